"""LSE-C / LSE-D lip-sync metrics (Prajwal et al. 2020, Wav2Lip) with SyncNet (Chung & Zisserman 2016).

The network and the recipe are those of joonson/syncnet_python (`SyncNetModel.S`, `SyncNetInstance.evaluate`) with
its published weights `syncnet_v2.model`, which Wav2Lip's evaluation (`evaluation/scores_LSE`) reuses unchanged:

- Video: 25 fps; per frame a 224x224 colour crop of the whole face (not only the lower half), fed as BGR values in
  0..255 with no normalisation; the lip stream sees 5 consecutive frames.
- Audio: 16 kHz mono at int16 scale; MFCC of python_speech_features' defaults (`mfcc` below) at 100 Hz, so video
  frame i goes with MFCC frames 4i .. 4i+19 (0.2 s).
- Windows: i = 0 .. min(frames, samples // 640) - 6 (syncnet_python drops one more window than needed).
- Scores (`sync_scores`): for each candidate offset in -15..+15 frames, the mean over windows of the Euclidean
  distance between video window i and audio window i + shift (audio embeddings zero-padded beyond the ends, as
  syncnet_python pads them); LSE-D is the smallest mean distance, LSE-C the median over offsets minus that minimum.
  A data set's LSE-D / LSE-C is the plain mean of the per-video values (Wav2Lip's calculate_scores scripts).

Face crops (`syncnet_crops`) follow syncnet_python's run_pipeline.crop_video with the bounding box of the iBUG-68
landmarks standing in for its S3FD face box (the one approximation here; S3FD boxes were not reproduced).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .crop import CropTrack, crop_frames
from .errors import LmdiffInputError
from .landmarks import LandmarkSequence
from .weights import load_checked

FPS = 25.0
SAMPLE_RATE = 16000
SAMPLES_PER_FRAME = SAMPLE_RATE // int(FPS)  # 640
MFCC_PER_FRAME = 4  # 100 Hz MFCC / 25 fps
WINDOW_FRAMES = 5
WINDOW_MFCC = 20
CROP_SIZE = 224
CROP_SCALE = 0.40  # run_pipeline --crop_scale
CROP_PAD_VALUE = 110  # run_pipeline pads frames with this grey before cropping
BOX_SMOOTHING = 13  # run_pipeline median-filters box centre and size over 13 frames
MAX_OFFSET = 15  # Wav2Lip's --vshift
BATCH_SIZE = 20
PAIRWISE_EPS = 1e-6  # torch.nn.functional.pairwise_distance adds it to the difference
EMBEDDING_SIZE = 1024

# python_speech_features.mfcc defaults at 16 kHz
_WIN, _STEP, _NFFT, _NFILT, _NUMCEP, _PREEMPH, _LIFTER = 400, 160, 512, 26, 13, 0.97, 22

WEIGHTS_EXPECTED = (
    "syncnet_v2.model of joonson/syncnet_python (a torch state dict with keys netcnnaud.*, netfcaud.*, netcnnlip.*, "
    "netfclip.*) or a .safetensors file with the same keys"
)


class SyncNet(nn.Module):
    """syncnet_python's `S` network; module and parameter names match `syncnet_v2.model`.

    `embed_audio`: MFCC [B, 1, 13, 20] -> [B, 1024]. `embed_video`: BGR frames in 0..255 [B, 3, 5, 224, 224] ->
    [B, 1024]. The no-op MaxPool2d(1) of the original is kept so that the Sequential indices match.
    """

    def __init__(self):
        super().__init__()
        self.netcnnaud = nn.Sequential(
            nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=1, stride=1),
            nn.Conv2d(64, 192, kernel_size=3, stride=1, padding=1),
            nn.BatchNorm2d(192),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=(1, 2)),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.BatchNorm2d(384),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.BatchNorm2d(256),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.BatchNorm2d(256),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(256, 512, kernel_size=(5, 4), padding=0),
            nn.BatchNorm2d(512),
            nn.ReLU(),
        )
        self.netfcaud = nn.Sequential(
            nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, EMBEDDING_SIZE)
        )
        self.netfclip = nn.Sequential(
            nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, EMBEDDING_SIZE)
        )
        self.netcnnlip = nn.Sequential(
            nn.Conv3d(3, 96, kernel_size=(5, 7, 7), stride=(1, 2, 2), padding=0),
            nn.BatchNorm3d(96),
            nn.ReLU(inplace=True),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2)),
            nn.Conv3d(96, 256, kernel_size=(1, 5, 5), stride=(1, 2, 2), padding=(0, 1, 1)),
            nn.BatchNorm3d(256),
            nn.ReLU(inplace=True),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
            nn.Conv3d(256, 256, kernel_size=(1, 3, 3), padding=(0, 1, 1)),
            nn.BatchNorm3d(256),
            nn.ReLU(inplace=True),
            nn.Conv3d(256, 256, kernel_size=(1, 3, 3), padding=(0, 1, 1)),
            nn.BatchNorm3d(256),
            nn.ReLU(inplace=True),
            nn.Conv3d(256, 256, kernel_size=(1, 3, 3), padding=(0, 1, 1)),
            nn.BatchNorm3d(256),
            nn.ReLU(inplace=True),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2)),
            nn.Conv3d(256, 512, kernel_size=(1, 6, 6), padding=0),
            nn.BatchNorm3d(512),
            nn.ReLU(inplace=True),
        )

    def embed_audio(self, mfcc: torch.Tensor) -> torch.Tensor:
        """[B, 1, 13, 20] MFCC windows -> [B, 1024]."""
        return self.netfcaud(self.netcnnaud(mfcc).flatten(1))

    def embed_video(self, frames: torch.Tensor) -> torch.Tensor:
        """[B, 3, 5, 224, 224] BGR windows in 0..255 -> [B, 1024]."""
        return self.netfclip(self.netcnnlip(frames).flatten(1))


def load_syncnet(path, device="cpu") -> SyncNet:
    """SyncNet in eval mode on `device` with the weights of `path` (a torch state dict read with weights_only=True,
    e.g. syncnet_v2.model, or .safetensors). Missing `num_batches_tracked` buffers (files from PyTorch < 0.4.1, unused
    in eval mode) are accepted; any other missing, unexpected or misshapen key raises LmdiffInputError."""
    return load_checked(SyncNet(), path, f"SyncNet weights: {WEIGHTS_EXPECTED}", device)


def _mel_filterbank() -> np.ndarray:
    """[26, 257] python_speech_features.get_filterbanks(26, 512, 16000, 0, 8000): triangles on integer FFT bins."""
    mel = np.linspace(0.0, 2595 * np.log10(1 + SAMPLE_RATE / 2 / 700.0), _NFILT + 2)
    bins = np.floor((_NFFT + 1) * 700 * (10 ** (mel / 2595.0) - 1) / SAMPLE_RATE).astype(int)
    bank = np.zeros((_NFILT, _NFFT // 2 + 1))
    for j in range(_NFILT):
        lo, mid, hi = bins[j], bins[j + 1], bins[j + 2]
        if mid > lo:
            bank[j, lo:mid] = (np.arange(lo, mid) - lo) / (mid - lo)
        if hi > mid:
            bank[j, mid:hi] = (hi - np.arange(mid, hi)) / (hi - mid)
    return bank


def mfcc(audio: np.ndarray) -> np.ndarray:
    """[13, M] MFCC at 100 Hz of 16 kHz mono audio (float in [-1, 1]), as python_speech_features.mfcc computes them
    with its defaults on syncnet_python's int16 samples: the audio is scaled and rounded to int16 values (ffmpeg's
    pcm_s16le conversion), pre-emphasised (0.97), cut into 25 ms frames every 10 ms (the last zero-padded,
    M = 1 + ceil((samples - 400) / 160)), no window, 512-point power spectrum / 512, 26 mel triangles on FFT bins,
    log, orthonormal DCT-II, lifter 22, coefficient 0 replaced by the log frame energy. Only floating-point rounding
    differs from python_speech_features (scipy.fft.dct instead of scipy.fftpack.dct)."""
    from scipy.fft import dct

    x = np.asarray(audio, dtype=np.float64).reshape(-1)
    if x.size == 0 or not np.isfinite(x).all():
        raise LmdiffInputError(f"audio must be a non-empty finite 1-D array, got {x.size} samples")
    x = np.clip(np.round(x * 32768.0), -32768, 32767)
    x = np.append(x[0], x[1:] - _PREEMPH * x[:-1])
    n = 1 if len(x) <= _WIN else 1 + math.ceil((len(x) - _WIN) / _STEP)
    x = np.pad(x, (0, (n - 1) * _STEP + _WIN - len(x)))
    frames = np.lib.stride_tricks.sliding_window_view(x, _WIN)[::_STEP]
    power = np.abs(np.fft.rfft(frames, _NFFT)) ** 2 / _NFFT
    eps = np.finfo(float).eps
    energy = power.sum(axis=1)
    energy[energy == 0] = eps
    bands = power @ _mel_filterbank().T
    bands[bands == 0] = eps
    cepstra = dct(np.log(bands), type=2, axis=1, norm="ortho")[:, :_NUMCEP]
    cepstra *= 1 + (_LIFTER / 2.0) * np.sin(np.pi * np.arange(_NUMCEP) / _LIFTER)
    cepstra[:, 0] = np.log(energy)
    return cepstra.T


def syncnet_crops(frames: np.ndarray, landmarks: LandmarkSequence) -> np.ndarray:
    """uint8 [T, 224, 224, 3] RGB face crops of uint8 frames [T, H, W, 3], placed as syncnet_python's run_pipeline
    places them: with the face box's half side s = max(width, height) / 2 and centre (x, y), a square of side 2.8 s
    centred at x, from y - s down to y + 1.8 s (top at the box's top, room for the chin below), resized bilinearly
    without antialiasing (cv2.resize), grey 110 outside the frame. The box is the bounding box of the iBUG-68
    landmarks; its size and centre are median-filtered over 13 frames (scipy's 'nearest' edges, where syncnet_python's
    signal.medfilt pads with zeros) and frames without a face take values interpolated from their neighbours."""
    from scipy.ndimage import median_filter

    frames = _check_frames(frames)
    if not isinstance(landmarks, LandmarkSequence) or landmarks.space != "image":
        raise LmdiffInputError(f"landmarks must be an image-space LandmarkSequence, got {landmarks!r:.80}")
    if abs(landmarks.fps - FPS) > 1e-6:
        raise LmdiffInputError(f"SyncNet needs 25 fps video, the landmarks are at {landmarks.fps:g} fps")
    height, width = frames.shape[1:3]
    if len(landmarks) != len(frames) or tuple(landmarks.frame_size) != (width, height):
        raise LmdiffInputError(
            f"landmarks ({len(landmarks)} frames of {landmarks.frame_size}) do not match the {len(frames)} frames of "
            f"{(width, height)}"
        )
    points = landmarks.to_topology("ibug68").points[..., :2].astype(np.float64)
    lo, hi = points.min(axis=1), points.max(axis=1)
    with np.errstate(invalid="ignore"):
        usable = landmarks.valid & np.isfinite(lo).all(axis=1) & np.isfinite(hi).all(axis=1) & (hi > lo).all(axis=1)
    if not usable.any():
        raise LmdiffInputError(f"syncnet_crops: no frame of the {len(frames)} has a face")
    t, good = np.arange(len(frames)), np.flatnonzero(usable)
    half = np.interp(t, good, (hi - lo).max(axis=1)[good]) / 2
    cx, cy = (np.interp(t, good, ((lo + hi) / 2)[good, k]) for k in range(2))
    half, cx, cy = (median_filter(v, size=BOX_SMOOTHING, mode="nearest") for v in (half, cx, cy))
    centers = np.stack([cx, cy + CROP_SCALE * half], axis=1)
    track = CropTrack.from_boxes(centers, 2 * (1 + CROP_SCALE) * half, np.zeros(len(t)), CROP_SIZE, (width, height))
    grey = CROP_PAD_VALUE / 255.0
    out = np.empty((len(frames), CROP_SIZE, CROP_SIZE, 3), dtype=np.uint8)
    for start, chunk in _float_chunks(frames):
        # zero padding of (frame - grey), plus grey: a bilinear warp with grey padding
        crop = crop_frames(chunk - grey, track, range(start, start + len(chunk)), padding="zeros", antialias=False)
        out[start : start + len(chunk)] = _to_uint8(crop + grey)
    return out


def _float_chunks(frames: np.ndarray):
    """(start, float [B, 3, H, W] in 0..1) over uint8 frames [T, H, W, 3], about 128 MB of floats at a time."""
    step = max(1, min(32, (1 << 25) // frames[0].size))
    for start in range(0, len(frames), step):
        yield start, torch.from_numpy(frames[start : start + step]).permute(0, 3, 1, 2).float() / 255.0


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """float [B, 3, H, W] in 0..1 -> uint8 [B, H, W, 3]."""
    return (x * 255.0).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def _check_frames(frames) -> np.ndarray:
    ok = isinstance(frames, np.ndarray) and frames.dtype == np.uint8 and frames.ndim == 4 and frames.shape[-1] == 3
    if not ok or len(frames) == 0:
        raise LmdiffInputError(
            f"frames must be a non-empty uint8 array [T, H, W, 3], got {getattr(frames, 'dtype', type(frames).__name__)} "
            f"{getattr(frames, 'shape', '')}"
        )
    return frames


def embeddings(net: SyncNet, crops: np.ndarray, audio: np.ndarray, batch_size: int = BATCH_SIZE):
    """(video, audio) embeddings, float32 [N, 1024] each on the CPU, of SyncNet windows i = 0 .. N - 1 with
    N = min(len(crops), len(audio) // 640) - 5: frames i .. i+4 of the uint8 RGB crops [T, 224, 224, 3] (25 fps) and
    MFCC frames 4i .. 4i+19 of the 16 kHz audio."""
    crops = _check_frames(crops)
    if crops.shape[1:3] != (CROP_SIZE, CROP_SIZE):
        raise LmdiffInputError(f"SyncNet crops must be {CROP_SIZE}x{CROP_SIZE}, got {crops.shape[2]}x{crops.shape[1]}")
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    n = min(len(crops), len(audio) // SAMPLES_PER_FRAME) - WINDOW_FRAMES
    if n < 1:
        raise LmdiffInputError(
            f"SyncNet needs at least {WINDOW_FRAMES + 1} frames of video and audio (0.24 s at 25 fps), got "
            f"{len(crops)} frames and {len(audio) / SAMPLE_RATE:.3f} s of audio"
        )
    features = torch.from_numpy(mfcc(audio[: (n + WINDOW_FRAMES) * SAMPLES_PER_FRAME])).float()
    device = next(net.parameters()).device
    video_out, audio_out = [], []
    net.eval()
    with torch.no_grad():
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            clip = torch.from_numpy(crops[start : stop + WINDOW_FRAMES - 1]).to(device).flip(-1)  # RGB -> BGR
            clip = clip.permute(3, 0, 1, 2).float()  # [3, frames, H, W]
            windows = torch.stack([clip[:, i : i + WINDOW_FRAMES] for i in range(stop - start)])
            video_out.append(net.embed_video(windows).float().cpu())
            cuts = [features[:, MFCC_PER_FRAME * i : MFCC_PER_FRAME * i + WINDOW_MFCC] for i in range(start, stop)]
            audio_out.append(net.embed_audio(torch.stack(cuts)[:, None].to(device)).float().cpu())
    return torch.cat(video_out), torch.cat(audio_out)


def sync_scores(video_embeddings, audio_embeddings, max_offset: int = MAX_OFFSET) -> dict:
    """LSE from SyncNet embeddings [N, D] of the same windows (torch tensors or numpy arrays).

    For each shift k in 0 .. 2 max_offset, distances[k] is the mean over windows i of |v_i - a_(i + k - max_offset)
    + 1e-6| (audio embeddings outside 0 .. N-1 are zero vectors, as syncnet_python pads them). Returns
    {"lse_d": min distance, "lse_c": median - min, "offset": max_offset - argmin, "distances": [2 max_offset + 1]};
    `offset` is syncnet_python's AV offset: video frame i matches audio frame i - offset, so audio delayed by d frames
    gives -d.
    """
    v, a = (_as_array(x, name) for x, name in ((video_embeddings, "video"), (audio_embeddings, "audio")))
    if v.shape != a.shape or v.ndim != 2 or len(v) == 0:
        raise LmdiffInputError(f"video and audio embeddings must both be [N, D] with N >= 1, got {v.shape}, {a.shape}")
    if isinstance(max_offset, bool) or not isinstance(max_offset, (int, np.integer)) or max_offset < 0:
        raise LmdiffInputError(f"max_offset must be a non-negative integer, got {max_offset!r}")
    n = len(v)
    padded = np.pad(a, ((max_offset, max_offset), (0, 0)))
    distances = np.array(
        [np.linalg.norm(v - padded[k : k + n] + PAIRWISE_EPS, axis=1).mean() for k in range(2 * max_offset + 1)]
    )
    best = int(np.argmin(distances))
    return {
        "lse_d": float(distances[best]),
        "lse_c": float(np.median(distances) - distances[best]),
        "offset": int(max_offset - best),
        "distances": distances,
    }


def _as_array(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    if not np.isfinite(x).all():
        raise LmdiffInputError(f"{name} embeddings hold non-finite values")
    return x


def lse(
    frames: np.ndarray,
    audio: np.ndarray,
    landmarks: LandmarkSequence | None,
    net: SyncNet,
    max_offset: int = MAX_OFFSET,
    batch_size: int = BATCH_SIZE,
) -> dict:
    """{"lse_c", "lse_d", "offset"} of one video: uint8 frames [T, H, W, 3] at 25 fps with their landmarks (face crops
    by `syncnet_crops`), or landmarks=None when the frames already are face crops (resized to 224x224 like Wav2Lip's
    calculate_scores_LRS), and its 16 kHz mono float audio."""
    frames = _check_frames(frames)
    if landmarks is None:
        crops = frames
        if frames.shape[1:3] != (CROP_SIZE, CROP_SIZE):
            size = (CROP_SIZE, CROP_SIZE)
            crops = np.concatenate(
                [
                    _to_uint8(F.interpolate(x, size=size, mode="bilinear", align_corners=False))
                    for _, x in _float_chunks(frames)
                ]
            )
    else:
        crops = syncnet_crops(frames, landmarks)
    video_emb, audio_emb = embeddings(net, crops, audio, batch_size)
    scores = sync_scores(video_emb, audio_emb, max_offset)
    return {"lse_c": scores["lse_c"], "lse_d": scores["lse_d"], "offset": scores["offset"]}
