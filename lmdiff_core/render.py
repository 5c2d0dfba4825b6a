"""Render landmark sequences to ControlNet-style conditioning images, batched in torch (no OpenCV).

Conventions
-----------
* Output images are ComfyUI IMAGE layout: ``[T, H, W, 3]`` float32 RGB in 0..1, black background.
* Pixel coordinates: x to the right, y down; pixel ``(i, j)`` (column i, row j) covers ``[i, i+1) x [j, j+1)``, so its
  centre is at ``(i + 0.5, j + 0.5)``. A landmark at ``x = W`` lies on the right border. This is the convention of
  MediaPipe's normalised coordinates times the frame size, so `LandmarkSequence` points need no shift.
* ``size``: ``None`` keeps ``seq.frame_size``; an int ``s`` gives an ``s x s`` image; a pair is ``(W, H)`` like
  ``frame_size``. Points are scaled from ``frame_size`` to the output size, each axis independently
  (``x * W_out / W_in``, ``y * H_out / H_in``), so a square size for a non-square frame stretches the face.
* ``thickness`` is the full line width in output pixels. Nothing scales it implicitly (not the output size, not
  the face size): the caller decides.
* Lines are capsules (round caps and joins) of half-width ``thickness / 2`` around every polyline segment. With
  ``antialias=True`` a pixel's coverage is ``clamp(thickness/2 + 0.5 - d, 0, 1)`` where ``d`` is the exact distance
  from the pixel centre to the segment; with ``antialias=False`` a pixel is on when ``d <= thickness / 2``.
* Overlaps: each pixel takes the colour of the part with the highest coverage there, ties going to the part later
  in `PART_ORDER` (irises over eyes, eyes over the contour). Colours never mix.
* Frames with ``seq.valid == False`` render black (and leave frames untouched in `draw_landmarks_on_frames`).
  Non-finite points draw nothing; segments are clipped to the image, so far-away points cost nothing.

Method: every segment is cut into pieces of at most 0.5-2 px (chosen per line width) with one sample each; each
sample scatters (``amax``) into the few pixels around it an integer key ``coverage_level * 16 + part_rank`` computed
from the exact pixel-to-segment distance; a lookup table turns keys into colours. Work is proportional to the drawn
line length, never to pixels x segments, and all frames of a batch are drawn together (16 at a time in scratch
buffers that are reused, so memory stays flat for any sequence length).
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .atomic import atomic_write
from .errors import LmdiffInputError
from .landmarks import LandmarkSequence
from .topology import Topology, get_topology

__all__ = [
    "PART_ORDER",
    "PART_COLORS",
    "MESH_COLOR",
    "STYLES",
    "render_landmarks",
    "render_points",
    "iter_rendered_frames",
    "draw_landmarks_on_frames",
    "mesh_edges",
    "to_openpose_face",
    "save_openpose_json",
]

STYLES = ("parts", "mesh")

# Drawing order, lowest priority first (later parts win ties where lines overlap).
PART_ORDER = (
    "contour",
    "right_brow",
    "left_brow",
    "nose",
    "right_eye",
    "left_eye",
    "outer_lips",
    "inner_lips",
    "right_iris",
    "left_iris",
)

# Fixed 8-bit RGB colour per face part ("right"/"left" are the subject's). Chosen so that every pair differs by at
# least ~127 (of 255) in some channel and no colour is grey: the subject's right side is warm, the left side cool,
# each iris contrasts with its own eye outline. ibug68 has no irises; its other parts use the same colours.
PART_COLORS: dict[str, tuple[int, int, int]] = {
    "contour": (255, 255, 255),  # white
    "right_brow": (255, 128, 0),  # orange
    "left_brow": (0, 128, 255),  # azure
    "nose": (255, 255, 0),  # yellow
    "right_eye": (255, 0, 0),  # red
    "left_eye": (0, 0, 255),  # blue
    "outer_lips": (255, 0, 255),  # magenta
    "inner_lips": (0, 255, 0),  # green
    "right_iris": (0, 255, 255),  # cyan
    "left_iris": (255, 128, 128),  # pink
}

# Dim grey of the face tessellation in the "mesh" style (drawn under the parts).
MESH_COLOR: tuple[int, int, int] = (96, 96, 96)
DEFAULT_MESH_THICKNESS = 1.0

_LEVELS = 255  # coverage quantisation levels (8-bit like the output)
_RANK_BITS = 16  # key = level * 16 + rank; ranks 0..15
_CHUNK_ENTRIES = 1 << 19  # (sample, pixel) pairs processed at once: ~2 MB buffers that the allocator reuses
_CANVAS_FRAMES = 16  # frames rasterised together inside a batch (bounds the scratch images to ~35 MB at 512)


# ---------------------------------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------------------------------
def _check_style(style: str, topo: Topology) -> None:
    if style not in STYLES:
        raise LmdiffInputError(f"render style is {style!r}, expected one of {STYLES}")
    if style == "mesh" and topo.name != "mediapipe478":
        raise LmdiffInputError(
            f"render style 'mesh' needs mediapipe478 landmarks (a dense face mesh); {topo.name} has no mesh, "
            "use style='parts'"
        )


def _check_positive(value, name: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise LmdiffInputError(f"render {name} is {value!r}, expected a positive number of pixels") from None
    if not (math.isfinite(value) and value > 0):
        raise LmdiffInputError(f"render {name} is {value}, expected a positive number of pixels")
    return value


def _check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise LmdiffInputError(f"render batch_size is {batch_size!r}, expected a positive integer")
    return int(batch_size)


def _output_size(size, frame_size: tuple[int, int]) -> tuple[int, int]:
    """(W, H) of the output."""
    if size is None:
        w, h = frame_size
    elif isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        w = h = int(size)
    elif (
        isinstance(size, (tuple, list))
        and len(size) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in size)
    ):
        w, h = int(size[0]), int(size[1])
    else:
        raise LmdiffInputError(
            f"render size is {size!r}, expected None, a positive int or a (width, height) pair of ints"
        )
    if w <= 0 or h <= 0:
        raise LmdiffInputError(f"render size is {size!r}, expected positive width and height")
    return w, h


def _check_seq(seq) -> LandmarkSequence:
    if not isinstance(seq, LandmarkSequence):
        raise LmdiffInputError(f"expected a LandmarkSequence, got {type(seq).__name__}")
    if min(seq.frame_size) <= 0:
        raise LmdiffInputError(f"LandmarkSequence.frame_size is {seq.frame_size}, expected a positive (width, height)")
    return seq


# ---------------------------------------------------------------------------------------------------------------------
# edges and colours
# ---------------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _part_edges(topology: str) -> tuple[np.ndarray, np.ndarray]:
    """([S, 2] int64 point-index pairs, [S] int64 rank into PART_ORDER) of all part polylines."""
    topo = get_topology(topology)
    edges, ranks = [], []
    for rank, part in enumerate(PART_ORDER):
        for line in topo.parts.get(part, ()):
            idx = list(line.indices)
            pairs = list(zip(idx[:-1], idx[1:]))
            if line.closed and len(idx) > 2:
                pairs.append((idx[-1], idx[0]))
            if len(idx) == 1:
                pairs.append((idx[0], idx[0]))
            edges += pairs
            ranks += [rank] * len(pairs)
    unknown = set(topo.parts) - set(PART_ORDER)
    if unknown:  # a topology with a part we have no colour for is a programming error, not a user one
        raise RuntimeError(f"topology {topology} has parts without a render colour: {sorted(unknown)}")
    return np.asarray(edges, dtype=np.int64).reshape(-1, 2), np.asarray(ranks, dtype=np.int64)


@functools.lru_cache(maxsize=1)
def mesh_edges() -> np.ndarray:
    """[E, 2] int64 unique undirected edges of MediaPipe's 478-point face tessellation (from the mediapipe package)."""
    try:
        from mediapipe.tasks.python.vision import FaceLandmarksConnections
    except ImportError as exc:  # pragma: no cover - mediapipe is a hard dependency
        raise LmdiffInputError(f"render style 'mesh' needs the mediapipe package ({exc})") from None
    pairs = np.asarray([(c.start, c.end) for c in FaceLandmarksConnections.FACE_LANDMARKS_TESSELATION], dtype=np.int64)
    pairs = np.unique(np.sort(pairs, axis=1), axis=0)
    return pairs


@functools.lru_cache(maxsize=1)
def _luts_cpu() -> tuple[torch.Tensor, torch.Tensor]:
    """Key -> premultiplied RGB [L, 3] and key -> alpha [L] lookup tables (key = level * 16 + rank)."""
    colors = torch.zeros(_RANK_BITS, 3)
    for rank, part in enumerate(PART_ORDER):
        colors[rank] = torch.tensor(PART_COLORS[part], dtype=torch.float32) / 255.0
    alpha = torch.arange(_LEVELS + 1, dtype=torch.float32) / _LEVELS
    rgb = alpha[:, None, None] * colors[None]  # [levels, ranks, 3]
    return rgb.reshape(-1, 3).contiguous(), alpha.repeat_interleave(_RANK_BITS).contiguous()


@functools.lru_cache(maxsize=8)
def _luts(device: torch.device, mesh: bool) -> tuple[torch.Tensor, torch.Tensor]:
    rgb, alpha = _mesh_lut_cpu() if mesh else _luts_cpu()
    return rgb.to(device), alpha.to(device)


# ---------------------------------------------------------------------------------------------------------------------
# the rasteriser
# ---------------------------------------------------------------------------------------------------------------------
def _footprint_size(reach: float, spacing: float) -> list[tuple[int, int]]:
    limit = reach + spacing / 2
    n = int(math.ceil(limit + 0.5))
    out = []
    for dy in range(-n, n + 1):
        for dx in range(-n, n + 1):
            gx, gy = max(0.0, abs(dx) - 0.5), max(0.0, abs(dy) - 0.5)
            if gx * gx + gy * gy < limit * limit:
                out.append((dx, dy))
    return out


@functools.lru_cache(maxsize=64)
def _plan(reach: float) -> tuple[float, tuple[tuple[int, int], ...]]:
    """(sample spacing, pixel offsets) for lines of the given reach (half-width, + 0.5 px when anti-aliased).

    Each sample stands for <= spacing/2 of its segment on either side and lies anywhere in its pixel, so an offset
    (dx, dy) is needed when that pixel's centre can be nearer than reach + spacing/2 to the sample. The spacing is
    the one of {0.5, 1, 1.5, 2} px that needs the fewest (sample, pixel) pairs per px of line.
    """
    best = min((len(_footprint_size(reach, s)) / s, s) for s in (0.5, 1.0, 1.5, 2.0))
    spacing = best[1]
    return spacing, tuple(_footprint_size(reach, spacing))


def _clip_segments(p0: torch.Tensor, p1: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    """Liang-Barsky clip of segments p0->p1 [..., 2] to the box [lo, hi]; returns (q0, q1, keep)."""
    d = p1 - p0
    parallel = d == 0
    safe_d = torch.where(parallel, torch.ones_like(d), d)
    ta = (lo - p0) / safe_d
    tb = (hi - p0) / safe_d
    t_in = torch.minimum(ta, tb)
    t_out = torch.maximum(ta, tb)
    inside = (p0 >= lo) & (p0 <= hi)
    inf = torch.full_like(d, math.inf)
    t_in = torch.where(parallel, torch.where(inside, -inf, inf), t_in)
    t_out = torch.where(parallel, torch.where(inside, inf, -inf), t_out)
    t0 = t_in.amax(-1).clamp(min=0.0)
    t1 = t_out.amin(-1).clamp(max=1.0)
    keep = t0 <= t1
    q0 = p0 + t0[..., None] * d
    q1 = p0 + t1[..., None] * d
    return q0, q1, keep


class _Canvas:
    """Padded key images for a few frames, reused across batches so big buffers are touched once per call."""

    def __init__(self, frames: int, width: int, height: int, pad: int, device: torch.device):
        self.frames, self.width, self.height, self.pad, self.device = frames, width, height, pad, device
        self.pw, self.ph = width + 2 * pad, height + 2 * pad
        self.keys = torch.zeros(frames, self.ph, self.pw, dtype=torch.float32, device=device)
        self.index = torch.zeros(frames, height, width, dtype=torch.int32, device=device)
        self._aux: tuple[torch.Tensor, torch.Tensor] | None = None

    def aux(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Second key image and index buffer, for the mesh layer (made on first use)."""
        if self._aux is None:
            self._aux = (
                torch.zeros(self.frames, self.ph, self.pw, dtype=torch.float32, device=self.device),
                torch.zeros(self.frames, self.height, self.width, dtype=torch.int32, device=self.device),
            )
        return self._aux

    def crop(self, buf: torch.Tensor, b: int) -> torch.Tensor:
        p = self.pad
        return buf[:b, p : p + self.height, p : p + self.width]


def _rasterise(
    keys: torch.Tensor,
    pad: int,
    pts: torch.Tensor,
    frame_ok: torch.Tensor,
    edges: torch.Tensor,
    ranks: torch.Tensor,
    width: int,
    height: int,
    half_width: float,
    antialias: bool,
) -> None:
    """amax-draw the segments `edges` of every frame of pts [B, N, 2] (output pixels) into keys [>=B, H+2pad, W+2pad].

    A pixel's key is coverage_level (0..255) * 16 + rank (ranks [S] < 16); 0 where nothing is drawn.
    """
    device, dtype = pts.device, torch.float32
    b, s = pts.shape[0], edges.shape[0]
    if b == 0 or s == 0:
        return
    reach = half_width + (0.5 if antialias else 0.0)
    spacing, offsets = _plan(round(reach, 6))
    ph, pw = keys.shape[1], keys.shape[2]
    flat_keys = keys.view(-1)
    off = torch.tensor(offsets, dtype=torch.int64, device=device)
    n_off = off.shape[0]
    off_lin = off[:, 1] * pw + off[:, 0]  # [K]

    p0 = pts[:, edges[:, 0]]  # [B, S, 2]
    p1 = pts[:, edges[:, 1]]
    ok = frame_ok[:, None] & torch.isfinite(p0).all(-1) & torch.isfinite(p1).all(-1)
    p0 = torch.where(ok[..., None], p0, torch.zeros_like(p0))
    p1 = torch.where(ok[..., None], p1, torch.zeros_like(p1))
    margin = reach + 1.0  # beyond this a piece of segment cannot reach the image
    lo = torch.tensor([-margin, -margin], dtype=dtype, device=device)
    hi = torch.tensor([width + margin, height + margin], dtype=dtype, device=device)
    q0, q1, keep = _clip_segments(p0, p1, lo, hi)
    q0 = torch.maximum(torch.minimum(q0, hi), lo)  # float rounding of huge coordinates must not leave the box
    q1 = torch.maximum(torch.minimum(q1, hi), lo)
    ok = (ok & keep).reshape(-1)
    q0 = q0.reshape(-1, 2)
    d = q1.reshape(-1, 2) - q0
    length = d.norm(dim=-1)  # [B*S]
    # n samples at the centres of n equal pieces (each <= spacing long); a zero-length segment gets one (a dot)
    counts = torch.where(ok, torch.ceil(length / spacing).clamp(min=1).long(), torch.zeros_like(ok, dtype=torch.long))
    safe_len = torch.where(length > 0, length, torch.ones_like(length))
    unit = torch.where((length > 0)[:, None], d / safe_len[:, None], torch.tensor([1.0, 0.0], device=device))
    # per-segment table gathered once per sample: q0 (2), d (2), length, unit (2), rank, frame
    frame = torch.arange(b, device=device, dtype=dtype).repeat_interleave(s)
    table = torch.cat([q0, d, length[:, None], unit, ranks.to(dtype).repeat(b)[:, None], frame[:, None]], 1)

    csum = torch.cumsum(counts, 0)
    total = int(csum[-1])
    if total == 0:
        return
    per_chunk = max(1, _CHUNK_ENTRIES // n_off)
    bounds = [0]
    if total > per_chunk:
        cuts = torch.searchsorted(csum, torch.arange(per_chunk, total, per_chunk, device=device), right=True)
        bounds += sorted(set(int(c) for c in cuts.tolist()))
    bounds.append(counts.numel())
    ox = off[:, 0].to(dtype)[:, None]  # [K, 1]; entries are laid out [K, m] (long rows vectorise best)
    oy = off[:, 1].to(dtype)[:, None]
    off_lin = off_lin.view(-1, 1)

    for a, z in zip(bounds[:-1], bounds[1:]):
        if z <= a:
            continue
        cnt = counts[a:z]
        m = int(cnt.sum())
        if m == 0:
            continue
        start = (torch.cumsum(cnt, 0) - cnt).to(dtype)
        per = torch.cat([table[a:z], start[:, None], cnt.to(dtype)[:, None]], 1)
        per = torch.repeat_interleave(per, cnt, dim=0, output_size=m).t()  # [11, m]
        q0x, q0y, dx, dy, seg_len, ux, uy, rank, fr, st, n = per.unbind(0)
        t = (torch.arange(m, device=device, dtype=dtype) - st + 0.5) / n  # sample at the centre of its piece
        posx = torch.addcmul(q0x, t, dx)
        posy = torch.addcmul(q0y, t, dy)
        pix_x = torch.floor(posx)
        pix_y = torch.floor(posy)
        fx = pix_x + 0.5 - posx  # pixel centre minus sample
        fy = pix_y + 0.5 - posy
        # along/across-segment coordinates of each candidate pixel centre (offset row k) relative to the sample
        along = torch.addcmul(torch.addcmul(fx * ux + fy * uy, ox, ux), oy, uy)  # [K, m]
        across = torch.addcmul(torch.addcmul(fx * uy - fy * ux, ox, uy), oy, -ux)
        clamped = torch.clamp(along, -t * seg_len, (1 - t) * seg_len)
        beyond = along.sub_(clamped)  # distance past the segment's ends (0 alongside it)
        dist2 = beyond.mul_(beyond).addcmul_(across, across)
        if antialias:
            level = dist2.sqrt_().neg_().add_(reach).clamp_(0.0, 1.0).mul_(_LEVELS).round_()
        else:
            level = (dist2 <= half_width * half_width + 1e-6).to(dtype).mul_(_LEVELS)
        key = level.mul_(_RANK_BITS).add_(rank)
        base = (fr.long() * ph + pix_y.long() + pad) * pw + pix_x.long() + pad
        idx = base + off_lin
        flat_keys.scatter_reduce_(0, idx.view(-1), key.view(-1), reduce="amax")


@functools.lru_cache(maxsize=1)
def _mesh_lut_cpu() -> tuple[torch.Tensor, torch.Tensor]:
    """LUTs indexed by part_key * 256 + mesh_level: parts composited over the dim mesh."""
    rgb, alpha = _luts_cpu()
    mcov = torch.arange(_LEVELS + 1, dtype=torch.float32) / _LEVELS
    mesh = torch.tensor(MESH_COLOR, dtype=torch.float32) / 255.0
    under = (1.0 - alpha)[:, None] * mcov[None]  # [keys, 256]
    rgb_m = rgb[:, None, :] + under[..., None] * mesh
    alpha_m = alpha[:, None] + under
    return rgb_m.reshape(-1, 3).contiguous(), alpha_m.reshape(-1).contiguous()


def _draw_into(
    canvas: _Canvas,
    pts: torch.Tensor,
    frame_ok: torch.Tensor,
    topo: Topology,
    thickness: float,
    style: str,
    mesh_thickness: float,
    antialias: bool,
    out_rgb: torch.Tensor,
    out_alpha: torch.Tensor | None = None,
) -> None:
    """Draw pts [b, N, 2] (output pixels) into out_rgb [b, H, W, 3] (contiguous) and optionally out_alpha [b, H, W]."""
    device = pts.device
    b = pts.shape[0]
    width, height, pad = canvas.width, canvas.height, canvas.pad
    edges_np, ranks_np = _part_edges(topo.name)
    keys = canvas.keys
    keys[:b].zero_()
    _rasterise(
        keys,
        pad,
        pts,
        frame_ok,
        torch.from_numpy(edges_np).to(device),
        torch.from_numpy(ranks_np).to(device),
        width,
        height,
        thickness / 2,
        antialias,
    )
    index = canvas.index[:b]
    index.copy_(canvas.crop(keys, b))
    if style == "mesh":
        medges = torch.from_numpy(mesh_edges()).to(device)
        mkeys, tmp = canvas.aux()
        mkeys[:b].zero_()
        _rasterise(
            mkeys,
            pad,
            pts,
            frame_ok,
            medges,
            torch.zeros(len(medges), dtype=torch.long, device=device),
            width,
            height,
            mesh_thickness / 2,
            antialias,
        )
        tmp = tmp[:b]
        tmp.copy_(canvas.crop(mkeys, b))
        index.mul_(_LEVELS + 1).add_(tmp.bitwise_right_shift_(4))  # part_key * 256 + mesh level
    lut_rgb, lut_alpha = _luts(device, style == "mesh")
    flat = index.view(-1)
    torch.index_select(lut_rgb, 0, flat, out=out_rgb.view(-1, 3))
    if out_alpha is not None:
        torch.index_select(lut_alpha, 0, flat, out=out_alpha.view(-1))


def _canvas_for(
    seq_len: int,
    width: int,
    height: int,
    thickness: float,
    mesh_thickness: float,
    batch_size: int,
    device: torch.device,
) -> _Canvas:
    reach = max(thickness, mesh_thickness) / 2 + 0.5
    spacing, offsets = _plan(round(reach, 6))
    n = max(max(abs(dx), abs(dy)) for dx, dy in offsets)
    pad = int(math.ceil(reach + 1.0)) + n + 2
    return _Canvas(max(1, min(seq_len, batch_size, _CANVAS_FRAMES)), width, height, pad, device)


def _prepare(seq: LandmarkSequence, width: int, height: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    sx = width / seq.frame_size[0]
    sy = height / seq.frame_size[1]
    scale = torch.tensor([sx, sy], dtype=torch.float32)
    pts = torch.from_numpy(np.ascontiguousarray(seq.points[..., :2], dtype=np.float32)) * scale
    return pts.to(device), torch.from_numpy(np.asarray(seq.valid, dtype=bool)).to(device)


def _iter_batches(
    seq, width, height, thickness, style, device, batch_size, mesh_thickness, antialias, want_alpha=False, out=None
):
    """Yield (start, rgb, alpha) batch by batch (rgb is a slice of `out` when given, else a fresh buffer)."""
    topo = get_topology(seq.topology)
    pts, valid = _prepare(seq, width, height, device)
    canvas = _canvas_for(len(seq), width, height, thickness, mesh_thickness, batch_size, device)
    step = canvas.keys.shape[0]
    for start in range(0, len(seq), batch_size):
        stop = min(start + batch_size, len(seq))
        rgb = out[start:stop] if out is not None else torch.empty(stop - start, height, width, 3, device=device)
        alpha = torch.empty(stop - start, height, width, device=device) if want_alpha else None
        for a in range(start, stop, step):
            z = min(a + step, stop)
            _draw_into(
                canvas,
                pts[a:z],
                valid[a:z],
                topo,
                thickness,
                style,
                mesh_thickness,
                antialias,
                rgb[a - start : z - start],
                None if alpha is None else alpha[a - start : z - start],
            )
        yield start, rgb, alpha


def _check_all(seq, size, thickness, style, batch_size, mesh_thickness, device):
    seq = _check_seq(seq)
    topo = get_topology(seq.topology)
    _check_style(style, topo)
    width, height = _output_size(size, seq.frame_size)
    thickness = _check_positive(thickness, "thickness")
    mesh_thickness = _check_positive(mesh_thickness, "mesh_thickness")
    batch_size = _check_batch_size(batch_size)
    device = torch.device(device) if device is not None else torch.device("cpu")
    return seq, width, height, thickness, mesh_thickness, batch_size, device


# ---------------------------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def render_landmarks(
    seq: LandmarkSequence,
    size: int | tuple[int, int] | None = None,
    thickness: float = 2.0,
    style: str = "parts",
    device=None,
    batch_size: int = 64,
    *,
    mesh_thickness: float = DEFAULT_MESH_THICKNESS,
    antialias: bool = True,
) -> torch.Tensor:
    """Conditioning images [T, H, W, 3] float32 in 0..1 (ComfyUI IMAGE layout) on `device` (default CPU).

    size: None keeps seq.frame_size; int s -> s x s; (W, H) pair. Points scale from frame_size per axis.
    thickness: line width in output pixels of the part polylines (PART_COLORS).
    style: "parts" (coloured part polylines) or "mesh" (mediapipe478 only: the full face tessellation in MESH_COLOR
        at `mesh_thickness` px, parts drawn over it).
    batch_size: frames drawn together (memory/speed trade-off; the result does not depend on it).
    Invalid frames are black. For long sequences use `iter_rendered_frames`, which never holds them all.
    """
    seq, width, height, thickness, mesh_thickness, batch_size, device = _check_all(
        seq, size, thickness, style, batch_size, mesh_thickness, device
    )
    out = torch.empty(len(seq), height, width, 3, dtype=torch.float32, device=device)
    for _ in _iter_batches(
        seq, width, height, thickness, style, device, batch_size, mesh_thickness, antialias, out=out
    ):
        pass
    return out


@torch.no_grad()
def render_points(
    points,
    topology: str,
    size: tuple[int, int],
    thickness: float = 2.0,
    style: str = "parts",
    valid=None,
    *,
    mesh_thickness: float = DEFAULT_MESH_THICKNESS,
    antialias: bool = True,
    return_alpha: bool = False,
):
    """Low-level batched drawing of points already in output pixels (e.g. a training batch on the GPU).

    points: [B, N, 2 or 3] tensor/array in pixels of the (W, H) = `size` output (z ignored); drawn on its device.
    valid: optional [B] bool. Returns rgb [B, H, W, 3] float32 (and alpha [B, H, W] with return_alpha=True).
    """
    topo = get_topology(topology)
    _check_style(style, topo)
    if not (isinstance(size, (tuple, list)) and len(size) == 2):
        raise LmdiffInputError(f"render_points size is {size!r}, expected a (width, height) pair")
    width, height = _output_size(tuple(size), (1, 1))
    thickness = _check_positive(thickness, "thickness")
    mesh_thickness = _check_positive(mesh_thickness, "mesh_thickness")
    pts = torch.as_tensor(points)
    if pts.ndim == 2:
        pts = pts[None]
    if pts.ndim != 3 or pts.shape[1] != topo.n_points or pts.shape[2] not in (2, 3):
        raise LmdiffInputError(
            f"render_points points have shape {tuple(pts.shape)}, expected [B, {topo.n_points}, 2 or 3] for {topology}"
        )
    pts = pts[..., :2].to(torch.float32)
    if valid is None:
        ok = torch.ones(pts.shape[0], dtype=torch.bool)
    else:
        ok = torch.as_tensor(valid).to(torch.bool).reshape(-1)
    if ok.shape[0] != pts.shape[0]:
        raise LmdiffInputError(f"render_points valid has {ok.shape[0]} entries, expected {pts.shape[0]}")
    ok = ok.to(pts.device)
    b = pts.shape[0]
    rgb = torch.empty(b, height, width, 3, device=pts.device)
    alpha = torch.empty(b, height, width, device=pts.device) if return_alpha else None
    canvas = _canvas_for(b, width, height, thickness, mesh_thickness, b, pts.device)
    step = canvas.keys.shape[0]
    for a in range(0, b, step):
        z = min(a + step, b)
        _draw_into(
            canvas,
            pts[a:z],
            ok[a:z],
            topo,
            thickness,
            style,
            mesh_thickness,
            antialias,
            rgb[a:z],
            None if alpha is None else alpha[a:z],
        )
    return (rgb, alpha) if return_alpha else rgb


def iter_rendered_frames(
    seq: LandmarkSequence,
    size: int | tuple[int, int] | None = None,
    thickness: float = 2.0,
    style: str = "parts",
    device=None,
    batch_size: int = 64,
    *,
    mesh_thickness: float = DEFAULT_MESH_THICKNESS,
    antialias: bool = True,
) -> Iterator[np.ndarray]:
    """Stream the frames of `render_landmarks` as uint8 [H, W, 3] numpy arrays, drawn `batch_size` at a time.

    Arguments are checked at the call (not at the first `next`), so a bad input fails before any writer opens.
    """
    seq, width, height, thickness, mesh_thickness, batch_size, device = _check_all(
        seq, size, thickness, style, batch_size, mesh_thickness, device
    )

    def frames():
        with torch.no_grad():
            for _, rgb, _ in _iter_batches(
                seq, width, height, thickness, style, device, batch_size, mesh_thickness, antialias
            ):
                batch = (rgb * 255.0).round_().clamp_(0, 255).to(torch.uint8).cpu().numpy()
                yield from batch

    return frames()


@torch.no_grad()
def draw_landmarks_on_frames(
    frames,
    seq: LandmarkSequence,
    thickness: float = 2.0,
    style: str = "parts",
    opacity: float = 1.0,
    device=None,
    batch_size: int = 64,
    *,
    mesh_thickness: float = DEFAULT_MESH_THICKNESS,
    antialias: bool = True,
):
    """Alpha-blend the rendered landmarks over real frames, for previews.

    frames: [T, H, W, 3] (or one [H, W, 3]) uint8 numpy array, uint8 torch tensor, or float torch tensor in 0..1
        (ComfyUI IMAGE); T must equal len(seq). Points are scaled from seq.frame_size to the frames' W x H.
    opacity: 0..1, multiplies the line coverage. Invalid frames are returned unchanged.
    Returns the same kind as the input (numpy uint8 -> numpy uint8, torch float -> torch float, same shape/device).
    """
    seq = _check_seq(seq)
    is_numpy = isinstance(frames, np.ndarray)
    if not is_numpy and not isinstance(frames, torch.Tensor):
        raise LmdiffInputError(
            f"draw_landmarks_on_frames frames is a {type(frames).__name__}, expected a numpy array or torch tensor"
        )
    single = frames.ndim == 3
    batch = frames[None] if single else frames
    if batch.ndim != 4 or batch.shape[-1] != 3:
        raise LmdiffInputError(
            f"draw_landmarks_on_frames frames have shape {tuple(frames.shape)}, expected [T, H, W, 3]"
        )
    if batch.shape[0] != len(seq):
        raise LmdiffInputError(f"draw_landmarks_on_frames got {batch.shape[0]} frames for {len(seq)} landmark frames")
    opacity = float(opacity)
    if not (0.0 <= opacity <= 1.0):
        raise LmdiffInputError(f"draw_landmarks_on_frames opacity is {opacity}, expected 0..1")
    height, width = int(batch.shape[1]), int(batch.shape[2])
    seq, width, height, thickness, mesh_thickness, batch_size, dev = _check_all(
        seq, (width, height), thickness, style, batch_size, mesh_thickness, device
    )
    out = torch.from_numpy(np.array(batch, copy=True)) if is_numpy else batch.clone()
    if out.dtype != torch.uint8 and not out.is_floating_point():
        raise LmdiffInputError(
            f"draw_landmarks_on_frames frames have dtype {out.dtype}, expected uint8 or float in 0..1"
        )
    is_uint8 = out.dtype == torch.uint8
    for start, rgb, alpha in _iter_batches(
        seq, width, height, thickness, style, dev, batch_size, mesh_thickness, antialias, want_alpha=True
    ):
        stop = start + rgb.shape[0]
        base = out[start:stop].to(dev, torch.float32)
        if is_uint8:
            base = base / 255.0
        a = (alpha * opacity)[..., None]
        blended = base * (1.0 - a) + rgb * opacity
        if is_uint8:
            blended = (blended * 255.0).round_().clamp_(0, 255).to(torch.uint8)
        else:
            blended = blended.to(out.dtype)
        out[start:stop] = blended.to(out.device)
    if single:
        out = out[0]
    return out.numpy() if is_numpy else out


# ---------------------------------------------------------------------------------------------------------------------
# OpenPose face export
# ---------------------------------------------------------------------------------------------------------------------
def _ibug68_points(seq: LandmarkSequence) -> np.ndarray:
    if seq.topology == "ibug68":
        return seq.points
    return seq.to_topology("ibug68").points  # mediapipe478: the documented index map (topology.py)


def to_openpose_face(seq: LandmarkSequence, normalized: bool = False) -> list[dict]:
    """One ComfyUI POSE_KEYPOINT dict per frame (OpenPose JSON layout, as comfyui_controlnet_aux writes it).

    face_keypoints_2d holds 70 (x, y, c) triples: the 68 iBUG points (mediapipe478 is converted with
    `LandmarkSequence.to_topology("ibug68")`) then the subject's right pupil and left pupil (`Topology.pupil_points`:
    iris centres for mediapipe478, eye-corner means for ibug68). x, y are pixels of seq.frame_size (or 0..1 of the
    canvas with normalized=True, as comfyui_controlnet_aux's own detectors emit); c is 1.0. A non-finite point is
    written as (0, 0, 0), OpenPose's "missing". An invalid frame has "people": [].
    """
    seq = _check_seq(seq)
    width, height = seq.frame_size
    face = _ibug68_points(seq)[..., :2]  # [T, 68, 2]
    pupils = get_topology(seq.topology).pupil_points(seq.points)[..., :2]  # [T, 2, 2]
    pts = np.concatenate([face, pupils], axis=1).astype(np.float64)  # [T, 70, 2]
    if normalized:
        pts = pts / np.array([width, height], dtype=np.float64)
    digits = 6 if normalized else 3
    finite = np.isfinite(pts).all(-1)
    triples = np.concatenate([np.where(finite[..., None], pts, 0.0), finite[..., None].astype(np.float64)], axis=-1)
    triples = np.round(triples, digits)
    result = []
    for t in range(len(seq)):
        people = []
        if seq.valid[t]:
            people.append(
                {
                    "pose_keypoints_2d": [],
                    "face_keypoints_2d": [float(v) for v in triples[t].reshape(-1)],
                    "hand_left_keypoints_2d": [],
                    "hand_right_keypoints_2d": [],
                }
            )
        result.append({"people": people, "canvas_width": int(width), "canvas_height": int(height)})
    return result


def save_openpose_json(seq: LandmarkSequence, path, normalized: bool = False) -> Path:
    """Write `to_openpose_face(seq)` (a JSON list, one entry per frame) atomically; returns the path."""
    path = Path(path)
    if path.is_dir():
        raise LmdiffInputError(f"OpenPose JSON path {path} is a directory, expected a file path")
    data = to_openpose_face(seq, normalized=normalized)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, separators=(",", ":"))
    return path
