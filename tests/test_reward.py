"""Reward fine-tuning (InstructVideo): the partial DDIM chain and its gradient truncation, segment sampling and
temporal attenuation checked by hand, the reward models, the stage (only LoRA trains, LoRA-only checkpoints), and
train -> resume -> export of `experiment=instructvideo debug=tiny`."""

import math
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from conftest import CONF_DIR
from vgen.checkpoint.original import to_vgen_state_dict
from vgen.diffusion import build_diffusion, ddim_sample
from vgen.models import UNet3D
from vgen.models.lora import LoRA, apply_lora, load_lora, lora_parameter_names, lora_state_dict
from vgen.models.text_encoder import TINY_CLIP, OpenCLIPTextEncoder, build_clip
from vgen.models.vae import IdentityAutoencoder
from vgen.rewards import (
    BrightnessReward,
    CLIPScore,
    ColorReward,
    HPSv2Reward,
    WeightedSum,
    attenuation_weights,
    guided_ddim_step,
    partial_ddim_chain,
    partial_timesteps,
    segment_frame_indices,
    segmental_reward,
)
from vgen.stages.reward import RewardFinetuneStage, export_lora

F64 = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore:stage.init.path is null")


def eps_param():
    return build_diffusion("linear_sd", prediction="eps", init_beta=0.00085, last_beta=0.012).param


class Toy(torch.nn.Module):
    """eps(x, t, text) = theta * x + 0.1 * mean(text) + 1e-4 t: one parameter, text matters (so CFG matters)."""

    def __init__(self, theta=0.3):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor(theta, dtype=F64))
        self.calls: list[tuple[int, bool]] = []

    def forward(self, x, t, text):
        self.calls.append((int(t[0]), torch.is_grad_enabled()))
        shift = 0.1 * text.mean(dim=(1, 2)) + 1e-4 * t.to(F64)
        return self.theta * x + shift.view(-1, 1, 1, 1, 1)


def conditions():
    return {"text": torch.ones(2, 3, 4, dtype=F64)}, {"text": torch.zeros(2, 3, 4, dtype=F64)}


def chain_grad(model, x, k, checkpointing=False):
    cond, uncond = conditions()
    model.theta.grad = None
    out, _ = partial_ddim_chain(model, eps_param(), x, partial_timesteps(1000, 20, 0.6), 50, cond=cond,
                                uncond=uncond, guidance=3.0, grad_steps=k, checkpointing=checkpointing)
    out.square().mean().backward()
    return model.theta.grad.clone(), out.detach()


# ---------------------------------------------------------------------------------------------- the chain
def test_partial_timesteps():
    steps = partial_timesteps(1000, 20, 0.6)
    assert steps.tolist() == list(range(551, 0, -50)) and len(steps) == 12  # t_noi = d(tau D) = 551
    assert partial_timesteps(1000, 20, 0.7).tolist()[0] == 651  # int(0.7 * 20) = 14, not 13
    assert partial_timesteps(1000, 20, 1.0).tolist()[0] == 951
    for tau in (0.0, 0.01, 1.5):
        with pytest.raises(ValueError, match="tau"):
            partial_timesteps(1000, 20, tau)


def test_chain_is_the_tail_of_the_ddim_sampler():
    param, model = eps_param(), Toy()
    cond, uncond = conditions()
    x_T = torch.randn(2, 3, 4, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    states = []
    full = ddim_sample(model, x_T, param, 20, cond=cond, uncond=uncond, guidance_scale=3.0,
                       callback=lambda s: states.append(s["x"]))
    x_551 = states[7]  # after 951, ..., 601
    tail, regulariser = partial_ddim_chain(model, param, x_551, partial_timesteps(1000, 20, 0.6), 50, cond=cond,
                                           uncond=uncond, guidance=3.0, grad_steps=0)
    assert regulariser is None
    torch.testing.assert_close(tail, full, rtol=0, atol=1e-12)


def test_gradient_reaches_the_model_only_through_the_last_k_steps():
    x = torch.randn(2, 3, 4, 4, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    model = Toy()
    grad1, out1 = chain_grad(model, x, 1)
    assert [t for t, grad in model.calls if grad] == [1, 1]  # cond + uncond of the last step only
    assert len(model.calls) == 24  # 12 steps x (cond, uncond)

    # by hand: the first 11 steps without a graph, then one differentiable step from t = 1 to 0
    param, (cond, uncond) = eps_param(), conditions()
    with torch.no_grad():
        x_in, _ = partial_ddim_chain(model, param, x, partial_timesteps(1000, 20, 0.6)[:-1], 50, cond=cond,
                                     uncond=uncond, guidance=3.0, grad_steps=0)
    model.theta.grad = None
    x_out, _ = guided_ddim_step(model, param, x_in, torch.tensor([1, 1]), torch.tensor([0, 0]), cond, uncond, 3.0)
    x_out.square().mean().backward()
    assert torch.equal(grad1, model.theta.grad) and torch.equal(out1, x_out.detach())

    grad2, _ = chain_grad(model, x, 2)
    grad_full, out_full = chain_grad(model, x, 12)
    assert torch.equal(out_full, out1)  # truncation changes gradients, never the forward
    assert abs(grad2 - grad1) > 1e-6 * abs(grad1) and abs(grad_full - grad2) > 1e-6 * abs(grad1)

    model.calls.clear()
    grad_ckpt, _ = chain_grad(model, x, 1, checkpointing=True)
    torch.testing.assert_close(grad_ckpt, grad1, rtol=1e-12, atol=0)
    assert [t for t, grad in model.calls if grad] == [1, 1, 1, 1]  # the last step, and its recomputation in backward


def test_regulariser_is_the_squared_distance_to_the_reference_prediction():
    x = torch.randn(2, 3, 4, 4, 4, generator=torch.Generator().manual_seed(2), dtype=F64)
    param, (cond, uncond) = eps_param(), conditions()
    model, reference = Toy(0.3), Toy(0.25)
    steps = partial_timesteps(1000, 20, 0.6)
    _, same = partial_ddim_chain(model, param, x, steps, 50, cond=cond, uncond=uncond, reference=model)
    assert torch.equal(same, torch.zeros(2, dtype=F64))
    with torch.no_grad():
        x_in, _ = partial_ddim_chain(model, param, x, steps[:-1], 50, cond=cond, uncond=uncond, grad_steps=0)
    _, regulariser = partial_ddim_chain(model, param, x, steps, 50, cond=cond, uncond=uncond, reference=reference)
    # guided outputs differ by (0.3 - 0.25) x_in exactly (the shift is shared), so the penalty is 0.05^2 mean(x^2)
    expected = (0.05 * x_in).pow(2).flatten(1).mean(dim=1)
    torch.testing.assert_close(regulariser, expected, rtol=1e-10, atol=0)
    regulariser.sum().backward()
    assert model.theta.grad is not None and reference.theta.grad is None


# ---------------------------------------------------------------------------------------------- SegVR and TAR
def test_segment_sampling_and_weights_by_hand():
    g = torch.Generator().manual_seed(5)
    indices = segment_frame_indices(3, 16, 4, generator=g)
    local = torch.randint(4, (3, 4), generator=torch.Generator().manual_seed(5))
    assert torch.equal(indices, local + torch.tensor([0, 4, 8, 12]))  # one uniform draw in each 4-frame segment
    many = segment_frame_indices(500, 10, 4, generator=g)  # span 10 // 4 = 2; frames 8, 9 are never scored
    for i in range(4):
        assert set(many[:, i].tolist()) == {2 * i, 2 * i + 1}
    assert segment_frame_indices(2, 1, 4).tolist() == [[0], [0]]  # a still is one segment

    g = torch.tensor([[1, 6, 9, 15]])
    weights = attenuation_weights(g, 16, 1.0)
    expected = [math.exp(-7), math.exp(-2), math.exp(-1), math.exp(-7)]  # exp(-|g - 8|)
    torch.testing.assert_close(weights, torch.tensor([expected]), rtol=1e-6, atol=0)
    torch.testing.assert_close(attenuation_weights(g, 16, 0.5), torch.tensor([expected]) ** 0.5, rtol=1e-6, atol=0)

    # R = (1/S) sum_i w_i r_i with a reward that returns each frame's constant value
    frames = torch.tensor([0.1, 0.2, 0.3, 0.4]).view(1, 1, 4, 1, 1).expand(1, 3, 4, 2, 2)
    reward, scores = segmental_reward(frames, g, 16, ["a cat"], lambda f, c: f.mean(dim=(1, 2, 3)), 1.0)
    assert torch.allclose(scores, torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    by_hand = (0.1 * expected[0] + 0.2 * expected[1] + 0.3 * expected[2] + 0.4 * expected[3]) / 4
    assert reward.item() == pytest.approx(by_hand, rel=1e-6)


# ---------------------------------------------------------------------------------------------- rewards
def test_simple_rewards_and_their_sum():
    red, black = torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4)
    red[:, 0] = 1.0
    both = torch.cat([red, black])
    assert ColorReward([1, 0, 0])(both, ["", ""]).tolist() == pytest.approx([1.0, 2 / 3])
    assert BrightnessReward()(both, ["", ""]).tolist() == pytest.approx([0.299, 0.0])
    total = WeightedSum({"r": ColorReward([1, 0, 0]), "b": BrightnessReward()}, {"r": 1.0, "b": 2.0})
    assert total(both, ["", ""]).tolist() == pytest.approx([1.0 + 0.598, 2 / 3])
    with pytest.raises(ValueError, match="one caption per frame"):
        ColorReward()(both, ["only one"])
    with pytest.raises(ValueError, match="RGB"):
        ColorReward([1, 0])
    with pytest.raises(ValueError, match="same"):
        WeightedSum({"r": ColorReward()}, {"x": 1.0})


def test_clip_score_is_a_differentiable_cosine_and_hpsv2_needs_weights(tmp_path):
    score = CLIPScore(arch="tiny")
    frames = torch.rand(2, 3, 40, 48, requires_grad=True)
    captions = ["a red circle", "a blue square"]
    got = score(frames, captions)
    clip = build_clip(TINY_CLIP, None)  # same seeded init
    resized = torch.nn.functional.interpolate(frames, size=(32, 38), mode="bilinear", antialias=True,
                                              align_corners=False)[:, :, :, 3:35]
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    image = clip.encode_image((resized - mean) / std, normalize=True)
    text = clip.encode_text(score.tokenizer(captions), normalize=True)
    torch.testing.assert_close(got, (image * text).sum(-1), rtol=1e-5, atol=1e-6)
    got.sum().backward()
    assert frames.grad.abs().sum() > 0

    with pytest.raises(ValueError, match="model.reward.weights"):
        HPSv2Reward(weights=None, arch="ViT-H-14")
    torch.save({"state_dict": clip.state_dict(), "epoch": 3}, tmp_path / "HPS_v2.pt")  # the release's layout
    hps = HPSv2Reward(weights=str(tmp_path / "HPS_v2.pt"), arch="tiny")
    torch.testing.assert_close(hps(frames.detach(), captions), got.detach())


# ---------------------------------------------------------------------------------------------- the stage
TINY = {"in_channels": 3, "out_channels": 3, "model_channels": 32, "channel_mult": (1, 2), "num_res_blocks": 1,
        "attention_scales": (1.0,), "head_dim": 16, "init_temporal_heads": 2, "context_dim": 64,
        "decoder_context_dim": 64, "dropout": 0.0}


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    unet = UNet3D(**TINY)
    with torch.no_grad():
        for p in unet.parameters():  # a "trained" base: no zero-initialised output layer
            p.copy_(torch.randn_like(p) * 0.5 / p.shape[-1] ** 0.5)
    return unet


def make_stage(base=None, lora=None, **kwargs):
    """The stage on ``tiny_unet()`` (from the weights file ``base`` when given: checkpoints then name it and hold
    the adapters only)."""
    tuning = {"tau": 0.2, "ddim_steps": 10, "segments": 2, **kwargs.pop("tuning", {})}
    init = {"path": str(base)} if base is not None else None
    return RewardFinetuneStage(tiny_unet(1 if base else 0), build_diffusion("linear_sd", prediction="eps"),
                               IdentityAutoencoder(), OpenCLIPTextEncoder("tiny"), ColorReward([1, 0, 0]),
                               tuning=tuning, optim={"lr": 5e-3, "warmup_steps": 0}, init=init,
                               adapters={"lora": LoRA(**(lora or {}))}, **kwargs)


@pytest.fixture
def base(tmp_path):
    """``tiny_unet()`` saved as an original-format release."""
    path = tmp_path / "base.pth"
    torch.save(to_vgen_state_dict(tiny_unet()), path)
    return path


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"video": torch.rand(2, 3, 4, 8, 8, generator=g) * 2 - 1, "caption": ["a red circle", "a blue square"]}


def test_stage_trains_only_lora_and_a_gradient_step_raises_the_reward(base):
    stage = make_stage(base)
    loaded = stage.unet.state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in tiny_unet().state_dict().items())  # the base file loaded
    names = set(lora_parameter_names(stage.unet))
    params = {id(p): n for n, p in stage.unet.named_parameters()}
    optimizer = stage.configure_optimizers()["optimizer"]
    assert {params[id(p)] for group in optimizer.param_groups for p in group["params"]} == names
    assert set(stage.state_dict()) == {f"unet.{n}" for n in names}  # checkpoints hold the adapters only
    assert set(make_stage().state_dict()) == {f"unet.{n}" for n in stage.unet.state_dict()}  # unnamed base: all
    before = {k: v.clone() for k, v in stage.unet.state_dict().items()}
    rewards = []
    stage.log = lambda name, value, **kw: rewards.append(float(value)) if name == "train/reward" else None

    def loss_at_fixed_draws():
        torch.manual_seed(7)  # same start noise and segment frames every time
        return stage.compute_loss(batch(0))

    loss = loss_at_fixed_draws()
    loss.backward()
    assert all(p.grad is None for n, p in stage.unet.named_parameters() if n not in names)
    assert sum(p.grad.abs().sum() for n, p in stage.unet.named_parameters() if n in names) > 0
    optimizer.step()
    changed = {k for k, v in stage.unet.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= names  # the base UNet is bit-identical

    # a small step against the gradient (through the last DDIM step only) raises the same clips' reward
    grads = [p.grad for p in optimizer.param_groups[0]["params"]]
    norm = torch.sqrt(sum(g.square().sum() for g in grads))
    with torch.no_grad():
        start = loss_at_fixed_draws()
        reward_before = rewards[-1]
        for p, g in zip(optimizer.param_groups[0]["params"], grads):
            p.sub_(0.2 * g / norm)
        end = loss_at_fixed_draws()
    assert end < start and rewards[-1] > reward_before, (reward_before, rewards[-1])


def test_stage_builds_a_graph_for_the_last_k_unet_calls_only():
    stage = make_stage(tuning={"tau": 0.3, "grad_steps": 1, "checkpointing": False})  # chain 201, 101, 1
    calls = []
    stage.unet.register_forward_hook(lambda module, args, out: calls.append((int(args[1][0]), out.requires_grad)))
    stage.log = lambda *a, **k: None
    stage.compute_loss(batch(0)).backward()
    assert calls == [(201, False), (201, False), (101, False), (101, False), (1, True), (1, True)]  # cond, uncond
    lora_grads = [p.grad for n, p in stage.unet.named_parameters() if "lora_up" in n]
    assert all(g is not None for g in lora_grads) and sum(g.abs().sum() for g in lora_grads) > 0


def test_stage_checkpoint_round_trip_and_bad_options(base):
    stage, other = make_stage(base), make_stage(base)
    with torch.no_grad():
        for n, p in stage.unet.named_parameters():
            if "lora_up" in n:
                p.normal_()
    other.load_state_dict(stage.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(lora_state_dict(stage.unet).values(),
                                                 lora_state_dict(other.unet).values()))
    with pytest.raises(KeyError, match="unet.input_blocks.0.0.weight"):
        other.load_state_dict({**stage.state_dict(), "unet.input_blocks.0.0.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="stage.tuning.grad_steps"):
        make_stage(tuning={"grad_steps": 3})  # int(0.2 * 10) = 2 steps
    with pytest.raises(ValueError, match="stage.tuning.sigma"):
        make_stage(tuning={"sigma": 1})
    with pytest.raises(ValueError, match="stage.adapters.lora: lora rank"):
        make_stage(lora={"rank": 0})
    with pytest.raises(ValueError, match="stage.adapters is empty"):
        make_stage().__class__(tiny_unet(), build_diffusion(), IdentityAutoencoder(), OpenCLIPTextEncoder("tiny"),
                               ColorReward([1, 0, 0]))


def test_kl_regulariser_is_logged_and_trained_against():
    stage = make_stage(tuning={"kl_weight": 1.0})
    with torch.no_grad():
        for n, p in stage.unet.named_parameters():
            if "lora_up" in n:
                p.normal_(0, 0.05)
    logged = {}
    stage.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    stage.compute_loss(batch(0)).backward()
    assert logged["train/kl"] > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in stage.unet.named_parameters()
               if "lora_down" in n)


# ---------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_instructvideo_tiny_trains_resumes_and_exports(tmp_path, monkeypatch):
    sys.path.insert(0, str(CONF_DIR.parent / "tests"))
    from test_train import run_training, tiny_overrides

    data = tmp_path / "data"
    import subprocess

    subprocess.run([sys.executable, str(CONF_DIR.parent / "data_pipelines" / "synthetic.py"), "--out",
                    str(data / "demo"), "--videos", "16", "--images", "8", "--shard-size", "2"], check=True,
                   capture_output=True)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=instructvideo", "debug=tiny"])
    base = instantiate(cfg.model.unet)
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.randn_like(p) * 0.5 / p.shape[-1] ** 0.5)
    torch.save(to_vgen_state_dict(base), tmp_path / "base.pth")  # an original-format release
    overrides = tiny_overrides("instructvideo", data, tmp_path / "logs", f"stage.init.path={tmp_path / 'base.pth'}",
                               "data.sources.1.weight=0.5", "optim.lr=1e-3", "optim.warmup_steps=0")
    out = tmp_path / "logs" / "run"
    run_training(overrides, out)
    trainer = run_training([*overrides, "resume=auto", "trainer.max_steps=3"], out)
    assert trainer.global_step == 3
    first = torch.load(out / "checkpoints" / "step0000002.ckpt", map_location="cpu", weights_only=True)
    last = torch.load(out / "checkpoints" / "step0000003.ckpt", map_location="cpu", weights_only=True)
    assert last["adapters"]["lora"]["config"]["rank"] == 4 and last["adapters"]["lora"]["config"]["alpha"] is None
    assert last["base_weights"] == {"path": str(tmp_path / "base.pth"), "format": "auto"}
    assert set(last["state_dict"]) == set(first["state_dict"])
    assert all(".lora_down." in k or ".lora_up." in k for k in last["state_dict"])
    assert any(not torch.equal(first["state_dict"][k], v) for k, v in last["state_dict"].items())

    # vgen.sample brings the adapters onto the base weights the checkpoint names (no training stage is built)
    from vgen.media import read_mp4
    from vgen.sample import main as sample

    video = tmp_path / "iv.mp4"
    args = [f"checkpoint={out / 'checkpoints' / 'step0000003.ckpt'}", "prompt=a red circle moving left", "steps=2",
            "num_frames=3", f"out={video}"]
    assert sample(args) == 0
    assert read_mp4(video)[0].shape[0] == 3
    (tmp_path / "base.pth").rename(tmp_path / "moved.pth")
    assert sample([*args[:-1], f"out={tmp_path / 'gone.mp4'}"]) == 2, "a missing base is named, not a traceback"
    (tmp_path / "moved.pth").rename(tmp_path / "base.pth")

    path = export_lora(out / "checkpoints" / "step0000003.ckpt", tmp_path / "adapter.safetensors")
    fresh = instantiate(cfg.model.unet)
    apply_lora(fresh, rank=4)
    load_lora(fresh, path)
    assert all(torch.equal(v, last["state_dict"][f"unet.{k}"]) for k, v in lora_state_dict(fresh).items())
