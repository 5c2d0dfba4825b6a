"""Opt-in: the pack inside a real ComfyUI server, installed the way a user installs it, driven through its HTTP API.

Runs when LMDIFF_COMFYUI_DIR points to a ComfyUI source checkout (it is copied, never changed). For each install route
(LMDIFF_COMFYUI_ROUTES, default "readme,pip,manager"; see tests/comfy_install.py) the test makes a fresh ComfyUI with a
new venv in a temporary folder and installs the pack: the README's steps literally (git clone into custom_nodes/lmdiff
+ `pip install -r requirements.txt`), pip, or ComfyUI-Manager's cm-cli (LMDIFF_COMFYUI_MANAGER: a ComfyUI-Manager
checkout). LMDIFF_COMFYUI_PACKS lists (os.pathsep-separated) checkouts of the other packs the workflows need
(VideoHelperSuite, comfyui_controlnet_aux); a workflow whose nodes the server lacks is skipped by name.

Each server is `main.py --cpu --listen 127.0.0.1` on a free port with temporary input, output and temp folders and
the tiny test checkpoints as extra model paths (no MediaPipe model: the default landmarker must work without one).
On the README route every API workflow runs as shipped (bundled checkpoints, its own step counts) and the bad inputs
are sent; on the other routes every workflow runs with the tiny checkpoints and 2 steps (the same nodes, quickly).
The server is stopped by its PID. LMDIFF_COMFYUI_RESULTS names a JSON file for the routes, install steps and
per-workflow seconds.
"""

import json
import math
import os
import platform
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

from .comfy_harness import INPUTS, PACK_ROOT, SPEECH_SECONDS, prepare_base
from .comfy_install import HOW, ROUTES, WORKAROUND, fresh_install
from .conftest import shared_path

COMFYUI_SOURCE = os.environ.get("LMDIFF_COMFYUI_DIR")
SELECTED_ROUTES = [r for r in os.environ.get("LMDIFF_COMFYUI_ROUTES", ",".join(ROUTES)).split(",") if r]
OTHER_PACKS = [Path(p) for p in os.environ.get("LMDIFF_COMFYUI_PACKS", "").split(os.pathsep) if p]
MANAGER = Path(os.environ["LMDIFF_COMFYUI_MANAGER"]) if os.environ.get("LMDIFF_COMFYUI_MANAGER") else None
RESULTS_FILE = os.environ.get("LMDIFF_COMFYUI_RESULTS")
WORKFLOWS = PACK_ROOT / "example_workflows" / "api"
TINY = {"LmdiffLoadA2LModel": "tiny_a2l", "LmdiffLoadL2VModel": "tiny_l2v"}
START_SECONDS, RUN_SECONDS = 240, 1500
RESULTS: dict = {"machine_workaround": WORKAROUND, "routes": {}}

pytestmark = pytest.mark.skipif(
    not COMFYUI_SOURCE, reason="opt-in: set LMDIFF_COMFYUI_DIR (a ComfyUI source checkout, copied for each install)"
)


class Server:
    """A ComfyUI server process started by this test, and its HTTP API."""

    def __init__(self, base: Path, log: Path, comfyui: Path, python: Path):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.base, self.log = base, log
        paths = base / "extra_model_paths.yaml"
        paths.write_text(
            "lmdiff_test:\n"
            f"    base_path: {base / 'models'}\n"
            "    lmdiff_a2l: lmdiff/a2l\n    lmdiff_l2v: lmdiff/l2v\n    lmdiff_landmarker: lmdiff/landmarker\n"
            "    vae_approx: vae_approx\n"
        )
        command = [
            str(python), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--input-directory", str(base / "input"), "--output-directory", str(base / "output"),
            "--temp-directory", str(base / "temp"), "--extra-model-paths-config", str(paths),
            "--disable-auto-launch",
        ]  # fmt: skip
        (base / "temp").mkdir()
        with open(log, "wb") as out:
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only what the venv holds
            self.process = subprocess.Popen(command, cwd=comfyui, stdout=out, stderr=subprocess.STDOUT, env=env)

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"ComfyUI exited with code {self.process.returncode}:\n{self.log_tail()}")
            try:
                self.get("/system_stats")
                return
            except OSError:
                time.sleep(1.0)
        pytest.fail(f"ComfyUI did not answer within {START_SECONDS} s:\n{self.log_tail()}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post(self, path: str, payload: dict) -> tuple[int, dict]:
        request = urllib.request.Request(
            self.url + path, json.dumps(payload).encode(), {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def upload(self, path: Path) -> dict:
        """POST /upload/image (images, audio and video all go there) as multipart form data."""
        boundary = uuid.uuid4().hex
        body = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{path.name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        body += path.read_bytes()
        body += f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="overwrite"\r\n\r\ntrue\r\n--{boundary}--\r\n'.encode()
        request = urllib.request.Request(
            self.url + "/upload/image", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    def run(self, graph: dict) -> dict:
        """Queue an API graph and wait for its history entry (the server's answer when it is refused)."""
        status, answer = self.post("/prompt", {"prompt": graph, "client_id": uuid.uuid4().hex})
        if status != 200:
            return {"refused": status, **answer}
        prompt_id = answer["prompt_id"]
        deadline = time.monotonic() + RUN_SECONDS
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                if entry["status"]["status_str"] in ("success", "error"):
                    return entry
            if self.process.poll() is not None:
                pytest.fail(f"ComfyUI died while running a prompt:\n{self.log_tail()}")
            time.sleep(0.5)
        pytest.fail(f"prompt {prompt_id} did not finish within {RUN_SECONDS} s:\n{self.log_tail()}")


def save_results() -> None:
    """Write what the routes did so far to LMDIFF_COMFYUI_RESULTS (when set)."""
    if not (RESULTS_FILE and RESULTS["routes"]):
        return
    source = Path(COMFYUI_SOURCE)
    commit = subprocess.run(["git", "-C", source, "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    version = (source / "comfyui_version.py").read_text().split("=")[-1].strip().strip('"')
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "")
    RESULTS.update(machine=f"{platform.machine()} {model}".strip(), cpus=os.cpu_count(),
                   torch_threads=os.environ.get("OMP_NUM_THREADS", "unset"),
                   comfyui={"version": version, "commit": commit.strip() or None})  # fmt: skip
    Path(RESULTS_FILE).write_text(json.dumps(RESULTS, indent=2) + "\n")


@pytest.fixture(scope="module", params=SELECTED_ROUTES)
def server(request, tmp_path_factory):
    route = request.param
    base = tmp_path_factory.mktemp(f"comfyui_{route}")
    record = RESULTS["routes"].setdefault(route, {"how": HOW[route], "install": "failed (see the test's output)"})
    save_results()
    installed = fresh_install(route, Path(COMFYUI_SOURCE), base / "install", OTHER_PACKS, MANAGER)
    record["install"] = "done"
    record.update(pack_commit=installed.pack_commit, other_packs=installed.other_packs, notes=installed.notes,
                  install_steps=installed.steps, workflows={})  # fmt: skip
    record["install_seconds"] = round(sum(step["seconds"] for step in installed.steps), 1)
    prepare_base(base, shared_path, mediapipe=False)
    comfy = Server(base, base / "comfyui.log", installed.comfyui, installed.python)
    comfy.route = route
    try:
        comfy.wait_ready()
        for key in ("portrait", "speech", "video"):
            assert comfy.upload(base / "input" / INPUTS[key])["name"] == INPUTS[key]
        yield comfy
    finally:
        comfy.stop()
        save_results()


def workflow(name: str, tiny: bool = True, **changes) -> dict:
    """An API workflow, with the tiny checkpoints and 2 sampling steps unless not `tiny`, and `changes`
    {class_type: {input: value}}."""
    graph = json.loads((WORKFLOWS / f"{name}.json").read_text())
    for node in graph.values():
        if tiny and node["class_type"] in TINY:
            node["inputs"]["model"] = TINY[node["class_type"]]
        if tiny and "steps" in node["inputs"]:
            node["inputs"]["steps"] = 2
        node["inputs"].update(changes.get(node["class_type"], {}))
    return graph


def saved_files(server: Server, entry: dict) -> list[Path]:
    files = []
    for output in entry["outputs"].values():
        for item in output.get("images", []) + output.get("gifs", []):
            files.append(server.base / "output" / item.get("subfolder", "") / item["filename"])
    return files


def execution_error(entry: dict) -> tuple[str, str]:
    """(node type, message) of a prompt that failed while running; the pack's errors show their short type name."""
    for kind, details in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            if details["node_type"].startswith("Lmdiff"):
                assert details["exception_type"] == "LmdiffInputError", details
            return details["node_type"], details["exception_message"].strip()
    raise AssertionError(f"the prompt did not fail while running: {entry}")


def test_the_pack_loads_in_the_server(server):
    info = server.get("/object_info/LmdiffTalkingHead")["LmdiffTalkingHead"]
    assert info["display_name"] == "Talking Head (lmdiff)" and info["output"] == ["IMAGE", "AUDIO", "FLOAT"]
    assert server.get("/object_info/LmdiffLoadA2LModel")["LmdiffLoadA2LModel"]["input"]["required"]["model"][0]


@pytest.mark.parametrize("name", sorted(p.stem for p in WORKFLOWS.glob("*.json")))
def test_api_workflow_runs_in_the_server(server, name):
    from lmdiff_core.media import read_video

    as_shipped = server.route == "readme"
    graph = workflow(name, tiny=not as_shipped)
    available = server.get("/object_info")
    missing = sorted({node["class_type"] for node in graph.values()} - available.keys())
    record = RESULTS["routes"][server.route]["workflows"]
    if missing:
        record[name] = {"status": f"skipped: the server lacks {missing}"}
        pytest.skip(f"this ComfyUI lacks the nodes {missing} (install their packs to run {name})")
    started = time.monotonic()
    entry = server.run(graph)
    status, seconds = entry.get("status", {}).get("status_str"), round(time.monotonic() - started, 1)
    record[name] = {"status": status, "seconds": seconds, "checkpoints": "bundled" if as_shipped else "tiny, 2 steps"}
    print(f"{server.route}: {name}: {status} in {seconds} s")
    assert status == "success", (entry, server.log_tail())
    n = math.ceil(round(SPEECH_SECONDS * 25, 9))
    files = saved_files(server, entry)
    videos = [f for f in files if f.suffix == ".mp4"]
    assert len(videos) == 1 and videos[0].name.startswith("lmdiff")
    assert read_video(videos[0], fps=None).frames.shape[0] == n
    for keypoints in (f for f in server.base.joinpath("output").rglob("lmdiff*.json")):
        assert len(json.loads(keypoints.read_text())) == n
    record[name]["checked"] = f"one mp4 of {n} frames"
    save_results()


def test_bad_inputs_fail_with_one_clear_message_and_the_next_prompt_runs(server, tmp_path):
    if server.route != "readme":
        pytest.skip("the bad inputs are sent on the README route")
    import soundfile
    from PIL import Image

    silence, blank = tmp_path / "lmdiff_silence.wav", tmp_path / "lmdiff_blank.png"
    soundfile.write(silence, np.zeros(0, np.float32), 16000)
    Image.fromarray(np.full((256, 256, 3), 128, np.uint8)).save(blank)
    for path in (silence, blank):
        server.upload(path)
    name = "lmdiff_portrait_talking_head"
    cases = [
        ({"LoadAudio": {"audio": silence.name}}, "empty"),
        ({"LoadImage": {"image": blank.name}}, "no face"),
        ({"LmdiffLoadL2VModel": {"autoencoder": "taesd_decoder.safetensors"}}, "does not match"),
    ]
    for seed, (changes, words) in enumerate(cases, start=1):
        node_type, message = execution_error(server.run(workflow(name, **changes)))
        if node_type.startswith("Lmdiff"):  # (ComfyUI's own LoadAudio may refuse an empty file first)
            assert words in message.lower() and "\n" not in message, message
        good = server.run(workflow(name, LmdiffTalkingHead={"seed": seed}))  # a new seed: the prompt really runs
        assert good["status"]["status_str"] == "success", good["status"]
    refused = server.run(workflow(name, LmdiffLoadA2LModel={"model": "../a2l/tiny_a2l"}))
    assert refused.get("refused") == 400 or "refused" in execution_error(refused)[1]  # not in the list, or ours
    assert server.run(workflow(name, LmdiffTalkingHead={"seed": 99}))["status"]["status_str"] == "success"
    RESULTS["routes"][server.route]["bad_inputs"] = "passed: one-line LmdiffInputError each, the next prompt ran"
