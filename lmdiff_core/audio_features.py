"""Speech features for the A2L models, aligned exactly with the 25 fps video frames.

Every extractor returns a float32 array ``[T, k, L, D]`` for a clip:

- ``T`` video frames at ``fps`` (``n_frames`` when given, else :func:`media.frame_count` of the audio's
  duration); the audio is first zero-padded or trimmed to exactly those frames with
  :func:`media.fit_audio_to_frames`, so a feature frame never drifts from its video frame;
- ``k`` audio sub-frames per video frame (``sub_frames``): frame ``t`` covers the audio span
  ``[t / fps, (t + 1) / fps)`` and its sub-frame ``j`` is centred at sample ``(t * k + j) * hop`` with
  ``hop = sample_rate / (fps * k)``, for every extractor;
- ``L`` layers (1, unless a pretrained encoder is asked for all its hidden states);
- ``D`` features per layer.

Extractors:

- :class:`LogMelFeatures` (the default, no weights): an 80-bin natural-log mel spectrogram with a 25 ms window
  and ``k = 4`` sub-frames (a 10 ms hop at 25 fps). It is **not** normalised per utterance: the A2L models
  normalise their inputs themselves, so a clip's loudness reaches them unchanged.
- :class:`PretrainedSpeechFeatures`: the hidden states of a wav2vec2, HuBERT or Whisper encoder, loaded with
  ``transformers`` from a local folder only (nothing is downloaded), or ``"whisper-base"``: OpenAI's Whisper base
  encoder from the ``lmdiff[speech]`` extra (:mod:`whisper_ct2`), resampled from the encoder's 50 Hz to
  ``T * k`` frames by linear interpolation in time. Long audio is encoded in chunks, so memory stays bounded.

Helpers: :func:`load_feature_extractor` builds an extractor from ``"logmel"``, ``"whisper-base"``, a model folder or a
:meth:`AudioFeatureExtractor.config` dict; :func:`audio_to_mono16k` takes an array, a ComfyUI AUDIO or a path;
:func:`frame_windows` gathers context windows around every frame; :class:`FeatureCache` keeps computed features on
disk, keyed by the audio's content and the extractor's configuration.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import atomic_write
from . import media
from .errors import LmdiffInputError

DEFAULT_FPS = media.DEFAULT_FPS
DEFAULT_SAMPLE_RATE = media.DEFAULT_SAMPLE_RATE

LOG_MEL_EPS = 1e-6
LOG_MEL_CHUNK_SUB_FRAMES = 3000  # 30 s at 100 sub-frames/s per melspectrogram call
"""Added to the mel power before the natural log: silence gives ``log(1e-6)``, the smallest possible value."""

_PRETRAINED_TYPES = ("wav2vec2", "hubert", "whisper")
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
WHISPER_BASE = "whisper-base"
"""The name of the built-in Whisper-base encoder (the ``lmdiff[speech]`` extra, :mod:`whisper_ct2`)."""
WHISPER_BASE_LAYER: int | str | None = "all"
"""``"whisper-base"`` gives every hidden state by default, for the A2L models' learned weighted sum: on the held-out
clips it gave better lip sync than layer 4 or the last layer alone (checkpoints/a2l/README.md)."""
_CONFIG_VERSION = 1  # bump when an extractor's output changes for the same configuration (invalidates caches)


class AudioFeatureExtractor:
    """Base class: turns 16 kHz mono audio into frame-aligned features ``[T, k, L, D]`` (see the module doc).

    Subclasses set ``sample_rate``, ``fps``, ``sub_frames`` (k), ``layers`` (L), ``dim`` (D) and ``name``, and
    implement :meth:`config` and :meth:`_extract`.
    """

    sample_rate: int = DEFAULT_SAMPLE_RATE
    fps: float = DEFAULT_FPS
    sub_frames: int = 1
    layers: int = 1
    dim: int = 0
    name: str = "audio_features"

    def config(self) -> dict:
        """A JSON-able dict that rebuilds this extractor with :func:`load_feature_extractor` and keys caches."""
        raise NotImplementedError

    def cache_token(self) -> str:
        """The text that identifies this extractor's output in :class:`FeatureCache` keys (its config as JSON)."""
        return json.dumps(self.config(), sort_keys=True)

    def __call__(self, audio: np.ndarray, n_frames: int | None = None) -> np.ndarray:
        """Features ``[T, k, L, D]`` float32 of ``audio`` (16 kHz mono, or anything :func:`audio_to_mono16k` takes).

        ``T`` is ``n_frames`` when given, else ``media.frame_count(len(audio) / sample_rate, fps)``; the audio
        is padded with silence or trimmed to exactly ``T`` frames first.
        """
        audio = audio_to_mono16k(audio, sample_rate=self.sample_rate)
        n_frames = self.n_frames_for(audio, n_frames)
        shape = (n_frames, self.sub_frames, self.layers, self.dim)
        if n_frames == 0:
            return np.zeros(shape, np.float32)
        fitted = media.fit_audio_to_frames(audio, n_frames, self.fps, self.sample_rate)
        features = np.ascontiguousarray(self._extract(fitted, n_frames), dtype=np.float32)
        if features.shape != shape:  # an internal error, not a user one
            raise RuntimeError(f"{self.name} produced features of shape {features.shape}, expected {shape}")
        return features

    def n_frames_for(self, audio: np.ndarray, n_frames: int | None = None) -> int:
        """The number of video frames ``T`` that :meth:`__call__` produces for ``audio`` (16 kHz mono)."""
        if n_frames is None:
            return media.frame_count(len(audio) / self.sample_rate, self.fps)
        if isinstance(n_frames, bool) or not isinstance(n_frames, numbers.Integral) or n_frames < 0:
            raise LmdiffInputError(f"n_frames must be a non-negative integer, got {n_frames!r}")
        return int(n_frames)

    def _extract(self, audio: np.ndarray, n_frames: int) -> np.ndarray:
        """Features of ``audio`` already fitted to ``n_frames`` frames (``n_frames >= 1``)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config()})"


class LogMelFeatures(AudioFeatureExtractor):
    """Log-mel spectrogram frames: ``[T, sub_frames, 1, n_mels]``, deterministic, no weights needed.

    The hop is ``sample_rate / (fps * sub_frames)`` samples (160 = 10 ms at the defaults) and must be a whole
    number; the window is 25 ms (400 samples at 16 kHz, Hann). ``librosa.feature.melspectrogram`` runs with
    ``center=True`` (zero padding) on the fitted audio, so sub-frame ``(t, j)`` is centred on sample
    ``(t * sub_frames + j) * hop``; the extra frame ``center=True`` adds at the end is dropped, leaving exactly
    ``T * sub_frames`` frames. Values are ``log(mel_power + 1e-6)`` (natural log, Slaney mel scale and filter
    normalisation). No per-utterance normalisation is applied: the model normalises its inputs.
    """

    def __init__(
        self,
        n_mels: int = 80,
        sub_frames: int = 4,
        fps: float = DEFAULT_FPS,
        sample_rate: int = DEFAULT_SAMPLE_RATE,
    ):
        self.n_mels = _positive_int(n_mels, "n_mels")
        self.sub_frames = _positive_int(sub_frames, "sub_frames")
        self.sample_rate = _positive_int(sample_rate, "sample_rate")
        self.fps = _positive_float(fps, "fps")
        hop = self.sample_rate / (self.fps * self.sub_frames)
        if abs(hop - round(hop)) > 1e-9 * hop or round(hop) < 1:
            raise LmdiffInputError(
                f"LogMelFeatures needs a whole number of samples per sub-frame: sample_rate / (fps * sub_frames) = "
                f"{self.sample_rate} / ({self.fps:g} * {self.sub_frames}) = {hop:g}; choose sub_frames or fps so it "
                "is an integer (e.g. 16000 Hz, 25 fps, 4 sub-frames: 160)"
            )
        self.hop_length = int(round(hop))
        self.win_length = int(round(0.025 * self.sample_rate))
        self.layers = 1
        self.dim = self.n_mels
        self.name = f"logmel{self.n_mels}"
        self.chunk_sub_frames = LOG_MEL_CHUNK_SUB_FRAMES

    def config(self) -> dict:
        return {
            "kind": "logmel",
            "version": _CONFIG_VERSION,
            "n_mels": self.n_mels,
            "sub_frames": self.sub_frames,
            "fps": self.fps,
            "sample_rate": self.sample_rate,
        }

    def _extract(self, audio: np.ndarray, n_frames: int) -> np.ndarray:
        import librosa  # slow to import (and JIT-compiles on first use): only when features are computed

        # Computed in chunks of sub-frames (bounded memory for long audio): each frame sees the same zero-padded
        # window of samples as one centred pass over the whole audio would give it.
        n_sub, hop, half = n_frames * self.sub_frames, self.hop_length, self.win_length // 2
        padded = np.pad(audio, (half, max(0, (n_sub - 1) * hop + self.win_length - half - len(audio))))
        out = np.empty((n_sub, self.n_mels), dtype=np.float32)
        for first in range(0, n_sub, self.chunk_sub_frames):
            last = min(n_sub, first + self.chunk_sub_frames)
            mel = librosa.feature.melspectrogram(
                y=padded[first * hop : (last - 1) * hop + self.win_length],
                sr=self.sample_rate,
                n_fft=self.win_length,
                hop_length=hop,
                win_length=self.win_length,
                window="hann",
                center=False,
                power=2.0,
                n_mels=self.n_mels,
                fmin=0.0,
                fmax=self.sample_rate / 2,
                htk=False,
                norm="slaney",
            )
            out[first:last] = np.log(mel.T.astype(np.float32) + np.float32(LOG_MEL_EPS))
        return out.reshape(n_frames, self.sub_frames, 1, self.n_mels)


class PretrainedSpeechFeatures(AudioFeatureExtractor):
    """Hidden states of a pretrained wav2vec2, HuBERT or Whisper encoder from a local folder.

    ``model_dir`` is a folder written by ``save_pretrained`` (``config.json`` and the weights, plus
    ``preprocessor_config.json`` where the model has one); it is opened with ``local_files_only=True``, so
    nothing is ever downloaded. ``model_dir="whisper-base"`` (the name, not a path) is Whisper base's encoder
    from the installed ``lmdiff[speech]`` extra (:func:`whisper_ct2.load_whisper_base_encoder`). ``model_type`` in its config picks the model: ``Wav2Vec2Model``,
    ``HubertModel`` or the encoder of ``WhisperModel``. The weights are loaded on first use.

    ``layer``: ``None`` for the last hidden state (L = 1), an int for that index of ``hidden_states`` (0 is the
    input to the first transformer layer; negative counts from the end; L = 1), or ``"all"`` for every hidden
    state stacked on the L axis (L = number of layers + 1), for a learned weighted sum in the model.

    Preprocessing follows each model: wav2vec2 / HuBERT take the raw 16 kHz waveform, normalised to zero mean and
    unit variance over the whole clip (unless the folder's ``preprocessor_config.json`` says
    ``do_normalize: false``); Whisper takes the log-mel of ``WhisperFeatureExtractor`` (from the folder's
    preprocessor config when present, else built with the model's ``num_mel_bins`` and Whisper's defaults, which
    is the same computation) on a window padded to 30 s, of which only the frames covering real audio are kept.

    The encoder frames (50 Hz: encoder frame ``i`` is centred on the middle of its receptive field, e.g. sample
    ``320 i + 200`` for wav2vec2 and ``320 i`` for Whisper) are linearly interpolated in time to the sub-frame
    centres ``(t * sub_frames + j) * sample_rate / (fps * sub_frames)``, holding the first/last encoder frame
    beyond the ends, and reshaped to ``[T, sub_frames, L, D]``.

    Bounded memory: audio longer than ``chunk_seconds`` (default 20 s for wav2vec2 / HuBERT, 30 s, the whole
    window, for Whisper, which is also the most it takes) is encoded in chunks. Chunk ``c`` owns the encoder
    frames of its core of ``chunk_seconds - 2 * context_seconds`` seconds and is encoded with up to
    ``context_seconds`` (default 1 s) of audio on each side, which is then trimmed away; the kept frames sit on
    the same 50 Hz grid as an unchunked pass. Frames near a chunk border therefore see at least 1 s of context on
    each side; a model whose receptive field is local (convolutions) gives the same frames as one pass, while
    attention layers see only their chunk (Whisper's 30 s window is the same limit). wav2vec2 base models
    normalise their first convolution over time (``feat_extract_norm="group"``), also per chunk.

    ``device`` and ``dtype`` (a ``torch.dtype`` or its name) say where and in what precision the encoder runs;
    features are returned as float32 on the CPU. ``device`` is not part of :meth:`config` (the same features
    come from any device, within precision), ``dtype`` is.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        layer: int | str | None = None,
        sub_frames: int = 2,
        fps: float = DEFAULT_FPS,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
        chunk_seconds: float | None = None,
        context_seconds: float = 1.0,
        sample_rate: int = DEFAULT_SAMPLE_RATE,
    ):
        self.builtin = isinstance(model_dir, str) and model_dir == WHISPER_BASE
        self.model_dir = model_dir if self.builtin else _model_folder(model_dir)
        self.sub_frames = _positive_int(sub_frames, "sub_frames")
        self.fps = _positive_float(fps, "fps")
        self.sample_rate = _positive_int(sample_rate, "sample_rate")
        if self.sample_rate != DEFAULT_SAMPLE_RATE:
            raise LmdiffInputError(
                f"pretrained speech encoders take {DEFAULT_SAMPLE_RATE} Hz audio, got sample_rate={sample_rate}"
            )
        self.device = torch.device(device)
        self.dtype = _torch_dtype(dtype)

        from transformers import AutoConfig

        if self.builtin:
            from . import whisper_ct2

            whisper_ct2.part_paths()  # the extra is installed (else the pip command), before any work is done
            self._hf_config = whisper_ct2.encoder_config()
        else:
            try:
                self._hf_config = AutoConfig.from_pretrained(str(self.model_dir), local_files_only=True)
            except (OSError, ValueError, KeyError) as error:
                raise LmdiffInputError(
                    f"model folder {self.model_dir} has no readable transformers config.json ({error}); expected a "
                    "wav2vec2, HuBERT or Whisper folder written by save_pretrained"
                ) from error
        self.model_type = getattr(self._hf_config, "model_type", None)
        if self.model_type not in _PRETRAINED_TYPES:
            raise LmdiffInputError(
                f"model folder {self.model_dir} holds a {self.model_type!r} model; supported speech encoders: "
                f"{', '.join(_PRETRAINED_TYPES)}"
            )
        if not self.builtin and not any((self.model_dir / name).is_file() for name in _WEIGHT_FILES):
            raise LmdiffInputError(
                f"model folder {self.model_dir} has no weights (expected one of {', '.join(_WEIGHT_FILES)})"
            )

        cfg = self._hf_config
        if self.model_type == "whisper":
            n_layers, self.dim = int(cfg.encoder_layers), int(cfg.d_model)
            self._whisper_extractor = self._load_whisper_extractor()
            mel_hop = int(self._whisper_extractor.hop_length)
            self.encoder_hop = mel_hop * 2  # conv1 stride 1, conv2 stride 2
            self.encoder_offset = 0.0  # mel frames are centred (stft center=True) and the convolutions symmetric
            self._window_samples = int(cfg.max_source_positions) * 2 * mel_hop
            self.receptive_field = 1
            default_chunk = self._window_samples / self.sample_rate
            self._normalize = False
        else:
            n_layers, self.dim = int(cfg.num_hidden_layers), int(cfg.hidden_size)
            strides, kernels = list(cfg.conv_stride), list(cfg.conv_kernel)
            self.encoder_hop = math.prod(strides)
            field, jump = 1, 1
            for kernel, stride in zip(kernels, strides):
                field += (kernel - 1) * jump
                jump *= stride
            self.receptive_field = field
            self.encoder_offset = (field - 1) / 2
            self._window_samples = None
            default_chunk = 20.0
            self._normalize = bool(self._preprocessor_config().get("do_normalize", True))

        self.layer = _checked_layer(layer, n_layers, self.model_dir)
        self.layers = n_layers + 1 if self.layer == "all" else 1
        self.chunk_seconds = _positive_float(default_chunk if chunk_seconds is None else chunk_seconds, "chunk_seconds")
        self.context_seconds = float(context_seconds)
        if not math.isfinite(self.context_seconds) or self.context_seconds < 0:
            raise LmdiffInputError(f"context_seconds must be zero or positive, got {context_seconds!r}")
        hop = self.encoder_hop
        chunk = int(self.chunk_seconds * self.sample_rate) // hop * hop
        if self._window_samples is not None:
            chunk = min(chunk, self._window_samples // hop * hop)
        # At least one receptive field of context, so that every frame a chunk owns can be computed from it.
        context = math.ceil(max(self.context_seconds * self.sample_rate, self.receptive_field) / hop) * hop
        if chunk - 2 * context < hop:
            raise LmdiffInputError(
                f"chunk_seconds ({self.chunk_seconds:g}) must exceed twice context_seconds ({self.context_seconds:g})"
                + (
                    f" within Whisper's {self._window_samples / self.sample_rate:g} s window"
                    if self._window_samples
                    else ""
                )
            )
        self._chunk_samples, self._context_samples = chunk, context
        self.name = WHISPER_BASE if self.builtin else f"{self.model_type}:{self.model_dir.name}"
        self._model = None

    def config(self) -> dict:
        return {
            "kind": "pretrained",
            "version": _CONFIG_VERSION,
            "model_dir": str(self.model_dir),
            "model_type": self.model_type,
            "layer": self.layer,
            "sub_frames": self.sub_frames,
            "fps": self.fps,
            "sample_rate": self.sample_rate,
            "dtype": str(self.dtype).removeprefix("torch."),
            "chunk_seconds": self.chunk_seconds,
            "context_seconds": self.context_seconds,
        }

    def cache_token(self) -> str:
        """The config plus the names, sizes and modification times of the folder's files (new weights, new key);
        for ``whisper-base`` the parts' checksums."""
        if self.builtin:
            from .whisper_ct2 import PARTS

            return json.dumps({"config": self.config(), "parts": [sha for _, _, sha in PARTS]}, sort_keys=True)
        files = sorted(
            (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in self.model_dir.iterdir() if p.is_file()
        )
        return json.dumps({"config": self.config(), "files": files}, sort_keys=True)

    # -- model ---------------------------------------------------------------------------------------------------

    def load(self) -> torch.nn.Module:
        """Load the encoder's weights (done on first use) and return the encoder module."""
        if self._model is not None:
            return self._model
        import transformers

        try:
            if self.builtin:
                from .whisper_ct2 import load_whisper_base_encoder

                model = load_whisper_base_encoder()
            elif self.model_type == "whisper" and getattr(self._hf_config, "architectures", None) == ["WhisperEncoder"]:
                from transformers.models.whisper.modeling_whisper import WhisperEncoder

                model = WhisperEncoder.from_pretrained(str(self.model_dir), local_files_only=True, dtype=self.dtype)
            elif self.model_type == "whisper":
                full = transformers.WhisperModel.from_pretrained(
                    str(self.model_dir), local_files_only=True, dtype=self.dtype
                )
                model = full.get_encoder()
                del full
            else:
                cls = transformers.Wav2Vec2Model if self.model_type == "wav2vec2" else transformers.HubertModel
                model = cls.from_pretrained(str(self.model_dir), local_files_only=True, dtype=self.dtype)
        except (OSError, ValueError, RuntimeError) as error:
            raise LmdiffInputError(
                f"could not load the {self.model_type} weights in {self.model_dir}: {error}"
            ) from error
        self._model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        return self._model

    def _preprocessor_config(self) -> dict:
        path = None if self.builtin else self.model_dir / "preprocessor_config.json"
        if path is None or not path.is_file():
            return {}
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise LmdiffInputError(f"{path} is not valid JSON: {error}") from error

    def _load_whisper_extractor(self):
        from transformers import WhisperFeatureExtractor

        n_mels = int(self._hf_config.num_mel_bins)
        if not self.builtin and (self.model_dir / "preprocessor_config.json").is_file():
            try:
                extractor = WhisperFeatureExtractor.from_pretrained(str(self.model_dir), local_files_only=True)
            except (OSError, ValueError) as error:
                raise LmdiffInputError(
                    f"{self.model_dir / 'preprocessor_config.json'} is not a Whisper feature extractor config: {error}"
                ) from error
            if extractor.feature_size != n_mels:
                raise LmdiffInputError(
                    f"{self.model_dir}: preprocessor_config.json has {extractor.feature_size} mel bins but the model "
                    f"expects {n_mels}"
                )
        else:
            extractor = WhisperFeatureExtractor(feature_size=n_mels, sampling_rate=self.sample_rate)
        if extractor.sampling_rate != self.sample_rate:
            raise LmdiffInputError(
                f"{self.model_dir}: the Whisper feature extractor expects {extractor.sampling_rate} Hz audio, "
                f"lmdiff feeds {self.sample_rate} Hz"
            )
        return extractor

    # -- features ------------------------------------------------------------------------------------------------

    def _extract(self, audio: np.ndarray, n_frames: int) -> np.ndarray:
        # Each chunk's encoder frames are resampled as soon as they are there (keeping the chunk's last frame for the
        # next one), so memory holds the output and one chunk, not every 50 Hz frame of a long file as well.
        n_sub = n_frames * self.sub_frames
        centres = np.arange(n_sub, dtype=np.float64) * (self.sample_rate / (self.fps * self.sub_frames))
        positions = np.maximum((centres - self.encoder_offset) / self.encoder_hop, 0.0)
        out = np.empty((n_sub, self.layers, self.dim), dtype=np.float32)
        done, start, buffer = 0, 0, None  # sub-frames written; 50 Hz index of buffer[0]
        pieces = self._encoded_pieces(audio)
        piece = next(pieces)
        while piece is not None:
            following = next(pieces, None)
            if buffer is not None:
                start += len(buffer) - 1
                piece = np.concatenate([buffer[-1:], piece])
            buffer, end = piece, start + len(piece)
            # a sub-frame is ready when both of its neighbouring frames are here (or no frame follows)
            stop = n_sub if following is None else int(np.searchsorted(positions, end - 1, side="left"))
            out[done:stop] = _interpolate_frames(buffer, positions[done:stop] - start)
            done, piece = stop, following
        return out.reshape(n_frames, self.sub_frames, self.layers, self.dim)

    def encode(self, audio: np.ndarray) -> np.ndarray:
        """Encoder frames ``[n_enc, L, D]`` float32 of 16 kHz mono ``audio``, chunked as described above.

        Frame ``i`` is centred on sample ``i * encoder_hop + encoder_offset``.
        """
        return np.concatenate(list(self._encoded_pieces(audio)), axis=0)

    def _encoded_pieces(self, audio: np.ndarray):
        """The encoder frames of :meth:`encode`, one chunk's kept frames ``[m, L, D]`` at a time, in order."""
        audio = np.asarray(audio, dtype=np.float32)
        if self.model_type != "whisper":
            if len(audio) < self.receptive_field:  # shorter than one encoder frame: pad with silence
                audio = np.pad(audio, (0, self.receptive_field - len(audio)))
            if self._normalize:
                audio = (audio - audio.mean()) / np.sqrt(audio.var() + 1e-7)
        hop, n = self.encoder_hop, len(audio)
        chunk, context = self._chunk_samples, self._context_samples
        if n <= chunk:
            yield self._encode_chunk(audio)
            return
        core = chunk - 2 * context
        for core_start in range(0, n, core):
            start, stop = max(0, core_start - context), min(n, core_start + core + context)
            frames = self._encode_chunk(audio[start:stop])
            first = (core_start - start) // hop
            last = None if core_start + core >= n else (core_start + core - start) // hop
            yield frames[first:last]

    @torch.inference_mode()
    def _encode_chunk(self, audio: np.ndarray) -> np.ndarray:
        model = self.load()
        want_all = self.layer is not None
        if self.model_type == "whisper":
            mel = self._whisper_extractor(
                audio,
                sampling_rate=self.sample_rate,
                padding="max_length",
                max_length=self._window_samples,
                truncation=True,
                return_tensors="pt",
            )["input_features"]
            output = model(mel.to(device=self.device, dtype=self.dtype), output_hidden_states=want_all)
            n_valid = math.ceil(len(audio) / self.encoder_hop)  # frames centred on real audio
        else:
            values = torch.from_numpy(np.ascontiguousarray(audio))[None].to(device=self.device, dtype=self.dtype)
            output = model(values, output_hidden_states=want_all)
            n_valid = None
        if self.layer is None:
            states = output.last_hidden_state[0][:, None]
        elif self.layer == "all":
            states = torch.stack([h[0] for h in output.hidden_states], dim=1)
        else:
            states = output.hidden_states[self.layer][0][:, None]
        return states[:n_valid].float().cpu().numpy()


def load_feature_extractor(
    spec: str | os.PathLike | dict | AudioFeatureExtractor | None = None, **kwargs: Any
) -> AudioFeatureExtractor:
    """Build a feature extractor.

    ``None`` or ``"logmel"``: :class:`LogMelFeatures`; ``"whisper-base"``: :class:`PretrainedSpeechFeatures` of
    the ``lmdiff[speech]`` extra's encoder at layer :data:`WHISPER_BASE_LAYER` (unless ``layer`` is given); a dict
    from :meth:`AudioFeatureExtractor.config`: the same extractor again; a path to a model folder: :class:`PretrainedSpeechFeatures`; an extractor: itself.
    ``kwargs`` go to the constructor (and override a dict's values), e.g. ``layer="all"`` or ``device="cuda"``.
    """
    if isinstance(spec, AudioFeatureExtractor):
        if kwargs:
            raise LmdiffInputError(f"cannot apply {sorted(kwargs)} to an already built {spec!r}")
        return spec
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "logmel"):
        return LogMelFeatures(**kwargs)
    if isinstance(spec, dict):
        params = dict(spec)
        kind = params.pop("kind", None)
        version = params.pop("version", _CONFIG_VERSION)
        if version != _CONFIG_VERSION:
            raise LmdiffInputError(
                f"audio feature config version {version!r} is not supported (this lmdiff writes {_CONFIG_VERSION})"
            )
        params.update(kwargs)
        try:
            if kind == "logmel":
                return LogMelFeatures(**params)
            if kind == "pretrained":
                params.pop("model_type", None)  # read from the folder again
                return PretrainedSpeechFeatures(**params)
        except TypeError as error:
            raise LmdiffInputError(f"invalid {kind} audio feature config {spec}: {error}") from error
        raise LmdiffInputError(f"audio feature config must have kind 'logmel' or 'pretrained', got {kind!r} in {spec}")
    if isinstance(spec, str) and spec.strip().lower() == WHISPER_BASE:
        return PretrainedSpeechFeatures(WHISPER_BASE, **{"layer": WHISPER_BASE_LAYER, **kwargs})
    if isinstance(spec, str | os.PathLike):
        path = Path(spec).expanduser()
        if path.is_dir():
            return PretrainedSpeechFeatures(path, **kwargs)
        raise LmdiffInputError(
            f"audio features {str(spec)!r}: expected 'logmel', '{WHISPER_BASE}' or a folder with a wav2vec2, HuBERT or Whisper model "
            f"({path} {'is not a folder' if path.exists() else 'does not exist'})"
        )
    raise LmdiffInputError(
        f"audio features must be 'logmel', a model folder or a config dict, got {type(spec).__name__}"
    )


def audio_to_mono16k(audio: Any, sample_rate: int = DEFAULT_SAMPLE_RATE) -> np.ndarray:
    """Float32 mono audio at 16 kHz (``sample_rate``) from an array, a ComfyUI AUDIO dict or a file path.

    An array (numpy or torch) is taken as mono at ``sample_rate`` (a ``[1, N]`` or ``[N, 1]`` array is
    squeezed); a ComfyUI AUDIO goes through :func:`comfy_io.audio_from_comfy` (first item, channels averaged,
    resampled); a path through :func:`media.read_audio`. NaN and infinite samples become silence; audio with no
    samples, or none finite, raises :class:`LmdiffInputError` saying it is empty.
    """
    if isinstance(audio, dict):
        from . import comfy_io

        mono, what = comfy_io.audio_from_comfy(audio, sample_rate=sample_rate), "AUDIO input"
    elif isinstance(audio, str | os.PathLike):
        mono, what = media.read_audio(audio, sample_rate=sample_rate), f"audio file {audio}"
    elif isinstance(audio, np.ndarray | torch.Tensor):
        if isinstance(audio, torch.Tensor):
            audio = audio.detach().to(device="cpu", dtype=torch.float32).numpy()
        mono, what = np.asarray(audio, dtype=np.float32), f"audio array of shape {audio.shape}"
        if mono.ndim == 2 and 1 in mono.shape:
            mono = mono.reshape(-1)
        if mono.ndim != 1:
            raise LmdiffInputError(f"audio must be mono with shape [samples], got shape {audio.shape}")
    else:
        raise LmdiffInputError(
            f"audio must be a numpy array, a ComfyUI AUDIO dict or a file path, got {type(audio).__name__}"
        )
    finite = np.isfinite(mono)
    if mono.size == 0 or not finite.any():
        raise LmdiffInputError(f"{what} is empty: it has no {'finite ' if mono.size else ''}samples")
    if not finite.all():
        mono = np.where(finite, mono, np.float32(0.0))
    return np.ascontiguousarray(mono, dtype=np.float32)


def frame_windows(features: np.ndarray, radius: int) -> np.ndarray:
    """Context windows around every frame: ``[T, k, L, D]`` -> ``[T, (2 * radius + 1) * k, L, D]``.

    Window ``t`` holds the sub-frames of frames ``t - radius`` ... ``t + radius`` in time order; frames before
    the first or after the last are the first / last frame repeated (edge padding). ``radius=0`` returns the
    features unchanged. Works on numpy arrays and torch tensors.
    """
    if isinstance(radius, bool) or not isinstance(radius, numbers.Integral) or radius < 0:
        raise LmdiffInputError(f"radius must be a non-negative integer, got {radius!r}")
    if features.ndim != 4:
        raise LmdiffInputError(f"features must have shape [T, k, L, D], got {tuple(features.shape)}")
    n, k, n_layers, dim = features.shape
    if radius == 0 or n == 0:
        return features.reshape(n, (2 * radius + 1) * k, n_layers, dim)
    index = np.clip(np.arange(n)[:, None] + np.arange(-radius, radius + 1)[None, :], 0, n - 1)
    if isinstance(features, torch.Tensor):
        index = torch.from_numpy(index).to(features.device)
    return features[index].reshape(n, (2 * radius + 1) * k, n_layers, dim)


class FeatureCache:
    """Computed features on disk, keyed by content: the audio's samples and the extractor's configuration.

    ComfyUI passes audio as AUDIO dicts without a path, so the key is the sha256 of the float32 16 kHz samples,
    the extractor's :meth:`~AudioFeatureExtractor.cache_token` (its config as JSON; for a pretrained model also the
    folder's file sizes and times) and the frame count. Entries are ``<key>.safetensors`` files in ``folder``,
    written to a temporary file and renamed, so a reader never sees half a file; an unreadable entry is
    recomputed.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder).expanduser()
        if self.folder.exists() and not self.folder.is_dir():
            raise LmdiffInputError(f"feature cache {self.folder} exists and is not a folder")

    def key(self, extractor: AudioFeatureExtractor, audio: np.ndarray, n_frames: int) -> str:
        digest = hashlib.sha256()
        digest.update(np.ascontiguousarray(audio, dtype=np.float32).tobytes())
        digest.update(b"\0" + extractor.cache_token().encode() + b"\0" + str(int(n_frames)).encode())
        return digest.hexdigest()

    def path_for(self, extractor: AudioFeatureExtractor, audio: Any, n_frames: int | None = None) -> Path:
        """The file that holds (or would hold) the features of ``audio``."""
        audio = audio_to_mono16k(audio, sample_rate=extractor.sample_rate)
        return self.folder / f"{self.key(extractor, audio, extractor.n_frames_for(audio, n_frames))}.safetensors"

    def get_or_compute(self, extractor: AudioFeatureExtractor, audio: Any, n_frames: int | None = None) -> np.ndarray:
        """``extractor(audio, n_frames)``, read from the cache when present, else computed and stored."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file, save_file

        audio = audio_to_mono16k(audio, sample_rate=extractor.sample_rate)
        n_frames = extractor.n_frames_for(audio, n_frames)
        path = self.folder / f"{self.key(extractor, audio, n_frames)}.safetensors"
        if path.is_file():
            try:
                return load_file(str(path))["features"]
            except (OSError, KeyError, SafetensorError):
                pass  # damaged: compute again and replace it
        features = extractor(audio, n_frames)
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as temporary:
            save_file({"features": features}, str(temporary), metadata={"extractor": json.dumps(extractor.config())})
        return features


# -- helpers -----------------------------------------------------------------------------------------------------


def _interpolate_frames(frames: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``frames`` [N, ...] at fractional frame ``positions``, clamped to the ends."""
    positions = np.clip(positions, 0, len(frames) - 1)
    lower = np.floor(positions).astype(np.int64)
    upper = np.minimum(lower + 1, len(frames) - 1)
    weight = (positions - lower).astype(np.float32).reshape(-1, *([1] * (frames.ndim - 1)))
    return frames[lower] * (1 - weight) + frames[upper] * weight


def _model_folder(model_dir: str | os.PathLike) -> Path:
    path = Path(model_dir).expanduser()
    if not path.exists():
        raise LmdiffInputError(f"model folder {path} does not exist; expected a wav2vec2, HuBERT or Whisper folder")
    if not path.is_dir():
        raise LmdiffInputError(f"model folder {path} is not a folder; expected a wav2vec2, HuBERT or Whisper folder")
    if not (path / "config.json").is_file():
        raise LmdiffInputError(f"model folder {path} has no config.json; expected a folder written by save_pretrained")
    return path.resolve()


def _checked_layer(layer: int | str | None, n_layers: int, model_dir: Path) -> int | str | None:
    if layer is None or layer == "all":
        return layer
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
        raise LmdiffInputError(f"layer must be None, 'all' or an integer, got {layer!r}")
    if not -(n_layers + 1) <= layer <= n_layers:
        raise LmdiffInputError(f"layer {layer} is out of range for {model_dir}, which has hidden states 0..{n_layers}")
    return int(layer)


def _torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise LmdiffInputError(f"dtype must be a floating torch dtype such as 'float32', got {dtype!r}")
    return resolved


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise LmdiffInputError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _positive_float(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise LmdiffInputError(f"{what} must be a positive number, got {value!r}")
    return float(value)
