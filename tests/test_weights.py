"""Weights in and out: VGen release files (strict), SD-2.1 spatial init, diffusers export and import."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import load_reference_json
from vgen.checkpoint.diffusers import diffusers_config, load_diffusers, save_diffusers, to_diffusers
from vgen.checkpoint.original import (
    init_unet,
    load_sd21_spatial,
    load_vgen_state_dict,
    sd21_key_map,
    to_sd21_state_dict,
    to_vgen_state_dict,
)
from vgen.compat.vgen import build_unet
from vgen.models import UNet3D

# Three levels (attention on the first two), two ResBlocks each: every block type and position of the mapping.
TINY = {"in_channels": 4, "out_channels": 4, "model_channels": 32, "channel_mult": (1, 2, 2), "num_res_blocks": 2,
        "attention_scales": (1.0, 0.5), "head_dim": 16, "init_temporal_heads": 8, "context_dim": 64,
        "decoder_context_dim": 64}
I2V = {"first_frame_condition": True, "fps_condition": True, "image_tokens": 4, "image_dim": 64}


def random_unet(seed=0, **overrides) -> UNet3D:
    """A tiny UNet3D with every weight random (no zero-initialised layer hides a mapping error)."""
    torch.manual_seed(seed)
    model = UNet3D(**{**TINY, **overrides}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def i2v_inputs(frames=3, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(2, 4, frames, size, size, generator=g), "t": torch.tensor([10, 700]),
            "text": torch.randn(2, 5, 64, generator=g), "image": torch.randn(2, 1, 64, generator=g),
            "first_frame": torch.randn(2, 4, 1, size, size, generator=g), "fps": torch.tensor([8, 16])}


# ---------------------------------------------------------------------------------------------- VGen releases
def _golden(reference, variant):
    meta = load_reference_json(f"{variant}.json")
    data = load_file(str(reference / f"{variant}.safetensors"))
    weights = {k[len("weights."):]: v.float() for k, v in data.items() if k.startswith("weights.")}
    return meta, data, weights


@pytest.mark.parametrize("variant,case", [("i2vgen_xl_unet_tiny", "case_f1"), ("sr600_unet_tiny", "case_even_lowres")])
def test_vgen_release_file_loads_strictly_and_reproduces_the_original(reference, variant, case, tmp_path):
    meta, data, weights = _golden(reference, variant)
    path = tmp_path / "release.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in weights.items()}, "step": 854500}, path)
    model = build_unet(meta["class"], meta["constructor_kwargs"]).eval()
    assert init_unet(model, path) == "vgen"
    inputs = {k.split(".input.")[1]: v.float() if v.is_floating_point() else v
              for k, v in data.items() if k.startswith(f"{case}.input.")}
    names = {"y": "text", "local_image": "first_frame"}
    with torch.no_grad():
        out = model(inputs.pop("x"), inputs.pop("t"), **{names.get(k, k): v for k, v in inputs.items()})
    torch.testing.assert_close(out, data[f"{case}.output"], rtol=1e-4, atol=1e-4)
    assert set(to_vgen_state_dict(model)) == set(weights)


def test_release_with_a_missing_and_an_extra_key_is_refused_naming_them(reference, tmp_path):
    meta, _, weights = _golden(reference, "i2vgen_xl_unet_tiny")
    weights["context_embedding.9.weight"] = weights.pop("fps_embedding.0.weight")
    path = tmp_path / "broken.pth"
    torch.save({"state_dict": weights}, path)
    model = build_unet(meta["class"], meta["constructor_kwargs"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(KeyError) as err:
        init_unet(model, path)
    assert "broken.pth" in str(err.value)
    assert "fps_embedding.0.weight" in str(err.value) and "context_embedding.9.weight" in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "a refused load changed weights"


@pytest.mark.parametrize("experiment,variant", [("i2vgen_stage2", "i2vgen_xl_unet"), ("t2v_stage2", "t2v_unet"),
                                                ("tft2v_stage2", "tft2v_t2v_unet"), ("i2vgen_refine", "sr600_unet")])
def test_full_size_release_layouts_load_strictly_on_meta(experiment, variant):
    """Every key and shape of the released checkpoints (from the reference manifests) loads into the experiment's
    full-size UNet, built on the meta device."""
    from test_recipes import full_size_unet

    model = full_size_unet(experiment)
    manifest = load_reference_json(f"{variant}.keys.json")
    state = {k: torch.empty(shape, device="meta") for k, shape in manifest["state_dict"]}
    load_vgen_state_dict(model, state, variant)
    assert [[k, list(v.shape)] for k, v in to_vgen_state_dict(model).items()] == manifest["state_dict"]


# ---------------------------------------------------------------------------------------------- Stable Diffusion 2.1
def test_sd21_mapping_is_exactly_the_stable_diffusion_unet():
    """Our 682 spatial parameters + the time MLP, renamed to LDM keys and converted by diffusers' own LDM loader,
    are exactly the keys and shapes of diffusers' SD-2.1 UNet2DConditionModel (full size, meta device)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    with torch.device("meta"):
        ours = UNet3D(**{**I2V, "image_dim": 1024})  # 8 input channels: SD's 4 + the first-frame concat
        sd21 = UNet2DConditionModel(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                                    use_linear_projection=True)
    assert len(ours.spatial_parameter_names()) == 682
    ldm = to_sd21_state_dict(ours)
    assert len(ldm) == 686
    converted = convert_ldm_unet_checkpoint(ldm, dict(sd21.config))
    expected = sd21.state_dict()
    assert set(converted) == set(expected)
    assert all(converted[k].shape == expected[k].shape for k in expected)


def test_sd21_init_with_bypassed_temporal_layers_is_the_sd_unet_on_images():
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    source = random_unet(0, dropout=0.0)
    sd = UNet2DConditionModel(sample_size=16, cross_attention_dim=64, attention_head_dim=[2, 4, 4],
                              use_linear_projection=True, block_out_channels=(32, 64, 64), layers_per_block=2,
                              down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")).eval()
    ldm = to_sd21_state_dict(source)
    sd.load_state_dict(convert_ldm_unet_checkpoint(ldm, dict(sd.config)), strict=True)
    video = random_unet(1, concat_channels=8)  # TF-T2V layout: SD's 4 input channels + 8 more
    sd_derived = sd21_key_map(video)
    temporal_before = {n: p.clone() for n, p in video.named_parameters() if n not in sd_derived}
    assert load_sd21_spatial(video, ldm) == len(ldm) == len(sd.state_dict())  # 686 at full size
    assert torch.equal(video.input_blocks[0][0].weight[:, 4:], torch.zeros(32, 8, 3, 3))
    assert all(torch.equal(p, temporal_before[n]) for n, p in video.named_parameters() if n in temporal_before)
    video.set_temporal_bypass(True)
    x, t, text = torch.randn(2, 4, 1, 16, 16), torch.tensor([3, 800]), torch.randn(2, 7, 64)
    with torch.no_grad():
        ours = video(x, t, text=text)[:, :, 0]
        theirs = sd(x[:, :, 0], t, encoder_hidden_states=text).sample
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_sd21_init_refuses_a_checkpoint_that_does_not_fit():
    model = random_unet(0)
    ldm = to_sd21_state_dict(model)
    ldm.pop("model.diffusion_model.middle_block.2.out_layers.3.weight")
    ldm["model.diffusion_model.middle_block.4.op.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"sd.ckpt.*missing \(1\): middle_block\.2\.out_layers\.3\.weight.*"
                       r"unexpected \(1\): middle_block\.4\.op\.weight"):
        load_sd21_spatial(random_unet(1), ldm, "sd.ckpt")
    with pytest.raises(KeyError, match="not an LDM-format"):
        load_sd21_spatial(random_unet(1), {"first_stage_model.x": torch.zeros(1)})


# ---------------------------------------------------------------------------------------------- diffusers
@pytest.mark.parametrize("kind", ["i2vgen_xl", "t2v"])
def test_vgen_format_to_diffusers_and_back_is_identical(kind, tmp_path):
    """VGen-format file -> vgen UNet3D -> diffusers folder -> vgen UNet3D -> VGen format: the same tensors."""
    source = random_unet(0, **(I2V if kind == "i2vgen_xl" else {}))
    original = to_vgen_state_dict(source)
    torch.save({"state_dict": original, "step": 1}, tmp_path / "release.pth")
    model = UNet3D(source.config)
    init_unet(model, tmp_path / "release.pth", "vgen")
    folder = save_diffusers(model, tmp_path / "diffusers")
    config = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == ("I2VGenXLUNet" if kind == "i2vgen_xl" else "UNet3DConditionModel")
    back = to_vgen_state_dict(load_diffusers(folder))
    assert list(back) == list(original)
    assert all(torch.equal(back[k], original[k]) for k in original)


def test_diffusers_i2vgen_xl_computes_what_ours_does():
    model = random_unet(0, **I2V)
    theirs = to_diffusers(model)
    inputs = i2v_inputs()
    frames = inputs["x"].shape[2]
    ramps = (torch.arange(1, frames) / (frames - 1)).view(1, 1, -1, 1, 1).expand(2, 4, -1, 16, 16)
    with torch.no_grad():
        ours = model(**inputs)
        out = theirs(inputs["x"], inputs["t"], fps=inputs["fps"], encoder_hidden_states=inputs["text"],
                     image_latents=torch.cat([inputs["first_frame"], ramps], dim=2),
                     image_embeddings=inputs["image"]).sample
    assert ours.abs().mean() > 0.1
    torch.testing.assert_close(out, ours, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("experiment", ["i2vgen_stage2", "t2v_stage2"])
def test_full_size_networks_map_onto_diffusers_strictly(experiment):
    from test_recipes import full_size_unet

    model = full_size_unet(experiment)
    theirs = to_diffusers(model)  # meta device: names and shapes only, every key checked both ways
    assert sum(p.numel() for p in theirs.parameters()) == sum(p.numel() for p in model.parameters())


def test_diffusers_t2v_computes_what_ours_does():
    model = random_unet(0)
    theirs = to_diffusers(model)
    inputs = i2v_inputs()
    with torch.no_grad():
        ours = model(inputs["x"], inputs["t"], text=inputs["text"])
        out = theirs(inputs["x"], inputs["t"], encoder_hidden_states=inputs["text"]).sample
    torch.testing.assert_close(out, ours, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("overrides,needle", [
    ({"resample": "sr600", "skip_filters": ((1.1, 0.6),)}, "resample"),
    ({"init_temporal_heads": 4}, "init_temporal_heads=4"),
    ({"image_tokens": 4, "image_dim": 64, "concat_channels": 8}, "concat_channels"),
])
def test_networks_diffusers_cannot_express_are_refused_by_key(overrides, needle):
    with torch.device("meta"):
        model = UNet3D(**{**TINY, **overrides})
    with pytest.raises(ValueError, match=needle):
        diffusers_config(model.config)


def test_convert_cli_round_trip(tmp_path):
    from vgen.checkpoint.convert import main

    source = random_unet(0, **I2V)
    original = to_vgen_state_dict(source)
    torch.save({"state_dict": original}, tmp_path / "release.pth")
    overrides = [f"{k}={list(v) if isinstance(v, tuple) else v}" for k, v in TINY.items()]
    overrides += ["image_dim=64", "conditions.image.num_tokens=4"]  # I2V's conditions come with --model i2vgen_xl
    assert main(["to-diffusers", str(tmp_path / "release.pth"), str(tmp_path / "out"), "--model", "i2vgen_xl",
                 "--set", *overrides]) == 0
    assert main(["from-diffusers", str(tmp_path / "out"), str(tmp_path / "back.pth")]) == 0
    back = torch.load(tmp_path / "back.pth", weights_only=True)["state_dict"]
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)
    assert main(["to-diffusers", str(tmp_path / "missing.pth"), str(tmp_path / "x"), "--model", "t2v"]) == 2


def test_a_pipeline_from_a_released_weights_file_and_a_run_config(reference, tmp_path):
    """``VideoPipeline.from_config``: the run config names the encoders and the sampler defaults; the UNet loads a
    VGen release file strictly."""
    from omegaconf import OmegaConf

    from conftest import compose_unet_config
    from vgen.pipeline import VideoPipeline

    unet_cfg = OmegaConf.to_container(compose_unet_config("t2v_tiny", "model.unet.context_dim=64",
                                                          "model.unet.decoder_context_dim=64"), resolve=True)
    source = UNet3D(**{k: v for k, v in unet_cfg.items() if not k.startswith("_")})
    with torch.no_grad():
        for p in source.parameters():
            p.normal_(0, 0.05)
    torch.save({"state_dict": to_vgen_state_dict(source)}, tmp_path / "release.pth")
    config = {"model": {"unet": unet_cfg, "vae": {"_target_": "vgen.models.vae.VideoAutoencoder", "config": "tiny"},
                        "text_encoder": {"_target_": "vgen.models.text_encoder.OpenCLIPTextEncoder", "arch": "tiny"}},
              "diffusion": {"_target_": "vgen.diffusion.build_diffusion", "ddim_steps": 2},
              "data": {"resolution": [16, 16], "num_frames": 3, "sample_fps": 8}}
    pipe = VideoPipeline.from_config(config, tmp_path / "release.pth")
    assert all(torch.equal(a, b) for a, b in zip(pipe.unet.state_dict().values(), source.state_dict().values()))
    video = pipe("a red circle")
    assert video.shape == (1, 3, 3, 16, 16) and pipe.sampler == "ddim"
