"""Units of the shared training stage: EMA maths, LR schedule, CFG dropout, SD-2.1 spatial gradient scaling,
and checkpoint contents (UNet + EMA only, frozen encoders excluded)."""

import math

import pytest
import torch

from vgen.diffusion import build_diffusion
from vgen.models import UNet3D
from vgen.models.text_encoder import OpenCLIPTextEncoder
from vgen.models.vae import IdentityAutoencoder
from vgen.stages import JointImageVideoStage
from vgen.stages.options import NEGATIVE_PROMPT
from vgen.training.ema import EMA
from vgen.training.optim import warmup_decay_lambda

TINY = {"in_channels": 3, "out_channels": 3, "model_channels": 32, "channel_mult": (1, 2), "num_res_blocks": 1,
            "attention_scales": (1.0,), "head_dim": 16, "init_temporal_heads": 2, "context_dim": 64, "decoder_context_dim": 64}


@pytest.fixture(scope="module")
def text_encoder():
    return OpenCLIPTextEncoder("tiny")


def make_stage(text_encoder, p_zero=0.1, **conditioning):
    torch.manual_seed(0)
    unet = UNet3D(**TINY)
    for p in unet.parameters():  # no zero-initialised layers: every gradient is non-trivial
        torch.nn.init.normal_(p, std=0.05)
    unet.conditions["text"].dropout = p_zero  # the text condition's own classifier-free dropout
    return JointImageVideoStage(unet, build_diffusion(), IdentityAutoencoder(), text_encoder,
                                ema={"decay": 0.9}, conditioning=conditioning)


def batch(b=2, f=3):
    g = torch.Generator().manual_seed(0)
    return {"video": torch.rand(b, 3, f, 8, 8, generator=g) * 2 - 1, "caption": ["a red circle moving left"] * b,
            "fps": torch.full((b,), 8), "kind": "video"}


def test_ema_update_is_a_lerp_and_round_trips():
    net = torch.nn.Linear(3, 2)
    ema = EMA(net, decay=0.9, start_step=2)
    before = {k: v.clone() for k, v in ema.shadow.items()}
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net, step=0)  # before start_step: plain copy
    torch.testing.assert_close(ema.shadow["weight"], net.weight.detach())
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net, step=5)
    torch.testing.assert_close(ema.shadow["weight"], 0.9 * (before["weight"] + 1) + 0.1 * net.weight.detach())
    other = EMA(torch.nn.Linear(3, 2), decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert all(torch.equal(other.shadow[k], ema.shadow[k]) for k in ema.shadow)
    with pytest.raises(KeyError, match="missing"):
        EMA(torch.nn.Linear(3, 3, bias=False)).load_state_dict({"shadow": {}})
    with pytest.raises(ValueError, match="decay"):
        EMA(net, decay=1.0)


def test_warmup_then_cosine_schedule():
    f = warmup_decay_lambda(warmup_steps=10, total_steps=110, decay="cosine", min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert warmup_decay_lambda(10, 100, "constant")(50) == 1.0
    with pytest.raises(ValueError, match="decay"):
        warmup_decay_lambda(10, 100, "exp")


def test_text_dropout_replaces_captions_with_the_negative_prompt(text_encoder):
    data = batch(b=4)
    always = make_stage(text_encoder, p_zero=1.0).training_conditions(data, data["video"])
    never = make_stage(text_encoder, p_zero=0.0).training_conditions(data, data["video"])
    negative = text_encoder([NEGATIVE_PROMPT])
    torch.testing.assert_close(always["text"], negative.expand(4, -1, -1))
    torch.testing.assert_close(never["text"], text_encoder(data["caption"]))


def test_spatial_gradients_are_scaled_and_temporal_ones_are_not(text_encoder):
    stage = make_stage(text_encoder, p_zero=0.0, spatial_grad_scale=0.5)
    torch.manual_seed(1)
    stage.compute_loss(batch()).backward()
    before = {n: p.grad.clone() for n, p in stage.unet.named_parameters()}
    stage.on_before_optimizer_step(None)
    spatial = set(stage.unet.spatial_parameter_names())
    assert spatial and len(spatial) < len(before)
    for name, p in stage.unet.named_parameters():
        expected = before[name] * (0.5 if name in spatial else 1.0)
        torch.testing.assert_close(p.grad, expected, rtol=0, atol=0)


def test_checkpoint_state_is_the_unet_only(text_encoder):
    stage = make_stage(text_encoder)
    state = stage.state_dict()
    assert set(state) == {f"unet.{k}" for k in stage.unet.state_dict()}
    fresh = make_stage(text_encoder)
    with torch.no_grad():
        for p in fresh.unet.parameters():
            p.zero_()
    fresh.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(fresh.unet.state_dict().values(), stage.unet.state_dict().values()))
    with pytest.raises(KeyError, match="outside"):
        fresh.load_state_dict({**state, "text_encoder.x": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="Missing"):
        fresh.load_state_dict({k: v for k, v in state.items() if "out.2" not in k})


def test_mismatched_widths_name_the_keys(text_encoder):
    with pytest.raises(ValueError, match="model.unet.context_dim"):
        JointImageVideoStage(UNet3D(**{**TINY, "context_dim": 32}), build_diffusion(), IdentityAutoencoder(),
                             text_encoder)
    with pytest.raises(ValueError, match="model.unet.in_channels"):
        JointImageVideoStage(UNet3D(**{**TINY, "in_channels": 4}), build_diffusion(), IdentityAutoencoder(),
                             text_encoder)


@pytest.mark.parametrize("i2v", [False, True], ids=["t2v", "i2v"])
def test_latent_batches_train_exactly_as_the_pixel_batches_they_encode(text_encoder, i2v):
    """A latent-cache batch (``latent``, ``text_embedding`` and, for image-to-video, ``image_embedding``, as
    data_pipelines/encode.py stores them) skips the VAE and the encoders, yet one training step gives the pixel
    batch's loss and weights: CFG-dropped samples get the negative-prompt embedding, computed once by the text
    encoder (and a zero image embedding)."""
    from vgen.models.image_encoder import OpenCLIPImageEncoder
    from vgen.models.vae import VideoAutoencoder

    vae = VideoAutoencoder("tiny")
    image_encoder = OpenCLIPImageEncoder("tiny") if i2v else None
    conditions = {"first_frame_condition": True, "fps_condition": True, "image_tokens": 2, "image_dim": 32} if i2v else {}

    def stage():
        torch.manual_seed(0)
        unet = UNet3D(**{**TINY, "in_channels": 4, "out_channels": 4, **conditions})
        for p in unet.parameters():
            torch.nn.init.normal_(p, std=0.05)
        unet.conditions["text"].dropout = 0.5
        if i2v:
            unet.conditions["image"].dropout = 0.5
        return JointImageVideoStage(unet, build_diffusion(), vae, text_encoder, image_encoder, ema={"enabled": False})

    pixels = batch(b=4)
    pixels["caption"] = ["a red circle moving left", "a blue square", "green", "a yellow star moving up"]
    pixel_stage, latent_stage = stage(), stage()
    torch.manual_seed(1)
    pixel_loss = pixel_stage.compute_loss(pixels)
    torch.manual_seed(1)
    with torch.no_grad():  # the same posterior draw the pixel path makes, then the encoders' embeddings
        cached = {**{k: v for k, v in pixels.items() if k != "video"}, "latent": vae.encode(pixels["video"]),
                  "text_embedding": text_encoder(pixels["caption"])}
        if i2v:
            cached["image_embedding"] = image_encoder(pixels["video"][:, :, 0])
    rng = torch.get_rng_state()

    seen = []
    latent_stage.vae.encode = lambda *a, **k: pytest.fail("the VAE encoded a latent batch")
    if i2v:
        latent_stage.image_encoder.forward = lambda *a, **k: pytest.fail("the image encoder ran on a latent batch")
    encode_text = latent_stage.encode_text
    latent_stage.encode_text = lambda captions: seen.append(list(captions)) or encode_text(captions)
    latent_loss = latent_stage.compute_loss(cached)
    assert seen == [[NEGATIVE_PROMPT]]  # the text encoder runs once, for the negative prompt only
    assert torch.equal(latent_loss, pixel_loss)

    # the seed drops some samples' text and keeps others', and the cached path drops the same ones
    torch.set_rng_state(rng)
    text = latent_stage.training_conditions(cached, cached["latent"])["text"]
    dropped = [torch.equal(row, latent_stage.negative_embedding(1)[0]) for row in text]
    kept = [torch.equal(row, emb) for row, emb in zip(text, cached["text_embedding"])]
    assert any(dropped) and any(kept) and all(d != k for d, k in zip(dropped, kept)), (dropped, kept)
    assert seen == [[NEGATIVE_PROMPT]]  # cached, not recomputed

    for s, loss in ((pixel_stage, pixel_loss), (latent_stage, latent_loss)):
        optimizer = torch.optim.SGD(s.unet.parameters(), lr=0.1)
        loss.backward()
        optimizer.step()
    for (name, a), b in zip(pixel_stage.unet.named_parameters(), latent_stage.unet.parameters()):
        assert torch.equal(a, b), name


def test_latent_batches_of_another_encoder_are_refused_naming_it(text_encoder):
    stage = make_stage(text_encoder)
    data = {k: v for k, v in batch().items() if k != "video"}
    with pytest.raises(ValueError, match=r"data_pipelines/encode.py --vae"):
        stage.compute_loss({**data, "latent": torch.zeros(2, 4, 3, 8, 8)})
    with pytest.raises(ValueError, match=r"data_pipelines/encode.py --text-encoder"):
        stage.compute_loss({**data, "latent": torch.zeros(2, 3, 3, 8, 8), "text_embedding": torch.zeros(2, 77, 32)})


def test_a_nonfinite_step_is_flagged_skipped_and_logs_no_per_kind_loss(text_encoder):
    stage = make_stage(text_encoder, p_zero=0.0)
    logged = []
    stage.log = lambda name, value, **kwargs: logged.append(name)
    bad = batch()
    bad["video"][0] = float("nan")
    stage.training_step(bad, 0)
    assert stage.step_skipped and stage.nonfinite_steps == 1
    assert logged == ["train/nonfinite_steps"]  # neither train/loss nor train/loss_video of a NaN
    optimizer = torch.optim.SGD(stage.unet.parameters(), lr=0.1)
    stage.optimizer_step(0, 0, optimizer, lambda: None)
    assert not stage.step_skipped  # cleared after its (skipped) optimizer step
    logged.clear()
    stage.training_step(batch(), 1)
    assert logged == ["train/loss", "train/loss_video"]


def test_training_timesteps_follow_the_recipes_timestep_shift(text_encoder):
    stage = make_stage(text_encoder)
    torch.manual_seed(0)
    uniform = stage.sample_timesteps(50_000)
    stage.diffusion = build_diffusion(timestep_shift=4.0)
    shifted = stage.sample_timesteps(50_000)
    assert (uniform >= 950).double().mean().item() == pytest.approx(0.05, abs=0.01)
    assert (shifted >= 950).double().mean().item() == pytest.approx(0.174, abs=0.01)
    seeded = stage._seeded_noise({"noise_seed": torch.arange(4000)}, torch.zeros(4000, 1, 1, 1, 1))["t"]
    assert (seeded >= 950).double().mean().item() == pytest.approx(0.174, abs=0.03)
