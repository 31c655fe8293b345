"""The tiny UNet goldens (weights + inputs + outputs from the original VGen code) reproduce through
``vgen.compat.vgen``: float32 to 1e-4 and float64 to 1e-6."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import load_reference_json
from vgen.compat import vgen as compat

VARIANTS = ["t2v_unet_tiny", "i2vgen_xl_unet_tiny", "sr600_unet_tiny", "tft2v_vcomposer_unet_tiny", "higen_unet_tiny"]


def _cases(fp64_only=False):
    """(variant, case) pairs present in the golden files; fp64_only keeps cases that have an output_fp64."""
    from conftest import reference_dir

    out = []
    for variant in VARIANTS:
        path = reference_dir() / f"{variant}.safetensors"
        if not path.exists():
            return [(v, "case0") for v in VARIANTS]  # the reference fixture skips these
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
        suffix = ".output_fp64" if fp64_only else ".output"
        out += [(variant, k[: -len(suffix)]) for k in keys if k.endswith(suffix)]
    return out


_cache: dict = {}


def _golden(reference, variant):
    if variant not in _cache:
        meta = load_reference_json(f"{variant}.json")
        _cache[variant] = meta, load_file(str(reference / f"{variant}.safetensors"))
    return _cache[variant]


def _model(reference, variant, dtype=torch.float32):
    meta, data = _golden(reference, variant)
    model = compat.build_unet(meta["class"], meta["constructor_kwargs"]).eval()
    weights = {k[len("weights."):]: v.float() for k, v in data.items() if k.startswith("weights.")}
    compat.load_state_dict(model, weights)
    return model.to(dtype)


def _inputs(data, case, dtype):
    prefix = f"{case}.input."
    inputs = {k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix)}
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_keys_shapes_and_order(reference, variant):
    meta, _ = _golden(reference, variant)
    model = compat.build_unet(meta["class"], meta["constructor_kwargs"])
    got = [(k, list(v.shape)) for k, v in compat.state_dict(model).items()]
    assert got == [(k, list(s)) for k, s in meta["state_dict_keys_in_order"]]
    assert sum(p.numel() for p in model.parameters()) == meta["num_parameters"]


@pytest.mark.parametrize("variant,case", _cases())
def test_forward_matches_golden_fp32(reference, variant, case):
    _meta, data = _golden(reference, variant)
    model = _model(reference, variant)
    inputs = _inputs(data, case, torch.float32)
    with torch.no_grad():
        out = compat.forward(model, inputs.pop("x"), inputs.pop("t"), **inputs)
    torch.testing.assert_close(out, data[f"{case}.output"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant,case", _cases(fp64_only=True))
def test_forward_matches_golden_fp64(reference, variant, case):
    _meta, data = _golden(reference, variant)
    model = _model(reference, variant, torch.float64)
    inputs = _inputs(data, case, torch.float64)
    with torch.no_grad():
        out = compat.forward(model, inputs.pop("x"), inputs.pop("t"), **inputs)
    assert (out - data[f"{case}.output_fp64"]).abs().max().item() < 1e-6


def test_state_dict_round_trip_is_exact(reference):
    variant = "i2vgen_xl_unet_tiny"
    meta, data = _golden(reference, variant)
    model = _model(reference, variant)
    fresh = compat.build_unet(meta["class"], meta["constructor_kwargs"]).eval()
    compat.load_state_dict(fresh, {"state_dict": compat.state_dict(model), "step": 3})
    inputs = _inputs(data, "case0", torch.float32)
    x, t = inputs.pop("x"), inputs.pop("t")
    with torch.no_grad():
        assert torch.equal(compat.forward(model, x, t, **inputs), compat.forward(fresh, x, t, **inputs))


def test_strict_load_names_every_bad_key(reference):
    meta, data = _golden(reference, "t2v_unet_tiny")
    model = compat.build_unet(meta["class"], meta["constructor_kwargs"])
    weights = {k[len("weights."):]: v.float() for k, v in data.items() if k.startswith("weights.")}
    weights.pop("out.2.bias")
    weights["input_blocks.1.0.temopral_conv.conv1.2.weight"] = torch.zeros(1)
    weights["not_a_layer.weight"] = torch.zeros(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(KeyError) as err:
        compat.load_state_dict(model, weights)
    message = str(err.value)
    for needle in ("out.2.bias", "not_a_layer.weight", "input_blocks.1.0.temopral_conv.conv1.2.weight", "missing",
                   "unexpected", "shape mismatch"):
        assert needle in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "a failed load must not modify"


def test_i2vgen_uses_only_first_frame_of_local_image(reference):
    _, data = _golden(reference, "i2vgen_xl_unet_tiny")
    model = _model(reference, "i2vgen_xl_unet_tiny")
    inputs = _inputs(data, "case0", torch.float32)
    x, t = inputs.pop("x"), inputs.pop("t")
    other = dict(inputs, local_image=torch.cat([inputs["local_image"][:, :, :1],
                                                torch.randn_like(inputs["local_image"][:, :, 1:])], dim=2))
    four_d = dict(inputs, local_image=inputs["local_image"][:, :, 0])
    with torch.no_grad():
        ref = compat.forward(model, x, t, **inputs)
        torch.testing.assert_close(compat.forward(model, x, t, **other), ref, rtol=0, atol=0)
        torch.testing.assert_close(compat.forward(model, x, t, **four_d), ref, rtol=0, atol=0)


def test_forward_rejects_unknown_original_arguments(reference):
    model = _model(reference, "t2v_unet_tiny")
    x = torch.randn(1, 4, 2, 16, 16)
    with pytest.raises(TypeError, match="local_image"):
        compat.forward(model, x, torch.tensor([3]), y=torch.randn(1, 3, 1024), local_image=x)
