"""Stage 5 (VideoLCM consistency distillation) and the LCM sampler: boundary conditions, the teacher's DDIM solver
step, one distillation step checked by hand, the target network's EMA, the teacher staying frozen and out of
checkpoints, parity of the sampler with diffusers' LCMScheduler, and the whole train -> resume -> sample path."""

import math
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from conftest import CONF_DIR, REPO
from vgen.diffusion import build_diffusion, ddim_sample
from vgen.diffusion.lcm import (
    boundary_scalings,
    consistency_distillation_loss,
    ddim_solver_step,
    lcm_sample,
    lcm_timesteps,
    solver_timesteps,
    x0_and_eps,
)
from vgen.media import read_mp4
from vgen.models import UNet3D
from vgen.models.text_encoder import OpenCLIPTextEncoder
from vgen.models.vae import IdentityAutoencoder
from vgen.stages.distill import ConsistencyDistillStage, update_target_network

F64 = torch.float64
TINY = {"in_channels": 3, "out_channels": 3, "model_channels": 32, "channel_mult": (1, 2), "num_res_blocks": 1,
        "attention_scales": (1.0,), "head_dim": 16, "init_temporal_heads": 2, "context_dim": 64,
        "decoder_context_dim": 64, "dropout": 0.0}


def v_param(schedule="cosine"):
    return build_diffusion(schedule, zero_terminal_snr=True, prediction="v").param


def toy_model(x, t, text):
    """Deterministic 'network' whose output depends on x, t and the text (so guidance matters)."""
    return 0.5 * x + (0.1 * t / 1000 + 0.2 * text.mean(dim=(1, 2))).to(x.dtype).view(-1, 1, 1, 1, 1)


class Scale(torch.nn.Module):
    """model(x, t, text) = theta * x: a one-parameter 'network'."""

    def __init__(self, theta: float):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor(theta, dtype=F64))

    def forward(self, x, t, text):
        return self.theta * x


# ---------------------------------------------------------------------------------------------- pure maths
def test_boundary_conditions():
    t = torch.tensor([0, 1, 20, 999])
    c_skip, c_out = boundary_scalings(t, torch.zeros(4, 1, dtype=F64))
    assert c_skip[0].item() == 1.0 and c_out[0].item() == 0.0  # f(x, 0) = x exactly
    assert c_skip[1].item() == pytest.approx(0.25 / (10.0**2 + 0.25), rel=1e-12)
    assert c_out[1].item() == pytest.approx(10.0 / math.sqrt(10.0**2 + 0.25), rel=1e-12)
    assert c_skip[3].item() < 1e-6 and c_out[3].item() == pytest.approx(1.0, abs=1e-7)
    assert c_skip.shape == (4, 1)


def test_solver_grid_and_lcm_timesteps():
    grid = solver_timesteps(1000, 50)
    assert grid.tolist() == list(range(19, 1000, 20))
    assert lcm_timesteps(1000, 4).tolist() == [999, 759, 499, 259]  # diffusers LCMScheduler, 50 original steps
    assert lcm_timesteps(1000, 1).tolist() == [999]
    assert lcm_timesteps(1000, 2).tolist() == [999, 499]
    with pytest.raises(ValueError, match="LCM steps"):
        lcm_timesteps(1000, 51)


def test_trailing_ddim_grid_is_the_lcm_solver_grid():
    """The 981-vs-999 mismatch: VGen's (leading) DDIM grid starts at 981 (50 steps) or 751 (4), the LCM grid at 999.
    ``ddim_spacing=trailing`` runs DDIM-50 on exactly the solver grid the student is distilled on (then to 0), and a
    few-step DDIM from 999 as LCM; leading stays VGen's."""
    from vgen.diffusion import ddim_timesteps

    assert ddim_timesteps(1000, 50).tolist()[:2] == [981, 961]
    assert ddim_timesteps(1000, 50, "trailing").tolist() == solver_timesteps(1000, 50).flip(0).tolist()
    assert ddim_timesteps(1000, 4, "trailing").tolist() == [999, 749, 499, 249]
    assert ddim_timesteps(1000, 4, "trailing")[0] == lcm_timesteps(1000, 4)[0]
    assert ddim_timesteps(1000, 3, "trailing").tolist() == [999, 666, 333]
    with pytest.raises(ValueError, match="spacing"):
        ddim_timesteps(1000, 4, "linspace")
    with pytest.raises(ValueError, match="ddim_spacing"):
        build_diffusion("cosine", ddim_spacing="middle")
    seen = []
    model = lambda x, t, **_: seen.append(int(t[0])) or torch.zeros_like(x)
    diffusion = build_diffusion("cosine", zero_terminal_snr=True, prediction="v", ddim_spacing="trailing",
                                guidance_scale=1.0)
    out = diffusion.sample(model, torch.randn(1, 3, 2, 4, 4), steps=4)
    assert seen == [999, 749, 499, 249]
    assert torch.isfinite(out).all()  # eps at t = 999 (alpha_bar = 0) is finite
    unet = UNet3D(**TINY).eval()
    assert torch.isfinite(diffusion.sample(lambda x, t, **_: unet(x, t, text=torch.zeros(1, 4, 64)),
                                           torch.randn(1, 3, 2, 8, 8), steps=2)).all()
    seen.clear()
    ddim_sample(model, torch.randn(1, 3, 2, 4, 4), diffusion.param, 4, guidance_scale=1.0)
    assert seen == [751, 501, 251, 1]


def test_zero_terminal_snr_end_is_finite():
    param = v_param()
    assert param.schedule.alpha_bar(torch.tensor([999]), torch.zeros(1)).item() == 0.0
    x_t, v = torch.randn(2, 3, 2, 4, 4, dtype=F64), torch.randn(2, 3, 2, 4, 4, dtype=F64)
    x0, eps = x0_and_eps(param, v, x_t, torch.tensor([999, 999]))
    assert torch.equal(x0, -v) and torch.equal(eps, x_t)


def test_teacher_solver_step_is_the_ddim_sampler_step():
    param = v_param()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 2, 4, 4, generator=g, dtype=F64)
    cond, uncond = {"text": torch.ones(2, 3, 8, dtype=F64)}, {"text": torch.zeros(2, 3, 8, dtype=F64)}
    steps = []
    ddim_sample(toy_model, x, param, 50, cond=cond, uncond=uncond, guidance_scale=3.0,
                callback=lambda s: steps.append(s["x"]))
    t, t_prev = torch.tensor([981, 981]), torch.tensor([961, 961])
    solver = ddim_solver_step(toy_model, param, x, t, t_prev, cond, uncond, guidance=2.0)  # w = 2 -> CFG 3
    torch.testing.assert_close(solver, steps[0], rtol=0, atol=1e-12)


def test_one_distillation_step_by_hand():
    """Scalar 'networks' (teacher cond 0.3 x, uncond 0.1 x; student theta x; target theta- x), w = 2, L2."""
    param = v_param()
    ab = param.schedule.alphas_cumprod
    theta, theta_target, w, lr, x0_value, noise_value, n = 0.4, 0.45, 2.0, 0.1, 0.5, -1.0, 10
    t, t_prev = 20 * n + 19, 20 * n - 1  # 219 -> 199
    a, s = math.sqrt(ab[t]), math.sqrt(1 - ab[t])
    a_prev, s_prev = math.sqrt(ab[t_prev]), math.sqrt(1 - ab[t_prev])

    def scalings(step):
        scaled = 10.0 * step
        return 0.25 / (scaled**2 + 0.25), scaled / math.sqrt(scaled**2 + 0.25)

    x_t = a * x0_value + s * noise_value
    skip, out = scalings(t)
    f_student = skip * x_t + out * (a * x_t - s * theta * x_t)
    guided = 0.1 * x_t + (1 + w) * (0.3 - 0.1) * x_t  # u + (1 + w)(c - u)
    x_prev = a_prev * (a * x_t - s * guided) + s_prev * (a * guided + s * x_t)
    skip_prev, out_prev = scalings(t_prev)
    f_target = skip_prev * x_prev + out_prev * (a_prev * x_prev - s_prev * theta_target * x_prev)
    expected_loss = (f_student - f_target) ** 2
    expected_grad = 2 * (f_student - f_target) * out * (-s * x_t)

    student, target = Scale(theta), Scale(theta_target)

    def teacher(x, t_, text):
        return (0.1 + 0.2 * text.mean()) * x  # text = ones -> 0.3 x, zeros -> 0.1 x

    shape = (1, 1, 1, 1, 1)
    kwargs = {"cond": {"text": torch.ones(1, 1, 1, dtype=F64)}, "uncond": {"text": torch.zeros(1, 1, 1, dtype=F64)},
              "guidance": w, "index": torch.tensor([n]), "noise": torch.full(shape, noise_value, dtype=F64)}
    x0 = torch.full(shape, x0_value, dtype=F64)
    loss, parts = consistency_distillation_loss(student, target, teacher, param, x0, loss="l2", **kwargs)
    assert parts["t"].tolist() == [t] and parts["t_prev"].tolist() == [t_prev]
    assert loss.item() == pytest.approx(expected_loss, rel=1e-6)
    optimizer = torch.optim.SGD(student.parameters(), lr=lr)
    loss.sum().backward()
    assert student.theta.grad.item() == pytest.approx(expected_grad, rel=1e-6)
    optimizer.step()
    assert student.theta.item() == pytest.approx(theta - lr * expected_grad, rel=1e-9)
    update_target_network(target, student, 0.95)
    assert target.theta.item() == pytest.approx(0.95 * theta_target + 0.05 * student.theta.item(), rel=1e-12)
    huber, _ = consistency_distillation_loss(student, target, teacher, param, x0, loss="huber", huber_c=0.001,
                                             **kwargs)
    _, again = consistency_distillation_loss(student, target, teacher, param, x0, loss="l2", **kwargs)
    d = (again["prediction"] - again["target"]).item()
    assert huber.item() == pytest.approx(math.sqrt(d**2 + 1e-6) - 1e-3, rel=1e-6)


def test_distillation_noise_follows_the_recipes_frame_correlation():
    """Without explicit noise the loss draws x_t's noise with ``frame_correlation`` (the teacher's training noise):
    0 is the plain randn stream; 0.9 makes the frames' noise share 90% of its variance."""
    param = v_param()
    x0 = torch.zeros(256, 1, 8, 4, 4, dtype=F64)
    args = (Scale(0.4), Scale(0.4), lambda x, t, text: 0.2 * x, param, x0)
    kwargs = {"cond": {"text": torch.ones(256, 1, 1, dtype=F64)}, "index": torch.full((256,), 49)}  # t = 999
    sigma = math.sqrt(1 - param.schedule.alphas_cumprod[999])

    def drawn(rho):
        _, parts = consistency_distillation_loss(*args, generator=torch.Generator().manual_seed(0),
                                                 frame_correlation=rho, **kwargs)
        return parts["x_t"] / sigma

    plain = drawn(0.0)
    assert torch.allclose(plain, torch.randn(x0.shape, generator=torch.Generator().manual_seed(0), dtype=F64),
                          rtol=1e-9, atol=1e-12)
    for rho, noise in ((0.0, plain), (0.9, drawn(0.9))):
        frames = noise.transpose(1, 2).flatten(2)  # [B, F, C*H*W]
        corr = torch.corrcoef(torch.stack([frames[:, 0].flatten(), frames[:, 1].flatten()]))[0, 1].item()
        assert corr == pytest.approx(rho, abs=0.06)
        assert noise.std().item() == pytest.approx(1.0, abs=0.05)


def test_lcm_sampler_matches_diffusers_lcm_scheduler():
    from diffusers import LCMScheduler

    param = build_diffusion("linear_sd", zero_terminal_snr=True, prediction="v").param
    scheduler = LCMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                             rescale_betas_zero_snr=True, prediction_type="v_prediction")
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == lcm_timesteps(1000, 4).tolist()
    text = torch.randn(2, 3, 8)
    x_T = torch.randn(2, 3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    ours = lcm_sample(toy_model, x_T, param, 4, cond={"text": text}, generator=torch.Generator().manual_seed(7))
    g, x = torch.Generator().manual_seed(7), x_T
    for t in scheduler.timesteps:
        x, denoised = scheduler.step(toy_model(x, t.expand(2), text), t, x, generator=g, return_dict=False)
    torch.testing.assert_close(ours, denoised, rtol=1e-5, atol=1e-5)


def test_deterministic_lcm_sampler_follows_the_trajectory():
    """eta = 0 re-noises with the trajectory's own noise: LCM-2 = one DDIM step 999 -> 499, then f at 499."""
    param = v_param()
    text = torch.randn(2, 3, 8, dtype=F64)
    x_T = torch.randn(2, 3, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    a = lcm_sample(toy_model, x_T, param, 2, cond={"text": text}, eta=0.0, generator=torch.Generator().manual_seed(1))
    b = lcm_sample(toy_model, x_T, param, 2, cond={"text": text}, eta=0.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    t, t_next = torch.tensor([999, 999]), torch.tensor([499, 499])
    x = ddim_solver_step(toy_model, param, x_T, t, t_next, {"text": text})
    x0, _ = x0_and_eps(param, toy_model(x, t_next, text), x, t_next)
    c_skip, c_out = boundary_scalings(t_next, x)
    torch.testing.assert_close(a, c_skip * x + c_out * x0, rtol=0, atol=1e-7)
    fresh = lcm_sample(toy_model, x_T, param, 2, cond={"text": text}, generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(a, fresh)


# ---------------------------------------------------------------------------------------------- the stage
@pytest.fixture(scope="module")
def text_encoder():
    return OpenCLIPTextEncoder("tiny")


def tiny_unet(seed):
    torch.manual_seed(seed)
    unet = UNet3D(**TINY)
    for p in unet.parameters():  # no zero-initialised output layer: every update is visible
        torch.nn.init.normal_(p, std=0.05)
    return unet


def teacher_checkpoint(path, unet, ema=False):
    """A checkpoint in vgen.train's format (UNet state dict + the run config it was built from)."""
    config = {"model": {"unet": {"_target_": "vgen.models.UNet3D", "_convert_": "all", **TINY}},
              "diffusion": {"_target_": "vgen.diffusion.build_diffusion", "schedule": "cosine",
                            "zero_terminal_snr": True, "prediction": "v"}}
    ckpt = {"state_dict": {f"unet.{k}": v for k, v in unet.state_dict().items()}, "global_step": 7,
            "vgen_config": config}
    if ema:
        ckpt["ema"] = {"shadow": {k: v + 1.0 for k, v in unet.state_dict().items()}}
    torch.save(ckpt, path)
    return path


def make_stage(text_encoder, checkpoint, **distill):
    return ConsistencyDistillStage(tiny_unet(1), build_diffusion("cosine", zero_terminal_snr=True, prediction="v"),
                                   IdentityAutoencoder(), text_encoder, teacher={"checkpoint": str(checkpoint)},
                                   distill={"solver_steps": 50, "guidance": 2.0, **distill}, optim={"lr": 1e-3})


def video_batch(b=2):
    g = torch.Generator().manual_seed(0)
    return {"video": torch.rand(b, 3, 2, 8, 8, generator=g) * 2 - 1, "caption": ["a red circle moving left"] * b}


def test_one_stage_step_keeps_the_teacher_and_moves_the_target_by_ema(text_encoder, tmp_path):
    teacher_unet = tiny_unet(0)
    stage = make_stage(text_encoder, teacher_checkpoint(tmp_path / "teacher.ckpt", teacher_unet))
    stage.setup("fit")
    teacher_weights = {k: v.clone() for k, v in teacher_unet.state_dict().items()}
    # student, its EMA, the target and the teacher all start at the teacher's weights
    for net in (stage.unet, stage.target, stage.teacher):
        assert all(torch.equal(v, teacher_weights[k]) for k, v in net.state_dict().items())
    assert all(torch.equal(v, teacher_weights[k]) for k, v in stage.ema.shadow.items())
    # the teacher and target are neither parameters nor submodules of the stage, so no strategy or optimizer sees them
    assert {id(p) for p in stage.parameters()}.isdisjoint(id(p) for p in stage.teacher.parameters())
    assert {id(p) for p in stage.parameters()}.isdisjoint(id(p) for p in stage.target.parameters())
    optimizer = stage.configure_optimizers()["optimizer"]
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for p in stage.unet.parameters()}
    target_before = {k: v.clone() for k, v in stage.target.named_parameters()}

    loss = stage.compute_loss(video_batch())
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert all(p.grad is None for p in stage.teacher.parameters())
    stage.optimizer_step(0, 0, optimizer, lambda: None)  # the optimizer step, then the target update

    student = dict(stage.unet.named_parameters())
    assert any(not torch.equal(student[k], teacher_weights[k]) for k in student), "the student must have moved"
    assert all(torch.equal(v, teacher_weights[k]) for k, v in stage.teacher.state_dict().items())
    for name, param in stage.target.named_parameters():
        torch.testing.assert_close(param, 0.95 * target_before[name] + 0.05 * student[name], rtol=0, atol=1e-7)
    # a step the non-finite guard skips leaves the target where it was
    target_now = {k: v.clone() for k, v in stage.target.named_parameters()}

    def nonfinite_step():  # the closure runs training_step, whose guard marks the step skipped
        stage._skip_nonfinite(torch.tensor(float("nan")))

    stage.optimizer_step(0, 1, optimizer, nonfinite_step)
    assert all(torch.equal(v, target_now[k]) for k, v in stage.target.named_parameters())
    assert stage.nonfinite_steps == 1 and not stage.step_skipped  # cleared after its (skipped) optimizer step
    # checkpoints hold the student (state_dict, EMA) and the target network, never the teacher
    ckpt = {"state_dict": stage.state_dict()}
    stage.on_save_checkpoint(ckpt)
    assert set(ckpt["state_dict"]) == {f"unet.{k}" for k in teacher_weights}
    assert not any("teacher" in key for key in ckpt)
    assert all(torch.equal(v, stage.target.state_dict()[k]) for k, v in ckpt["lcm_target"].items())


def test_teacher_ema_weights_and_bad_teachers_fail_naming_the_key(text_encoder, tmp_path):
    from vgen.config import ConfigError

    teacher_unet = tiny_unet(0)
    stage = make_stage(text_encoder, teacher_checkpoint(tmp_path / "t.ckpt", teacher_unet, ema=True))
    stage.setup("fit")  # teacher.ema null -> the EMA weights, which the checkpoint has
    assert all(torch.equal(v, teacher_unet.state_dict()[k] + 1.0) for k, v in stage.teacher.state_dict().items())
    with pytest.raises(ConfigError, match=r"stage.teacher.checkpoint=.*nope.ckpt: no such file"):
        make_stage(text_encoder, tmp_path / "nope.ckpt").setup("fit")
    other = ConsistencyDistillStage(UNet3D(**{**TINY, "model_channels": 64}),
                                    build_diffusion("cosine", zero_terminal_snr=True, prediction="v"),
                                    IdentityAutoencoder(), text_encoder, teacher={"checkpoint": str(tmp_path / "t.ckpt")})
    with pytest.raises(ConfigError, match=r"model.unet differs from the teacher's UNet in model_channels"):
        other.setup("fit")
    eps = ConsistencyDistillStage(tiny_unet(1), build_diffusion("cosine", zero_terminal_snr=True, prediction="eps"),
                                  IdentityAutoencoder(), text_encoder, teacher={"checkpoint": str(tmp_path / "t.ckpt")})
    with pytest.raises(ConfigError, match=r"diffusion.prediction=eps but the teacher predicts v"):
        eps.setup("fit")
    with pytest.raises(ValueError, match=r"stage.distill.loss must be one of huber, l2"):
        make_stage(text_encoder, tmp_path / "t.ckpt", loss="l1")


def test_released_vgen_weights_as_teacher(text_encoder, tmp_path):
    """A VGen release (.pth in the original key names, no run config) loads strictly into model.unet's architecture."""
    from vgen.checkpoint.original import to_vgen_state_dict
    from vgen.config import ConfigError

    teacher_unet = tiny_unet(0)
    release = tmp_path / "release.pth"
    torch.save(to_vgen_state_dict(teacher_unet), release)
    stage = make_stage(text_encoder, release)
    stage.setup("fit")
    assert all(torch.equal(v, teacher_unet.state_dict()[k]) for k, v in stage.teacher.state_dict().items())
    assert all(torch.equal(v, teacher_unet.state_dict()[k]) for k, v in stage.unet.state_dict().items())
    broken = to_vgen_state_dict(teacher_unet)
    broken.pop(next(iter(broken)))
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ConfigError, match=r"stage.teacher.checkpoint=.*broken.pth: .*missing"):
        make_stage(text_encoder, tmp_path / "broken.pth").setup("fit")


def test_lcm_sampling_of_a_stage_is_deterministic_and_refuses_guidance(text_encoder, tmp_path):
    from vgen.pipeline import VideoPipeline

    stage = make_stage(text_encoder, teacher_checkpoint(tmp_path / "t.ckpt", tiny_unet(0)))
    pipe = VideoPipeline.from_stage(stage)
    assert pipe.sampler == "lcm" and pipe.samplers == ["lcm", "ddim"]
    kwargs = {"num_frames": 2, "height": 8, "width": 8, "seed": 3}
    a = pipe(["a red circle moving left"], steps=2, **kwargs)
    b = pipe(["a red circle moving left"], steps=2, **kwargs)
    assert a.shape == (1, 3, 2, 8, 8) and torch.equal(a, b)
    assert not torch.equal(a, pipe(["a red circle moving left"], steps=1, **kwargs))
    assert not torch.equal(a, pipe(["a red circle moving left"], steps=2, sampler="ddim", **kwargs))
    with pytest.raises(ValueError, match="guidance does not apply to sampler=lcm"):
        pipe(["x"], guidance=3.0, **kwargs)


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "demo"
    subprocess.run([sys.executable, str(REPO / "data_pipelines" / "synthetic.py"), "--out", str(out), "--videos", "64",
                    "--images", "32", "--shard-size", "8"], check=True, capture_output=True)
    return out.parent


def run_training(overrides, output_dir):
    from vgen.train import train

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return train(cfg)


@pytest.mark.slow
def test_distill_a_trained_teacher_resume_and_sample(demo_data, tmp_path):
    from vgen.config import ConfigError
    from vgen.sample import main as sample_main

    common = ["debug=tiny", f"paths.data_dir={demo_data}", f"paths.log_dir={tmp_path}", "data.sources.1.weight=0",
              "data.num_frames=4", "data.resolution=[16,16]", "callbacks.sample_videos.every_n_steps=1000",
              "model.text_encoder.max_length=8"]  # the demo's short captions, for the students too
    run_training(["experiment=demo", "trainer.max_steps=1", *common], tmp_path / "teacher")
    teacher = tmp_path / "teacher" / "checkpoints" / "step0000001.ckpt"
    teacher_bytes = teacher.read_bytes()
    # the student gets the demo teacher's UNet (not the experiment's TF-T2V one)
    distill = ["experiment=videolcm_distill", "model/unet=demo", *common]
    # the teacher has the demo UNet (frame-index encoding in temporal attention): the t2v default is refused
    with pytest.raises(ConfigError, match="model.unet differs from the teacher's UNet in temporal_position"):
        run_training(["experiment=videolcm_distill", *common, f"stage.teacher.checkpoint={teacher}"],
                     tmp_path / "bad")
    with pytest.raises(ConfigError, match="diffusion noise schedule differs from the teacher's"):
        run_training([*distill, f"stage.teacher.checkpoint={teacher}"], tmp_path / "bad")
    distill += ["diffusion=cosine_v_ztsnr", f"stage.teacher.checkpoint={teacher}", "trainer.max_steps=2"]
    run = tmp_path / "student"
    trainer = run_training(distill, run)
    assert trainer.global_step == 2
    first = torch.load(run / "checkpoints" / "step0000002.ckpt", map_location="cpu", weights_only=True)
    assert all(k.startswith("unet.") for k in first["state_dict"]) and "lcm_target" in first
    assert teacher.read_bytes() == teacher_bytes
    resumed = run_training([*distill, "resume=auto", "trainer.max_steps=3"], run)
    assert resumed.global_step == 3
    last = torch.load(run / "checkpoints" / "step0000003.ckpt", map_location="cpu", weights_only=True)
    # the resumed run continued the target EMA from the saved one: target_3 = 0.95 target_2 + 0.05 student_3
    for name, value in last["lcm_target"].items():
        expected = 0.95 * first["lcm_target"][name] + 0.05 * last["state_dict"][f"unet.{name}"]
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)

    args = [f"checkpoint={run / 'checkpoints' / 'step0000003.ckpt'}", "prompt=a red circle moving left",
            "num_frames=4", "height=16", "width=16", "sampler=lcm", "steps=4", f"out={tmp_path / 'lcm.mp4'}"]
    assert sample_main(args) == 0
    frames, _ = read_mp4(tmp_path / "lcm.mp4")
    assert frames.shape == (4, 16, 16, 3)
    assert sample_main([*args, "guidance=3"]) == 2
    assert sample_main([f"checkpoint={teacher}", *args[1:]]) == 2, "sampler=lcm needs a distilled checkpoint"


# ---------------------------------------------------------------------------------------------- sharded strategies
def strategy_worker(spec: dict) -> None:
    """``python tests/test_distill.py '<json spec>'``: train in this process (Lightning starts rank 1 from it)."""
    from pathlib import Path

    out = Path(spec["out"])
    run_training([f"paths.log_dir={out.parent}", *spec["overrides"]], out)


def launch_two_ranks(out, overrides):
    import json
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LOCAL_RANK", "RANK", "WORLD_SIZE",
                                                                      "MASTER_"))}
    env.update(WANDB_MODE="offline", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO / "src")]))
    spec = json.dumps({"out": str(out), "overrides": overrides})
    result = subprocess.run([sys.executable, __file__, spec], check=False, cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=900, start_new_session=True)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [
    "fsdp2", "deepspeed_zero3"])
def test_sharded_student_updates_the_target_from_full_weights_and_resumes(strategy, demo_data, tmp_path):
    from vgen.checkpoint.export import load_unet_weights
    from vgen.checkpoint.sharded import deepspeed_metadata

    out = tmp_path / "run"
    common = ["experiment=videolcm_distill", "debug=tiny", f"strategy={strategy}", "trainer.devices=2",
              f"paths.data_dir={demo_data}", "data.sources.1.weight=0", "data.num_frames=4", "data.resolution=[16,16]",
              "callbacks.sample_videos=null", "callbacks.progress=null", "model.unet.dropout=0.0"]
    launch_two_ranks(out, [*common, "trainer.max_steps=2"])
    launch_two_ranks(out, [*common, "trainer.max_steps=3", "resume=auto"])
    first, last = out / "checkpoints" / "step0000002.ckpt", out / "checkpoints" / "step0000003.ckpt"
    assert first.is_dir() and last.is_dir(), "sharded strategies write checkpoint directories"
    targets = []
    for ckpt in (first, last):
        # the client state (step, config, target network) is in DeepSpeed's rank-0 model-states file, or in the
        # metadata file of the DCP checkpoint
        meta = deepspeed_metadata(ckpt) if strategy.startswith("deepspeed") else load_unet_weights(ckpt)[1]
        targets.append(meta["lcm_target"])
    student, _ = load_unet_weights(last)
    assert set(targets[1]) == set(student)
    for name, value in targets[1].items():  # the resumed run moved the saved target towards the gathered student
        torch.testing.assert_close(value, 0.95 * targets[0][name] + 0.05 * student[name], rtol=0, atol=1e-6)
    assert any(not torch.equal(targets[0][k], targets[1][k]) for k in student)


if __name__ == "__main__":
    import json

    strategy_worker(json.loads(sys.argv[1]))
