"""LandmarkToVideoPipeline and `lmdiff generate` end to end on real clips, with tiny random-weight models."""

import numpy as np
import pytest
import torch

from lmdiff_core.autoencoders import load_autoencoder
from lmdiff_core.canonical import uncanonicalize
from lmdiff_core.cli import main
from lmdiff_core.data.prepare import prepare_dataset
from lmdiff_core.data.store import clip_sequence
from lmdiff_core.detectors import detect_image, load_landmarker
from lmdiff_core.errors import LmdiffInputError
from lmdiff_core.media import frame_count, iter_frames, read_audio, read_image, read_video, write_video
from lmdiff_core.models import A2LLSTM, L2VUNet
from lmdiff_core.pipelines.a2l import AudioToLandmarksPipeline
from lmdiff_core.pipelines.l2v import LandmarkToVideoPipeline
from lmdiff_core.pipelines.schedulers import make_scheduler

from .conftest import shared_path
from .test_l2v_model import TINY

CLIP = "edtalk_woman_en"


def _tiny_l2v(seed=0) -> LandmarkToVideoPipeline:
    torch.manual_seed(seed)
    ae = load_autoencoder("pixel")
    unet = L2VUNet(latent_channels=ae.latent_channels, downscale=ae.downscale, autoencoder="pixel", **TINY)
    with torch.no_grad():  # trained-looking weights: the guider and temporal layers start at zero otherwise
        for name, p in unet.named_parameters():
            if "zero_conv" in name or "to_out" in name or "conv_out" in name:
                p.normal_(0, 0.05)
    return LandmarkToVideoPipeline(unet.eval(), make_scheduler(unet, "ddim"), ae, crop_size=64, window=4, overlap=1)


@pytest.fixture(scope="module")
def clip(tmp_path_factory, mediapipe_model):
    """12 real frames of a clip and their (image-space) landmarks."""
    folder = tmp_path_factory.mktemp("l2v_ds")
    source = tmp_path_factory.mktemp("src") / f"{CLIP}.mp4"
    video = read_video(shared_path(f"data/clips/{CLIP}.mp4"))
    write_video(source, video.frames[:50], 25, audio=video.audio[: 2 * 16000])
    prepare_dataset([source], folder, lambda: load_landmarker("mediapipe", mediapipe_model), crop_size=0)
    seq = uncanonicalize(clip_sequence(folder, CLIP))[:12]
    return list(video.frames[:12]), seq


def test_dub_keeps_everything_outside_the_lower_face(clip):
    frames, seq = clip
    pipe = _tiny_l2v()
    identity = pipe.reference_crop(frames[6], seq[6])
    out = pipe(frames, seq, seq, identity, num_inference_steps=2, seed=0)
    assert out.shape == (len(seq), *frames[0].shape)
    changed = np.abs(out.astype(int) - np.stack(frames).astype(int)).max(-1) > 0
    assert changed.mean() > 0.01  # the lower face was regenerated
    eye_y = int(seq.points[:, :, 1].min())  # above the highest landmark (brows): untouched
    assert not changed[:, : max(eye_y - 2, 0)].any()


def test_same_seed_same_frames_and_save_load_round_trip(clip, tmp_path):
    frames, seq = clip
    pipe = _tiny_l2v()
    identity = pipe.reference_crop(frames[6], seq[6])
    a = pipe(frames[:6], seq[:6], seq[:6], identity, num_inference_steps=2, seed=3)
    b = pipe(frames[:6], seq[:6], seq[:6], identity, num_inference_steps=2, seed=3)
    c = pipe(frames[:6], seq[:6], seq[:6], identity, num_inference_steps=2, seed=4)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).max() > 0
    pipe.save_pretrained(tmp_path / "l2v")
    loaded = LandmarkToVideoPipeline.from_pretrained(tmp_path / "l2v", autoencoder=load_autoencoder("pixel"))
    np.testing.assert_array_equal(a, loaded(frames[:6], seq[:6], seq[:6], identity, num_inference_steps=2, seed=3))


@pytest.mark.parametrize("window, overlap", [(1, 0), (4, 0), (4, 3)])
def test_every_window_and_overlap_gives_every_frame(clip, window, overlap):
    frames, seq = clip
    pipe = _tiny_l2v()
    pipe.window, pipe.overlap = window, overlap
    identity = pipe.reference_crop(frames[6], seq[6])
    out = pipe(frames[:7], seq[:7], seq[:7], identity, num_inference_steps=1, seed=0)
    assert out.shape == (7, *frames[0].shape)


def test_autoencoder_must_match_the_unet():
    pipe = _tiny_l2v()
    with pytest.raises(LmdiffInputError, match="48 channels"):
        pipe.set_autoencoder(load_autoencoder(shared_path("weights/taesd")))


def _tiny_a2l(folder):
    torch.manual_seed(0)
    model = A2LLSTM(hidden_size=16, num_layers=1)
    AudioToLandmarksPipeline(model).save_pretrained(folder)
    return folder


def _frames_of(path) -> int:
    return sum(1 for _ in iter_frames(path, None))


def test_generate_cli_dub_and_one_shot(tmp_path, mediapipe_model):
    a2l = _tiny_a2l(tmp_path / "a2l")
    _tiny_l2v().save_pretrained(tmp_path / "l2v")
    speech = tmp_path / "speech.wav"
    audio = read_audio(shared_path("data/speech/speech_de.wav"))[: int(1.5 * 16000)]
    import soundfile

    soundfile.write(speech, audio, 16000)
    video = tmp_path / "short.mp4"  # 1 s of video for 1.5 s of speech: looped
    write_video(video, read_video(shared_path(f"data/clips/{CLIP}.mp4")).frames[:25], 25)
    common = ["--a2l", str(a2l), "--l2v", str(tmp_path / "l2v"), "--steps", "2", "--model", str(mediapipe_model)]
    for source, out in (
        (["--video", str(video)], "dub.mp4"),
        (["--image", str(shared_path("data/images/portrait_woman_a.jpg"))], "one.mp4"),
    ):
        assert main(["generate", "--audio", str(speech), *source, "-o", str(tmp_path / out), *common]) == 0
        assert _frames_of(tmp_path / out) == frame_count(1.5, 25) == 38
        assert len(read_audio(tmp_path / out)) > 16000  # the speech is muxed in


def test_generate_cli_bad_inputs(tmp_path, mediapipe_model, capsys):
    a2l = _tiny_a2l(tmp_path / "a2l")
    _tiny_l2v().save_pretrained(tmp_path / "l2v")
    import soundfile
    from PIL import Image

    silent = tmp_path / "empty.wav"
    soundfile.write(silent, np.zeros(0, np.float32), 16000)
    speech = tmp_path / "speech.wav"
    soundfile.write(speech, read_audio(shared_path("data/speech/speech_de.wav"))[:16000], 16000)
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((256, 256, 3), 128, np.uint8)).save(blank)
    common = ["--a2l", str(a2l), "--l2v", str(tmp_path / "l2v"), "--steps", "1", "--model", str(mediapipe_model)]
    cases = [
        (["--audio", str(speech), "--image", str(blank)], "face"),
        (["--audio", str(silent), "--image", str(shared_path("data/images/portrait_woman_a.jpg"))], "audio"),
        (["--audio", str(speech), "--video", str(speech)], "video"),
        (["--audio", str(speech), "--image", str(blank), "--vae", str(shared_path("weights/taesd"))], "channels"),
    ]
    for args, word in cases:
        out = tmp_path / "out.mp4"
        assert main(["generate", *args, "-o", str(out), *common]) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and word in err.lower(), err
        assert not out.exists()


def test_still_portrait_keeps_the_photo_above_the_mouth(tmp_path, mediapipe_model):
    a2l = _tiny_a2l(tmp_path / "a2l")
    _tiny_l2v().save_pretrained(tmp_path / "l2v")
    speech = tmp_path / "speech.wav"
    import soundfile

    soundfile.write(speech, read_audio(shared_path("data/speech/speech_en_hdtf_radio34.wav"))[:16000], 16000)
    portrait = shared_path("data/images/portrait_woman_a.jpg")
    out = tmp_path / "still.mp4"
    args = ["generate", "--audio", str(speech), "--image", str(portrait), "--image-mode", "still", "-o", str(out)]
    common = ["--a2l", str(a2l), "--l2v", str(tmp_path / "l2v"), "--steps", "2", "--model", str(mediapipe_model)]
    assert main([*args, *common]) == 0
    frames = read_video(out).frames.astype(np.float32)
    assert len(frames) == 25
    with load_landmarker("mediapipe", mediapipe_model) as landmarker:
        image = read_image(portrait)
        face = detect_image(image, landmarker).to_topology("ibug68").points[0]
    eyes_bottom = int(face[36:48, 1].max())
    nose_bottom = int(face[33, 1])
    above = slice(0, eyes_bottom + (nose_bottom - eyes_bottom) // 4)
    # Above the pose mask every frame is the photo (up to video coding); below it the lower face is generated.
    assert np.abs(frames[:, above] - image[above].astype(np.float32)).mean() < 3.0
    mouth = slice(int(face[48:68, 1].min()), int(face[48:68, 1].max()) + 1)
    assert np.abs(frames[:, mouth] - image[mouth].astype(np.float32)).mean() > 3.0


def test_demo_with_the_bundled_checkpoints(tmp_path):
    """README command (a): the bundled portrait and speech-like audio through the bundled A2L and L2V checkpoints
    (offline: dlib finds the face, the L2V model is pixel-space). The photo is kept above the mouth; the lower face
    changes over time with the speech."""
    from lmdiff_core.checkpoints import BUNDLED_A2L, BUNDLED_L2V
    from lmdiff_core.demo import demo_portrait

    assert (BUNDLED_A2L / "README.md").is_file() and (BUNDLED_L2V / "README.md").is_file()
    out = tmp_path / "demo.mp4"
    assert main(["demo", "-o", str(out), "--seconds", "2", "--steps", "2", "--detector", "dlib"]) == 0
    frames = read_video(out).frames.astype(np.float32)
    assert len(frames) == 50 and len(read_audio(out)) > 1.9 * 16000
    portrait = demo_portrait()
    with load_landmarker("dlib") as landmarker:
        face = detect_image(portrait, landmarker).points[0]
    above = slice(0, int(face[36:48, 1].max()))
    assert np.abs(frames[:, above] - portrait[above].astype(np.float32)).mean() < 3.0
    top, bottom = int(face[48:68, 1].min()), int(face[48:68, 1].max()) + 1
    left, right = int(face[48:68, 0].min()), int(face[48:68, 0].max()) + 1
    mouth = frames[:, top:bottom, left:right]
    assert mouth.std(axis=0).mean() > 2.0  # the mouth region moves


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    _tiny_l2v().save_pretrained(folder / "l2v")
    return ["--a2l", str(_tiny_a2l(folder / "a2l")), "--l2v", str(folder / "l2v"), "--steps", "1"]


@pytest.fixture(scope="module")
def two_faces(tmp_path_factory):
    """(video, speech, frames): 1 s of two real speakers side by side (edtalk_man_en | edtalk_woman_en, 256x256 each,
    as decoded from the file written) and 1 s of speech."""
    import soundfile

    folder = tmp_path_factory.mktemp("two_faces")
    left = read_video(shared_path("data/clips/edtalk_man_en.mp4"), with_audio=False).frames[:25]
    right = read_video(shared_path(f"data/clips/{CLIP}.mp4"), with_audio=False).frames[:25]
    video = write_video(folder / "two.mp4", np.concatenate([left, right], axis=2), 25)
    speech = folder / "speech.wav"
    soundfile.write(speech, read_audio(shared_path("data/speech/speech_de.wav"))[:16000], 16000)
    return video, speech, read_video(video, with_audio=False).frames.astype(np.float32)


@pytest.mark.parametrize("face, dubbed", [(0, "left"), (1, "right")])
def test_generate_dubs_the_face_it_is_given(two_faces, tiny_models, mediapipe_model, tmp_path, face, dubbed):
    """D1: with two people side by side, `--face 0` dubs the left one and leaves the right half as it was (up to video
    coding), and `--face 1` the other way round."""
    video, speech, source = two_faces
    out = tmp_path / "dub.mp4"
    args = ["generate", "--audio", str(speech), "--video", str(video), "-o", str(out), "--face", str(face)]
    assert main([*args, *tiny_models, "--model", str(mediapipe_model)]) == 0
    frames = read_video(out, with_audio=False).frames.astype(np.float32)
    assert frames.shape == source.shape
    change = np.abs(frames - source).mean(axis=(0, 3))  # [H, W]: mean change per pixel
    halves = {"left": change[:, :256], "right": change[:, 256:]}
    kept = halves["right" if dubbed == "left" else "left"]
    # The kept half differs by re-encoding only (~1.5 grey levels, at most ~6 per pixel on average over the frames);
    # the dubbed half has its lower face regenerated by the random-weight model.
    assert kept.mean() < 3.0 and kept.max() < 10, (kept.mean(), kept.max())
    assert (halves[dubbed] > 10).sum() > 500, (halves[dubbed] > 10).sum()


def test_generate_face_index_beyond_the_faces(two_faces, tiny_models, mediapipe_model, tmp_path, capsys):
    video, speech, _ = two_faces
    out = tmp_path / "dub.mp4"
    args = ["generate", "--audio", str(speech), "--video", str(video), "-o", str(out), "--face", "2"]
    assert main([*args, *tiny_models, "--model", str(mediapipe_model)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no face with index 2 (found 2" in err, err
    assert not out.exists()


def test_generate_obeys_max_gap_no_smooth_and_fps(tiny_models, mediapipe_model, tmp_path, capsys):
    """D1: a clip whose face is hidden for 15 frames fails with the default --max-gap 12 and is dubbed with
    --max-gap 15; --no-smooth changes the result (raw landmarks); --fps 20 gives 20 frames a second."""
    import soundfile

    frames = read_video(shared_path(f"data/clips/{CLIP}.mp4"), with_audio=False).frames[:25].copy()
    frames[5:20] = 128  # frames 5-19: no face
    video = write_video(tmp_path / "gap.mp4", frames, 25)
    speech = tmp_path / "speech.wav"
    soundfile.write(speech, read_audio(shared_path("data/speech/speech_de.wav"))[:16000], 16000)
    common = ["generate", "--audio", str(speech), "--video", str(video), *tiny_models, "--model", str(mediapipe_model)]
    assert main([*common, "-o", str(tmp_path / "default.mp4")]) == 2
    assert "frames 5-19" in capsys.readouterr().err and not (tmp_path / "default.mp4").exists()
    results = {}
    for name, extra in (("smooth", []), ("raw", ["--no-smooth"]), ("fps20", ["--fps", "20"])):
        out = tmp_path / f"{name}.mp4"
        assert main([*common, "-o", str(out), "--max-gap", "15", *extra]) == 0
        results[name] = read_video(out, fps=None, with_audio=False)
    assert len(results["smooth"].frames) == len(results["raw"].frames) == 25
    assert np.abs(results["smooth"].frames.astype(int) - results["raw"].frames.astype(int)).max() > 20
    assert results["fps20"].fps == pytest.approx(20) and len(results["fps20"].frames) == 20
