"""A2L models on tiny configs: shapes, initial outputs, save/load, the dependencies each design promises, training."""

import json

import numpy as np
import pytest
import torch

from lmdiff_core.models import A2LLSTM, A2LDiffusion
from lmdiff_core.topology import MEDIAPIPE478

MEDIAPIPE_LIPS = [
    int(i) for i in np.union1d(MEDIAPIPE478.part_indices("outer_lips"), MEDIAPIPE478.part_indices("inner_lips"))
]
IBUG_LIPS = list(range(48, 68))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine the threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_lstm(**overrides) -> A2LLSTM:
    return A2LLSTM(**{"hidden_size": 32, "num_layers": 2, "audio_context": 2, **overrides})


def tiny_diffusion(**overrides) -> A2LDiffusion:
    return A2LDiffusion(**{"d_model": 32, "n_heads": 2, "n_layers": 2, "ffn_mult": 2, "window": 8, **overrides})


def inputs(batch=2, frames=8, n_points=68, layers=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    audio = torch.randn(batch, frames, 4, layers, 80, generator=g) * 2 - 5  # natural-log-mel-like scale
    reference = torch.randn(batch, n_points, 3, generator=g) * 0.5
    sample = torch.randn(batch, frames, n_points, 3, generator=g)
    prev = reference[:, None] + 0.05 * torch.randn(batch, 3, n_points, 3, generator=g)
    return audio, reference, sample, prev


def perturb(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Add noise to every parameter, zero-initialised heads and FiLM layers included, so every path is live."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize(
    ("layers", "n_points", "lips"), [(1, 68, IBUG_LIPS), (3, 68, IBUG_LIPS), (1, 478, MEDIAPIPE_LIPS)]
)
def test_shapes(layers, n_points, lips):
    audio, reference, sample, prev = inputs(n_points=n_points, layers=layers)
    lstm = perturb(tiny_lstm(n_points=n_points, audio_layers=layers))
    assert lstm(audio, reference).shape == (2, 8, n_points, 3)
    diffusion = perturb(tiny_diffusion(n_points=n_points, lip_indices=lips, audio_layers=layers))
    out = diffusion(sample, torch.tensor([3, 700]), audio, reference, prev, torch.tensor([True, False]))
    assert out.shape == (2, 8, n_points, 3) and torch.isfinite(out).all()
    assert diffusion(sample, 10, audio, reference).shape == (2, 8, n_points, 3)


def test_wrong_audio_layout_is_a_clear_error():
    audio, reference, sample, _ = inputs()
    with pytest.raises(ValueError, match=r"\[B, T, k, L, D\]"):
        tiny_lstm()(audio[:, :, :2], reference)
    with pytest.raises(ValueError, match=r"\[B, T, k, L, D\]"):
        tiny_diffusion(audio_layers=3)(sample, 0, audio, reference)


def test_invalid_diffusion_config():
    with pytest.raises(ValueError, match="lip_indices"):
        tiny_diffusion(lip_indices=(48, 68))
    with pytest.raises(ValueError, match="prediction_type"):
        tiny_diffusion(prediction_type="flow")


def test_untrained_lstm_returns_the_reference_exactly():
    audio, reference, _, _ = inputs()
    out = tiny_lstm()(audio, reference)
    assert torch.equal(out, reference[:, None].expand_as(out))


def test_untrained_diffusion_outputs_exact_zeros():
    audio, reference, sample, prev = inputs()
    out = tiny_diffusion()(sample, 500, audio, reference, prev)
    assert torch.equal(out, torch.zeros_like(out))


def test_sample_landmark_conversion_round_trips():
    model = tiny_diffusion(displacement_scale=20.0)
    _, reference, landmarks, _ = inputs()
    sample = model.landmarks_to_sample(landmarks, reference)
    assert torch.allclose(sample, 20.0 * (landmarks - reference[:, None]))
    assert torch.allclose(model.sample_to_landmarks(sample, reference), landmarks, atol=1e-6)


def _public(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


@pytest.mark.parametrize("make", [tiny_lstm, lambda: tiny_diffusion(lip_indices=tuple(IBUG_LIPS))])
def test_save_load_round_trip(make, tmp_path):
    model = perturb(make())
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == type(model).__name__
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert _public(loaded.config) == _public(model.config)
    audio, reference, sample, prev = inputs()
    with torch.no_grad():
        if isinstance(model, A2LLSTM):
            assert torch.equal(loaded(audio, reference), model(audio, reference))
        else:
            assert torch.equal(loaded(sample, 9, audio, reference, prev), model(sample, 9, audio, reference, prev))


def test_loading_the_other_class_is_an_error(tmp_path):
    tiny_lstm().save_pretrained(tmp_path / "lstm")
    tiny_diffusion().save_pretrained(tmp_path / "diffusion")
    with pytest.raises(ValueError, match="A2LLSTM.*A2LDiffusion"):
        A2LDiffusion.from_pretrained(tmp_path / "lstm")
    with pytest.raises(ValueError, match="A2LDiffusion.*A2LLSTM"):
        A2LLSTM.from_pretrained(tmp_path / "diffusion")


def test_lstm_sees_audio_only_up_to_its_context():
    context, changed_frame = 2, 10
    model = perturb(tiny_lstm(audio_context=context))
    audio, reference, _, _ = inputs(frames=16)
    changed = audio.clone()
    changed[:, changed_frame] += 3 * torch.randn_like(changed[:, changed_frame])
    with torch.no_grad():
        before, after = model(audio, reference), model(changed, reference)
    first_affected = changed_frame - context
    assert torch.equal(before[:, :first_affected], after[:, :first_affected])
    assert (before[:, first_affected:] - after[:, first_affected:]).abs().amax(dim=(0, 2, 3)).min() > 0


def test_feature_statistics_standardise_the_audio_and_are_saved(tmp_path):
    """With statistics set, the model sees (audio - mean) / std: the same as identity statistics on standardised audio."""
    audio, reference, sample, _ = inputs()
    mean, std = audio.mean(dim=(0, 1, 2)), audio.std(dim=(0, 1, 2)) + 0.5
    for make, call in (
        (tiny_lstm, lambda m, a: m(a, reference)),
        (tiny_diffusion, lambda m, a: m(sample, 5, a, reference)),
    ):
        model = perturb(make())
        plain = type(model).from_config(model.config)
        plain.load_state_dict(model.state_dict())
        model.audio_norm.set_statistics(mean, std)
        with torch.no_grad():
            assert torch.allclose(call(model, audio), call(plain, (audio - mean) / std), atol=1e-5)
        model.save_pretrained(tmp_path / make.__name__)
        loaded = type(model).from_pretrained(tmp_path / make.__name__)
        assert torch.equal(loaded.audio_norm.mean, model.audio_norm.mean)
        assert torch.equal(loaded.audio_norm.std, model.audio_norm.std)


def _grad_of_group_wrt_group(model, out_points, in_points):
    audio, reference, sample, prev = inputs()
    sample.requires_grad_(True)
    prev.requires_grad_(True)
    reference.requires_grad_(True)
    out = model(sample, 100, audio, reference, prev)
    out[:, :, out_points].square().sum().backward()
    return max(t.grad[..., in_points, :].abs().max().item() for t in (sample, prev, reference))


def test_lip_and_non_lip_streams_attend_separately():
    non_lip = [i for i in range(68) if i not in IBUG_LIPS]
    separate = perturb(tiny_diffusion(stream_exchange=False))
    assert _grad_of_group_wrt_group(separate, non_lip, IBUG_LIPS) == 0.0
    assert _grad_of_group_wrt_group(separate, IBUG_LIPS, non_lip) == 0.0
    assert _grad_of_group_wrt_group(separate, non_lip, non_lip) > 0.0
    exchanging = perturb(tiny_diffusion(stream_exchange=True))
    assert _grad_of_group_wrt_group(exchanging, non_lip, IBUG_LIPS) > 0.0
    assert _grad_of_group_wrt_group(exchanging, IBUG_LIPS, non_lip) > 0.0


def test_masked_audio_has_no_influence():
    model = perturb(tiny_diffusion())
    audio, reference, sample, _ = inputs()
    audio.requires_grad_(True)
    out = model(sample, 250, audio, reference, audio_mask=torch.tensor([False, True]))
    out[0].sum().backward(retain_graph=True)
    assert torch.count_nonzero(audio.grad) == 0
    audio.grad = None
    out[1].sum().backward()
    assert audio.grad[1].abs().max() > 0


def test_prev_frames_are_used():
    model = perturb(tiny_diffusion())
    audio, reference, sample, prev = inputs()
    with torch.no_grad():
        without = model(sample, 50, audio, reference)
        with_prev = model(sample, 50, audio, reference, prev)
        other_prev = model(sample, 50, audio, reference, prev + 0.1)
    assert (with_prev[:, 0] - without[:, 0]).abs().max() > 1e-4
    assert (with_prev[:, 0] - other_prev[:, 0]).abs().max() > 1e-4


def test_masked_prev_frames_are_as_if_absent():
    """A prev frame hidden by prev_mask has no influence; hiding all of them equals giving none (prev dropout trains
    the first window's case)."""
    model = perturb(tiny_diffusion())
    audio, reference, sample, prev = inputs()
    none_seen = torch.zeros(2, 3, dtype=torch.bool)
    with torch.no_grad():
        without = model(sample, 50, audio, reference)
        hidden = model(sample, 50, audio, reference, prev, prev_mask=none_seen)
        hidden_other = model(sample, 50, audio, reference, prev + 0.3, prev_mask=none_seen)
        first_only = torch.tensor([[True, False, False], [True, False, False]])
        partly = model(sample, 50, audio, reference, prev, prev_mask=first_only)
        moved_hidden = prev + 0.3 * (~first_only)[..., None, None]  # only the hidden frames change
        partly_other = model(sample, 50, audio, reference, moved_hidden, prev_mask=first_only)
    torch.testing.assert_close(hidden, without, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden_other, without, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(partly_other, partly, rtol=1e-5, atol=1e-5)
    assert (partly - without).abs().max() > 1e-4
    with pytest.raises(ValueError, match="prev_mask"):
        model(sample, 50, audio, reference, prev, prev_mask=none_seen[:, :2])


def test_scalar_and_batched_timesteps_agree():
    model = perturb(tiny_diffusion())
    audio, reference, sample, _ = inputs()
    with torch.no_grad():
        assert torch.equal(model(sample, 42, audio, reference), model(sample, torch.tensor([42, 42]), audio, reference))


def _steps_to_divide_loss_by_10(model, loss_fn, max_steps=200, lr=3e-3) -> int | None:
    """Adam steps until the loss is below a tenth of its initial value; None if it is not within max_steps."""
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    first = loss_fn().item()
    for step in range(1, max_steps + 1):
        optimiser.zero_grad()
        loss_fn().backward()
        optimiser.step()
        with torch.no_grad():
            if loss_fn().item() < first / 10:
                return step
    return None


def test_lstm_overfits_a_tiny_batch():
    torch.manual_seed(0)
    model = tiny_lstm()
    audio, reference, _, _ = inputs()
    target = reference[:, None] + 0.1 * torch.randn(2, 8, 68, 3)
    assert _steps_to_divide_loss_by_10(model, lambda: (model(audio, reference) - target).square().mean()) is not None


def test_diffusion_overfits_a_tiny_batch():
    torch.manual_seed(0)
    model = tiny_diffusion()
    audio, reference, sample, prev = inputs()
    timestep, target = torch.tensor([100, 800]), torch.randn_like(sample)
    loss = lambda: (model(sample, timestep, audio, reference, prev) - target).square().mean()  # noqa: E731
    assert _steps_to_divide_loss_by_10(model, loss) is not None


@pytest.mark.parametrize("make", [tiny_lstm, tiny_diffusion])
def test_same_seed_same_model(make):
    torch.manual_seed(123)
    a = make()
    torch.manual_seed(123)
    b = make()
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    audio, reference, sample, _ = inputs()
    with torch.no_grad():
        if isinstance(a, A2LLSTM):
            assert torch.equal(perturb(a)(audio, reference), perturb(b)(audio, reference))
        else:
            assert torch.equal(perturb(a)(sample, 3, audio, reference), perturb(b)(sample, 3, audio, reference))
