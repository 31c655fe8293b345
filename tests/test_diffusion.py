"""vgen.diffusion against the goldens from the original VGen code (schedules, embedding, DDIM, loss),
plus the behaviours the goldens do not pin down (parameterisation, offset noise, CFG, configs)."""

import json

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import CONF_DIR
from vgen.diffusion import (
    NoiseSchedule,
    Parameterization,
    beta_schedule,
    build_diffusion,
    cosine_sigmas,
    ddim_invert,
    ddim_sample,
    ddim_timesteps,
    diffusion_loss,
    frame_noise,
    guided_output,
    logsnr_cosine_interp_sigmas,
    sample_timesteps,
    sinusoidal_embedding,
    training_noise,
)

SCHEDULES = ["cosine_ztsnr", "cosine_plain", "linear_sd_ztsnr", "linear_sd_plain"]
TOY_CASES = ["v_cosine_ztsnr", "v_linear_sd_ztsnr", "eps_linear_sd_plain"]
CONFIGS = {  # conf/diffusion file -> (golden schedule, prediction)
    "cosine_v_ztsnr": ("cosine_ztsnr", "v"),
    "linear_sd_v_ztsnr": ("linear_sd_ztsnr", "v"),
    "linear_sd_eps": ("linear_sd_plain", "eps"),
}
F64 = torch.float64


@pytest.fixture(scope="module")
def schedules_golden(reference):
    return json.loads((reference / "diffusion_schedules.json").read_text())


@pytest.fixture(scope="module")
def toy_golden(reference):
    meta = json.loads((reference / "diffusion_ddim_toy.json").read_text())
    return meta, load_file(str(reference / "diffusion_ddim_toy.safetensors"))


def toy_model(x, t, y):
    """The closed-form denoiser the goldens were made with: 0.5 x + 0.1 t/1000 + 0.2 y."""
    per_sample = (0.1 * (t / 1000) + 0.2 * y).to(x.dtype)
    return 0.5 * x + per_sample.view(-1, 1, 1, 1, 1)


def golden_param(schedules_golden, schedule_key, prediction):
    spec = schedules_golden[schedule_key]
    kwargs = dict(spec["schedule_param"])
    betas = beta_schedule(spec["schedule"], kwargs.pop("num_timesteps"), **kwargs)
    return Parameterization(NoiseSchedule(betas), prediction)


def max_abs(a, b):
    return (a - torch.as_tensor(b, dtype=a.dtype)).abs().max().item()


@pytest.mark.parametrize("key", SCHEDULES)
def test_beta_schedules_match_golden(schedules_golden, key):
    schedule = golden_param(schedules_golden, key, "v").schedule
    assert schedule.betas.dtype == F64
    assert max_abs(schedule.betas, schedules_golden[key]["betas"]) < 1e-10
    assert max_abs(schedule.alphas_cumprod, schedules_golden[key]["alphas_cumprod"]) < 1e-10


def test_sr600_sigma_schedules(schedules_golden):
    reverse = schedules_golden["sr600_reverse_sigmas_cosine_ztsnr"]["sigmas"]
    assert max_abs(cosine_sigmas(), reverse) < 1e-10
    # The golden is float32 arithmetic; kernel rounding differs by CPU, so allow two float32 ulps.
    forward = logsnr_cosine_interp_sigmas()
    assert max_abs(forward, schedules_golden["sr600_forward_sigmas_logsnr_cosine_interp"]["sigmas"]) < 2.5e-7
    # Why the original's zero-terminal-SNR step on these sigma arrays is a no-op (not implemented).
    assert abs(cosine_sigmas()[-1].item() - 1) < 1e-4 and abs(forward[-1].item() - 1) < 1e-4


@pytest.mark.parametrize("steps", [50, 20, 10, 4])
def test_ddim_timesteps_match_golden(schedules_golden, steps):
    expected = schedules_golden["ddim_timesteps"]["by_num_steps"][str(steps)]
    assert ddim_timesteps(1000, steps).tolist() == expected


def test_sinusoidal_embedding(schedules_golden):
    spec = schedules_golden["sinusoidal_embedding"]
    emb = sinusoidal_embedding(torch.tensor(spec["t"]), spec["dim"])
    assert emb.dtype == torch.float32
    assert max_abs(emb, spec["embedding_float32"]) < 1e-6
    emb64 = sinusoidal_embedding(torch.tensor(spec["t"]), spec["dim"], dtype=F64)
    assert emb64.dtype == F64 and max_abs(emb64.float(), spec["embedding_float32"]) < 1e-4
    odd = sinusoidal_embedding(torch.tensor([3, 7]), 7)
    assert odd.shape == (2, 7) and torch.equal(odd[:, :6], sinusoidal_embedding(torch.tensor([3, 7]), 6))
    assert torch.all(odd[:, 6] == 0)


@pytest.mark.parametrize("dtype, tol", [(F64, 1e-6), (torch.float32, 2e-5)])
@pytest.mark.parametrize("case", TOY_CASES)
def test_ddim_toy_trajectories(schedules_golden, toy_golden, case, dtype, tol):
    meta, tensors = toy_golden
    spec = meta["cases"][case]
    param = golden_param(schedules_golden, spec["schedule"], spec["mean_type"])
    xs, x0s = [], []
    final = ddim_sample(
        toy_model,
        tensors["ddim_noise"].to(dtype),
        param,
        spec["ddim"]["ddim_timesteps"],
        cond={"y": torch.ones(2, dtype=dtype)},
        uncond={"y": torch.zeros(2, dtype=dtype)},
        guidance_scale=spec["ddim"]["guide_scale"],
        eta=spec["ddim"]["eta"],
        callback=lambda step: (xs.append(step["x"]), x0s.append(step["x0"])),
    )
    prefix = f"ddim.{case}.{'fp64' if dtype == F64 else 'fp32'}"
    assert final.dtype == dtype
    assert max_abs(torch.stack(xs), tensors[f"{prefix}.trajectory_xt"]) < tol
    assert max_abs(torch.stack(x0s), tensors[f"{prefix}.trajectory_x0"]) < tol
    assert max_abs(final, tensors[f"{prefix}.final"]) < tol


@pytest.mark.parametrize("case", TOY_CASES)
def test_loss_matches_golden_and_given_noise_gets_no_offset(schedules_golden, toy_golden, case):
    meta, tensors = toy_golden
    spec = meta["cases"][case]
    param = golden_param(schedules_golden, spec["schedule"], spec["mean_type"])
    t = torch.tensor(spec["loss"]["t"])
    x0, noise = tensors["loss_x0"], tensors["loss_noise"]
    assert max_abs(param.q_sample(x0, t, noise), tensors[f"loss.{case}.q_sample"]) < 1e-6
    per_sample = diffusion_loss(
        toy_model,
        param,
        x0,
        {"y": torch.tensor([1.0, 0.0], dtype=F64)},
        t=t,
        noise=noise,
        offset_noise_strength=0.1,
    )
    assert per_sample.shape == (2,)
    assert max_abs(per_sample, tensors[f"loss.{case}.loss_per_sample"]) < 1e-6


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_parameterization_round_trip(prediction):
    param = Parameterization(NoiseSchedule.from_name("linear_sd", zero_terminal_snr=True), prediction)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, 8, generator=gen, dtype=F64), torch.randn(2, 3, 8, generator=gen, dtype=F64)
    t = torch.tensor([5, 700])
    x_t = param.q_sample(x0, t, noise)
    output = param.target(x0, noise, t)  # a perfect network
    torch.testing.assert_close(param.predict_x0(output, x_t, t), x0, rtol=0, atol=1e-10)
    torch.testing.assert_close(param.predict_eps(output, x_t, t), noise, rtol=0, atol=1e-10)


def test_offset_noise_is_constant_over_space_per_sample_channel_frame():
    like = torch.zeros(4, 3, 5, 16, 16)
    base = training_noise(like, 0.0, torch.Generator().manual_seed(1))
    offset = training_noise(like, 0.5, torch.Generator().manual_seed(1)) - base
    assert torch.allclose(offset, offset[..., :1, :1].expand_as(offset), atol=1e-6)
    per_cell = offset[..., 0, 0]
    assert per_cell.std(dim=1).min() > 0 and per_cell.std(dim=2).min() > 0  # varies over channels and frames
    assert 0.35 < per_cell.std().item() < 0.65
    assert abs(base.std().item() - 1) < 0.05


def test_loss_defaults_mask_and_weight():
    param = Parameterization(NoiseSchedule.from_name("cosine", zero_terminal_snr=True), "v")
    x0 = torch.randn(3, 4, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    kwargs = {"y": torch.ones(3)}
    loss = diffusion_loss(toy_model, param, x0, kwargs, generator=torch.Generator().manual_seed(3))
    assert loss.shape == (3,) and torch.all(loss > 0)
    masked = diffusion_loss(toy_model, param, x0, kwargs, loss_mask=torch.zeros_like(x0))
    assert torch.all(masked == 0)
    t, noise = torch.tensor([1, 500, 999]), torch.randn_like(x0)
    plain = diffusion_loss(toy_model, param, x0, kwargs, t=t, noise=noise)
    weighted = diffusion_loss(
        toy_model, param, x0, kwargs, t=t, noise=noise, weight=torch.tensor([0.0, 1.0, 2.0])
    )
    torch.testing.assert_close(weighted, plain * torch.tensor([0.0, 1.0, 2.0]))


def test_cfg_scale_one_equals_cond_only_and_batched_cfg_matches():
    param = Parameterization(NoiseSchedule.from_name("linear_sd"), "eps")
    x_T = torch.randn(2, 4, 3, 4, 5, generator=torch.Generator().manual_seed(4), dtype=F64)
    cond, uncond = {"y": torch.ones(2, dtype=F64)}, {"y": torch.zeros(2, dtype=F64)}
    cond_only = ddim_sample(toy_model, x_T, param, 10, cond=cond)
    scale_one = ddim_sample(toy_model, x_T, param, 10, cond=cond, uncond=uncond, guidance_scale=1.0)
    torch.testing.assert_close(scale_one, cond_only, rtol=0, atol=1e-10)
    t = torch.tensor([10, 900])
    two_calls = guided_output(toy_model, x_T, t, cond, uncond, 9.0)
    torch.testing.assert_close(guided_output(toy_model, x_T, t, cond, uncond, 9.0, batch_cfg=True), two_calls)


def test_eta_adds_seeded_noise():
    param = Parameterization(NoiseSchedule.from_name("linear_sd"), "eps")
    x_T = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(5))
    cond = {"y": torch.ones(1)}

    def run(eta, seed):
        return ddim_sample(
            toy_model, x_T, param, 4, cond=cond, eta=eta, generator=torch.Generator().manual_seed(seed)
        )

    assert torch.equal(run(1.0, 0), run(1.0, 0))
    assert not torch.allclose(run(1.0, 0), run(1.0, 1)) and not torch.allclose(run(1.0, 0), run(0.0, 0))


def test_ddim_with_exact_denoiser_is_exact_and_stops_at_alpha_bar_0():
    """With the exact eps-denoiser of a point-mass data distribution every DDIM step is exact, so sampling
    walks q_sample(center, t, eps) down to t=0 (not to the clean center: the original's last-step quirk) and
    inversion walks it back up to t=T-1."""
    param = Parameterization(NoiseSchedule.from_name("linear_sd"), "eps")
    center = torch.full((1, 4, 2, 3, 3), 0.7, dtype=F64)
    eps = torch.randn(center.shape, generator=torch.Generator().manual_seed(6), dtype=F64)

    def exact_eps(x, t):
        alpha, sigma = param.schedule.scalings(t, x)
        return (x - alpha * center) / sigma

    def at_level(t):
        return param.q_sample(center, torch.tensor([t]), eps)

    torch.testing.assert_close(ddim_sample(exact_eps, at_level(901), param, 10), at_level(0))
    torch.testing.assert_close(ddim_invert(exact_eps, at_level(0), param, 10), at_level(999))


def test_bad_names_raise_with_choices():
    with pytest.raises(ValueError, match=r"'cosin'.*cosine, linear_sd, linear, quadratic"):
        beta_schedule("cosin")
    with pytest.raises(ValueError, match=r"'epsilon'.*eps, v, x0"):
        build_diffusion(schedule="linear_sd", prediction="epsilon")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_configs_instantiate_to_the_golden_schedules(schedules_golden, name):
    path = CONF_DIR / "diffusion" / f"{name}.yaml"
    key_lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    assert all(" # " in line for line in key_lines), f"{path}: every key needs a one-line comment"
    diffusion = instantiate(OmegaConf.load(path))
    golden_key, prediction = CONFIGS[name]
    assert max_abs(diffusion.schedule.alphas_cumprod, schedules_golden[golden_key]["alphas_cumprod"]) < 1e-10
    assert diffusion.param.prediction == prediction
    assert (diffusion.ddim_steps, diffusion.ddim_eta, diffusion.guidance_scale) == (50, 0.0, 9.0)
    assert diffusion.offset_noise_strength == 0.1
    assert diffusion.frame_noise_correlation == 0.0  # the original's i.i.d. noise
    assert diffusion.timestep_shift == 1.0  # the original's uniform training timesteps


def test_uncorrelated_frame_noise_is_the_plain_randn_stream():
    a = frame_noise((2, 3, 4, 5, 5), 0.0, torch.Generator().manual_seed(7))
    assert torch.equal(a, torch.randn((2, 3, 4, 5, 5), generator=torch.Generator().manual_seed(7)))
    plain = training_noise(torch.zeros(2, 3, 4, 5, 5), 0.1, torch.Generator().manual_seed(7))
    assert torch.equal(plain, training_noise(torch.zeros(2, 3, 4, 5, 5), 0.1, torch.Generator().manual_seed(7), 0.0))


@pytest.mark.parametrize("rho", [0.5, 0.8])
def test_mixed_frame_noise_has_unit_variance_and_the_configured_frame_correlation(rho):
    noise = frame_noise((64, 4, 6, 16, 16), rho, torch.Generator().manual_seed(0))
    assert abs(noise.var().item() - 1.0) < 0.02
    frames = noise.permute(2, 0, 1, 3, 4).reshape(6, -1)  # one row per frame
    corr = torch.corrcoef(frames)
    off_diagonal = corr[~torch.eye(6, dtype=torch.bool)]
    assert (off_diagonal - rho).abs().max() < 0.02
    spatial = torch.corrcoef(torch.stack([noise[..., 0, 0].flatten(), noise[..., 0, 1].flatten()]))
    assert abs(spatial[0, 1].item()) < 0.05  # neighbouring pixels stay independent
    images = frame_noise((64, 4, 1, 16, 16), rho, torch.Generator().manual_seed(0))  # one frame: nothing to share
    assert torch.equal(images, torch.randn((64, 4, 1, 16, 16), generator=torch.Generator().manual_seed(0)))


def test_frame_correlation_reaches_training_and_sampling_noise():
    diffusion = build_diffusion(schedule="linear_sd", frame_noise_correlation=0.8, offset_noise_strength=0.0)
    seen = []

    def model(x, t, **kwargs):
        seen.append(x)
        return torch.zeros_like(x)

    x0 = torch.zeros(32, 4, 4, 8, 8)
    diffusion.loss(model, x0, t=torch.full((32,), 999))  # x_t ~ noise at t = T - 1
    noise = diffusion.noise((32, 4, 4, 8, 8), torch.Generator().manual_seed(1))
    for sample in (seen[0] / seen[0].std(), noise):
        corr = torch.corrcoef(sample.permute(2, 0, 1, 3, 4).reshape(4, -1))
        assert (corr[0, 1:] - 0.8).abs().max() < 0.05
    with pytest.raises(ValueError, match="frame_noise_correlation must be in"):
        build_diffusion(frame_noise_correlation=1.0)


def test_timestep_shift_1_is_the_uniform_randint_stream_and_s_moves_draws_to_high_noise():
    uniform = sample_timesteps(1000, 1000, generator=torch.Generator().manual_seed(3))
    assert torch.equal(uniform, torch.randint(0, 1000, (1000,), generator=torch.Generator().manual_seed(3)))
    for shift in (0.5, 4.0):
        t = sample_timesteps(200_000, 1000, generator=torch.Generator().manual_seed(0), shift=shift)
        assert t.dtype == torch.int64 and 0 <= t.min() and t.max() <= 999
        # P(t >= 950) = 1 - u*, where s u* / (1 + (s - 1) u*) = 0.95
        expected = 1 - 0.95 / (shift - 0.95 * (shift - 1))
        assert (t >= 950).double().mean().item() == pytest.approx(expected, abs=0.003)
    seen = []

    def model(x, t, **kwargs):
        seen.append(t)
        return torch.zeros_like(x)

    diffusion = build_diffusion(timestep_shift=4.0)
    torch.manual_seed(0)
    diffusion.loss(model, torch.zeros(20_000, 1, 1, 1, 1))
    assert (seen[0] >= 950).double().mean().item() == pytest.approx(0.174, abs=0.01)
    for bad in (0, -1.0, "4"):
        with pytest.raises(ValueError, match="diffusion.timestep_shift must be a number > 0"):
            build_diffusion(timestep_shift=bad)
