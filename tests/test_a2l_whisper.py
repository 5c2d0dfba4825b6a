"""`lmdiff a2l` with the bundled A2L checkpoint (Whisper-base features): no --checkpoint needed, every common audio
format works, and bad input (too short, the speech extra missing or damaged) gives one line and exit 2."""

from __future__ import annotations

import importlib.util
import math

import av
import numpy as np
import pytest
import soundfile

from lmdiff_core import whisper_ct2
from lmdiff_core.canonical import CANONICAL_SIZE, mean_face
from lmdiff_core.cli import main
from lmdiff_core.landmarks import LandmarkSequence
from lmdiff_core.media import read_audio

from .conftest import shared_path

pytestmark = pytest.mark.skipif(
    not all(importlib.util.find_spec(package) for package, _, _ in whisper_ct2.PARTS),
    reason=f"the bundled A2L checkpoint needs the lmdiff[speech] extra ({whisper_ct2.PIP_COMMAND})",
)


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return read_audio(shared_path("data/speech/speech_en_hdtf_radio34.wav"))[: 16000 * 3]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "reference.npz"
    LandmarkSequence(mean_face("ibug68")[None], "ibug68", frame_size=CANONICAL_SIZE, space="canonical").save(path)
    return path


def _a2l(capsys, audio, reference, out) -> tuple[int, str]:
    code = main(["a2l", "--audio", str(audio), "--reference", str(reference), "-o", str(out)])
    return code, capsys.readouterr().err.strip()


def _write_mp3(path, audio: np.ndarray, rate: int) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mp3", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray((audio[None] * 32767).astype(np.int16), format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


@pytest.mark.parametrize("kind", ["wav16k", "wav8k", "wav44k_stereo", "mp3"])
def test_a2l_without_checkpoint_takes_any_common_audio(tmp_path, capsys, speech, reference, kind):
    """The bundled checkpoint runs without --checkpoint; T = ceil(duration x 25) for the file's own duration, and the
    mouth moves with the speech."""
    import librosa

    path = tmp_path / ("speech.mp3" if kind == "mp3" else "speech.wav")
    if kind == "wav16k":
        soundfile.write(path, speech, 16000)
    elif kind == "wav8k":
        soundfile.write(path, librosa.resample(speech, orig_sr=16000, target_sr=8000), 8000)
    elif kind == "wav44k_stereo":
        wide = librosa.resample(speech, orig_sr=16000, target_sr=44100)
        soundfile.write(path, np.stack([wide, 0.5 * wide], axis=1), 44100)
    else:
        _write_mp3(path, speech, 16000)
    info = soundfile.info(str(path)) if kind != "mp3" else None
    out = tmp_path / "talk.npz"
    code, err = _a2l(capsys, path, reference, out)
    assert code == 0, err
    talking = LandmarkSequence.load(out)
    if info is not None:
        assert len(talking) == math.ceil(info.frames / info.samplerate * 25 - 1e-9)
    else:  # mp3 pads with encoder delay: within a few frames of the 3 s written
        assert abs(len(talking) - 75) <= 3
    assert talking.mouth_opening().std() > 0.01


def test_a2l_on_pure_silence_keeps_the_reference_mouth(tmp_path, capsys, reference):
    path = tmp_path / "silence.wav"
    soundfile.write(path, np.zeros(16000 * 2, np.float32), 16000)
    out = tmp_path / "talk.npz"
    code, err = _a2l(capsys, path, reference, out)
    assert code == 0, err
    talking = LandmarkSequence.load(out)
    assert len(talking) == 50
    # the CLI adds generated head motion (a rigid move and scale): compare the 3D inner-lip gap in 3D eye-corner units
    np.testing.assert_allclose(_gap_3d(talking), _gap_3d(LandmarkSequence.load(reference))[0], atol=1e-4)


def _gap_3d(seq: LandmarkSequence) -> np.ndarray:
    from lmdiff_core.topology import get_topology

    topo = get_topology(seq.topology)
    upper, lower = topo.inner_lips
    a, b = topo.outer_eye_corners
    gap = np.linalg.norm(seq.points[:, upper] - seq.points[:, lower], axis=-1)
    return gap / np.linalg.norm(seq.points[:, a] - seq.points[:, b], axis=-1)


def test_audio_under_0_2_s_is_one_clear_error(tmp_path, capsys, speech, reference):
    path = tmp_path / "blip.wav"
    soundfile.write(path, speech[:1600], 16000)
    out = tmp_path / "talk.npz"
    code, err = _a2l(capsys, path, reference, out)
    assert code == 2 and len(err.splitlines()) == 1 and "0.2 s" in err and "0.100 s" in err
    assert not out.exists()


def test_missing_speech_extra_names_the_pip_command(tmp_path, capsys, speech, reference, monkeypatch):
    monkeypatch.setattr(whisper_ct2, "PARTS", (("lmdiff_absent_part_pkg", "model.bin.part1", "0" * 64),))
    path = tmp_path / "speech.wav"
    soundfile.write(path, speech, 16000)
    code, err = _a2l(capsys, path, reference, tmp_path / "talk.npz")
    assert code == 2 and len(err.splitlines()) == 1 and whisper_ct2.PIP_COMMAND in err
    assert not (tmp_path / "talk.npz").exists()


def test_damaged_part_names_the_part_and_its_checksum(tmp_path, capsys, speech, reference, monkeypatch):
    (package, name, _), second = whisper_ct2.PARTS
    monkeypatch.setattr(whisper_ct2, "PARTS", ((package, name, "ab" * 32), second))
    path = tmp_path / "speech.wav"
    soundfile.write(path, speech, 16000)
    code, err = _a2l(capsys, path, reference, tmp_path / "talk.npz")
    assert code == 2 and len(err.splitlines()) == 1 and name in err and "ab" * 32 in err
    assert not (tmp_path / "talk.npz").exists()
