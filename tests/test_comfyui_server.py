"""Opt-in: the pack inside a real ComfyUI server, driven through its HTTP API.

Runs when LMDIFF_COMFYUI_DIR points to a ComfyUI checkout and LMDIFF_COMFYUI_PYTHON to a Python that runs it, set
up as the README says (this repository cloned into custom_nodes/lmdiff, `pip install -r requirements.txt`). The test
links this pack into the checkout's custom_nodes (unless it is there already), starts `main.py --cpu --listen
127.0.0.1` on a free port with temporary input, output and temp folders and the tiny test checkpoints as extra model
paths (no MediaPipe model: the default landmarker must work without one), uploads the inputs, POSTs every API
workflow as shipped (bundled checkpoints, its own step counts) to /prompt, polls /history, checks the saved outputs,
sends bad inputs (with the tiny checkpoints), and stops the server by its PID. Workflows whose nodes the server lacks
(VideoHelperSuite, comfyui_controlnet_aux) are skipped by name. The seconds each workflow took are printed.
"""

import json
import math
import os
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
from .conftest import shared_path

COMFYUI_DIR = os.environ.get("LMDIFF_COMFYUI_DIR")
COMFYUI_PYTHON = os.environ.get("LMDIFF_COMFYUI_PYTHON")
WORKFLOWS = PACK_ROOT / "example_workflows" / "api"
TINY = {"LmdiffLoadA2LModel": "tiny_a2l", "LmdiffLoadL2VModel": "tiny_l2v"}
START_SECONDS, RUN_SECONDS = 240, 1500

pytestmark = pytest.mark.skipif(
    not (COMFYUI_DIR and COMFYUI_PYTHON),
    reason="opt-in: set LMDIFF_COMFYUI_DIR (a ComfyUI checkout) and LMDIFF_COMFYUI_PYTHON (its Python)",
)


class Server:
    """A ComfyUI server process started by this test, and its HTTP API."""

    def __init__(self, base: Path, log: Path):
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
            COMFYUI_PYTHON, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--input-directory", str(base / "input"), "--output-directory", str(base / "output"),
            "--temp-directory", str(base / "temp"), "--extra-model-paths-config", str(paths),
            "--disable-auto-launch",
        ]  # fmt: skip
        (base / "temp").mkdir()
        with open(log, "wb") as out:
            self.process = subprocess.Popen(command, cwd=COMFYUI_DIR, stdout=out, stderr=subprocess.STDOUT)

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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfyui")
    prepare_base(base, shared_path, mediapipe=False)
    custom_nodes = Path(COMFYUI_DIR) / "custom_nodes"
    linked = None
    if not any(entry.resolve() == PACK_ROOT for entry in custom_nodes.iterdir()):
        linked = custom_nodes / f"lmdiff_under_test_{os.getpid()}"
        linked.symlink_to(PACK_ROOT, target_is_directory=True)
    comfy = Server(base, base / "comfyui.log")
    try:
        comfy.wait_ready()
        for key in ("portrait", "speech", "video"):
            assert comfy.upload(base / "input" / INPUTS[key])["name"] == INPUTS[key]
        yield comfy
    finally:
        comfy.stop()
        if linked is not None:
            linked.unlink()


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

    graph = workflow(name, tiny=False)
    available = server.get("/object_info")
    missing = sorted({node["class_type"] for node in graph.values()} - available.keys())
    if missing:
        pytest.skip(f"this ComfyUI lacks the nodes {missing} (install their packs to run {name})")
    started = time.monotonic()
    entry = server.run(graph)
    print(f"{name}: {entry.get('status', {}).get('status_str')} in {time.monotonic() - started:.1f} s")
    assert entry.get("status", {}).get("status_str") == "success", (entry, server.log_tail())
    n = math.ceil(round(SPEECH_SECONDS * 25, 9))
    files = saved_files(server, entry)
    videos = [f for f in files if f.suffix == ".mp4"]
    assert len(videos) == 1 and videos[0].name.startswith("lmdiff")
    assert read_video(videos[0], fps=None).frames.shape[0] == n
    for keypoints in (f for f in server.base.joinpath("output").rglob("lmdiff*.json")):
        assert len(json.loads(keypoints.read_text())) == n


def test_bad_inputs_fail_with_one_clear_message_and_the_next_prompt_runs(server, tmp_path):
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
