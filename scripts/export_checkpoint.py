"""Copy a trained checkpoint into the repository's bundled folder, optionally with half-precision weights (they are
loaded back at the precision asked for). Usage: python scripts/export_checkpoint.py {a2l,l2v} RUN/final DEST [--half]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from lmdiff_core.pipelines.a2l import AudioToLandmarksPipeline
from lmdiff_core.pipelines.l2v import LandmarkToVideoPipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stage", choices=("a2l", "l2v"))
    parser.add_argument("source", type=Path)
    parser.add_argument("dest", type=Path)
    parser.add_argument("--half", action="store_true", help="store the weights as float16")
    args = parser.parse_args()
    card = args.dest / "README.md"
    kept = card.read_text() if card.is_file() else None
    dtype = torch.float16 if args.half else torch.float32
    if args.stage == "a2l":
        pipeline = AudioToLandmarksPipeline.from_pretrained(args.source, dtype=dtype)
    else:
        pipeline = LandmarkToVideoPipeline.from_pretrained(args.source, dtype=dtype)
    if args.dest.exists():
        shutil.rmtree(args.dest)
    pipeline.save_pretrained(args.dest)
    for config in args.dest.rglob("config.json"):  # where the run happened to live says nothing about the model
        values = json.loads(config.read_text())
        values.pop("_name_or_path", None)
        config.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    if kept is not None:
        card.write_text(kept)
    size = sum(f.stat().st_size for f in args.dest.rglob("*") if f.is_file())
    print(f"{args.dest}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
