"""Full-size UNets built on the meta device have exactly the original key set, shapes and parameter count, and the
Hydra configs in conf/model/unet build the same networks as the recorded original constructor kwargs."""

import pytest
import torch
from hydra.utils import instantiate

from conftest import compose_unet_config, load_reference_json
from vgen.compat import vgen as compat

FULL = [("t2v_unet", "t2v"), ("i2vgen_xl_unet", "i2vgen_xl"), ("sr600_unet", "sr600"), ("tft2v_t2v_unet", "tft2v"),
        ("tft2v_vcomposer_unet", "videocomposer"), ("videolcm_vcomposer_unet", "videocomposer"), ("higen_unet", "higen")]


def _keys(model):
    return [(k, list(v.shape)) for k, v in compat.state_dict(model).items()]


@pytest.mark.parametrize("variant,conf_name", FULL)
def test_full_size_matches_key_manifest(reference, variant, conf_name):
    meta = load_reference_json(f"{variant}.keys.json")
    with torch.device("meta"):
        model = compat.build_unet(meta["class"], meta["constructor_kwargs"])
    assert _keys(model) == [(k, list(s)) for k, s in meta["state_dict"]]
    assert sum(p.numel() for p in model.parameters()) == meta["num_parameters"]
    spatial = model.spatial_parameter_names()
    params = dict(model.named_parameters())
    assert len(spatial) == meta["keys_in_vgen_spatial_keylist"]
    assert sum(params[n].numel() for n in spatial) == meta["params_in_vgen_spatial_keylist"]

    with torch.device("meta"):
        from_yaml = instantiate(compose_unet_config(conf_name, "data.resolution=[448,256]"))
    assert from_yaml.config.architecture() == model.config.architecture()
    assert _keys(from_yaml) == _keys(model)


@pytest.mark.parametrize("name", ["t2v_tiny", "i2vgen_xl_tiny", "sr600_tiny", "demo"])
def test_tiny_configs_build_and_run(name):
    model = instantiate(compose_unet_config(name)).eval()
    x = torch.randn(1, model.config.in_channels, 2, 16, 16)
    kwargs = {name: cond.example(1, 2, 16, 16) for name, cond in model.conditions.items()}
    with torch.no_grad():
        assert model(x, torch.tensor([500]), **kwargs).shape == x.shape


def test_videocomposer_builds_at_tiny_size_for_any_subset_of_its_conditions():
    """Non-square 96x64 frames (latent 12 x 8): any subset of the conditions, none included, runs; each one
    present changes the output; the missing ones add nothing (the summed concat block)."""
    model = instantiate(compose_unet_config("videocomposer", "debug=tiny", "data.resolution=[96,64]")).eval()
    with torch.no_grad():
        for p in model.parameters():  # no zero-initialised output layer
            p.normal_(0, 0.1)
    x, t = torch.randn(2, model.config.in_channels, 3, 8, 12), torch.tensor([10, 700])
    values = {name: cond.example(2, 3, 8, 12) for name, cond in model.conditions.items()}
    values["image"] = torch.randn(2, 1, model.config.image_dim)
    spatial = [n for n, c in model.conditions.items() if c.summed]
    assert spatial == ["depth", "local_image", "motion", "sketch", "single_sketch", "mask"]
    with torch.no_grad():
        text_only = model(x, t, text=values["text"])
        for name in spatial:
            alone = model(x, t, text=values["text"], **{name: values[name]})
            assert alone.shape == x.shape and not torch.allclose(alone, text_only), name
        everything = model(x, t, values)
        assert not torch.allclose(everything, text_only)
