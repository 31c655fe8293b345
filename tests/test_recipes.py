"""The I2VGen-XL / T2V / TF-T2V recipes: experiments at full size (meta device), the stage-1/2/3 and refinement
algorithms (conditions, dropout, text-free batches, coherence loss, frozen parts, noise range) and the cascade.
The 2-step tiny training of every experiment is in tests/test_train.py (it runs every conf/experiment file)."""

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import CONF_DIR, load_reference_json
from vgen.diffusion import build_diffusion, denoise_from, sdedit_timesteps
from vgen.models import UNet3D
from vgen.models.image_encoder import OpenCLIPImageEncoder
from vgen.models.text_encoder import OpenCLIPTextEncoder
from vgen.models.vae import IdentityAutoencoder
from vgen.stages import HQFinetuneStage, ImagePretrainStage, JointImageVideoStage, RefinementStage
from vgen.stages.joint import temporal_coherence_loss

RECIPES = {  # experiment -> reference manifest of the original network it trains
    "i2vgen_stage1": "i2vgen_xl_unet", "i2vgen_stage2": "i2vgen_xl_unet", "i2vgen_stage3": "i2vgen_xl_unet",
    "i2vgen_refine": "sr600_unet", "t2v_stage1": "t2v_unet", "t2v_stage2": "t2v_unet", "t2v_stage3": "t2v_unet",
    "tft2v_stage2": "tft2v_t2v_unet",
}
PIXEL_TINY = {"in_channels": 3, "out_channels": 3, "model_channels": 32, "channel_mult": (1, 2), "num_res_blocks": 1,
              "attention_scales": (1.0,), "head_dim": 16, "init_temporal_heads": 2, "context_dim": 64,
              "decoder_context_dim": 64, "dropout": 0.0}


def compose_experiment(experiment, *overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=[f"experiment={experiment}", *overrides])


def full_size_unet(experiment) -> UNet3D:
    """The experiment's full-size UNet, built on the meta device (no memory, no init time)."""
    cfg = OmegaConf.to_container(compose_experiment(experiment).model.unet, resolve=True)
    with torch.device("meta"):
        return UNet3D(**{k: v for k, v in cfg.items() if not k.startswith("_")})


@pytest.mark.parametrize("experiment", sorted(RECIPES))
def test_experiment_builds_the_reference_network_with_gpu_defaults(experiment):
    cfg = compose_experiment(experiment)
    model = full_size_unet(experiment)
    assert sum(p.numel() for p in model.parameters()) == load_reference_json(f"{RECIPES[experiment]}.keys.json")[
        "num_parameters"]
    assert cfg.strategy.name == "deepspeed_zero2"
    assert cfg.trainer.precision == "bf16-mixed"
    assert cfg.stage.gradient_checkpointing is True
    assert cfg.diffusion.prediction == "v" and cfg.diffusion.zero_terminal_snr is True
    tiny = compose_experiment(experiment, "debug=tiny")
    assert (tiny.strategy.name, tiny.trainer.precision, tiny.trainer.accelerator) == ("auto", "32-true", "cpu")
    assert list(tiny.data.resolution) == [16, 16] and tiny.model.unet.model_channels == 32


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")))
def test_an_experiment_names_its_run_directory_and_the_command_line_still_wins(experiment):
    """The root config's own keys are defaults: an experiment's ``name`` decides outputs/<name> (make demo reads
    outputs/demo), with or without a debug config, and a command-line override beats both."""
    assert compose_experiment(experiment).name == experiment
    assert compose_experiment(experiment, "debug=tiny").name == experiment
    assert compose_experiment(experiment, "name=mine").name == "mine"


# ---------------------------------------------------------------------------------------------- shared fixtures
@pytest.fixture(scope="module")
def encoders():
    return OpenCLIPTextEncoder("tiny"), OpenCLIPImageEncoder("tiny")


def make_stage(cls, encoders, unet_overrides=None, text_dropout=None, **kwargs):
    torch.manual_seed(0)
    unet = UNet3D(**{**PIXEL_TINY, **(unet_overrides or {})})
    with torch.no_grad():
        for p in unet.parameters():  # no zero-initialised layer: every path is live
            p.normal_(0, 0.05)
    if text_dropout is not None:
        unet.conditions["text"].dropout = text_dropout
    text, image = encoders
    kwargs.setdefault("ema", {"enabled": False})
    return cls(unet, build_diffusion(), IdentityAutoencoder(), text, image, **kwargs)


def make_batch(captions, frames=3, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = len(captions)
    return {"video": torch.rand(b, 3, frames, size, size, generator=g) * 2 - 1, "caption": list(captions),
            "fps": torch.full((b,), 8), "kind": "video" if frames > 1 else "image"}


class Spy(torch.nn.Module):
    """Wraps the UNet and records the keyword inputs of each call."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.calls = unet, []
        self.config, self.conditions = unet.config, unet.conditions

    def forward(self, x, t, **kwargs):
        self.calls.append({k: v.detach().clone() for k, v in kwargs.items()})
        return self.unet(x, t, **kwargs)


# ---------------------------------------------------------------------------------------------- TF-T2V
def test_temporal_coherence_loss_on_a_hand_computed_case():
    output = torch.tensor([0.0, 1.0, 3.0, 2.0]).view(1, 1, 4, 1, 1)
    target = torch.tensor([1.0, 1.0, 2.0, 4.0]).view(1, 1, 4, 1, 1)
    # output diffs (1, 2, -1), target diffs (0, 1, 2): errors 1, 1, -3 -> (1 + 1 + 9) / 3
    assert temporal_coherence_loss(output, target).tolist() == pytest.approx([11 / 3])
    shifted = output + torch.tensor([5.0, -2.0]).view(2, 1, 1, 1, 1)[:1]  # a frame-constant offset changes nothing
    assert temporal_coherence_loss(shifted, target).tolist() == pytest.approx([11 / 3])
    assert temporal_coherence_loss(torch.ones(2, 3, 1, 4, 4), torch.zeros(2, 3, 1, 4, 4)).tolist() == [0.0, 0.0]


def test_coherence_loss_adds_weight_times_its_value_on_video_batches(encoders):
    stages = {w: make_stage(JointImageVideoStage, encoders, text_dropout=0.0, coherence_loss_weight=w).eval()
              for w in (0.0, 0.5)}
    batch = make_batch(["a red circle moving left", "a blue square moving up"], frames=4)
    losses = {}
    for w, stage in stages.items():
        torch.manual_seed(7)
        losses[w] = stage.compute_loss(batch).item()
    stage = stages[0.0]
    torch.manual_seed(7)
    latents = stage.encode_video(batch["video"])
    cond = stage.training_conditions(batch, latents)
    t = stage.sample_timesteps(2)
    from vgen.diffusion import training_noise

    noise = training_noise(latents, stage.diffusion.offset_noise_strength)
    with torch.no_grad():
        out = stage.unet(stage.diffusion.param.q_sample(latents, t, noise), t, **cond)
    coherence = temporal_coherence_loss(out, stage.diffusion.param.target(latents, noise, t)).mean().item()
    assert coherence > 0.01
    assert losses[0.5] - losses[0.0] == pytest.approx(0.5 * coherence, rel=1e-4)
    torch.manual_seed(7)
    image_batch = make_batch(["a red circle"], frames=1)
    with_weight = stages[0.5].compute_loss(image_batch).item()
    torch.manual_seed(7)
    assert with_weight == pytest.approx(stages[0.0].compute_loss(image_batch).item(), rel=1e-6)


def tft2v_stage(encoders, mode):
    return make_stage(JointImageVideoStage, encoders, {"image_tokens": 4, "image_dim": 32, "concat_channels": 8},
                      text_dropout=0.0, text_free={"mode": mode})


def test_text_free_samples_get_null_text_and_an_image_embedding(encoders):
    stage = tft2v_stage(encoders, "empty_caption")
    text_enc, image_enc = encoders
    batch = make_batch(["a red circle moving left", ""], frames=5)
    cond = stage.training_conditions(batch, stage.encode_video(batch["video"]))
    torch.testing.assert_close(cond["text"][0], text_enc(["a red circle moving left"])[0])
    torch.testing.assert_close(cond["text"][1], text_enc([""])[0])  # null text (the empty prompt), not the negative
    torch.testing.assert_close(cond["image"][1], image_enc(batch["video"][1:2, :, 2])[0])  # the middle frame
    assert torch.equal(cond["image"][0], torch.zeros_like(cond["image"][0]))  # captioned sample: no image
    flagged = {**batch, "caption": ["a", "b"], "text_free": torch.tensor([True, False])}
    cond = stage.training_conditions(flagged, stage.encode_video(batch["video"]))
    torch.testing.assert_close(cond["text"][0], text_enc([""])[0])
    assert torch.equal(cond["image"][1], torch.zeros_like(cond["image"][1]))
    captioned = stage.training_conditions(make_batch(["a", "b"]), stage.encode_video(batch["video"][:, :, :3]))
    assert "image" not in captioned  # no text-free sample: text-only, as at inference


def test_all_videos_mode_trains_clips_text_free_and_stills_with_text(encoders):
    stage = tft2v_stage(encoders, "all_videos")
    text_enc, _ = encoders
    stage.unet = spy = Spy(stage.unet)
    torch.manual_seed(0)
    stage.compute_loss(make_batch(["a red circle moving left", "a blue square moving up"], frames=3))
    stage.compute_loss(make_batch(["a red circle"], frames=1))
    video, still = spy.calls
    torch.testing.assert_close(video["text"], text_enc([""]).expand(2, -1, -1))
    assert video["image"].shape == (2, 1, 32) and video["image"].abs().min() > 0
    torch.testing.assert_close(still["text"], text_enc(["a red circle"]))
    assert "image" not in still


def test_text_free_needs_image_tokens(encoders):
    with pytest.raises(ValueError, match="stage.text_free.mode=all_videos needs an image-token condition"):
        make_stage(JointImageVideoStage, encoders, text_free={"mode": "all_videos"})
    with pytest.raises(ValueError, match="stage.text_free.mode must be one of"):
        make_stage(JointImageVideoStage, encoders, text_free={"mode": "sometimes"})


# ---------------------------------------------------------------------------------------------- I2VGen-XL stage 2
I2V = {"first_frame_condition": True, "fps_condition": True, "image_tokens": 2, "image_dim": 32}


def test_i2vgen_joint_dropout_is_the_released_unconditional_branch(encoders):
    stage = make_stage(JointImageVideoStage, encoders, I2V, text_dropout=0.0, conditioning={"p_joint_zero": 1.0})
    batch = make_batch(["a red circle moving left", "a blue square"], frames=3)
    latents = stage.encode_video(batch["video"])
    cond = stage.training_conditions(batch, latents)
    torch.testing.assert_close(cond["text"], stage.negative_embedding(2))
    assert torch.equal(cond["image"], torch.zeros(2, 1, 32))
    assert torch.equal(cond["first_frame"], latents[:, :, :1])  # the first frame is kept
    assert cond["fps"].tolist() == [8, 8]
    keep = make_stage(JointImageVideoStage, encoders, I2V, text_dropout=0.0, conditioning={"p_joint_zero": 0.0})
    cond = keep.training_conditions(batch, latents)
    torch.testing.assert_close(cond["image"], encoders[1](batch["video"][:, :, 0]))
    with pytest.raises(ValueError, match="p_joint_zero"):
        make_stage(JointImageVideoStage, encoders, I2V, conditioning={"p_joint_zero": 2.0})


def test_i2vgen_stills_are_not_their_own_condition(encoders):
    stage = make_stage(JointImageVideoStage, encoders, I2V, text_dropout=0.0)
    still = make_batch(["a red circle"], frames=1)
    cond = stage.training_conditions(still, stage.encode_video(still["video"]))
    assert not cond["first_frame"].any() and not cond["image"].any()


# ---------------------------------------------------------------------------------------------- stage 1 and 3
def one_step(stage, batch):
    """One optimizer step as Lightning runs it (loss, backward, the stage's optimizer)."""
    optimizer = stage.configure_optimizers()["optimizer"]
    torch.manual_seed(0)
    stage.compute_loss(batch).backward()
    optimizer.step()
    return optimizer


def test_stage1_bypasses_and_freezes_temporal_layers_and_trains_on_single_frames(encoders):
    stage = make_stage(ImagePretrainStage, encoders, temporal="bypass")
    temporal = set(stage.unet.temporal_parameter_names())
    assert temporal and all(not p.requires_grad for n, p in stage.unet.named_parameters() if n in temporal)
    frames = ImagePretrainStage.single_frames(make_batch(["a", "b"], frames=5))
    assert frames["video"].shape == (2, 3, 1, 8, 8)
    clip = make_batch(["a", "b"], frames=5)["video"]
    assert all(any(torch.equal(frames["video"][i, :, 0], clip[i, :, f]) for f in range(5)) for i in range(2))
    before = {n: p.detach().clone() for n, p in stage.unet.named_parameters()}
    one_step(stage, frames)
    changed = {n for n, p in stage.unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed and not changed & temporal
    # bypassed: the network ignores its temporal layers entirely
    stage.eval()
    x, t, text = torch.randn(1, 3, 2, 8, 8), torch.tensor([500]), torch.randn(1, 4, 64)
    with torch.no_grad():
        reference = stage.unet(x, t, text=text)
        for name, p in stage.unet.named_parameters():
            if name in temporal:
                p.add_(1.0)
        assert torch.equal(stage.unet(x, t, text=text), reference)
        stage.unet.set_temporal_bypass(False)
        assert not torch.allclose(stage.unet(x, t, text=text), reference)
    with pytest.raises(ValueError, match="stage.temporal must be one of"):
        make_stage(ImagePretrainStage, encoders, temporal="skip")


def test_stage3_trains_only_the_selected_parameters(encoders):
    stage = make_stage(HQFinetuneStage, encoders, trainable="temporal")
    temporal = set(stage.unet.temporal_parameter_names())
    optimizer = one_step(stage, make_batch(["a red circle moving left"], frames=3))
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(temporal)
    prefixes = make_stage(HQFinetuneStage, encoders, trainable=["out.", "input_blocks.0."])
    assert {n for n, p in prefixes.unet.named_parameters() if p.requires_grad} == {
        n for n, _ in prefixes.unet.named_parameters() if n.startswith(("out.", "input_blocks.0."))}
    with pytest.raises(ValueError, match="prefix 'nothing.' matches no UNet parameter"):
        make_stage(HQFinetuneStage, encoders, trainable=["nothing."])


# ---------------------------------------------------------------------------------------------- refinement
def test_refinement_trains_on_its_inference_noise_range(encoders):
    stage = make_stage(RefinementStage, encoders, noise_levels=700)
    t = stage.sample_timesteps(20000)
    assert t.min() == 0 and t.max() == 699
    assert sdedit_timesteps(700, 4) == [699, 524, 350, 175, -1]
    with pytest.raises(ValueError, match="stage.noise_levels"):
        make_stage(RefinementStage, encoders, noise_levels=1001)


def test_sdedit_from_t699_with_an_oracle_denoiser_returns_the_target():
    param = build_diffusion().param
    target = torch.rand(2, 3, 4, 8, 8) * 2 - 1
    t0 = torch.full((2,), 699)
    x = param.q_sample(target, t0, torch.randn_like(target))

    def oracle(x_t, t, **_):  # the v that points from x_t to the target
        alpha, sigma = param.schedule.scalings(t, x_t)
        eps = (x_t - alpha * target) / sigma
        return alpha * eps - sigma * target

    out = denoise_from(oracle, x, param, sdedit_timesteps(700, 5), cond={})
    torch.testing.assert_close(out, target, rtol=1e-4, atol=1e-4)


def fake_checkpoint(path, experiment, *overrides):
    """A vgen checkpoint of an untrained tiny stage (what vgen.train writes, minus the training state)."""
    cfg = compose_experiment(experiment, "debug=tiny", *overrides)
    torch.manual_seed(0)
    stage = instantiate(cfg.stage)
    config = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("stage", "data", "diffusion", "model")}
    torch.save({"state_dict": stage.state_dict(), "vgen_config": config}, path)
    return path


def test_sample_cascades_through_the_refinement_model(tmp_path):
    from vgen.media import read_mp4
    from vgen.sample import main

    base = fake_checkpoint(tmp_path / "base.ckpt", "t2v_stage2")
    refiner = fake_checkpoint(tmp_path / "refiner.ckpt", "i2vgen_refine")
    out = tmp_path / "v.mp4"
    args = [f"checkpoint={base}", "prompt=a red circle moving left", "num_frames=3", "height=8", "width=8",
            "steps=2", f"out={out}", f"refiner={refiner}", "refine_height=16", "refine_width=24", "refine_steps=2"]
    assert main(args) == 0
    frames, _ = read_mp4(out)
    assert frames.shape == (3, 16, 24, 3)
    assert main([*args[:-4], f"refiner={base}"]) == 2, "a non-refinement checkpoint is refused as refiner"
