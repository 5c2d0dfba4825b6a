"""Tests of lmdiff_core.media and lmdiff_core.comfy_io against real clips in ../shared/data.

Expectations are computed independently of the code under test: frame counts from the clips' known
durations and from decoding with PyAV directly, audio from the clips' 16 kHz wav files via soundfile,
resampling via librosa.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import tracemalloc
from pathlib import Path

import av
import librosa
import numpy as np
import pytest
import soundfile
import torch
from PIL import Image
from scipy import signal

from lmdiff_core import comfy_io, media
from lmdiff_core.errors import LmdiffInputError

from .conftest import SHARED, truncated_mp4  # the one way tests reach ../shared

DATA = SHARED / "data"
CLIP = DATA / "clips" / "edtalk_woman_en.mp4"  # 10.00 s, 256x256, 25 fps, AAC 44.1 kHz
CLIP_WAV = DATA / "clips" / "edtalk_woman_en.wav"  # the same 10 s span, 16 kHz mono
LONG_CLIP = DATA / "clips" / "edtalk_man_en.mp4"  # 30.00 s, 256x256
VIDEO_ONLY = DATA / "clips_more" / "video_only" / "dreamtalk_mead_M030_front_angry_level3_001.mp4"
PORTRAIT = DATA / "images" / "portrait_woman_b.png"  # 474x474

pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared (real test media) is absent")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * math.log10(255**2 / mse)


def aligned_correlation(a: np.ndarray, b: np.ndarray, max_lag: int) -> float:
    """Pearson correlation of ``a`` and ``b`` at the lag (within ``max_lag`` samples) where it is highest."""
    n = min(len(a), len(b))
    a, b = a[:n] - a[:n].mean(), b[:n] - b[:n].mean()
    cross = signal.correlate(a, b, mode="full", method="fft")
    lags = signal.correlation_lags(n, n, mode="full")
    window = np.abs(lags) <= max_lag
    lag = int(lags[window][np.argmax(cross[window])])
    a, b = (a[lag:], b[: n - lag]) if lag >= 0 else (a[: n + lag], b[-lag:])
    return float(np.corrcoef(a, b)[0, 1])


def gradient_frames(n: int, height: int, width: int) -> list[np.ndarray]:
    """Smooth, distinct frames that H.264 reproduces well."""
    ys, xs = np.mgrid[0:height, 0:width]
    red, green = xs * 255 // (width - 1), ys * 255 // (height - 1)
    return [np.stack([red, green, np.full_like(xs, 20 * i)], axis=-1).astype(np.uint8) for i in range(n)]


def gray_level_frames(n: int, size: int = 64) -> list[np.ndarray]:
    """Frame ``i`` is uniformly grey at level ``4 * i``, so it can be identified after encoding."""
    return [np.full((size, size, 3), 4 * i, dtype=np.uint8) for i in range(n)]


def frame_identity(frame: np.ndarray) -> int:
    return round(float(frame.mean()) / 4)


@pytest.fixture(scope="module")
def clip_frames() -> np.ndarray:
    return media.read_video(CLIP, with_audio=False).frames


# --- length contract ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("duration", "fps", "expected"),
    [
        (10.0, 25, 250),
        (30.0, 25, 750),
        (10.01, 25, 251),
        (10.04, 25, 251),
        (0.1 * 3, 10, 3),  # 0.30000000000000004 s
        (0.0, 25, 0),
        (2, 12.5, 25),
    ],
)
def test_frame_count_is_ceil_of_duration_times_fps(duration, fps, expected):
    assert media.frame_count(duration, fps) == expected


@pytest.mark.parametrize("fps", [0, -25, float("nan")])
def test_frame_count_rejects_non_positive_fps(fps):
    with pytest.raises(LmdiffInputError, match="fps"):
        media.frame_count(1.0, fps)


def test_fit_audio_to_frames_pads_and_trims():
    audio = np.ones(1000, dtype=np.float32)
    padded = media.fit_audio_to_frames(audio, n_frames=3, fps=25, sample_rate=16000)
    assert padded.shape == (1920,) and padded.dtype == np.float32
    assert np.all(padded[:1000] == 1) and np.all(padded[1000:] == 0)
    assert media.fit_audio_to_frames(audio, n_frames=1, fps=30, sample_rate=16000).shape == (533,)


# --- reading video -------------------------------------------------------------------------------------


def test_probe_video_matches_the_clip():
    info = media.probe_video(CLIP)
    with av.open(str(CLIP)) as container:
        decoded = sum(1 for _ in container.decode(video=0))
    assert (info.width, info.height, info.fps, info.has_audio) == (256, 256, 25.0, True)
    assert info.duration == pytest.approx(10.0)
    assert info.n_frames_source == decoded == 250
    assert media.probe_video(VIDEO_ONLY).has_audio is False


def test_read_video_at_source_rate_equals_plain_decode(clip_frames):
    with av.open(str(CLIP)) as container:
        decoded = container.decode(video=0)
        reference = [next(decoded).to_ndarray(format="rgb24") for _ in range(5)]
    assert clip_frames.shape == (250, 256, 256, 3) and clip_frames.dtype == np.uint8
    np.testing.assert_array_equal(clip_frames[:5], np.stack(reference))


def test_half_rate_keeps_every_other_frame(clip_frames):
    half = np.stack(list(media.iter_frames(CLIP, fps=12.5)))
    assert len(half) == media.frame_count(10.0, 12.5) == 125
    np.testing.assert_array_equal(half, clip_frames[::2])


def test_max_frames_stops_early(clip_frames):
    frames = list(media.iter_frames(CLIP, max_frames=7))
    np.testing.assert_array_equal(np.stack(frames), clip_frames[:7])


def test_30_fps_source_is_resampled_by_timestamps(tmp_path):
    path = media.write_video(tmp_path / "thirty.mp4", gray_level_frames(60), fps=30)
    info = media.probe_video(path)
    assert (info.fps, info.n_frames_source) == (30.0, 60)
    assert info.duration == pytest.approx(2.0)

    at_source_rate = [frame_identity(f) for f in media.iter_frames(path, fps=None)]
    assert at_source_rate == list(range(60))
    at_25 = [frame_identity(f) for f in media.iter_frames(path, fps=25)]
    assert at_25 == [math.floor(k * 30 / 25) for k in range(50)]


def test_upsampling_holds_each_frame(tmp_path):
    path = media.write_video(tmp_path / "five.mp4", gray_level_frames(3), fps=5)
    identities = [frame_identity(f) for f in media.iter_frames(path, fps=25)]
    assert identities == [k * 5 // 25 for k in range(15)]


def test_stream_ending_early_is_an_error_unless_partial_is_allowed(tmp_path, monkeypatch):
    path = media.write_video(tmp_path / "five.mp4", gray_level_frames(3), fps=5)
    declared = dataclasses.replace(media.probe_video(path), duration=1.0)  # frames cover only 0.6 s
    monkeypatch.setattr(media, "probe_video", lambda _: declared)
    with pytest.raises(LmdiffInputError, match=r"five\.mp4 stops decoding after frame 2 .*output frame 15 at 25 fps"):
        list(media.iter_frames(path, fps=25))
    with media.allow_partial_media():
        identities = [frame_identity(f) for f in media.iter_frames(path, fps=25)]
    # Each frame is held for its own 0.2 s and no longer: the frames that are not there are not made up.
    assert identities == [k * 5 // 25 for k in range(15)]


@pytest.fixture(scope="module")
def truncated_clip(tmp_path_factory):
    """(path, the frames that decode, as PyAV itself decodes them): 3 s of a real clip as a faststart mp4 cut after a
    quarter of its bytes (conftest.truncated_mp4)."""
    path, _ = truncated_mp4(tmp_path_factory.mktemp("truncated"))
    decodable = []
    with av.open(str(path)) as container:
        try:
            for frame in container.decode(video=0):
                decodable.append(frame.to_ndarray(format="rgb24"))
        except av.InvalidDataError:
            pass
    return path, decodable, 75


def test_truncated_video_is_an_error_naming_the_file_and_frame(truncated_clip):
    path, decodable, n = truncated_clip
    assert media.probe_video(path).duration == pytest.approx(3.0, abs=0.05)  # the index still declares 3 s
    expected = rf"truncated\.mp4 stops decoding after frame {len(decodable) - 1} "
    with pytest.raises(LmdiffInputError, match=expected):
        list(media.iter_frames(path))
    with pytest.raises(LmdiffInputError, match=expected):
        media.read_video(path)


def test_truncated_video_with_partial_allowed_gives_only_what_decodes(truncated_clip):
    path, decodable, _ = truncated_clip
    with media.allow_partial_media():
        frames = list(media.iter_frames(path))
        video = media.read_video(path, with_audio=False)
    assert len(frames) == len(video.frames) == len(decodable)
    for ours, theirs in zip(frames, decodable):
        np.testing.assert_array_equal(ours, theirs)


def test_truncated_audio_is_an_error_unless_partial_is_allowed(truncated_clip):
    path, _, _ = truncated_clip
    with pytest.raises(
        LmdiffInputError, match=r"audio .*truncated\.mp4 stops decoding at \d+\.\d+ s of its declared 3"
    ):
        media.read_audio(path)
    with media.allow_partial_media():
        audio = media.read_audio(path)
    assert 0 < len(audio) < 2.5 * 16000


def test_rotation_metadata_is_applied(tmp_path):
    path = tmp_path / "rotated.mp4"
    upright = np.zeros((32, 64, 3), dtype=np.uint8)
    upright[:16, :32] = 255  # white top-left quarter
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        stream.set_display_rotation(90)  # display rotated 90 degrees counter-clockwise
        container.mux(stream.encode(av.VideoFrame.from_ndarray(upright, format="rgb24")))
        container.mux(stream.encode(None))
    info = media.probe_video(path)
    (frame,) = media.iter_frames(path)
    assert (info.width, info.height) == (32, 64)
    assert frame.shape == (64, 32, 3)
    assert np.abs(frame.astype(int) - np.rot90(upright)).mean() < 5


def test_iter_frames_streams_with_bounded_memory():
    frames = media.iter_frames(LONG_CLIP)
    assert inspect.isgenerator(frames)
    full_size = 750 * 256 * 256 * 3
    tracemalloc.start()
    try:
        count = sum(1 for _ in frames)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == media.frame_count(30.0, 25) == 750
    assert peak < full_size / 20


def test_read_video_of_a_silent_clip_has_no_audio():
    video = media.read_video(VIDEO_ONLY, fps=25)
    assert video.audio is None
    assert len(video.frames) == media.frame_count(3.92, 25) == 98


# --- reading audio -------------------------------------------------------------------------------------


def test_read_audio_of_wav_equals_soundfile():
    reference, rate = soundfile.read(CLIP_WAV, dtype="float32")
    assert rate == 16000
    np.testing.assert_allclose(media.read_audio(CLIP_WAV), reference, atol=1e-6)


def test_read_audio_averages_channels_of_other_formats(tmp_path):
    speech, _ = soundfile.read(CLIP_WAV, dtype="float32", frames=16000)
    stereo = np.stack([speech, np.zeros_like(speech)], axis=1)  # speech on the left channel only
    soundfile.write(tmp_path / "stereo.flac", stereo, 16000)
    np.testing.assert_allclose(media.read_audio(tmp_path / "stereo.flac"), speech / 2, atol=1e-4)


def test_read_audio_of_mp4_matches_its_wav():
    from_mp4 = media.read_audio(CLIP)
    reference, _ = soundfile.read(CLIP_WAV, dtype="float32")
    assert from_mp4.dtype == np.float32 and from_mp4.ndim == 1
    assert abs(len(from_mp4) - len(reference)) <= 16000 // 25
    assert np.abs(from_mp4).max() <= 1.0
    assert aligned_correlation(from_mp4, reference, max_lag=1600) > 0.9


def test_read_audio_resamples_like_librosa():
    reference, _ = soundfile.read(CLIP_WAV, dtype="float32")
    at_8k = media.read_audio(CLIP_WAV, sample_rate=8000)
    expected = librosa.resample(reference, orig_sr=16000, target_sr=8000)
    assert abs(len(at_8k) - len(expected)) <= 1
    assert aligned_correlation(at_8k, expected, max_lag=8) > 0.99


# --- writing video -------------------------------------------------------------------------------------


def test_write_video_round_trip(tmp_path, clip_frames):
    speech, _ = soundfile.read(CLIP_WAV, dtype="float32")
    frames = clip_frames[:50]
    path = media.write_video(tmp_path / "out.mp4", frames, fps=25, audio=speech[:40000])  # 2.5 s of audio

    with av.open(str(path)) as container:
        video_stream, audio_stream = container.streams.video[0], container.streams.audio[0]
        assert video_stream.codec_context.name == "h264"
        assert video_stream.codec_context.pix_fmt == "yuv420p"
        assert audio_stream.codec_context.name == "aac"
        assert float(video_stream.duration * video_stream.time_base) == pytest.approx(50 / 25, abs=0.05)
        assert float(audio_stream.duration * audio_stream.time_base) == pytest.approx(50 / 25, abs=0.05)

    decoded = media.read_video(path)
    assert decoded.frames.shape == frames.shape
    assert psnr(decoded.frames, frames) > 30
    assert abs(len(decoded.audio) - 32000) <= 640
    assert aligned_correlation(decoded.audio, speech[:32000], max_lag=1600) > 0.9


def test_write_video_preset_is_x264s_and_checked(tmp_path, clip_frames):
    """The default preset (veryfast) and x264's own default (medium) give the same picture quality class; a preset
    x264 does not know is one clear message before anything is written."""
    frames = clip_frames[:25]
    fast = media.read_video(media.write_video(tmp_path / "fast.mp4", frames, fps=25)).frames
    medium = media.read_video(media.write_video(tmp_path / "medium.mp4", frames, fps=25, preset="medium")).frames
    assert psnr(fast, frames) > 30 and psnr(medium, frames) > 30
    assert not np.array_equal(fast, medium)  # the preset reached the encoder
    with pytest.raises(LmdiffInputError, match="preset must be one of"):
        media.write_video(tmp_path / "bad.mp4", frames, fps=25, preset="warp9")
    assert not (tmp_path / "bad.mp4").exists()


def test_write_video_pads_short_audio_with_silence(tmp_path):
    tone = 0.5 * np.sin(2 * np.pi * 440 * np.arange(8000) / 16000).astype(np.float32)  # 0.5 s
    path = media.write_video(tmp_path / "tone.mp4", gray_level_frames(25), fps=25, audio=tone)
    audio = media.read_audio(path)
    assert abs(len(audio) - 16000) <= 640
    assert np.abs(audio[:6000]).max() > 0.3
    assert np.abs(audio[10000:]).max() < 0.01


def test_write_video_streams_odd_sized_frames(tmp_path):
    frames = gradient_frames(5, height=17, width=33)
    path = media.write_video(tmp_path / "odd.mp4", (frame for frame in frames), fps=25, progress=True)
    info = media.probe_video(path)
    assert (info.width, info.height, info.n_frames_source, info.has_audio) == (34, 18, 5, False)
    decoded = np.stack(list(media.iter_frames(path)))
    assert psnr(decoded[:, :17, :33], np.stack(frames)) > 30


@pytest.mark.parametrize("failure", [RuntimeError("encoder input failed"), KeyboardInterrupt()])
def test_failed_write_keeps_the_existing_output(tmp_path, failure):
    path = media.write_video(tmp_path / "out.mp4", gray_level_frames(3), fps=25)
    before = path.read_bytes()

    def failing_frames():
        yield from gray_level_frames(10)
        raise failure

    with pytest.raises(type(failure)):
        media.write_video(path, failing_frames(), fps=25, audio=np.zeros(16000, np.float32))
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]


def test_failed_write_leaves_no_file(tmp_path):
    frames = gray_level_frames(3) + [np.zeros((8, 8, 3), np.uint8)]
    with pytest.raises(LmdiffInputError, match="frame 3"):
        media.write_video(tmp_path / "out.mp4", frames, fps=25)
    assert list(tmp_path.iterdir()) == []


# --- images --------------------------------------------------------------------------------------------


def test_read_image_of_a_real_portrait():
    image = media.read_image(PORTRAIT)
    assert image.shape == (474, 474, 3) and image.dtype == np.uint8


def test_read_image_applies_exif_orientation_and_converts_modes(tmp_path):
    landscape = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    landscape.save(tmp_path / "rotated.jpg", exif=exif)
    assert media.read_image(tmp_path / "rotated.jpg").shape == (40, 20, 3)

    Image.new("L", (20, 20), 77).save(tmp_path / "grey.png")
    assert np.all(media.read_image(tmp_path / "grey.png") == 77)

    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(tmp_path / "transparent.png")
    assert np.all(media.read_image(tmp_path / "transparent.png") == 255)


# --- ComfyUI adapters ----------------------------------------------------------------------------------


def test_comfy_image_round_trip_is_exact(clip_frames):
    frames = clip_frames[:4]
    image = comfy_io.frames_to_image(frames)
    assert image.dtype == torch.float32 and image.shape == (4, 256, 256, 3)
    assert 0.0 <= image.min() and image.max() <= 1.0
    np.testing.assert_array_equal(comfy_io.image_to_frames(image), frames)


def test_comfy_image_drops_alpha_and_clamps():
    rgba = torch.tensor([[[[0.5, -0.2, 1.7, 0.3]]]])
    np.testing.assert_array_equal(comfy_io.image_to_frames(rgba), [[[[128, 0, 255]]]])


def test_comfy_audio_stereo_44k_to_mono_16k_matches_librosa():
    rng = np.random.default_rng(0)
    stereo = rng.uniform(-0.5, 0.5, size=(2, 44100)).astype(np.float32)
    mono = comfy_io.audio_from_comfy({"waveform": torch.from_numpy(stereo)[None], "sample_rate": 44100})
    expected = librosa.resample(stereo.mean(axis=0), orig_sr=44100, target_sr=16000)
    assert mono.dtype == np.float32
    np.testing.assert_allclose(mono, expected, atol=1e-5)


def test_comfy_audio_round_trip():
    speech, _ = soundfile.read(CLIP_WAV, dtype="float32", frames=16000)
    wrapped = comfy_io.audio_to_comfy(speech)
    assert wrapped["sample_rate"] == 16000 and wrapped["waveform"].shape == (1, 1, 16000)
    np.testing.assert_array_equal(comfy_io.audio_from_comfy(wrapped), speech)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: comfy_io.image_to_frames(torch.zeros(8, 8, 3)), "4 dimensions"),
        (lambda: comfy_io.image_to_frames(torch.zeros(1, 8, 8, 2)), "channels"),
        (lambda: comfy_io.image_to_frames(np.zeros((1, 8, 8, 3))), "torch.Tensor"),
        (lambda: comfy_io.frames_to_image(np.zeros((1, 8, 8, 3), np.float32)), "uint8"),
        (lambda: comfy_io.audio_from_comfy({"waveform": torch.zeros(1, 1, 10)}), "sample_rate"),
        (lambda: comfy_io.audio_from_comfy({"waveform": torch.zeros(9), "sample_rate": 8000}), r"\[B, C, T\]"),
        (lambda: comfy_io.audio_from_comfy({"waveform": torch.zeros(1, 1, 0), "sample_rate": 8000}), "empty"),
        (lambda: comfy_io.audio_from_comfy({"waveform": torch.zeros(1, 1, 9), "sample_rate": 0}), "positive"),
        (lambda: comfy_io.audio_to_comfy(np.zeros((2, 10), np.float32)), "mono"),
    ],
)
def test_comfy_adapters_reject_malformed_inputs(call, message):
    with pytest.raises(LmdiffInputError, match=message):
        call()


# --- bad inputs ----------------------------------------------------------------------------------------


@pytest.fixture
def bad_inputs(tmp_path) -> dict[str, Path]:
    text_as_video = tmp_path / "notes.mp4"
    text_as_video.write_text("this is not a video\n")
    text_as_image = tmp_path / "notes.png"
    text_as_image.write_text("this is not an image\n")
    folder = tmp_path / "folder.mp4"
    folder.mkdir()
    empty_wav = tmp_path / "empty.wav"
    soundfile.write(empty_wav, np.zeros(0, np.float32), 16000)
    tiny_image = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1)).save(tiny_image)
    return {
        "text_as_video": text_as_video,
        "text_as_image": text_as_image,
        "folder": folder,
        "missing": tmp_path / "missing.mp4",
        "empty_wav": empty_wav,
        "tiny_image": tiny_image,
        "video_only": VIDEO_ONLY,
        "wav": CLIP_WAV,
    }


VIDEO_READERS = {
    "probe_video": media.probe_video,
    "iter_frames": media.iter_frames,
    "read_video": media.read_video,
    "read_audio": media.read_audio,
}


@pytest.mark.parametrize("reader", VIDEO_READERS)
@pytest.mark.parametrize(
    ("name", "message"),
    [("text_as_video", "cannot read"), ("folder", "is a directory"), ("missing", "does not exist")],
)
def test_media_readers_reject_bad_paths(bad_inputs, reader, name, message):
    path = bad_inputs[name]
    with pytest.raises(LmdiffInputError, match=message) as error:
        VIDEO_READERS[reader](path)
    assert path.name in str(error.value)


@pytest.mark.parametrize(
    ("call", "name", "message"),
    [
        (media.read_audio, "empty_wav", "no audio samples"),
        (media.read_audio, "video_only", "no audio track"),
        (media.probe_video, "wav", "no video stream"),
        (media.read_image, "tiny_image", "1x1"),
        (media.read_image, "text_as_image", "not a readable image"),
        (media.read_image, "folder", "is a directory"),
        (media.read_image, "missing", "does not exist"),
    ],
)
def test_unsuitable_inputs_are_named_in_the_error(bad_inputs, call, name, message):
    path = bad_inputs[name]
    with pytest.raises(LmdiffInputError, match=message) as error:
        call(path)
    assert path.name in str(error.value)


def test_write_video_rejects_bad_destinations(bad_inputs, tmp_path):
    frames = gray_level_frames(1)
    with pytest.raises(LmdiffInputError, match="is a directory"):
        media.write_video(bad_inputs["folder"], frames, fps=25)
    with pytest.raises(LmdiffInputError, match="does not exist"):
        media.write_video(tmp_path / "no_such_folder" / "out.mp4", frames, fps=25)
    with pytest.raises(LmdiffInputError, match="no frames"):
        media.write_video(tmp_path / "out.mp4", [], fps=25)
    assert not (tmp_path / "out.mp4").exists()
