"""Behaviour of UNet3D beyond the goldens: activation checkpointing and attention backends change nothing
numerically, frames mix through time but batch entries stay independent, dtype/device agnosticism, clear errors."""

import pytest
import torch

from vgen.models import UNet3D, UNet3DConfig, get_attention_backend, set_attention_backend

TINY = {"model_channels": 32, "channel_mult": (1, 2), "num_res_blocks": 1, "attention_scales": (1.0,), "head_dim": 16,
            "init_temporal_heads": 4}


def _inputs(batch=2, frames=3, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, frames, size, size, generator=g), torch.tensor([10, 700][:batch]),
            torch.randn(batch, 5, 1024, generator=g))


def _randomize(model, seed=0):
    """Make every layer non-trivial (zero-initialised output layers would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / max(1, p[0].numel()) ** 0.5)
    return model


@pytest.fixture
def attention_backend():
    previous = get_attention_backend()
    yield set_attention_backend
    set_attention_backend(previous)


def test_gradient_checkpointing_gives_identical_outputs_and_gradients():
    torch.manual_seed(0)
    model = _randomize(UNet3D(**TINY)).train()
    x, t, text = _inputs()
    grads = []
    for enabled in (False, True):
        model.set_gradient_checkpointing(enabled)
        model.zero_grad()
        torch.manual_seed(1)  # dropout draws must line up: checkpointing replays the RNG state
        out = model(x, t, text=text)
        out.square().mean().backward()
        grads.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_naive_and_sdpa_attention_agree(attention_backend):
    model = _randomize(UNet3D(**TINY)).eval()
    x, t, text = _inputs()
    with torch.no_grad():
        attention_backend("sdpa")
        sdpa = model(x, t, text=text)
        attention_backend("naive")
        naive = model(x, t, text=text)
    torch.testing.assert_close(sdpa, naive, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="flash"):
        attention_backend("flash")


def test_frames_mix_in_time_but_batch_entries_are_independent():
    model = _randomize(UNet3D(**TINY)).eval()
    x, t, text = _inputs()
    with torch.no_grad():
        ref = model(x, t, text=text)
        x2 = x.clone()
        x2[0, :, -1] += 1.0  # perturb the last frame of sample 0
        out = model(x2, t, text=text)
    assert (out[0, :, 0] - ref[0, :, 0]).abs().max() > 1e-4, "frame 0 must see the last frame (temporal layers)"
    torch.testing.assert_close(out[1], ref[1], rtol=0, atol=1e-6)


def test_bfloat16_forward_and_backward_run():
    model = _randomize(UNet3D(**TINY)).to(torch.bfloat16)
    x, t, text = _inputs()
    out = model(x.bfloat16(), t, text=text.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_fp64_matches_fp32_closely():
    model = _randomize(UNet3D(**TINY)).eval()
    x, t, text = _inputs()
    with torch.no_grad():
        out32 = model(x, t, text=text)
        out64 = model.double()(x.double(), t, text=text.double())
    torch.testing.assert_close(out32.double(), out64, rtol=1e-4, atol=1e-4)


def test_meta_device_build_has_no_storage():
    with torch.device("meta"):
        model = UNet3D()  # full size, 1.41B parameters
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 1_411_233_860


def test_clear_errors():
    with pytest.raises(ValueError, match="valid keys") as err:
        UNet3DConfig.from_dict({"model_channel": 32})
    assert "model_channel" in str(err.value) and "model_channels" in str(err.value)
    with pytest.raises(ValueError, match="resample"):
        UNet3D(**TINY, resample="bicubic")
    with pytest.raises(ValueError, match="multiples of 32"):
        UNet3D(**{**TINY, "model_channels": 48})
    model = UNet3D(**TINY).eval()
    x, t, text = _inputs()
    with pytest.raises(ValueError, match="needs the condition .text."):
        model(x, t)
    with pytest.raises(ValueError, match="divisible by 2"):
        model(torch.randn(2, 4, 3, 9, 8), t, text=text)
    with pytest.raises(ValueError, match=r"\[B, C, F, H, W\]"):
        model(x[:, :, 0], t, text=text)
    i2v = UNet3D(**TINY, first_frame_condition=True, fps_condition=True, image_tokens=2, image_dim=64)
    with pytest.raises(ValueError, match="first_frame"):
        i2v(x, t, text=text, fps=torch.tensor([8, 8]))
    with pytest.raises(ValueError, match="fps"):
        i2v(x, t, text=text, first_frame=x[:, :, 0])


def test_bad_shapes_and_configs_are_named():
    model = UNet3D(**TINY).eval()
    x, t, text = _inputs()
    with pytest.raises(ValueError, match="in_channels=4"):
        model(x[:, :3], t, text=text)
    with pytest.raises(ValueError, match="context_dim=1024"):
        model(x, t, text=text[..., :64])
    with pytest.raises(ValueError, match=r"\[B=2\]"):
        model(x, torch.tensor([1, 2, 3]), text=text)
    for bad in ({"channel_mult": ()}, {"channel_mult": (1, 0)}, {"num_res_blocks": 0}, {"head_dim": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            UNet3D(**{**TINY, **bad})


def test_extra_condition_pathways_are_off_by_default_and_leave_the_vgen_layout_alone():
    config = UNet3DConfig()
    assert not (config.text_embedding or config.frame_embedding or config.scale_shift_norm)
    keys = set(UNet3D(**TINY).state_dict())
    assert not any(k.startswith(("text_embed.", "frame_embed.")) for k in keys)
    extra = UNet3D(**TINY, text_embedding=True, frame_embedding=True, scale_shift_norm=True).state_dict()
    assert {k for k in extra if k.startswith(("text_embed.", "frame_embed."))} == set(extra) - keys
    assert extra["input_blocks.1.0.emb_layers.1.weight"].shape[0] == 2 * UNet3D(**TINY).state_dict()[
        "input_blocks.1.0.emb_layers.1.weight"].shape[0]


@pytest.mark.parametrize("channels", [32, 64])
def test_scale_shift_norm_lets_the_embedding_through_one_channel_groupnorm_groups(channels):
    """With one channel per GroupNorm group (32-channel levels) the original additive embedding is normalised away
    exactly: a ResBlock's output does not depend on the timestep at all. FiLM after the norm fixes that."""
    from vgen.models.blocks import ResBlock

    torch.manual_seed(0)
    x, e1, e2 = torch.randn(2, channels, 4, 4), torch.randn(2, 16), torch.randn(2, 16)
    changes = {}
    for scale_shift in (False, True):
        block = ResBlock(channels, 16, channels, 0.0, scale_shift).eval()
        torch.nn.init.normal_(block.out_layers[-1].weight, std=0.05)  # zero-initialised in the model
        with torch.no_grad():
            changes[scale_shift] = (block(x, e1) - block(x, e2)).abs().max().item()
    assert changes[True] > 0.1
    if channels == 32:
        assert changes[False] < 1e-5
    else:
        assert changes[False] > 0.1


def test_frame_embedding_tells_identical_frames_apart_without_temporal_layers():
    x, t, text = _inputs(frames=4)
    x = x[:, :, :1].expand_as(x).contiguous()  # four identical frames
    outs = {}
    for enabled in (False, True):
        model = _randomize(UNet3D(**TINY, frame_embedding=enabled)).eval()
        model.set_temporal_bypass(True)  # frames go through the network independently
        with torch.no_grad():
            out = model(x, t, text=text)
        outs[enabled] = (out[:, :, 1:] - out[:, :, :1]).abs().max().item()
    assert outs[False] < 1e-5 and outs[True] > 1e-3


def test_text_embedding_conditions_a_model_whose_cross_attention_is_cut():
    x, t, text = _inputs()
    other = torch.randn_like(text)
    for enabled in (False, True):
        model = _randomize(UNet3D(**TINY, text_embedding=enabled)).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".attn2.to_v." in name:  # cross-attention values: the caption no longer reaches the trunk
                    p.zero_()
            change = (model(x, t, text=text) - model(x, t, text=other)).abs().max().item()
        assert (change > 1e-3) == enabled
