"""The UNet's fast computation paths (vgen.models.fastpath) compute what the reference op order computes, for the
general network (attention at every level, 3 levels, odd frame counts, non-square latents, per-frame tokens), with
the same parameters; compat's use_checkpoint; the AdamW implementations; compiled blocks."""

from __future__ import annotations

import pytest
import torch

from vgen.compat.vgen import build_unet
from vgen.models import UNet3D
from vgen.models.attention import Attention
from vgen.models.fastpath import NAMES, current, fast_paths, reference_order, set_fast_paths
from vgen.training.optim import build_optimizer

PALETTE = {"_target_": "vgen.models.conditions.composer.PaletteTokens", "bins": 12}


def _unet(**overrides) -> UNet3D:
    torch.manual_seed(0)
    kwargs = {"model_channels": 32, "channel_mult": (1, 2, 2), "num_res_blocks": 1, "head_dim": 32,
              "init_temporal_heads": 4, "attention_scales": (1.0, 0.5, 0.25), "context_dim": 48,
              "decoder_context_dim": 48, "dropout": 0.0, "temporal_position": "sinusoidal"}
    unet = UNet3D(**{**kwargs, **overrides})
    with torch.no_grad():  # every weight non-zero: zero-initialised output layers would hide a wrong path
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return unet.eval()


def _run(unet, x, t, conditions, **flags):
    with fast_paths(**flags):
        unet.zero_grad(set_to_none=True)
        out = unet(x, t, conditions)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("frames,size,palette", [(5, (8, 12), False), (3, (12, 8), True), (1, (8, 8), False)])
def test_every_fast_path_computes_the_reference_function(frames, size, palette):
    conditions = {"text": None}
    unet = _unet(conditions={"text": {"_target_": "vgen.models.conditions.TextTokens"},
                             **({"palette": PALETTE} if palette else {})})
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, frames, *size, generator=g)
    t = torch.tensor([3, 900])
    conditions = {"text": torch.randn(2, 6, 48, generator=g)}
    if palette:  # per-frame tokens: the cross-attention context differs per frame (the per-frame path)
        conditions["palette"] = torch.rand(2, frames, 12, generator=g)
    off = dict.fromkeys(NAMES, False)
    reference, ref_grads = _run(unet, x, t, conditions, **off)
    scale = reference.abs().max()
    assert scale > 1e-3
    for flags in [{name: True} for name in NAMES] + [dict.fromkeys(NAMES, True)]:
        out, grads = _run(unet, x, t, conditions, **{**off, **flags})
        assert (out - reference).abs().max() <= 1e-5 * scale, flags
        assert grads.keys() == ref_grads.keys()
        largest = max(g.abs().max() for g in ref_grads.values())
        worst = max(((grads[n] - g).abs().max() / largest, n) for n, g in ref_grads.items())
        assert worst[0] <= 1e-5, (flags, worst)


def test_the_state_dict_is_the_same_in_either_order():
    unet = _unet()
    with reference_order():
        keys = {k: v.shape for k, v in unet.state_dict().items()}
    assert keys == {k: v.shape for k, v in _unet().state_dict().items()}
    conv = unet.input_blocks[1][0].temporal_conv.conv1[-1]
    assert isinstance(conv, torch.nn.Conv3d) and conv.weight.shape[2:] == (3, 1, 1)
    proj = unet.input_blocks[0][1].proj_in
    assert isinstance(proj, torch.nn.Conv1d) and proj.weight.shape[-1] == 1


def test_switches_are_scoped_and_validated():
    before = current()
    with reference_order():
        assert not any(current().values())
    assert current() == before
    with pytest.raises(ValueError, match="unknown fast path"):
        set_fast_paths(warp_speed=True)


def test_a_clip_context_must_divide_the_query_batch():
    attention = Attention(32, 1, 32, 16)
    x, context = torch.randn(6, 5, 32), torch.randn(4, 3, 16)
    with pytest.raises(ValueError, match="context batch 4 does not divide the query batch 6"):
        attention(x, context)
    shared = torch.randn(2, 3, 16)  # 2 clips of 3 frames: the same as repeating each clip's context 3 times
    assert torch.allclose(attention(x, shared), attention(x, shared.repeat_interleave(3, dim=0)), atol=1e-6)


def test_compat_use_checkpoint_is_activation_checkpointing():
    kwargs = {"in_dim": 4, "dim": 32, "y_dim": 1024, "context_dim": 1024, "out_dim": 4, "dim_mult": [1, 2],
              "num_heads": 2, "head_dim": 32, "num_res_blocks": 1, "attn_scales": [1.0], "dropout": 0.0}
    plain = build_unet("UNetSD_T2VBase", kwargs)
    checkpointed = build_unet("UNetSD_T2VBase", {**kwargs, "use_checkpoint": True})
    assert not plain.gradient_checkpointing and checkpointed.gradient_checkpointing
    checkpointed.load_state_dict(plain.state_dict(), strict=True)
    for p in plain.parameters():
        torch.nn.init.normal_(p, std=0.05)
    checkpointed.load_state_dict(plain.state_dict(), strict=True)
    x, t, y = torch.randn(1, 4, 3, 8, 8), torch.tensor([10]), torch.randn(1, 4, 1024)
    grads = []
    for model in (plain, checkpointed):
        model.train()  # the temporal convs' dropout is on: the recomputation must draw the same masks
        torch.manual_seed(1)
        model(x, t, text=y).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6 * grads[0].abs().max())


def test_adamw_implementations_take_the_same_steps():
    results = {}
    for implementation in ("loop", "foreach", "fused"):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
        opt = build_optimizer(params, lr=1e-2, weight_decay=0.1, implementation=implementation)
        for step in range(3):
            for i, p in enumerate(params):
                p.grad = torch.full_like(p, 0.1 * (step + 1) * (i + 1))
            opt.step()
        results[implementation] = torch.cat([p.detach().flatten() for p in params])
        assert set(opt.state_dict()["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert torch.allclose(results["loop"], results["foreach"], atol=1e-6)
    assert torch.allclose(results["loop"], results["fused"], atol=1e-6)
    with pytest.raises(ValueError, match="optim.implementation"):
        build_optimizer(params, implementation="turbo")
