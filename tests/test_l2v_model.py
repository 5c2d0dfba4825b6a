"""L2VUNet on tiny configs: shapes, gradients, the zero-initialised guider and temporal layers, SD1.5 initialisation."""

import pytest
import torch

from lmdiff_core.errors import LmdiffInputError
from lmdiff_core.models import L2VUNet

TINY = dict(
    block_out_channels=(16, 32),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    num_attention_heads=2,
    cross_attention_dim=32,
    norm_num_groups=8,
)


def _inputs(n=4, c=4, h=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(n, c, h, h, generator=g),
        timestep=torch.full((n,), 300),
        condition=torch.rand(n, 3, 8 * h, 8 * h, generator=g),
        pose_reference=torch.randn(n, c, h, h, generator=g),
        pose_mask=torch.rand(n, 1, 8 * h, 8 * h, generator=g),
        identity=torch.randn(n, c, h, h, generator=g),
    )


def _randomize_zero_layers(model):
    """Give the zero-initialised guider and temporal output layers random weights (as training would)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "zero_conv" in name or ("temporal_layers" in name and "to_out" in name):
                p.normal_(0, 0.1)


def test_forward_backward_shapes():
    torch.manual_seed(0)
    model = L2VUNet(**TINY)
    out = model(**_inputs(), num_frames=2)
    assert out.shape == (4, 4, 8, 8)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_untrained_guider_and_temporal_layers_change_nothing():
    """Zero-initialised: the landmark image and the other frames of a window have no effect until trained."""
    torch.manual_seed(0)
    model = L2VUNet(**TINY).eval()
    x = _inputs()
    other = dict(x, condition=torch.rand_like(x["condition"]))
    with torch.no_grad():
        base = model(**x, num_frames=2)
        assert torch.allclose(base, model(**other, num_frames=2), atol=1e-6)
        assert torch.allclose(base, model(**x, num_frames=1), atol=1e-6)
        _randomize_zero_layers(model)
        assert not torch.allclose(model(**x, num_frames=2), model(**other, num_frames=2), atol=1e-4)


def test_temporal_attention_stays_within_a_window():
    """With trained temporal layers, frame 0 depends on frame 1 of its window and not on another window's frames."""
    torch.manual_seed(0)
    model = L2VUNet(**TINY).eval()
    _randomize_zero_layers(model)
    x = _inputs(n=4)
    changed = dict(x, sample=x["sample"].clone())
    changed["sample"][1] += 1.0  # frame 1 of window 0
    with torch.no_grad():
        a, b = model(**x, num_frames=2), model(**changed, num_frames=2)
        c = model(**changed, num_frames=1)
        d = model(**x, num_frames=1)
    assert not torch.allclose(a[0], b[0], atol=1e-5)  # same window: frame 0 sees frame 1
    assert torch.allclose(a[2:], b[2:], atol=1e-6)  # other window: untouched
    assert torch.allclose(c[0], d[0], atol=1e-6)  # no temporal mixing with num_frames=1


@pytest.mark.parametrize("concat", [True, False])
def test_identity_reference_attention_reads_the_identity(concat):
    torch.manual_seed(0)
    model = L2VUNet(**{**TINY, "temporal_attention": False, "identity_concat": concat}).eval()
    channels = model.config.latent_channels
    assert model.conv_in.in_channels == (3 if concat else 2) * channels + 1
    x = _inputs()
    with torch.no_grad():
        model.conv_in.weight[:, 2 * channels + 1 :].zero_()  # whatever reaches the output now comes by attention
        a = model(**x)
        b = model(**dict(x, identity=torch.randn_like(x["identity"])))
    assert not torch.allclose(a, b, atol=1e-5)


def test_identity_by_concatenation_only():
    no_attention = dict(down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    model = L2VUNet(**{**TINY, **no_attention, "temporal_attention": False}).eval()
    assert model.identity_tokens is None
    x = _inputs()
    with torch.no_grad():
        a = model(**x)
        b = model(**dict(x, identity=torch.randn_like(x["identity"])))
    assert not torch.allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="identity"):
        L2VUNet(**{**TINY, **no_attention, "identity_concat": False})


def test_bad_inputs_are_clear_errors():
    model = L2VUNet(**TINY)
    x = _inputs()
    with pytest.raises(LmdiffInputError, match="channels"):
        model(**dict(x, sample=torch.randn(4, 16, 8, 8)))
    with pytest.raises(LmdiffInputError, match="condition"):
        model(**dict(x, condition=torch.rand(4, 3, 32, 32)))
    with pytest.raises(LmdiffInputError, match="num_frames"):
        model(**x, num_frames=3)
    with pytest.raises(LmdiffInputError, match="multiple"):
        model(**_inputs(h=5))


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = L2VUNet(**TINY).eval()
    _randomize_zero_layers(model)
    model.save_pretrained(tmp_path / "unet")
    loaded = L2VUNet.from_pretrained(tmp_path / "unet").eval()
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(model(**x, num_frames=2), loaded(**x, num_frames=2))


def test_from_sd15_copies_matching_weights(tmp_path):
    """A (tiny, random) SD1.5-layout UNet folder initialises the U-Net: same-named weights equal, conv_in extended."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    sd = UNet2DConditionModel(
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
        sample_size=8,
    )
    sd.save_pretrained(tmp_path / "unet")
    model = L2VUNet.from_sd15(tmp_path / "unet", autoencoder="taesd")
    ours, theirs = model.state_dict(), sd.state_dict()
    same = [k for k in theirs if k in ours and ours[k].shape == theirs[k].shape]
    assert len(same) > 0.8 * len(theirs)
    for key in same:
        assert torch.equal(ours[key], theirs[key]), key
    assert torch.equal(ours["conv_in.weight"][:, :4], theirs["conv_in.weight"])
    assert ours["conv_in.weight"][:, 4:].abs().sum() == 0
    with pytest.raises(LmdiffInputError, match="config.json"):
        L2VUNet.from_sd15(tmp_path)


def test_extra_reference_unet_uses_the_reference_and_reloads(tmp_path):
    """extra_references=1 (the quality-mode refiner): the reference is one more conv_in input that changes the output,
    a call without it is refused, and save/from_pretrained give the same model back. Default off: conv_in is as
    before (a checkpoint without the option loads unchanged)."""
    torch.manual_seed(0)
    plain = L2VUNet(**TINY)
    model = L2VUNet(**TINY, extra_references=1, prediction_type="sample").eval()
    assert plain.conv_in.in_channels == 3 * 4 + 1
    assert model.conv_in.in_channels == 4 * 4 + 1
    x = _inputs()
    reference = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(**x, references=reference)
        assert out.shape == (4, 4, 8, 8)
        assert not torch.allclose(out, model(**x, references=reference + 1.0), atol=1e-4)
    with pytest.raises(LmdiffInputError, match="extra reference"):
        model(**x)
    with pytest.raises(LmdiffInputError, match="extra reference"):
        plain(**x, references=reference)
    with pytest.raises(LmdiffInputError, match="references must be"):
        model(**x, references=reference[:, :2])
    model.save_pretrained(tmp_path / "unet")
    loaded = L2VUNet.from_pretrained(tmp_path / "unet").eval()
    assert loaded.config.extra_references == 1
    with torch.no_grad():
        assert torch.equal(loaded(**x, references=reference), out)


def test_reference_residual_starts_at_the_reference():
    """reference_residual: an untrained refiner returns its first extra reference exactly; it needs one."""
    torch.manual_seed(0)
    model = L2VUNet(**TINY, extra_references=1, reference_residual=True, prediction_type="sample").eval()
    reference = torch.randn(4, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(**_inputs(), references=reference), reference)
    with pytest.raises(ValueError, match="extra_references"):
        L2VUNet(**TINY, reference_residual=True)
