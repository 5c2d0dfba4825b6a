#!/usr/bin/env bash
# Creates .venv (or the folder named by LMDIFF_VENV) and installs lmdiff with its test, dlib and speech (Whisper-base)
# extras.
# On a machine without an NVIDIA GPU torch is held to the CPU build through constraints-cpu.txt,
# so pip never pulls the multi-GB CUDA wheels.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${LMDIFF_VENV:-$here/.venv}
python=${PYTHON:-python3}

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
if ! command -v nvidia-smi >/dev/null 2>&1; then
    export PIP_CONSTRAINT="$here/constraints-cpu.txt"
fi
"$venv/bin/python" -c "import torch" 2>/dev/null || "${pip[@]}" install "torch==2.13.0"
"${pip[@]}" install -e "$here[dev,dlib,speech]"
# mediapipe brings the GUI build of OpenCV; swap it for the headless one (same cv2 modules, no libGL).
if "${pip[@]}" show opencv-contrib-python >/dev/null 2>&1; then
    "${pip[@]}" uninstall -y opencv-contrib-python opencv-python
    "${pip[@]}" install --no-deps --force-reinstall opencv-contrib-python-headless
fi
echo "lmdiff installed in $venv"
