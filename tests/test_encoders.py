"""Frozen encoders: the KL autoencoder and its LDM key adapter, the identity autoencoder, and the OpenCLIP text and
image encoders (tiny models run on the CPU; the full-size ones are built on the meta device)."""

import re
import subprocess
import sys

import open_clip
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import save_file

from conftest import CONF_DIR
from vgen.checkpoint.ldm_vae import diffusers_to_ldm_vae, ldm_to_diffusers_vae, to_diffusers_vae
from vgen.models.frozen import load_strict
from vgen.models.image_encoder import OpenCLIPImageEncoder
from vgen.models.text_encoder import OpenCLIPTextEncoder, build_clip, clip_config
from vgen.models.vae import AUTOENCODER_CONFIGS, IdentityAutoencoder, VideoAutoencoder

SD_VAE_PARAMETERS = 83_653_863  # Stable Diffusion KL-f8 VAE
SD_VAE_DECODER_PARAMETERS = 49_490_199  # post_quant_conv + decoder
SD_VAE_LDM_KEYS = 248  # first_stage_model.* tensors of an SD checkpoint: 108 encoder + quant_conv, 140 decoder side


def _video(b=2, f=3, h=16, w=16, seed=0):
    return torch.rand(b, 3, f, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _perturbed_tiny_vae() -> VideoAutoencoder:
    """A tiny VAE whose weights differ from the seeded random init, so loading them is observable."""
    vae = VideoAutoencoder("tiny")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return vae


# ---------------------------------------------------------------------------------------------- autoencoders
def test_tiny_vae_shapes_for_videos_and_images():
    vae = VideoAutoencoder("tiny")
    assert (vae.latent_channels, vae.downsample, vae.scale_factor) == (4, 2, 0.18215)
    latents = vae.encode(_video())
    assert latents.shape == (2, 4, 3, 8, 8)
    video = vae.decode(latents)
    assert video.shape == (2, 3, 3, 16, 16) and video.abs().max() <= 1
    image = _video()[:, :, 0]
    assert vae.encode(image, sample=False).shape == (2, 4, 8, 8)
    assert vae.decode(vae.encode(image)).shape == (2, 3, 16, 16)
    assert torch.equal(vae.encode(image, sample=False), vae.encode(image[:, :, None], sample=False)[:, :, 0])


def assert_close_float32(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float32 rounding: a kernel may pick another algorithm (summation order) for another batch size,
    so results of different chunkings differ by a few ulps of the values summed. rtol 1e-5 (~80 ulps) per element,
    atol 1e-5 of the tensor's largest magnitude for elements that are sums of larger terms that cancel."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * max(1.0, expected.abs().max().item()))


def test_vae_chunking_does_not_change_results():
    whole, chunked = VideoAutoencoder("tiny", encode_chunk=16, decode_chunk=16), VideoAutoencoder(
        "tiny", encode_chunk=2, decode_chunk=1)
    video = _video(b=2, f=3)
    latents = whole.encode(video, sample=False)
    assert_close_float32(chunked.encode(video, sample=False), latents)
    assert_close_float32(chunked.decode(latents), whole.decode(latents))
    sampled = [vae.encode(video, torch.Generator().manual_seed(3)) for vae in (whole, chunked)]
    assert_close_float32(sampled[0], sampled[1])


def test_vae_posterior_sample_is_mean_plus_std_noise_and_reproducible():
    vae = VideoAutoencoder("tiny")
    video = _video(b=1, f=2)
    first = vae.encode(video, torch.Generator().manual_seed(0))
    assert torch.equal(first, vae.encode(video, torch.Generator().manual_seed(0)))
    assert not torch.allclose(first, vae.encode(video, torch.Generator().manual_seed(1)))
    assert not torch.allclose(vae.encode(video), vae.encode(video))

    frames = video.transpose(1, 2).flatten(0, 1)
    posterior = vae.model.encode(frames).latent_dist
    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(0))
    expected = (posterior.mean + posterior.std * noise) * 0.18215
    torch.testing.assert_close(first, expected.unflatten(0, (1, 2)).transpose(1, 2))
    mean = (posterior.mean * 0.18215).unflatten(0, (1, 2)).transpose(1, 2)
    torch.testing.assert_close(vae.encode(video, sample=False), mean)


def test_vae_decode_unscales_and_clamps():
    vae = VideoAutoencoder("tiny", scale_factor=0.5)
    latents = 3 * torch.randn(1, 4, 2, 8, 8)
    expected = vae.model.decode(latents.transpose(1, 2).flatten(0, 1) / 0.5).sample.clamp(-1, 1)
    torch.testing.assert_close(vae.decode(latents), expected.unflatten(0, (1, 2)).transpose(1, 2))


def test_vae_rejects_bad_shapes_and_configs():
    vae = VideoAutoencoder("tiny")
    with pytest.raises(ValueError, match="multiples of 2"):
        vae.encode(torch.zeros(1, 3, 2, 15, 16))
    with pytest.raises(ValueError, match=r"\[B, 4, F, H, W\]"):
        vae.decode(torch.zeros(1, 3, 2, 8, 8))
    with pytest.raises(ValueError, match="unknown autoencoder config 'sd15'"):
        VideoAutoencoder("sd15")


def test_encoders_are_frozen_and_stay_in_eval_mode():
    for module in (VideoAutoencoder("tiny"), IdentityAutoencoder(), OpenCLIPTextEncoder("tiny"),
                   OpenCLIPImageEncoder("tiny")):
        module.train()
        assert not module.training and not any(m.training for m in module.modules())
        assert not any(p.requires_grad for p in module.parameters())


def test_identity_autoencoder_is_exact():
    vae = IdentityAutoencoder()
    assert (vae.latent_channels, vae.scale_factor, vae.downsample) == (3, 1.0, 1)
    video = _video()
    assert torch.equal(vae.encode(video, torch.Generator(), sample=True), video)
    assert torch.equal(vae.decode(vae.encode(video)), video)
    assert torch.equal(vae.decode(torch.full((1, 3, 1, 2, 2), 5.0)), torch.ones(1, 3, 1, 2, 2))


# ---------------------------------------------------------------------------------------------- LDM adapter
def test_ldm_adapter_names_shapes_and_round_trip():
    diffusers = _perturbed_tiny_vae().model.state_dict()
    ldm = diffusers_to_ldm_vae(diffusers)
    assert len(ldm) == len(diffusers)
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (32, 32, 1, 1)
    assert ldm["decoder.mid.attn_1.proj_out.weight"].shape == (32, 32, 1, 1)
    assert torch.equal(ldm["encoder.mid.attn_1.q.weight"][:, :, 0, 0],
                       diffusers["encoder.mid_block.attentions.0.to_q.weight"])
    # decoder levels are reversed: diffusers up_blocks.0 (lowest resolution, has the upsampler) is LDM up.1
    assert torch.equal(ldm["decoder.up.1.upsample.conv.weight"], diffusers["decoder.up_blocks.0.upsamplers.0.conv.weight"])
    assert torch.equal(ldm["decoder.up.0.block.1.conv1.weight"], diffusers["decoder.up_blocks.1.resnets.1.conv1.weight"])
    assert not any(k.startswith("decoder.up.0.upsample") for k in ldm)
    assert {"encoder.norm_out.weight", "encoder.down.0.downsample.conv.weight", "encoder.mid.block_2.conv2.bias",
            "quant_conv.weight", "post_quant_conv.bias"} <= set(ldm)
    assert not any(re.search(r"_blocks|resnets|to_[qkvo]|conv_norm_out|conv_shortcut", k) for k in ldm)

    back = ldm_to_diffusers_vae({f"first_stage_model.{k}": v for k, v in ldm.items()})
    assert list(back) == list(diffusers)
    assert all(torch.equal(back[k], v) for k, v in diffusers.items())
    assert diffusers_to_ldm_vae(back).keys() == ldm.keys()


def test_ldm_adapter_shortcuts_map_to_conv_shortcut():
    vae = VideoAutoencoder({**AUTOENCODER_CONFIGS["tiny"], "block_out_channels": (32, 64)})
    ldm = diffusers_to_ldm_vae(vae.model.state_dict())
    assert ldm["encoder.down.1.block.0.nin_shortcut.weight"].shape == (64, 32, 1, 1)
    assert ldm["decoder.up.0.block.0.nin_shortcut.weight"].shape == (32, 64, 1, 1)


def test_ldm_adapter_rejects_unmapped_keys():
    with pytest.raises(ValueError, match=r"encoder\.down\.0\.attn\.0\.q\.weight"):
        ldm_to_diffusers_vae({"encoder.down.0.attn.0.q.weight": torch.zeros(1),
                              "decoder.up.0.block.0.conv1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"1 diffusers autoencoder keys have no LDM equivalent .*: decoder\.foo\.weight$"):
        diffusers_to_ldm_vae({"decoder.foo.weight": torch.zeros(1)})


def test_full_size_sd21_vae_on_meta_round_trips_with_the_sd_key_set():
    with torch.device("meta"):
        vae = VideoAutoencoder("sd21")
    assert (vae.latent_channels, vae.downsample) == (4, 8)
    params = dict(vae.model.named_parameters())
    assert sum(p.numel() for p in params.values()) == SD_VAE_PARAMETERS
    decoder = sum(p.numel() for k, p in params.items() if k.startswith(("decoder.", "post_quant_conv.")))
    assert decoder == SD_VAE_DECODER_PARAMETERS

    ldm = diffusers_to_ldm_vae(vae.model.state_dict())
    assert len(ldm) == SD_VAE_LDM_KEYS
    assert sum(k.startswith(("encoder.", "quant_conv.")) for k in ldm) == 108
    shapes = {k: tuple(v.shape) for k, v in ldm.items()}
    assert shapes["encoder.conv_in.weight"] == (128, 3, 3, 3)
    assert shapes["encoder.down.2.block.0.nin_shortcut.weight"] == (512, 256, 1, 1)
    assert shapes["encoder.mid.attn_1.v.weight"] == (512, 512, 1, 1)
    assert shapes["encoder.conv_out.weight"] == (8, 512, 3, 3)
    assert shapes["quant_conv.weight"] == (8, 8, 1, 1) and shapes["post_quant_conv.weight"] == (4, 4, 1, 1)
    assert shapes["decoder.conv_in.weight"] == (512, 4, 3, 3)
    assert shapes["decoder.up.3.upsample.conv.weight"] == (512, 512, 3, 3)
    assert shapes["decoder.up.1.block.0.nin_shortcut.weight"] == (256, 512, 1, 1)
    assert shapes["decoder.up.0.block.2.conv2.weight"] == (128, 128, 3, 3)
    assert "encoder.down.3.downsample.conv.weight" not in shapes and "decoder.up.0.upsample.conv.weight" not in shapes

    with torch.device("meta"):
        fresh = VideoAutoencoder("sd21")
    load_strict(fresh.model, ldm_to_diffusers_vae({f"first_stage_model.{k}": v for k, v in ldm.items()}), "sd21")


def test_vae_loads_an_sd_checkpoint(tmp_path):
    source = _perturbed_tiny_vae()
    ldm = {f"first_stage_model.{k}": v for k, v in diffusers_to_ldm_vae(source.model.state_dict()).items()}
    checkpoint = {"state_dict": {**ldm, "model.diffusion_model.out.0.weight": torch.zeros(2)}, "global_step": 7}
    torch.save(checkpoint, tmp_path / "sd.ckpt")
    loaded = VideoAutoencoder("tiny", weights=str(tmp_path / "sd.ckpt"))
    video = _video()
    latents = source.encode(video, sample=False)
    assert torch.equal(loaded.encode(video, sample=False), latents)
    assert torch.equal(loaded.decode(latents), source.decode(latents))
    assert not torch.equal(VideoAutoencoder("tiny").encode(video, sample=False), latents)


def test_vae_loads_diffusers_safetensors_including_legacy_attention_names(tmp_path):
    source = _perturbed_tiny_vae()
    state = source.model.state_dict()
    save_file(state, tmp_path / "vae.safetensors")
    legacy = {k.replace("to_q.", "query.").replace("to_out.0.", "proj_attn."): v for k, v in state.items()}
    assert "encoder.mid_block.attentions.0.query.weight" in legacy
    assert to_diffusers_vae(legacy).keys() == state.keys()
    torch.save(legacy, tmp_path / "vae.bin")
    video = _video()
    for name in ("vae.safetensors", "vae.bin"):
        loaded = VideoAutoencoder("tiny", weights=str(tmp_path / name))
        assert torch.equal(loaded.encode(video, sample=False), source.encode(video, sample=False))


def test_strict_load_names_every_bad_key(tmp_path):
    state = VideoAutoencoder("tiny").model.state_dict()
    del state["decoder.conv_in.bias"]
    state["encoder.conv_in.weight"] = torch.zeros(1, 2, 3)
    state["extra.weight"] = torch.zeros(1)
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError) as err:
        VideoAutoencoder("tiny", weights=str(tmp_path / "bad.safetensors"))
    message = str(err.value)
    assert "missing (1): decoder.conv_in.bias" in message
    assert "unexpected (1): extra.weight" in message
    assert "encoder.conv_in.weight (file (1, 2, 3), model (32, 3, 3, 3))" in message
    assert "bad.safetensors" in message


def test_pickled_objects_are_refused_naming_the_file(tmp_path):
    torch.save({"state_dict": {}, "callback": torch.nn.Identity()}, tmp_path / "legacy.ckpt")
    with pytest.raises(ValueError, match="legacy.ckpt: not a weights-only checkpoint: refused") as err:
        VideoAutoencoder("tiny", weights=str(tmp_path / "legacy.ckpt"))
    assert "weights_only=False" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        VideoAutoencoder("tiny", weights=str(tmp_path / "missing.ckpt"))


# ---------------------------------------------------------------------------------------------- OpenCLIP
CAPTIONS = ["a red circle moving left", "a green square moving right"]


def test_tiny_text_encoder_shape_and_determinism():
    encoder = OpenCLIPTextEncoder("tiny")
    assert encoder.dim == 64 and encoder.num_layers == 1
    out = encoder(CAPTIONS)
    assert out.shape == (2, 77, 64)
    assert torch.equal(out, OpenCLIPTextEncoder("tiny")(CAPTIONS))
    assert not torch.allclose(out[0], out[1])
    assert_close_float32(encoder(CAPTIONS[:1]), out[:1])  # captions are encoded independently (another batch size)


def test_tiny_text_encoder_is_deterministic_across_processes():
    code = ("import torch; from vgen.models.text_encoder import OpenCLIPTextEncoder; "
            f"print(OpenCLIPTextEncoder('tiny')({CAPTIONS[:1]!r})[0, :4, :3].tolist())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert torch.equal(torch.tensor(eval(other)), OpenCLIPTextEncoder("tiny")(CAPTIONS[:1])[0, :4, :3])


@pytest.mark.parametrize("layer", ["penultimate", "last"])
def test_text_encoder_matches_open_clip_blocks(layer):
    clip = build_clip(clip_config("tiny"), None)
    x = clip.token_embedding(open_clip.tokenize(CAPTIONS)) + clip.positional_embedding
    blocks = clip.transformer.layers - (layer == "penultimate")
    _, intermediates = clip.transformer.forward_intermediates(x, attn_mask=clip.attn_mask, indices=[blocks - 1])
    expected = clip.ln_final(intermediates[0])
    torch.testing.assert_close(OpenCLIPTextEncoder("tiny", layer=layer)(CAPTIONS), expected)


def test_text_encoder_loads_open_clip_weights_strictly(tmp_path):
    clip = build_clip(clip_config("tiny"), None)
    with torch.no_grad():
        clip.ln_final.bias.add_(1.0)
    torch.save(clip.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    loaded = OpenCLIPTextEncoder("tiny", weights=str(tmp_path / "open_clip_pytorch_model.bin"))
    torch.testing.assert_close(loaded(CAPTIONS), OpenCLIPTextEncoder("tiny")(CAPTIONS) + 1.0, rtol=0, atol=1e-5)

    state = clip.state_dict()
    del state["text_projection"]
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"missing \(1\): text_projection"):
        OpenCLIPImageEncoder("tiny", weights=str(tmp_path / "bad.safetensors"))


def test_text_encoder_rejects_bad_arguments():
    with pytest.raises(ValueError, match="layer must be one of"):
        OpenCLIPTextEncoder("tiny", layer="pooled")
    with pytest.raises(ValueError, match=r"max_length must be in \[1, 77\]"):
        OpenCLIPTextEncoder("tiny", max_length=78)
    with pytest.raises(ValueError, match="unknown OpenCLIP architecture 'ViT-Q-1'"):
        OpenCLIPTextEncoder("ViT-Q-1")


def test_tiny_image_encoder_shape_and_open_clip_parity():
    encoder = OpenCLIPImageEncoder("tiny")
    assert encoder.dim == 32 and encoder.image_size == (32, 32)
    images = _video(b=2, f=1, h=40, w=56)[:, :, 0]
    out = encoder(images)
    assert out.shape == (2, 1, 32)
    clip = build_clip(clip_config("tiny"), None)
    torch.testing.assert_close(out[:, 0], clip.encode_image(encoder.preprocess(images)))


def test_image_preprocessing_crops_the_centre_square_and_normalises():
    encoder = OpenCLIPImageEncoder("tiny")
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    wide = torch.full((1, 3, 48, 80), 0.5)
    wide[..., :16], wide[..., 64:] = -1.0, 1.0  # outside the centre 48x48 square
    tall = wide.transpose(-1, -2).contiguous()
    expected = ((0.75 - mean) / std).expand(1, 3, 32, 32)
    for image in (wide, tall):
        torch.testing.assert_close(encoder.preprocess(image), expected)

    images = _video(b=1, f=1, h=64, w=64)[:, :, 0].requires_grad_(True)
    encoder(images).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_image_resize_matches_pil_bilinear():
    """VGen resized PIL images with BILINEAR (antialiased when shrinking); the torch path agrees to uint8 rounding."""
    image_module = pytest.importorskip("PIL.Image")
    pixels = torch.rand(1, 3, 12, 16, generator=torch.Generator().manual_seed(0))
    pixels = torch.nn.functional.interpolate(pixels, size=(240, 320), mode="bicubic").clamp(0, 1)
    uint8 = (pixels[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    square = image_module.fromarray(uint8[:, 40:280]).resize((224, 224), image_module.BILINEAR)
    reference = torch.tensor(list(square.getdata()), dtype=torch.float32).view(224, 224, 3).permute(2, 0, 1) / 255
    with torch.device("meta"):
        encoder = OpenCLIPImageEncoder("ViT-H-14")
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    ours = encoder.preprocess(torch.from_numpy(uint8).permute(2, 0, 1)[None].float() / 255 * 2 - 1)[0] * std + mean
    assert (ours - reference).abs().max() <= 1.01 / 255


def test_encoders_follow_the_module_dtype():
    video = _video(b=1, f=2)
    vae = VideoAutoencoder("tiny").to(torch.bfloat16)
    latents = vae.encode(video, torch.Generator().manual_seed(0))
    assert latents.dtype == torch.bfloat16 and vae.decode(latents).dtype == torch.bfloat16
    assert OpenCLIPTextEncoder("tiny").to(torch.bfloat16)(CAPTIONS).dtype == torch.bfloat16
    assert OpenCLIPImageEncoder("tiny").to(torch.bfloat16)(video[:, :, 0]).dtype == torch.bfloat16
    with pytest.raises(TypeError, match="list of strings"):
        OpenCLIPTextEncoder("tiny")("a single caption")


def test_full_size_vit_h14_encoders_build_on_meta():
    with torch.device("meta"):
        text = OpenCLIPTextEncoder("ViT-H-14")
        image = OpenCLIPImageEncoder("ViT-H-14")
    assert (text.dim, text.num_layers, len(text.transformer.resblocks)) == (1024, 23, 24)
    assert (image.dim, image.image_size) == (1024, (224, 224))
    text_params = sum(p.numel() for p in text.parameters())
    image_params = sum(p.numel() for p in image.parameters())
    # ViT-H-14 has 986,109,441 parameters: text tower, vision tower, text_projection (1024 x 1024), logit_scale
    assert text_params + image_params + 1024 * 1024 + 1 == 986_109_441
    assert image_params == 632_076_800


# ---------------------------------------------------------------------------------------------- Hydra configs
CONFIGS = ["vae/sd21", "vae/tiny", "vae/identity", "text_encoder/open_clip_vit_h14", "text_encoder/tiny",
           "image_encoder/open_clip_vit_h14", "image_encoder/tiny"]


@pytest.mark.parametrize("name", CONFIGS)
def test_configs_instantiate_and_comment_every_key(name):
    path = CONF_DIR / "model" / f"{name}.yaml"
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            assert " # " in line, f"{path}: key without a comment: {line}"
    cfg = OmegaConf.load(path)
    if "tiny" in name or "identity" in name:
        module = instantiate(cfg)
    else:
        with torch.device("meta"):
            module = instantiate(cfg)
        assert getattr(module, "dim", 1024) == 1024
    assert not module.training
