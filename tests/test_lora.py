"""LoRA adapters: the InstructVideo golden (UNetSD_LoRA) reproduces through vgen.compat.vgen, merge/unmerge,
disabling, targets, strict separate save/load, and only the adapters being trainable."""

import json

import pytest
import torch
from safetensors import safe_open

from conftest import golden_model, load_golden, load_reference_json
from vgen.compat import vgen as compat
from vgen.models import UNet3D
from vgen.models.lora import (
    LoRALinear,
    apply_lora,
    load_lora,
    load_lora_state_dict,
    lora_disabled,
    lora_modules,
    lora_parameter_names,
    lora_state_dict,
    mark_only_lora_trainable,
    merge_lora,
    save_lora,
    unmerge_lora,
)

VARIANT = "instructvideo_lora_unet_tiny"
TINY = {"in_channels": 4, "out_channels": 4, "model_channels": 32, "channel_mult": (1, 2), "num_res_blocks": 1,
        "attention_scales": (1.0,), "head_dim": 16, "init_temporal_heads": 2, "context_dim": 64,
        "decoder_context_dim": 64, "dropout": 0.0}
def _golden(reference):
    return load_golden(VARIANT)


def _golden_model(reference, dtype=torch.float32):
    return golden_model(VARIANT, dtype)


def _case(data, dtype):
    prefix = "case0.input."
    inputs = {k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix)}
    return inputs["x"].to(dtype), inputs["t"], inputs["y"].to(dtype)


def _random_tiny(seed=0, lora=True):
    torch.manual_seed(seed)
    model = UNet3D(**TINY).eval()
    with torch.no_grad():
        for p in model.parameters():  # no zero-initialised layer: every path matters
            p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    if lora:
        apply_lora(model, rank=4)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_up" in name:
                    p.normal_(0, 0.2)
    return model


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 3, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 5, 64, generator=g)


# ---------------------------------------------------------------------------------------------- golden parity
def test_golden_state_dict_keys_shapes_and_order(reference):
    meta, _ = _golden(reference)
    model = compat.build_unet(meta["class"], meta["constructor_kwargs"])
    got = [(k, list(v.shape)) for k, v in compat.state_dict(model).items()]
    assert got == [(k, list(s)) for k, s in meta["state_dict_keys_in_order"]]
    assert sum(p.numel() for p in model.parameters()) == meta["num_parameters"]
    assert len(lora_modules(model)) == 24  # q, k, v, out x 2 attentions x 3 transformers


def test_golden_forward_fp32_and_fp64(reference):
    _, data = _golden(reference)
    with torch.no_grad():
        x, t, y = _case(data, torch.float32)
        out = compat.forward(_golden_model(reference), x, t, y=y)
        torch.testing.assert_close(out, data["case0.output"], rtol=1e-4, atol=1e-4)
        x, t, y = _case(data, torch.float64)
        out64 = compat.forward(_golden_model(reference, torch.float64), x, t, y=y)
    assert (out64 - data["case0.output_fp64"]).abs().max().item() < 1e-6


def test_full_size_lora_key_manifest(reference):
    meta = load_reference_json("instructvideo_lora_unet.keys.json")
    with torch.device("meta"):
        model = compat.build_unet(meta["class"], meta["constructor_kwargs"])
    assert [(k, list(v.shape)) for k, v in compat.state_dict(model).items()] == [(k, list(s)) for k, s in
                                                                                meta["state_dict"]]
    assert sum(p.numel() for p in model.parameters()) == meta["num_parameters"]
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) == meta["params_by_module_type"]["LoRA"]


def test_golden_adapters_matter_and_disable_to_the_base_network(reference):
    """Zeroing the adapters changes the output (~2.5 per the golden notes); disabling them equals the plain T2V
    network (UNetSD_LoRA with use_lora false) carrying the same base weights."""
    meta, data = _golden(reference)
    model = _golden_model(reference)
    base = compat.build_unet("UNetSD_LoRA", {**meta["constructor_kwargs"], "use_lora": False}).eval()
    base_keys = set(compat.state_dict(base))
    compat.load_state_dict(base, {k: v for k, v in compat.state_dict(model).items() if k in base_keys})
    x, t, y = _case(data, torch.float32)
    with torch.no_grad():
        adapted = compat.forward(model, x, t, y=y)
        with lora_disabled(model):
            disabled = compat.forward(model, x, t, y=y)
        plain = compat.forward(base, x, t, y=y)
    assert torch.equal(disabled, plain)
    assert (adapted - plain).abs().max().item() > 0.5


def test_compat_refuses_lora_alpha():
    with pytest.raises(ValueError, match="lora_alpha"):
        compat.build_unet("UNetSD_LoRA", {"dim": 32, "dim_mult": [1], "attn_scales": [], "lora_alpha": 8})


# ---------------------------------------------------------------------------------------------- merge / unmerge
def test_merged_forward_equals_unmerged_and_unmerge_restores_the_base(reference):
    model = _golden_model(reference)
    _, data = _golden(reference)
    x, t, y = _case(data, torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        unmerged = compat.forward(model, x, t, y=y)
        merge_lora(model)
        merged = compat.forward(model, x, t, y=y)
    assert all(m.merged for m in lora_modules(model).values())
    assert (merged - unmerged).abs().max().item() < 1e-5
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(k.endswith(".weight") and "lora" not in k for k in changed)
    with pytest.raises(RuntimeError, match="unmerge"):
        lora_state_dict(model)
    unmerge_lora(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=1e-6)


def test_alpha_scales_the_update():
    linear = torch.nn.Linear(6, 5)
    a = LoRALinear.from_linear(linear, rank=2, alpha=8.0)
    assert a.weight is linear.weight and a.bias is linear.bias  # the base parameters are reused
    with torch.no_grad():
        a.lora_up.weight.normal_()
    x = torch.randn(3, 6)
    expected = linear(x) + 4.0 * (x @ a.lora_down.weight.T @ a.lora_up.weight.T)
    torch.testing.assert_close(a(x), expected)
    a.merge()
    torch.testing.assert_close(a(x), expected, rtol=1e-5, atol=1e-5)


def test_new_adapters_start_as_the_base_model():
    model = _random_tiny(lora=False)
    x, t, y = _inputs()
    with torch.no_grad():
        before = model(x, t, text=y)
        names = apply_lora(model, rank=4)
        after = model(x, t, text=y)
    assert torch.equal(before, after)  # lora_up starts at zero
    down = [m.lora_down.weight for m in lora_modules(model).values()]
    assert 0.15 < torch.cat([d.flatten() for d in down]).std().item() < 0.35  # N(0, (1/r)^2), r = 4
    # 9 transformers (input temporal; encoder, middle: spatial + temporal; 2 decoder blocks x 2) x 2 attentions x 4
    assert len(names) == 9 * 2 * 4


# ---------------------------------------------------------------------------------------------- targets, training
def test_target_patterns_choose_modules():
    model = _random_tiny(lora=False)
    names = apply_lora(model, rank=2, targets=["*.attn1.to_q"])
    assert names and all(n.endswith("attn1.to_q") for n in names)
    with pytest.raises(ValueError, match="match no nn.Linear"):
        apply_lora(_random_tiny(lora=False), rank=2, targets=["to_nothing"])
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, rank=2)
    with pytest.raises(ValueError, match="rank"):
        apply_lora(_random_tiny(lora=False), rank=0)


def test_only_lora_weights_are_trainable_and_change():
    model = _random_tiny()
    trainable = mark_only_lora_trainable(model)
    names = set(lora_parameter_names(model))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == names
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if n in names)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, t, y = _inputs()
    model(x, t, text=y).square().mean().backward()
    optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == names


# ---------------------------------------------------------------------------------------------- save / load
def test_save_and_load_separately_from_the_base(tmp_path):
    model = _random_tiny(seed=0)
    path = save_lora(model, tmp_path / "adapter.safetensors")
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert keys == set(lora_parameter_names(model))  # adapters only, no base weight
    assert meta["rank"] == "4" and json.loads(meta["alpha"]) is None
    other = _random_tiny(seed=0, lora=False)  # same base weights, fresh adapters
    apply_lora(other, rank=4)
    load_lora(other, path)
    x, t, y = _inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, text=y), other(x, t, text=y))


def test_bad_lora_files_are_refused_and_change_nothing(tmp_path):
    model = _random_tiny(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = dict(lora_state_dict(model))
    missing_key = next(iter(state))
    bad = {k: v.clone() for k, v in state.items() if k != missing_key}
    bad["not.an.adapter.lora_up.weight"] = torch.zeros(1)
    with pytest.raises(KeyError) as err:
        load_lora_state_dict(model, bad, "bad.safetensors")
    assert "bad.safetensors" in str(err.value) and missing_key in str(err.value)
    assert "not.an.adapter.lora_up.weight" in str(err.value)
    rank2 = _random_tiny(seed=0, lora=False)
    apply_lora(rank2, rank=2)
    path = save_lora(rank2, tmp_path / "rank2.safetensors")
    with pytest.raises(ValueError, match="rank"):
        load_lora(model, path)
    torch.save({"x": torch.zeros(1)}, tmp_path / "plain.safetensors.pt")
    with pytest.raises(ValueError, match="safetensors"):
        load_lora(model, tmp_path / "plain.safetensors.pt")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_original_key_round_trip_with_adapters(reference):
    meta, _ = _golden(reference)
    model = _golden_model(reference)
    original = compat.state_dict(model)
    assert any(".to_out_lora.up_linear." in k for k in original)
    fresh = compat.build_unet(meta["class"], meta["constructor_kwargs"])
    compat.load_state_dict(fresh, {"state_dict": original})
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def test_lora_is_an_adapter_applied_saved_merged_and_disabled_through_the_common_mechanism(tmp_path):
    from vgen.models.adapters import adapter_parameter_names, adapters_disabled, mark_only_adapters_trainable
    from vgen.models.lora import LoRA, save_lora

    torch.manual_seed(0)
    base = UNet3D(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1,), num_res_blocks=1, attention_scales=(1.0,), head_dim=16, init_temporal_heads=2, context_dim=64, decoder_context_dim=64).eval()
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, 0.1)
    x, t, text = torch.randn(1, 4, 2, 8, 8), torch.tensor([300]), torch.randn(1, 3, 64)
    with torch.no_grad():
        reference = base(x, t, text=text)
    adapters = {"lora": LoRA(rank=2, targets=["to_q", "to_v"])}
    modules = adapters["lora"].apply(base)
    assert modules and all(m.endswith(("to_q", "to_v")) for m in modules)
    names = adapter_parameter_names(base, adapters)
    assert mark_only_adapters_trainable(base, adapters) == sum(dict(base.named_parameters())[n].numel() for n in names)
    with torch.no_grad():
        for n, p in base.named_parameters():
            if n in names:
                p.normal_(0, 0.2)
        adapted = base(x, t, text=text)
        with adapters_disabled(base, adapters):
            torch.testing.assert_close(base(x, t, text=text), reference)
        adapters["lora"].merge(base)
        torch.testing.assert_close(base(x, t, text=text), adapted, rtol=1e-4, atol=1e-5)
        adapters["lora"].unmerge(base)
    path = save_lora(base, tmp_path / "a.safetensors")
    other = UNet3D(**base.config.to_dict())
    LoRA(rank=2, targets=["to_q", "to_v"], weights=str(path)).apply(other)
    assert all(torch.equal(dict(other.named_parameters())[n], dict(base.named_parameters())[n]) for n in names)
