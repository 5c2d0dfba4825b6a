#!/usr/bin/env bash
# Rebuild the bundled checkpoints (checkpoints/a2l, checkpoints/a2l_diffusion, checkpoints/l2v, checkpoints/refiner)
# from the dev clips.
# Usage: bash scripts/train_default_checkpoints.sh SHARED_DIR WORK_DIR
#   SHARED_DIR: the development media folder (data/clips, data/clips_more/av, weights/mediapipe_face_landmarker)
#   WORK_DIR:   scratch space for the dataset and the runs (about 0.5 GB; the refiner's pair cache adds 7.5 GB)
set -euo pipefail
shared=$(realpath "$1"); work=$(realpath -m "$2")
repo=$(cd "$(dirname "$0")/.." && pwd)
py="$repo/.venv/bin/python"
mkdir -p "$work"
# Held out: 3 people never trained on. pcavs_741400163 shows the person of pcavs_741400104 (dlib face descriptors
# 0.37 apart; other people here are 0.70-0.91 apart), so it is left out altogether.
held_out=(pcavs_00086 pcavs_620900105 pcavs_741400104)
mapfile -t clips < <(ls "$shared"/data/clips/*.mp4 "$shared"/data/clips_more/av/*.mp4 | grep -v pcavs_741400163)
"$repo/.venv/bin/lmdiff" prepare "${clips[@]}" -o "$work/dataset" --crop-size 128 --val-fraction 0 \
    --val-clips "${held_out[@]}" --model "$shared/weights/mediapipe_face_landmarker/face_landmarker_v2_with_blendshapes.task"
# The bundled A2L models read Whisper-base features (the lmdiff[speech] extra), computed from the clips' stored audio.
"$py" -c "import sys; from lmdiff_core.data.prepare import refeature_dataset; refeature_dataset(*sys.argv[1:], 'whisper-base')" \
    "$work/dataset" "$work/dataset_whisper"
cd "$repo/training"
"$py" train_a2l.py --config configs/a2l_lstm_whisper_cpu.yaml --data "$work/dataset_whisper" --out "$work/a2l"
"$py" train_a2l.py --config configs/a2l_diffusion_whisper_cpu.yaml --data "$work/dataset_whisper" --out "$work/a2l_diffusion"
"$py" train_l2v.py --config configs/l2v_default_cpu.yaml --data "$work/dataset" --out "$work/l2v"
"$py" train_refiner.py --config configs/refiner_default_cpu.yaml --shared "$shared" --cache "$work/refiner_cache" \
    --out "$work/refiner"
"$py" "$repo/scripts/export_checkpoint.py" a2l "$work/a2l/final" "$repo/checkpoints/a2l"
"$py" "$repo/scripts/export_checkpoint.py" a2l "$work/a2l_diffusion/final" "$repo/checkpoints/a2l_diffusion" --half
"$py" "$repo/scripts/export_checkpoint.py" l2v "$work/l2v/final" "$repo/checkpoints/l2v" --half
"$py" "$repo/scripts/export_checkpoint.py" l2v "$work/refiner/best" "$repo/checkpoints/refiner" --half
