"""Personalising A2L by several frames of the speaker (`speaker_references`), on a real clip and the bundled model."""

from __future__ import annotations

import numpy as np
import pytest

from lmdiff_core.canonical import to_model_units
from lmdiff_core.checkpoints import BUNDLED_A2L
from lmdiff_core.detectors import extract_landmarks, load_landmarker
from lmdiff_core.errors import LmdiffInputError
from lmdiff_core.media import iter_frames, read_audio
from lmdiff_core.pipelines.a2l import REFERENCE_QUANTILES, AudioToLandmarksPipeline, speaker_references

from .conftest import shared_path


@pytest.fixture(scope="module")
def track(mediapipe_model, clips_dir):
    frames = list(iter_frames(clips_dir / "macron_fr.mp4", 25.0, max_frames=75))
    with load_landmarker("mediapipe", mediapipe_model, video=True) as landmarker:
        return extract_landmarks(frames, landmarker, 25.0, max_gap=None, source="macron_fr")


def test_speaker_references_span_the_mouth_openings(track):
    references, rest = speaker_references(track)
    opening = track.mouth_opening()[track.valid]
    assert 1 < len(references) <= len(REFERENCE_QUANTILES) and len(rest) == 1
    assert rest.mouth_opening()[0] == pytest.approx(opening.min())
    picked = np.sort(references.mouth_opening())
    for value, q in zip(picked, REFERENCE_QUANTILES):  # distinct frames here: one per quantile
        assert value == pytest.approx(np.quantile(opening, q, method="nearest"), abs=1e-6)
    faceless = track.replace(valid=np.zeros(len(track), dtype=bool))
    with pytest.raises(LmdiffInputError, match="no valid frame"):
        speaker_references(faceless)


def test_several_references_give_the_mean_prediction_and_silence_the_rest_frame(track):
    pipeline = AudioToLandmarksPipeline.from_pretrained(BUNDLED_A2L)
    speech = read_audio(shared_path("data/speech/speech_fr_macron.wav"))[: 2 * 16000]
    audio = np.concatenate([speech, np.zeros(32000, np.float32)])  # 2 s of speech, 2 s of silence
    references, rest = speaker_references(track)
    features = pipeline.features(audio, 100)
    mean = pipeline.predict_features(features, references)  # no silence gate: the models' own outputs
    singles = [pipeline.predict_features(features, references[i : i + 1]).points for i in range(len(references))]
    np.testing.assert_allclose(to_model_units(mean.points), to_model_units(np.mean(singles, axis=0)), atol=1e-5)
    assert np.abs(np.diff(to_model_units(np.stack(singles)), axis=0)).max() > 0.01  # the references matter
    gated = pipeline(audio, references, rest=rest)
    rest_points = pipeline.reference_points(rest)[0]
    np.testing.assert_allclose(to_model_units(gated.points)[60:95], np.repeat(rest_points[None], 35, 0), atol=1e-4)
