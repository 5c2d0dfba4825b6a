"""lmdiff_core.syncnet: offset search against a direct loop, MFCC against a direct per-frame computation on a real
wav, crops against PIL, the weight loader, and the whole LSE plumbing on a real clip.

The real syncnet_v2.model weights are not available here: every test that runs the network uses a RANDOMLY
INITIALISED SyncNet (seeded), so it checks shapes, alignment, determinism and plumbing, never score values.
"""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import wavfile

from lmdiff_core import syncnet
from lmdiff_core.detectors import extract_landmarks, load_landmarker
from lmdiff_core.errors import LmdiffInputError
from lmdiff_core.media import iter_frames, read_audio

from .conftest import shared_path

N_FRAMES = 30  # 1.2 s at 25 fps: 25 SyncNet windows


@pytest.fixture(scope="module")
def clip(mediapipe_model):
    frames = np.stack(list(iter_frames(shared_path("data/clips/macron_fr.mp4"), 25.0, max_frames=N_FRAMES)))
    with load_landmarker("mediapipe", mediapipe_model, num_faces=1) as landmarker:
        seq = extract_landmarks(frames, landmarker, 25.0)
    audio = read_audio(shared_path("data/clips/macron_fr.wav"))[: N_FRAMES * 640]
    return frames, seq, audio


@pytest.fixture(scope="module")
def random_net():
    """A randomly initialised SyncNet (no real weights exist here)."""
    torch.manual_seed(0)
    return syncnet.SyncNet().eval()


# -- offset search ------------------------------------------------------------------------------------------------
def _loop_distances(v, a, max_offset):
    """Mean distance per candidate offset o = max_offset .. -max_offset: video window i against audio window i - o
    (a zero vector where that window does not exist), |x - y + 1e-6| as torch's pairwise_distance."""
    out = []
    for o in range(max_offset, -max_offset - 1, -1):
        total = 0.0
        for i in range(len(v)):
            j = i - o
            other = a[j] if 0 <= j < len(a) else np.zeros(a.shape[1])
            total += math.sqrt(sum((x - y + 1e-6) ** 2 for x, y in zip(v[i], other)))
        out.append(total / len(v))
    return np.array(out)


@pytest.mark.parametrize("lead", [-4, 0, 6])
def test_sync_scores_finds_shift_and_matches_loop(lead):
    rng = np.random.default_rng(lead + 10)
    n, dim, margin = 40, 16, 10
    base = rng.normal(size=(n + 2 * margin, dim))
    video = base[margin : margin + n]
    # audio leading the video by `lead` frames: audio window j carries the content of video window j + lead
    audio = base[margin + lead : margin + lead + n] + rng.normal(scale=0.1, size=(n, dim))
    synced = syncnet.sync_scores(torch.from_numpy(video).float(), audio, max_offset=8)
    assert synced["offset"] == lead
    expected = _loop_distances(video, audio, 8)
    np.testing.assert_allclose(synced["distances"], expected, rtol=1e-5)
    assert synced["lse_d"] == pytest.approx(expected.min(), rel=1e-5)
    assert synced["lse_c"] == pytest.approx(np.median(expected) - expected.min(), rel=1e-5)
    unrelated = syncnet.sync_scores(video, rng.normal(size=(n, dim)), max_offset=8)
    assert synced["lse_d"] < 0.5 * unrelated["lse_d"]
    assert synced["lse_c"] > 2 * unrelated["lse_c"]


def test_sync_scores_rejects_bad_input():
    with pytest.raises(LmdiffInputError, match="embeddings"):
        syncnet.sync_scores(np.zeros((5, 4)), np.zeros((6, 4)))
    with pytest.raises(LmdiffInputError, match="max_offset"):
        syncnet.sync_scores(np.zeros((5, 4)), np.zeros((5, 4)), max_offset=-1)
    with pytest.raises(LmdiffInputError, match="non-finite"):
        syncnet.sync_scores(np.full((5, 4), np.nan), np.zeros((5, 4)))


# -- MFCC -----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wav():
    rate, samples = wavfile.read(shared_path("data/clips/edtalk_woman_en.wav"))
    assert rate == 16000 and samples.dtype == np.int16 and samples.ndim == 1
    return samples[: 50 * 640]  # 2 s


def _direct_mfcc_frame(samples: np.ndarray, m: int) -> np.ndarray:
    """MFCC frame m computed term by term from python_speech_features' definition (int16-scale samples)."""
    x = samples.astype(np.float64)
    emphasised = np.concatenate([[x[0]], x[1:] - 0.97 * x[:-1]])
    segment = np.zeros(400)
    part = emphasised[160 * m : 160 * m + 400]
    segment[: len(part)] = part
    spectrum = np.fft.fft(segment, 512)[:257]
    power = np.abs(spectrum) ** 2 / 512
    mel = np.linspace(0, 2595 * math.log10(1 + 8000 / 700), 28)
    bins = [math.floor(513 * 700 * (10 ** (p / 2595) - 1) / 16000) for p in mel]
    bands = []
    for j in range(26):
        total = 0.0
        for i in range(bins[j], bins[j + 1]):
            total += power[i] * (i - bins[j]) / (bins[j + 1] - bins[j])
        for i in range(bins[j + 1], bins[j + 2]):
            total += power[i] * (bins[j + 2] - i) / (bins[j + 2] - bins[j + 1])
        bands.append(math.log(total))
    cepstra = []
    for k in range(13):
        scale = math.sqrt(1 / 26) if k == 0 else math.sqrt(2 / 26)
        c = scale * sum(b * math.cos(math.pi * k * (2 * n + 1) / 52) for n, b in enumerate(bands))
        cepstra.append(c * (1 + 11 * math.sin(math.pi * k / 22)))
    cepstra[0] = math.log(power.sum())
    return np.array(cepstra)


def test_mfcc_shape_and_100hz_alignment(wav):
    audio = wav.astype(np.float32) / 32768
    feats = syncnet.mfcc(audio)
    # python_speech_features: 1 + ceil((samples - 400) / 160) frames, i.e. 4 per 25 fps video frame minus one
    assert feats.shape == (13, 1 + math.ceil((len(wav) - 400) / 160)) == (13, 4 * 50 - 1)
    assert np.isfinite(feats).all()
    # cutting the audio at video frame k moves every MFCC frame by exactly 4k (frame 4k itself differs: its first
    # sample loses the pre-emphasis of the sample before the cut)
    for k in (1, 7, 20):
        np.testing.assert_allclose(syncnet.mfcc(audio[640 * k :])[:, 1:], feats[:, 4 * k + 1 :], atol=1e-9)
    # the int16 samples are recovered exactly from read_audio's float samples
    np.testing.assert_array_equal(
        syncnet.mfcc(read_audio(shared_path("data/clips/edtalk_woman_en.wav"))[: len(wav)]), feats
    )


def test_mfcc_matches_direct_computation(wav):
    feats = syncnet.mfcc(wav.astype(np.float32) / 32768)
    for m in (0, 1, 57, 120, feats.shape[1] - 1):
        np.testing.assert_allclose(feats[:, m], _direct_mfcc_frame(wav, m), rtol=1e-9, atol=1e-9)


# -- crops -----------------------------------------------------------------------------------------------------------
def test_crops_match_pil_reference_and_pad_with_grey(clip):
    frames, seq, _ = clip
    still = np.repeat(frames[:1], 3, axis=0)
    still_seq = seq[[0, 0, 0]]  # a still face: the median filter leaves its box unchanged
    crops = syncnet.syncnet_crops(still, still_seq)
    assert crops.shape == (3, 224, 224, 3) and crops.dtype == np.uint8
    points = seq.to_topology("ibug68").points[0, :, :2].astype(np.float64)
    (x0, y0), (x1, y1) = points.min(axis=0), points.max(axis=0)
    s, cx, cy = max(x1 - x0, y1 - y0) / 2, (x0 + x1) / 2, (y0 + y1) / 2
    box = (cx - 1.4 * s, cy - s, cx + 1.4 * s, cy + 1.8 * s)  # run_pipeline.crop_video with crop_scale 0.4
    reference = Image.fromarray(frames[0]).transform(
        (224, 224), Image.Transform.EXTENT, box, resample=Image.Resampling.BILINEAR, fillcolor=(110, 110, 110)
    )
    difference = np.abs(crops[0].astype(float) - np.asarray(reference, dtype=float))
    assert difference.mean() < 0.6 and difference.max() <= 2  # rounding apart, the same pixels
    # a face at the frame's top-left corner: the part of the crop outside the frame is grey 110
    corner = still_seq.replace(points=still_seq.points - np.array([cx, cy, 0], np.float32))
    cropped = syncnet.syncnet_crops(still, corner)
    assert (cropped[:, :40, :40] == 110).all() and (cropped[:, 120:, 120:] != 110).any()


def test_crops_reject_mismatched_landmarks(clip):
    frames, seq, _ = clip
    with pytest.raises(LmdiffInputError, match="do not match"):
        syncnet.syncnet_crops(frames[:5], seq)
    with pytest.raises(LmdiffInputError, match="25 fps"):
        syncnet.syncnet_crops(frames, seq.replace(fps=30.0))


# -- network and weights ---------------------------------------------------------------------------------------------
def test_parameter_names_and_shapes_follow_syncnet_v2(random_net):
    state = random_net.state_dict()
    assert {k.split(".")[0] for k in state} == {"netcnnaud", "netfcaud", "netcnnlip", "netfclip"}
    expected = {
        "netcnnaud.0.weight": (64, 1, 3, 3),
        "netcnnaud.1.running_var": (64,),
        "netcnnaud.4.weight": (192, 64, 3, 3),
        "netcnnaud.18.weight": (512, 256, 5, 4),
        "netcnnaud.19.running_mean": (512,),
        "netfcaud.0.weight": (512, 512),
        "netfcaud.3.weight": (1024, 512),
        "netcnnlip.0.weight": (96, 3, 5, 7, 7),
        "netcnnlip.4.weight": (256, 96, 1, 5, 5),
        "netcnnlip.18.weight": (512, 256, 1, 6, 6),
        "netfclip.1.weight": (512,),
        "netfclip.3.bias": (1024,),
    }
    assert {k: tuple(state[k].shape) for k in expected} == expected
    # 13.6 M parameters: 52 MiB of float32, the size of the published syncnet_v2.model
    assert sum(p.numel() for p in random_net.parameters()) == 13_631_616


def _roundtrip_outputs(net, path):
    loaded = syncnet.load_syncnet(path)
    assert not loaded.training
    torch.manual_seed(1)
    mfcc, frames = torch.randn(2, 1, 13, 20), torch.rand(2, 3, 5, 224, 224) * 255
    with torch.no_grad():
        for a, b in (
            (net.embed_audio(mfcc), loaded.embed_audio(mfcc)),
            (net.embed_video(frames), loaded.embed_video(frames)),
        ):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_loader_round_trips(random_net, tmp_path):
    from safetensors.torch import save_file

    state = random_net.state_dict()
    torch.save(state, tmp_path / "syncnet.pt")
    _roundtrip_outputs(random_net, tmp_path / "syncnet.pt")
    # the real file predates PyTorch 1.6 (legacy pickle format) and may lack num_batches_tracked buffers
    from collections import OrderedDict

    old = OrderedDict((k, v) for k, v in state.items() if not k.endswith("num_batches_tracked"))
    torch.save(old, tmp_path / "syncnet_v2.model", _use_new_zipfile_serialization=False)
    _roundtrip_outputs(random_net, tmp_path / "syncnet_v2.model")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "syncnet.safetensors"))
    _roundtrip_outputs(random_net, tmp_path / "syncnet.safetensors")


def test_loader_errors_name_the_file(random_net, tmp_path):
    missing = tmp_path / "absent.model"
    with pytest.raises(LmdiffInputError, match=f"{missing} does not exist.*syncnet_v2.model"):
        syncnet.load_syncnet(missing)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(LmdiffInputError, match=f"{garbage} is not a state dict"):
        syncnet.load_syncnet(garbage)
    state = random_net.state_dict()
    prefixed = tmp_path / "prefixed.model"
    torch.save({f"__S__.{k}": v for k, v in state.items()}, prefixed)
    with pytest.raises(
        LmdiffInputError,
        match=f"{prefixed} is not SyncNet.*missing keys \\(netcnnaud.0.weight.*unexpected keys \\(__S__",
    ):
        syncnet.load_syncnet(prefixed)
    shaped = tmp_path / "shaped.model"
    torch.save({**state, "netfclip.3.weight": torch.zeros(512, 512)}, shaped)
    with pytest.raises(
        LmdiffInputError, match=r"shaped.model.*wrong shapes \(netfclip.3.weight \(512, 512\) for \(1024, 512\)"
    ):
        syncnet.load_syncnet(shaped)
    pickled_module = tmp_path / "module.model"
    torch.save(random_net, pickled_module)  # a whole pickled network: refused by weights_only
    with pytest.raises(LmdiffInputError, match="module.model"):
        syncnet.load_syncnet(pickled_module)


# -- the whole pipeline, RANDOM network ------------------------------------------------------------------------------
def test_lse_plumbing_with_random_network(clip, random_net):
    frames, seq, audio = clip
    crops = syncnet.syncnet_crops(frames, seq)
    assert crops.shape == (N_FRAMES, 224, 224, 3)
    video_emb, audio_emb = syncnet.embeddings(random_net, crops, audio)
    assert video_emb.shape == audio_emb.shape == (N_FRAMES - 5, 1024)
    assert torch.isfinite(video_emb).all() and torch.isfinite(audio_emb).all()
    expected = syncnet.sync_scores(video_emb, audio_emb)
    from_landmarks = syncnet.lse(frames, audio, seq, random_net)
    from_crops = syncnet.lse(crops, audio, None, random_net)
    assert set(from_landmarks) == {"lse_c", "lse_d", "offset"}
    for result in (from_landmarks, from_crops):  # deterministic: the same numbers on every pass
        assert result == {k: expected[k] for k in ("lse_c", "lse_d", "offset")}
    assert math.isfinite(expected["lse_d"]) and expected["lse_c"] >= 0 and -15 <= expected["offset"] <= 15
    # a longer audio track does not change the windows: they stop at the shorter stream
    assert syncnet.lse(crops[:8], np.concatenate([audio, audio]), None, random_net)["lse_d"] == pytest.approx(
        syncnet.sync_scores(*syncnet.embeddings(random_net, crops[:8], audio[: 8 * 640]))["lse_d"]
    )
    # frames that are not 224x224 are resized first (the path of Wav2Lip's calculate_scores_LRS)
    small = frames[:8, ::2, ::2]
    assert syncnet.lse(small, audio, None, random_net) == syncnet.lse(small, audio, None, random_net)
    with pytest.raises(LmdiffInputError, match="at least 6 frames"):
        syncnet.lse(crops[:5], audio, None, random_net)
