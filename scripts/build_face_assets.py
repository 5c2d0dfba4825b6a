"""Derive lmdiff's two landmark assets from a folder of real frontal face photos.

1. `mean_face_mediapipe478.npy`: the canonical mean face [478, 3], by generalised Procrustes analysis (3D similarity)
   of MediaPipe landmarks, turned frontal (eye line along +x, forehead-to-chin along +y, depth +z away from the
   camera) and placed in a virtual 512x512 frontal frame (outer-eye-corner distance 150 px, eye midpoint at (256, 220)).
2. `ibug68_from_mediapipe478.json`: for each of the 68 iBUG points, the MediaPipe vertex or blend of two vertices
   that best matches dlib's 68-point fit, fitted on half the photos and reported on the other half.

Usage: python scripts/build_face_assets.py PHOTO_DIR [PHOTO_DIR ...] --mediapipe-model face_landmarker.task
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lmdiff_core.canonical import CANONICAL_EYE_MID, CANONICAL_INTER_OCULAR, umeyama
from lmdiff_core.detectors import load_landmarker, select_face
from lmdiff_core.media import read_image
from lmdiff_core.topology import IBUG68, MEDIAPIPE478

ASSETS = Path(__file__).resolve().parents[1] / "lmdiff_core" / "assets"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def detect_pairs(folders, model):
    """(mediapipe [478,3], dlib [68,3]) for every photo where both find a face."""
    files = sorted(p for d in folders for p in Path(d).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    mp = load_landmarker("mediapipe", model, video=False, num_faces=1)
    dl = load_landmarker("dlib")
    pairs = []
    for path in tqdm(files, desc="detecting"):
        image = read_image(path)
        a, b = select_face(mp.detect(image)), select_face(dl.detect(image))
        if a is not None and b is not None:
            pairs.append((a.points, b.points, path.name))
    mp.close()
    return pairs


def mean_shape(shapes: np.ndarray, iterations: int = 10) -> np.ndarray:
    """Generalised Procrustes mean of shapes [S, N, 3] under 3D similarity transforms."""
    mean = shapes[0] - shapes[0].mean(0)
    for _ in range(iterations):
        s, r, t = umeyama(shapes, mean[None].repeat(len(shapes), 0))
        aligned = s[:, None, None] * shapes @ r.transpose(0, 2, 1) + t[:, None]
        mean = aligned.mean(0)
        mean = (mean - mean.mean(0)) / np.sqrt(((mean - mean.mean(0)) ** 2).sum())
    return mean


def frontalize(mean: np.ndarray) -> np.ndarray:
    """Rotate and place the mean face in the canonical 512x512 frontal frame."""
    right_eye, left_eye = MEDIAPIPE478.outer_eye_corners
    x_axis = mean[left_eye] - mean[right_eye]  # image x grows from the subject's right eye to the left eye
    x_axis /= np.linalg.norm(x_axis)
    y_axis = mean[152] - mean[10]  # forehead to chin: image y grows downwards
    y_axis -= x_axis * (y_axis @ x_axis)
    y_axis /= np.linalg.norm(y_axis)
    z_axis = np.cross(x_axis, y_axis)  # right-handed: depth grows away from the camera
    face = mean @ np.stack([x_axis, y_axis, z_axis], axis=1)
    scale = CANONICAL_INTER_OCULAR / np.linalg.norm(face[left_eye, :2] - face[right_eye, :2])
    face = face * scale
    eye_mid = (face[left_eye] + face[right_eye]) / 2
    face[:, :2] += np.asarray(CANONICAL_EYE_MID) - eye_mid[:2]
    face[:, 2] -= face[:, 2].mean()
    return face


def fit_map(mp_pts: np.ndarray, dl_pts: np.ndarray, candidates: int = 8):
    """Per iBUG point: (a, b, w) minimising mean |w p_a + (1 - w) p_b - q| / IOD over the photos (2D)."""
    iod = IBUG68.inter_ocular(dl_pts)[:, None]
    mp2, dl2 = mp_pts[..., :2] / iod[..., None], dl_pts[..., :2] / iod[..., None]
    table = []
    for j in range(68):
        err = np.linalg.norm(mp2 - dl2[:, j : j + 1], axis=-1).mean(0)
        near = np.argsort(err)[:candidates]
        best = (err[near[0]], int(near[0]), int(near[0]), 1.0)
        for ia, a in enumerate(near):
            for b in near[ia + 1 :]:
                d = mp2[:, a] - mp2[:, b]
                w = np.clip(((dl2[:, j] - mp2[:, b]) * d).sum() / max((d * d).sum(), 1e-12), 0.0, 1.0)
                e = np.linalg.norm(w * mp2[:, a] + (1 - w) * mp2[:, b] - dl2[:, j], axis=-1).mean()
                if e < best[0]:
                    best = (e, int(a), int(b), float(w))
        table.append(best[1:])
    return table


def map_error(table, mp_pts, dl_pts) -> np.ndarray:
    """Per-photo mean normalised error of the mapped points against dlib."""
    a, b, w = (np.array(c) for c in zip(*table))
    mapped = mp_pts[:, a, :2] * w[:, None] + mp_pts[:, b, :2] * (1 - w[:, None])
    return np.linalg.norm(mapped - dl_pts[..., :2], axis=-1).mean(1) / IBUG68.inter_ocular(dl_pts)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--mediapipe-model", required=True)
    args = parser.parse_args()
    pairs = detect_pairs(args.folders, args.mediapipe_model)
    mp_pts = np.stack([p[0] for p in pairs]).astype(np.float64)
    dl_pts = np.stack([p[1] for p in pairs]).astype(np.float64)
    print(f"{len(pairs)} photos with a face found by both detectors")

    ASSETS.mkdir(exist_ok=True)
    mean = frontalize(mean_shape(mp_pts))
    np.save(ASSETS / "mean_face_mediapipe478.npy", mean.astype(np.float32))

    fit, held = np.arange(len(pairs)) % 2 == 0, np.arange(len(pairs)) % 2 == 1
    table = fit_map(mp_pts[fit], dl_pts[fit])
    held_err = map_error(table, mp_pts[held], dl_pts[held])
    table = fit_map(mp_pts, dl_pts)
    doc = {
        "description": "iBUG-68 point j = w * mediapipe[a] + (1 - w) * mediapipe[b]; rows are [a, b, w] for j = 0..67",
        "derived_by": "scripts/build_face_assets.py: least-squares fit to dlib's 68-point predictor on real frontal photos",
        "photos": len(pairs),
        "held_out_mean_error_iod": float(held_err.mean()),
        "held_out_p95_error_iod": float(np.percentile(held_err, 95)),
        "map": [[a, b, round(w, 4)] for a, b, w in table],
    }
    (ASSETS / "ibug68_from_mediapipe478.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"map held-out error: mean {held_err.mean():.4f}, p95 {np.percentile(held_err, 95):.4f} (inter-ocular units)")


if __name__ == "__main__":
    main()
