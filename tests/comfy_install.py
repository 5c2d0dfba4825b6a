"""A fresh ComfyUI with this pack, installed the way a user installs it, for the opt-in real-server test.

`fresh_install(route, ...)` copies a ComfyUI source checkout into a new folder (no custom node packs), makes a new
venv beside it with the Python running the tests, installs ComfyUI's requirements, then the pack by one route:

- "readme": the README's steps, literally: `git clone <this repository> custom_nodes/lmdiff`, then
  `python -m pip install -r custom_nodes/lmdiff/requirements.txt`;
- "pip": lmdiff pip-installed into ComfyUI's venv (`pip install "<clone>[dlib,speech]"`, not editable) next to the
  pack folder. ComfyUI loads node packs only from its custom_nodes folders (nodes.py `init_external_custom_nodes`
  lists `folder_paths.get_folder_paths("custom_nodes")`), so pip alone cannot register a pack: this route checks
  that the pack still runs its own core with another lmdiff_core importable, on the pip package's dependencies;
- "manager": ComfyUI-Manager (a checkout given to the test, installed as its README says: cloned into custom_nodes,
  `pip install -r requirements.txt`) installs the pack with `cm-cli.py install <git url>`: a git clone plus one
  `pip install` (`uv pip install`) per requirements.txt line. The URL is this repository served over git's plain
  HTTP protocol on 127.0.0.1 (the Manager takes http(s) URLs only).

Other packs the example workflows need (VideoHelperSuite, comfyui_controlnet_aux) are copied into custom_nodes from
checkouts given to the test and their requirements installed, as their READMEs say.

MACHINE WORKAROUND (this test machine only, see `torch_family_workaround`): the CPU-only test machine reaches only
PyPI, where torch is a CUDA build of a newer version and torchaudio / torchvision are CUDA builds whose compiled parts
do not load with the CPU torch (no torchaudio 2.13 exists; torchvision 0.28's Python code then fails at import, and
ComfyUI imports torchvision at startup). So the torch, torchvision and torchaudio lines are left out of ComfyUI's and
the other packs' requirements files; torch is the local CPU wheel pinned by the project's constraints-cpu.txt
(PIP_CONSTRAINT and UV_CONSTRAINT, for every install); after all installs, torchaudio 2.11.1 is installed without
dependencies and with its CUDA-linked extension removed (it then runs its pure-PyTorch code; ComfyUI uses its
`functional.resample`), and torchvision 0.16.2 without dependencies (the last release that imports without its
compiled operators; ComfyUI uses its Python transforms only). lmdiff's own requirements.txt is installed as written.
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest

from .comfy_harness import PACK_ROOT

ROUTES = ("readme", "pip", "manager")
HOW = {
    "readme": "git clone <this repository> custom_nodes/lmdiff; pip install -r custom_nodes/lmdiff/requirements.txt",
    "pip": "git clone <this repository> custom_nodes/lmdiff; pip install 'custom_nodes/lmdiff[dlib,speech]' (lmdiff "
    "in site-packages too; ComfyUI loads packs only from custom_nodes folders)",
    "manager": "ComfyUI-Manager cloned into custom_nodes + its requirements.txt; cm-cli.py install <git url of this "
    "repository, served on 127.0.0.1>",
}
WORKAROUND = (
    "this machine only: torch/torchvision/torchaudio lines left out of ComfyUI's and the other packs' requirements; "
    "torch==2.13.0 local CPU wheel via constraints-cpu.txt; torchaudio 2.11.1 --no-deps without its CUDA-linked "
    "extension; torchvision 0.16.2 --no-deps"
)
TORCH_FAMILY = re.compile(r"^\s*(torch|torchvision|torchaudio)\s*([<>=!~;#].*)?$")
TORCHAUDIO = "torchaudio==2.11.1"  # the newest torchaudio on PyPI; none is built for torch 2.13
TORCHVISION = "torchvision==0.16.2"  # imports without its compiled operators (0.17+ does not)
STEP_SECONDS = 1800


@dataclass
class Installed:
    """A ComfyUI folder, the venv Python that runs it, and the install steps taken (command, seconds)."""

    route: str
    comfyui: Path
    python: Path
    log: Path
    steps: list = field(default_factory=list)
    pack_commit: str = ""
    other_packs: dict = field(default_factory=dict)  # name -> commit of the checkout copied
    notes: list = field(default_factory=list)

    def shown(self, command: list) -> str:
        """`command` as the results show it: the temporary folder as <base>, this repository as <this repository>."""
        text = " ".join(map(str, command))
        return text.replace(str(self.log.parent), "<base>").replace(str(PACK_ROOT), "<this repository>")

    def run(self, step: str, command: list, cwd: Path | None = None, check: bool = True) -> str:
        """Run one install step; fail the test with the end of its output when it fails (when `check`)."""
        env = dict(os.environ, PIP_CONSTRAINT=str(PACK_ROOT / "constraints-cpu.txt"))
        env["UV_CONSTRAINT"] = env["PIP_CONSTRAINT"]
        env.pop("PYTHONPATH", None)  # the venv sees only what was installed into it
        started = time.monotonic()
        done = subprocess.run(
            [str(c) for c in command], cwd=cwd or self.comfyui, env=env, capture_output=True, text=True,
            timeout=STEP_SECONDS,
        )  # fmt: skip
        seconds = round(time.monotonic() - started, 1)
        output = done.stdout + done.stderr
        with open(self.log, "a") as log:
            log.write(f"\n$ {' '.join(map(str, command))}  # {step}, {seconds} s, exit {done.returncode}\n{output}")
        self.steps.append({"step": step, "command": self.shown(command), "seconds": seconds,
                           "exit": done.returncode})  # fmt: skip
        if check and done.returncode != 0:
            pytest.fail(f"install step '{step}' failed (exit {done.returncode}):\n{output[-4000:]}")
        return output

    def pip(self, step: str, *arguments) -> str:
        return self.run(step, [self.python, "-m", "pip", "install", *arguments])


def copy_checkout(source: Path, target: Path) -> None:
    """A checkout's files without its git folder (as `git clone` of it would give, for a source that is not ours)."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.pyc"), symlinks=True)


def fresh_comfyui(source: Path, base: Path, route: str) -> Installed:
    """ComfyUI copied from `source` with no custom node pack, and a new venv holding its requirements."""
    comfyui, venv = base / "ComfyUI", base / "venv"
    copy_checkout(source, comfyui)
    for entry in (comfyui / "custom_nodes").iterdir():
        if entry.is_dir() and entry.name != "__pycache__":
            shutil.rmtree(entry)
    installed = Installed(route, comfyui, venv / "bin" / "python", base / "install.log")
    installed.run("make a venv", [sys.executable, "-m", "venv", venv])
    installed.pip("pip up to date", "-U", "pip")
    installed.pip("torch (constraints-cpu.txt: the local CPU wheel)", "torch")
    requirements = without_torch_family(comfyui / "requirements.txt", base / "comfyui-requirements.txt")
    installed.pip("ComfyUI's requirements.txt (workaround: torch family out)", "-r", requirements)
    return installed


def without_torch_family(requirements: Path, target: Path) -> Path:
    """MACHINE WORKAROUND: `requirements` less its torch, torchvision and torchaudio lines (see the module doc)."""
    lines = requirements.read_text().splitlines()
    target.write_text("\n".join(line for line in lines if not TORCH_FAMILY.match(line)) + "\n")
    return target


def torch_family_workaround(installed: Installed) -> None:
    """MACHINE WORKAROUND: torchaudio without its CUDA-linked extension, torchvision 0.16.2 (see the module doc)."""
    installed.pip("workaround: torchvision without dependencies", "--no-deps", TORCHVISION)
    installed.pip("workaround: torchaudio without dependencies", "--no-deps", TORCHAUDIO)
    code = (
        "import pathlib, importlib.util as u; lib = pathlib.Path(u.find_spec('torchaudio').origin).parent / 'lib'\n"
        "for so in lib.glob('*.so'): so.unlink(); print('removed', so)\n"
        "import torch, torchvision, torchaudio.functional as F; assert F.resample(torch.zeros(1, 160), 16000, 44100).shape[-1] == 441"
    )
    installed.run("workaround: torchaudio's CUDA-linked extension removed", [installed.python, "-c", code])


def clone_pack(installed: Installed) -> Path:
    """`git clone <this repository> lmdiff` in custom_nodes (the committed state of the branch checked out here)."""
    folder = installed.comfyui / "custom_nodes" / "lmdiff"
    installed.run("git clone <this repository> lmdiff", ["git", "clone", "-q", PACK_ROOT, "lmdiff"], folder.parent)
    installed.pack_commit = git_commit(folder)
    return folder


def git_commit(folder: Path) -> str:
    return subprocess.run(["git", "-C", folder, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def install_other_pack(installed: Installed, checkout: Path) -> None:
    """Another node pack: copied into custom_nodes, its requirements installed (workaround: torch family out)."""
    target = installed.comfyui / "custom_nodes" / checkout.name
    copy_checkout(checkout, target)
    installed.other_packs[checkout.name] = git_commit(checkout)
    requirements = target / "requirements.txt"
    if requirements.is_file():
        filtered = without_torch_family(requirements, installed.log.parent / f"{checkout.name}-requirements.txt")
        installed.pip(f"{checkout.name}'s requirements.txt (workaround: torch family out)", "-r", filtered)


class GitHttpServer:
    """A bare clone of this repository served over git's plain ("dumb") HTTP protocol on 127.0.0.1."""

    def __init__(self, folder: Path):
        self.bare = folder / "lmdiff.git"
        subprocess.run(["git", "clone", "-q", "--bare", PACK_ROOT, self.bare], check=True)
        subprocess.run(["git", "-C", self.bare, "update-server-info"], check=True)
        handler = partial(QuietHandler, directory=str(folder))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/lmdiff.git"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def install_with_manager(installed: Installed, manager: Path) -> None:
    """ComfyUI-Manager as its README says, then `cm-cli.py install <url of this repository>`."""
    target = installed.comfyui / "custom_nodes" / "ComfyUI-Manager"
    copy_checkout(manager, target)
    installed.other_packs["ComfyUI-Manager"] = git_commit(manager)
    installed.pip("ComfyUI-Manager's requirements.txt", "-r", target / "requirements.txt")
    served = GitHttpServer(installed.log.parent)
    try:
        command = ["env", f"COMFYUI_PATH={installed.comfyui}", installed.python, target / "cm-cli.py", "install"]
        output = installed.run("cm-cli.py install <git url>", [*command, served.url])
    finally:
        served.close()
    assert "[INSTALLED]" in output and (installed.comfyui / "custom_nodes" / "lmdiff").is_dir(), output[-3000:]
    for line in output.splitlines():
        if "version is outdated" in line or "Cannot connect" in line or "network error" in line:
            installed.notes.append(f"cm-cli said: {line.strip()}")
    installed.pack_commit = git_commit(installed.comfyui / "custom_nodes" / "lmdiff")


def fresh_install(route: str, source: Path, base: Path, other_packs: list[Path], manager: Path | None) -> Installed:
    """A fresh ComfyUI (from the checkout `source`) in `base` with the pack installed by `route`."""
    installed = fresh_comfyui(source, base, route)
    if route == "readme":
        pack = clone_pack(installed)
        installed.pip("pip install -r lmdiff/requirements.txt (README)", "-r", pack / "requirements.txt")
    elif route == "pip":
        pack = clone_pack(installed)
        installed.pip("pip install <clone>[dlib,speech] (not editable)", f"{pack}[dlib,speech]")
    elif route == "manager":
        if manager is None:
            pytest.skip("the Manager route needs LMDIFF_COMFYUI_MANAGER (a ComfyUI-Manager checkout)")
        install_with_manager(installed, manager)
    else:
        raise ValueError(f"unknown install route {route!r}; expected one of {ROUTES}")
    for checkout in other_packs:
        install_other_pack(installed, checkout)
    torch_family_workaround(installed)
    installed.run("pip check (reported, not required)", [installed.python, "-m", "pip", "check"], check=False)
    return installed
