"""Tests of lmdiff_core.audio_features on real speech from ../shared/data.

Expectations are computed independently of the code under test: frame counts from the wavs' durations, the
energy of every sub-frame from the audio samples under its window, a reference log-mel from numpy's FFT, the
resampled ComfyUI audio against the original 16 kHz wav, context windows from a plain loop.

The pretrained-encoder tests use tiny wav2vec2 / HuBERT / Whisper models with **random weights**, built and saved
inside the tests: no real checkpoint can be obtained here (no network, nothing in ../shared). They check what
lmdiff adds around the encoder: loading from a local folder, preprocessing, layer selection, alignment to the
video frames and chunking; not what the features mean.
"""

from __future__ import annotations

import json
import math

import librosa
import numpy as np
import pytest
import soundfile
import torch
from scipy import signal
from scipy.special import logsumexp

from lmdiff_core import comfy_io, media
from lmdiff_core.audio_features import (
    AudioFeatureExtractor,
    FeatureCache,
    LogMelFeatures,
    PretrainedSpeechFeatures,
    audio_to_mono16k,
    frame_windows,
    load_feature_extractor,
)
from lmdiff_core.errors import LmdiffInputError

from .conftest import shared_path

SR = 16000
HOP = 160  # LogMelFeatures at 25 fps and 4 sub-frames
WIN = 400
# Clips of whole-frame lengths (10, 20, 30 s) and speech of non-integer frame counts (11.86 s, 9.34 s).
WAVS = [
    "data/clips/edtalk_woman_en.wav",
    "data/clips/latentsync_man_a.wav",
    "data/clips/cnn_anchor_en.wav",
    "data/speech/speech_fr_macron.wav",
    "data/speech/speech_de.wav",
]
SPEECH = "data/speech/speech_fr_macron.wav"  # 11.86 s, 297 frames
LOG_FLOOR = np.float32(np.log(np.float32(1e-6)))


def read_wav(relative: str) -> np.ndarray:
    audio, rate = soundfile.read(shared_path(relative), dtype="float32")
    assert rate == SR and audio.ndim == 1
    return audio


def speech_seconds(seconds: float) -> np.ndarray:
    """Real speech of exactly ``seconds`` (clips joined end to end)."""
    parts = [read_wav("data/clips/edtalk_man_en.wav"), read_wav("data/clips/latentsync_woman.wav")]
    audio = np.concatenate(parts * 2)
    n = round(seconds * SR)
    assert len(audio) >= n
    return audio[:n]


@pytest.fixture(scope="module")
def logmel() -> LogMelFeatures:
    return LogMelFeatures()


# -- LogMelFeatures ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("relative", WAVS)
def test_logmel_frames_align_with_the_video_and_follow_the_energy(logmel, relative):
    audio = read_wav(relative)
    duration = len(audio) / SR
    features = logmel(audio)

    n_frames = media.frame_count(duration, 25)
    assert n_frames == math.ceil(round(duration * 25, 6))
    assert features.shape == (n_frames, 4, 1, 80) and features.dtype == np.float32

    # Sub-frame (t, j) is centred on sample (4 t + j) * 160: its energy is that of the 400 samples around it.
    padded = np.pad(audio, (WIN // 2, n_frames * 640 - len(audio) + WIN // 2))
    starts = np.arange(n_frames * 4) * HOP
    power = np.array([np.mean(padded[s : s + WIN].astype(np.float64) ** 2) for s in starts])
    mel_energy = logsumexp(features.reshape(-1, 80), axis=1)
    assert np.corrcoef(np.log(power + 1e-10), mel_energy)[0, 1] > 0.95
    # Misaligning the power by two sub-frames (20 ms) must fit worse: the alignment is what is measured.
    shifted = np.corrcoef(np.log(power[2:] + 1e-10), mel_energy[:-2])[0, 1]
    assert shifted < np.corrcoef(np.log(power + 1e-10), mel_energy)[0, 1]


def test_logmel_equals_a_numpy_log_mel(logmel):
    audio = read_wav(SPEECH)
    features = logmel(audio)
    n_sub = features.shape[0] * 4
    padded = np.pad(media.fit_audio_to_frames(audio, features.shape[0], 25), WIN // 2)
    window = signal.get_window("hann", WIN, fftbins=True)
    frames = np.stack([padded[m * HOP : m * HOP + WIN] for m in range(n_sub)]) * window
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    expected = np.log(power @ librosa.filters.mel(sr=SR, n_fft=WIN, n_mels=80).T + 1e-6)
    np.testing.assert_allclose(features.reshape(n_sub, 80), expected, atol=2e-3)


def test_logmel_silence_gives_the_minimum_value(logmel):
    audio = read_wav(SPEECH)
    features = logmel(np.concatenate([audio, np.zeros(SR, np.float32)]))
    subs = features.reshape(-1, 80)
    silent = np.arange(len(subs)) * HOP - WIN // 2 >= len(audio)  # windows entirely in the appended zeros
    assert silent.sum() >= 95
    np.testing.assert_allclose(subs[silent], LOG_FLOOR, rtol=1e-6)
    assert subs.min() == pytest.approx(LOG_FLOOR, rel=1e-6)
    speech = subs[: len(audio) // HOP - 3].max(axis=1)
    assert np.mean(speech > LOG_FLOOR + 5) > 0.8  # the speech itself is well above it


def test_logmel_shifting_the_audio_by_one_frame_shifts_the_features(logmel):
    audio = read_wav(SPEECH)
    features = logmel(audio)
    shifted = logmel(np.concatenate([np.zeros(640, np.float32), audio]))
    assert shifted.shape[0] == features.shape[0] + 1
    np.testing.assert_allclose(shifted[2:-1], features[1:-1], atol=1e-4)
    # With an equal number of frames (the tail trimmed), the shift holds too.
    trimmed = logmel(np.concatenate([np.zeros(640, np.float32), audio]), n_frames=features.shape[0])
    np.testing.assert_allclose(trimmed[2:-1], features[1:-2], atol=1e-4)


def test_logmel_is_deterministic(logmel):
    audio = read_wav(SPEECH)
    first, second = logmel(audio), logmel(audio.copy())
    assert np.array_equal(first, second)
    assert np.array_equal(first, LogMelFeatures()(audio))


def test_logmel_chunks_equal_one_pass():
    """Long audio is computed in chunks of sub-frames; chunk borders change nothing (each frame sees the same
    samples), whatever the chunk length, including one not dividing the frame count."""
    audio = speech_seconds(7.3)
    whole = LogMelFeatures()
    whole.chunk_sub_frames = 10**9
    reference = whole(audio)
    for chunk in (1, 7, 400):
        chunked = LogMelFeatures()
        chunked.chunk_sub_frames = chunk
        np.testing.assert_allclose(chunked(audio), reference, rtol=0, atol=1e-4)


def test_logmel_n_frames_pads_or_trims(logmel):
    audio = read_wav(SPEECH)
    full = logmel(audio)
    longer = logmel(audio, n_frames=len(full) + 10)
    assert longer.shape == (len(full) + 10, 4, 1, 80)
    np.testing.assert_allclose(longer[: len(full) - 1], full[:-1], atol=1e-5)
    np.testing.assert_allclose(longer[-5:], LOG_FLOOR, rtol=1e-6)
    shorter = logmel(audio, n_frames=100)
    np.testing.assert_allclose(shorter[:-1], full[:99], atol=1e-5)
    assert logmel(audio, n_frames=0).shape == (0, 4, 1, 80)
    with pytest.raises(LmdiffInputError, match="n_frames"):
        logmel(audio, n_frames=-1)


def test_logmel_options_and_config():
    extractor = LogMelFeatures(n_mels=40, sub_frames=2)
    assert (extractor.hop_length, extractor.sub_frames, extractor.dim, extractor.layers) == (320, 2, 40, 1)
    audio = np.random.default_rng(0).standard_normal(SR).astype(np.float32) * 0.1
    assert extractor(audio).shape == (25, 2, 1, 40)
    config = json.loads(json.dumps(extractor.config()))
    rebuilt = load_feature_extractor(config)
    assert isinstance(rebuilt, LogMelFeatures) and rebuilt.config() == extractor.config()
    assert np.array_equal(rebuilt(audio), extractor(audio))
    with pytest.raises(LmdiffInputError, match="whole number"):
        LogMelFeatures(sub_frames=3)  # 16000 / 75 = 213.3 samples
    with pytest.raises(LmdiffInputError, match="n_mels"):
        LogMelFeatures(n_mels=0)


def test_load_feature_extractor_specs(tmp_path):
    assert isinstance(load_feature_extractor(), LogMelFeatures)
    assert isinstance(load_feature_extractor("logmel", n_mels=64), LogMelFeatures)
    assert load_feature_extractor("logmel", n_mels=64).dim == 64
    missing = tmp_path / "no_such_model"
    with pytest.raises(LmdiffInputError, match="no_such_model"):
        load_feature_extractor(str(missing))
    with pytest.raises(LmdiffInputError, match="kind"):
        load_feature_extractor({"n_mels": 80})


# -- pretrained encoders (tiny random models) ------------------------------------------------------------------


def _tiny_wav2vec2(folder, model_type="wav2vec2", feat_extract_norm="layer"):
    from transformers import HubertConfig, HubertModel, Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    config_cls, model_cls = (Wav2Vec2Config, Wav2Vec2Model) if model_type == "wav2vec2" else (HubertConfig, HubertModel)
    config = config_cls(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        conv_dim=(16, 16, 16),
        conv_stride=(5, 8, 8),  # 320 samples per frame: 50 Hz, like the real models
        conv_kernel=(10, 8, 8),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        feat_extract_norm=feat_extract_norm,
    )
    torch.manual_seed(0)
    model_cls(config).save_pretrained(folder)
    if model_type == "wav2vec2":
        Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=False).save_pretrained(folder)
    return folder


def _tiny_whisper(folder, with_preprocessor=True):
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    config = WhisperConfig(
        d_model=32,
        encoder_layers=2,
        encoder_attention_heads=2,
        encoder_ffn_dim=37,
        decoder_layers=1,
        decoder_attention_heads=2,
        decoder_ffn_dim=37,
        num_mel_bins=80,
        max_source_positions=1500,  # the real 30 s window
        max_target_positions=32,
        vocab_size=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        begin_suppress_tokens=None,
        suppress_tokens=None,
    )
    torch.manual_seed(0)
    WhisperModel(config).save_pretrained(folder)
    if with_preprocessor:
        WhisperFeatureExtractor(feature_size=80).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_speech_models")
    return {
        "wav2vec2": _tiny_wav2vec2(root / "wav2vec2"),
        "hubert": _tiny_wav2vec2(root / "hubert", "hubert", feat_extract_norm="group"),
        "whisper": _tiny_whisper(root / "whisper"),
    }


@pytest.mark.parametrize("model_type", ["wav2vec2", "hubert", "whisper"])
def test_pretrained_shapes_and_layers(tiny_models, model_type):
    audio = read_wav(SPEECH)
    n_frames = media.frame_count(len(audio) / SR, 25)
    last = load_feature_extractor(str(tiny_models[model_type]))
    assert isinstance(last, PretrainedSpeechFeatures) and last.model_type == model_type
    every = load_feature_extractor(str(tiny_models[model_type]), layer="all")
    first = load_feature_extractor(str(tiny_models[model_type]), layer=1)

    features_last, features_all, features_1 = last(audio), every(audio), first(audio)
    assert features_last.shape == (n_frames, 2, 1, 32) and features_last.dtype == np.float32
    assert features_all.shape == (n_frames, 2, 3, 32)  # embeddings + 2 layers
    assert features_1.shape == (n_frames, 2, 1, 32)
    assert np.isfinite(features_all).all()
    np.testing.assert_allclose(features_all[:, :, 1:2], features_1, atol=1e-5)
    np.testing.assert_allclose(features_all[:, :, -1:], features_last, atol=1e-5)
    assert not np.allclose(features_all[:, :, 0], features_all[:, :, 2], atol=1e-3)  # the layers differ

    # The config rebuilds the same extractor (and the same features).
    config = json.loads(json.dumps(every.config()))
    assert config["model_type"] == model_type and config["layer"] == "all"
    rebuilt = load_feature_extractor(config)
    assert rebuilt.config() == every.config()
    np.testing.assert_array_equal(rebuilt(audio), features_all)


@pytest.mark.parametrize("model_type", ["wav2vec2", "whisper"])
@pytest.mark.parametrize("seconds", [0.5, 9.34, 12.3])
def test_pretrained_frame_count_matches_the_video(tiny_models, model_type, seconds):
    audio = speech_seconds(seconds)
    extractor = load_feature_extractor(str(tiny_models[model_type]), sub_frames=3)
    features = extractor(audio)
    assert features.shape == (media.frame_count(seconds, 25), 3, 1, 32)
    assert extractor(audio, n_frames=7).shape == (7, 3, 1, 32)


def test_pretrained_chunks_equal_one_pass_for_a_local_encoder(tiny_models):
    """wav2vec2 up to hidden state 0 (convolutions + per-frame layer norms) is local: chunking must not show."""
    audio = speech_seconds(45)
    folder = str(tiny_models["wav2vec2"])
    chunked = load_feature_extractor(folder, layer=0)  # 20 s chunks, 1 s context
    whole = load_feature_extractor(folder, layer=0, chunk_seconds=60)
    assert chunked.config()["chunk_seconds"] == 20.0
    features_chunked, features_whole = chunked(audio), whole(audio)
    assert features_chunked.shape == features_whole.shape == (1125, 2, 1, 32)
    np.testing.assert_allclose(features_chunked, features_whole, atol=1e-5)


def test_pretrained_chunks_stay_close_to_one_pass_with_attention(tiny_models):
    audio = speech_seconds(45)
    folder = str(tiny_models["wav2vec2"])
    chunked = load_feature_extractor(folder)(audio)
    whole = load_feature_extractor(folder, chunk_seconds=60)(audio)
    assert chunked.shape == whole.shape == (1125, 2, 1, 32)
    # Attention sees only its chunk, so the frames differ a little (random weights: little), not in alignment.
    np.testing.assert_allclose(chunked, whole, atol=2e-2)
    scale = np.abs(whole).mean()
    assert np.abs(chunked - whole).mean() < 0.01 * scale


def test_whisper_long_audio_is_encoded_in_windows(tiny_models):
    """45 s through Whisper's 30 s window: the first window holds 0..29 s, of which 0..28 s are kept."""
    audio = speech_seconds(45)
    extractor = load_feature_extractor(str(tiny_models["whisper"]), layer="all")
    features = extractor(audio)
    assert features.shape == (1125, 2, 3, 32) and np.isfinite(features).all()
    prefix = extractor(audio[: 29 * SR])  # exactly the first chunk's input, in one window
    np.testing.assert_allclose(features[:700], prefix[:700], atol=1e-5)
    assert not np.allclose(features[705:725], prefix[705:725], atol=1e-3)  # past 28 s the second chunk takes over


def test_whisper_without_preprocessor_config_computes_the_same_mel(tiny_models, tmp_path):
    import shutil

    bare = tmp_path / "whisper_bare"
    shutil.copytree(tiny_models["whisper"], bare)
    (bare / "preprocessor_config.json").unlink()
    audio = read_wav("data/speech/speech_de.wav")
    with_config = load_feature_extractor(str(tiny_models["whisper"]))(audio)
    without = load_feature_extractor(str(bare))(audio)
    np.testing.assert_allclose(without, with_config, atol=1e-6)


def test_pretrained_folder_errors(tmp_path):
    missing = tmp_path / "missing_model"
    with pytest.raises(LmdiffInputError, match="missing_model"):
        PretrainedSpeechFeatures(missing)
    empty = tmp_path / "empty_model"
    empty.mkdir()
    with pytest.raises(LmdiffInputError, match="empty_model.*config.json"):
        PretrainedSpeechFeatures(empty)
    other = tmp_path / "bert_model"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(LmdiffInputError, match="bert"):
        load_feature_extractor(str(other))
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    from transformers import Wav2Vec2Config

    Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2).save_pretrained(no_weights)
    with pytest.raises(LmdiffInputError, match="no_weights.*no weights"):
        load_feature_extractor(str(no_weights))


def test_pretrained_rejects_a_layer_out_of_range(tiny_models):
    with pytest.raises(LmdiffInputError, match="layer 5"):
        load_feature_extractor(str(tiny_models["hubert"]), layer=5)
    assert load_feature_extractor(str(tiny_models["hubert"]), layer=-1).layer == -1


# -- audio_to_mono16k -------------------------------------------------------------------------------------------


def test_audio_to_mono16k_from_a_comfy_stereo_44k_dict_and_a_path():
    path = shared_path(SPEECH)
    original = read_wav(SPEECH)
    np.testing.assert_allclose(audio_to_mono16k(path), original, atol=1e-4)
    np.testing.assert_array_equal(audio_to_mono16k(original), original)

    at_44k = signal.resample_poly(original.astype(np.float64), 441, 160).astype(np.float32)
    stereo = torch.from_numpy(np.stack([at_44k * 0.5, at_44k * 1.5]))[None]  # [1, 2, N]: the mean is the original
    mono = audio_to_mono16k({"waveform": stereo, "sample_rate": 44100})
    assert mono.dtype == np.float32 and abs(len(mono) - len(original)) <= 1
    n = min(len(mono), len(original))
    assert np.corrcoef(mono[:n], original[:n])[0, 1] > 0.99
    assert np.abs(mono[:n] - original[:n]).max() < 0.05

    # The same audio gives the same features whichever way it comes in.
    back = comfy_io.audio_to_comfy(original)
    np.testing.assert_array_equal(audio_to_mono16k(back), original)


def test_audio_to_mono16k_errors(tmp_path):
    with pytest.raises(LmdiffInputError, match="empty"):
        audio_to_mono16k(np.zeros(0, np.float32))
    with pytest.raises(LmdiffInputError, match="empty"):
        audio_to_mono16k(np.full(1000, np.nan, np.float32))
    with pytest.raises(LmdiffInputError, match="AUDIO.*empty"):
        audio_to_mono16k({"waveform": torch.zeros(1, 2, 0), "sample_rate": 44100})
    with pytest.raises(LmdiffInputError, match="nowhere.wav"):
        audio_to_mono16k(tmp_path / "nowhere.wav")
    with pytest.raises(LmdiffInputError, match="mono"):
        audio_to_mono16k(np.zeros((2, 100), np.float32))
    with pytest.raises(LmdiffInputError, match="empty"):
        LogMelFeatures()(np.zeros(0, np.float32))
    partly = np.ones(1000, np.float32)
    partly[10] = np.nan
    assert np.isfinite(audio_to_mono16k(partly)).all()


# -- frame_windows ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("radius", [0, 1, 3])
def test_frame_windows_against_a_loop(radius):
    features = np.random.default_rng(1).standard_normal((6, 4, 2, 5)).astype(np.float32)
    windows = frame_windows(features, radius)
    n, k = features.shape[:2]
    expected = np.zeros((n, (2 * radius + 1) * k, 2, 5), np.float32)
    for t in range(n):
        for offset in range(-radius, radius + 1):
            source = min(max(t + offset, 0), n - 1)
            slot = offset + radius
            expected[t, slot * k : (slot + 1) * k] = features[source]
    assert np.array_equal(windows, expected)
    if radius == 0:
        assert np.array_equal(windows, features)
    assert torch.equal(frame_windows(torch.from_numpy(features), radius), torch.from_numpy(expected))


def test_frame_windows_edges():
    assert frame_windows(np.zeros((0, 4, 1, 80), np.float32), 2).shape == (0, 20, 1, 80)
    single = np.arange(8, dtype=np.float32).reshape(1, 2, 1, 4)
    assert np.array_equal(frame_windows(single, 1), np.concatenate([single] * 3, axis=1))
    with pytest.raises(LmdiffInputError, match="radius"):
        frame_windows(single, -1)


# -- FeatureCache -----------------------------------------------------------------------------------------------


def test_feature_cache_reads_back_from_disk(tmp_path, monkeypatch):
    audio = read_wav("data/speech/speech_de.wav")
    cache = FeatureCache(tmp_path / "cache")
    extractor = LogMelFeatures()
    first = cache.get_or_compute(extractor, audio)
    files = list((tmp_path / "cache").glob("*.safetensors"))
    assert len(files) == 1 and not list((tmp_path / "cache").glob("*.tmp"))

    def refuse(*args, **kwargs):
        raise AssertionError("the cached features should have been used")

    monkeypatch.setattr(LogMelFeatures, "_extract", refuse)
    second = cache.get_or_compute(extractor, audio.copy())
    assert np.array_equal(first, second) and second.dtype == np.float32
    # By content: a ComfyUI AUDIO of the same samples hits the same entry.
    third = cache.get_or_compute(LogMelFeatures(), comfy_io.audio_to_comfy(audio))
    assert np.array_equal(first, third)
    # The frame count is part of the key; n_frames=None and the same T explicitly share the entry.
    assert cache.get_or_compute(extractor, audio, n_frames=len(first)).shape == first.shape
    with pytest.raises(AssertionError, match="cached"):
        cache.get_or_compute(extractor, audio, n_frames=len(first) + 1)


def test_feature_cache_keys_on_the_extractor_config(tmp_path):
    audio = read_wav("data/speech/speech_de.wav")[: 2 * SR]
    cache = FeatureCache(tmp_path)
    a = cache.get_or_compute(LogMelFeatures(), audio)
    b = cache.get_or_compute(LogMelFeatures(n_mels=40), audio)
    assert a.shape[-1] == 80 and b.shape[-1] == 40
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    assert cache.path_for(LogMelFeatures(), audio) != cache.path_for(LogMelFeatures(n_mels=40), audio)
    # A damaged entry is recomputed and replaced.
    path = cache.path_for(LogMelFeatures(), audio)
    path.write_bytes(b"not a safetensors file")
    assert np.array_equal(cache.get_or_compute(LogMelFeatures(), audio), a)


def test_extractors_share_the_base_contract(tiny_models):
    for extractor in (LogMelFeatures(), load_feature_extractor(str(tiny_models["hubert"]), layer="all")):
        assert isinstance(extractor, AudioFeatureExtractor)
        assert extractor.sample_rate == SR and extractor.fps == 25.0
        assert isinstance(extractor.name, str) and extractor.name
        config = extractor.config()
        assert json.loads(json.dumps(config)) == config
