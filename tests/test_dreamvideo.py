"""DreamVideo's stages (vgen.stages.DreamVideoStage) at tiny size: what trains and what stays bit-identical, the
checkpoints (only what trained, with their base named), the masked loss, resume, composition at sampling, and
2-rank DDP / FSDP2 runs that match one process."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from helpers import reinit_by_name, run_training

SIZE = 16


class Snapshot(L.Callback):
    """Keeps a copy of every UNet and text-encoder tensor at the start of fitting (after init and adapters)."""

    last: dict | None = None

    def on_fit_start(self, trainer, pl_module):
        Snapshot.last = {
            "unet": {k: v.detach().clone() for k, v in pl_module.unet.state_dict().items()},
            "text": {k: v.detach().clone() for k, v in pl_module.text_encoder.state_dict().items()},
            "placeholder": None if getattr(pl_module.text_encoder, "placeholder", None) is None
            else pl_module.text_encoder.placeholder.embedding.detach().clone(),
        }


def _shape(kind: str, center, radius: float, size: int) -> np.ndarray:
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    d = np.hypot(xs - center[0], ys - center[1])
    mask = (d < radius) & (d > radius * 0.5) if kind == "ring" else d < radius
    frame = np.full((size, size, 3), 20, np.uint8)
    frame[mask] = (230, 40, 40)
    return frame, mask


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """4 subject images with masks/ (a ring) and 2 captioned motion videos."""
    from vgen.media import write_mp4

    root = tmp_path_factory.mktemp("dreamvideo")
    subject, motion = root / "subject", root / "motion"
    (subject / "masks").mkdir(parents=True)
    motion.mkdir()
    for i in range(4):
        frame, mask = _shape("ring", (8 + 3 * i, 14), 6, 32)
        Image.fromarray(frame).save(subject / f"img{i}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(subject / "masks" / f"img{i}.png")
    for i in range(2):
        frames = np.stack([_shape("disc", (6 + 2 * t, 6 + 2 * t + i), 5, 32)[0] for t in range(8)])
        write_mp4(frames, motion / f"clip{i}.mp4", fps=8)
        (motion / f"clip{i}.txt").write_text("a red disc moving")
    return {"subject": subject, "motion": motion}


def _overrides(experiment: str, log_dir: Path, *extra: str) -> list[str]:
    return [f"experiment={experiment}", "debug=tiny", f"paths.log_dir={log_dir}", "data=folder",
            "~data.image_batch_size", f"data.resolution=[{SIZE},{SIZE}]", "data.num_workers=0",
            "+callbacks.snapshot._target_=test_dreamvideo.Snapshot", *extra]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny base UNet with every weight non-zero (a random init's zero output conv would give the adapters no
    gradient), as a vgen checkpoint that stage.init.path names; the same trunk for every DreamVideo experiment."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    GlobalHydra.instance().clear()
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=dreamvideo_subject_step1", "debug=tiny"])
    unet = instantiate(cfg.model.unet)
    reinit_by_name(unet)
    path = tmp_path_factory.mktemp("base") / "base.ckpt"
    torch.save({"state_dict": {f"unet.{k}": v for k, v in unet.state_dict().items()}}, path)
    return path


def _ckpt(run: Path, step: int) -> dict:
    return torch.load(run / "checkpoints" / f"step{step:07d}.ckpt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def step1(folders, base, tmp_path_factory):
    out = tmp_path_factory.mktemp("step1")
    run = out / "dreamvideo_subject_step1"
    trainer = run_training(_overrides("dreamvideo_subject_step1", out, f"data.root={folders['subject']}",
                                      "data.num_frames=1", "data.caption=a *", f"stage.init.path={base}",
                                      "stage.masked_loss=true", "trainer.max_steps=3", "optim.lr=1e-2"), run)
    return run, trainer, Snapshot.last


def test_textual_inversion_trains_only_the_word(step1, base):
    run, trainer, before = step1
    stage = trainer.lightning_module
    # every UNet and text-encoder tensor is bit-identical; only the placeholder's own row moved
    assert all(torch.equal(v, before["unet"][k]) for k, v in stage.unet.state_dict().items())
    text = stage.text_encoder.state_dict()
    frozen = {k for k in text if not k.startswith("placeholder.")}
    assert frozen and all(torch.equal(text[k], before["text"][k]) for k in frozen)
    assert not torch.equal(stage.text_encoder.placeholder.embedding, before["placeholder"])
    # it started from "dog"'s row
    dog = stage.text_encoder.token_embedding.weight[stage.text_encoder._base_tokenizer.encode("dog")[0]]
    assert torch.equal(before["placeholder"], dog)
    ckpt = _ckpt(run, 3)
    assert set(ckpt["state_dict"]) == {"text_encoder.placeholder.embedding"}, "only what trained is saved"
    assert ckpt["base_weights"]["path"] == str(base)
    assert ckpt["placeholder"]["token"] == "*"
    assert torch.equal(ckpt["placeholder"]["embedding"], stage.text_encoder.placeholder.embedding.detach())


def test_textual_inversion_resumes_bit_exactly(step1, folders, base, tmp_path):
    """2 steps, then resume=auto to 3: the same word (and optimizer state) as 3 steps straight."""
    _, straight, _ = step1
    common = _overrides("dreamvideo_subject_step1", tmp_path, f"data.root={folders['subject']}", "data.num_frames=1",
                        "data.caption=a *", f"stage.init.path={base}", "stage.masked_loss=true", "optim.lr=1e-2")
    run = tmp_path / "dreamvideo_subject_step1"
    run_training([*common, "trainer.max_steps=2"], run)
    resumed = run_training([*common, "trainer.max_steps=3", "resume=auto"], run)
    assert resumed.global_step == 3
    assert torch.equal(resumed.lightning_module.text_encoder.placeholder.embedding,
                       straight.lightning_module.text_encoder.placeholder.embedding)


def test_the_stage_weights_its_loss_by_the_subject_mask(step1, folders):
    """The stage's loss is the diffusion loss with the batch's subject mask at latent size as ``loss_mask``
    (:func:`vgen.diffusion.loss.latent_mask`; that it ignores the target outside the mask is tested in
    test_diffusion_mask.py); without ``masked_loss`` it is the plain loss, and a batch without masks is refused."""
    from vgen.data.folder import FolderDataModule
    from vgen.diffusion.loss import latent_mask

    _, trainer, _ = step1
    stage = trainer.lightning_module
    data = FolderDataModule(str(folders["subject"]), caption="a *", num_frames=1, resolution=(SIZE, SIZE),
                            batch_size=2, num_workers=0)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert 0 < batch["subject_mask"].mean() < 1

    def seeded(fn):
        torch.manual_seed(0)
        with torch.no_grad():
            return fn()

    masked = seeded(lambda: stage.compute_loss(batch))
    def by_hand():
        latents = stage.batch_latents(batch)
        conditions = stage.training_conditions(batch, latents)
        mask = latent_mask(batch["subject_mask"], latents)
        return stage.diffusion.loss(stage.unet, latents, conditions, loss_mask=mask).mean()

    expected = seeded(by_hand)
    assert masked == expected
    stage.masked_loss = False
    try:
        assert seeded(lambda: stage.compute_loss(batch)) != masked
    finally:
        stage.masked_loss = True
    with pytest.raises(ValueError, match="subject_mask"):
        stage.compute_loss({k: v for k, v in batch.items() if k != "subject_mask"})


@pytest.fixture(scope="module")
def step2(folders, base, step1, tmp_path_factory):
    out = tmp_path_factory.mktemp("step2")
    run = out / "dreamvideo_subject_step2"
    word = step1[0] / "checkpoints" / "step0000003.ckpt"
    trainer = run_training(_overrides("dreamvideo_subject_step2", out, f"data.root={folders['subject']}",
                                      "data.num_frames=1", "data.caption=a *", f"stage.init.path={base}",
                                      f"stage.placeholder.path={word}", "trainer.max_steps=3", "optim.lr=1e-2"),
                           run)
    return run, trainer, Snapshot.last


def test_identity_adapter_trains_alone_on_the_learned_word(step1, step2):
    run, trainer, before = step2
    stage = trainer.lightning_module
    names = set(stage.adapters["identity"].parameter_names(stage.unet))
    state = stage.unet.state_dict()
    assert names and all(torch.equal(state[k], before["unet"][k]) for k in state if k not in names)
    assert any(not torch.equal(state[k], before["unet"][k]) for k in names)
    learned = _ckpt(step1[0], 3)["placeholder"]["embedding"]
    assert torch.equal(stage.text_encoder.placeholder.embedding.detach(), learned), "the word is frozen in step 2"
    ckpt = _ckpt(run, 3)
    assert set(ckpt["state_dict"]) == {f"unet.{k}" for k in names} | {"text_encoder.placeholder.embedding"}


@pytest.fixture(scope="module")
def motion(folders, base, tmp_path_factory):
    out = tmp_path_factory.mktemp("motion")
    common = [f"data.root={folders['motion']}", "data.num_frames=4", "data.sample_fps=4", "data.batch_size=2",
              f"stage.init.path={base}", "optim.lr=1e-2", "model.unet.conditions.appearance.dropout=1.0",
              "callbacks.checkpoint.every_n_train_steps=2", "callbacks.checkpoint.save_top_k=-1"]
    straight = run_training(_overrides("dreamvideo_motion", out / "a", *common, "trainer.max_steps=4"), out / "a" / "r")
    before = Snapshot.last
    run_training(_overrides("dreamvideo_motion", out / "b", *common, "trainer.max_steps=2"), out / "b" / "r")
    resumed = run_training(_overrides("dreamvideo_motion", out / "b", *common, "trainer.max_steps=4", "resume=auto"),
                           out / "b" / "r")
    return straight, resumed, before


def test_motion_adapters_train_alone_and_a_dropped_appearance_gets_no_gradient(motion):
    straight, _, before = motion
    stage = straight.lightning_module
    names = set(stage.adapters["motion"].parameter_names(stage.unet))
    state = stage.unet.state_dict()
    assert names and all(torch.equal(state[k], before["unet"][k]) for k in state if k not in names)
    # p_image_zero = 1 with drop_to zeros (VGen): W_c never gets a gradient; its bias and the bottlenecks do
    projections = [k for k in names if "condition_linear.weight" in k]
    assert projections and all(torch.equal(state[k], before["unet"][k]) for k in projections)
    others = [k for k in names if "condition_linear.weight" not in k]
    assert any(not torch.equal(state[k], before["unet"][k]) for k in others)


def test_motion_stage_resumes_bit_exactly(motion):
    straight, resumed, _ = motion
    assert resumed.global_step == straight.global_step == 4
    a, b = straight.lightning_module.unet.state_dict(), resumed.lightning_module.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sampling_composes_motion_and_subject_with_appearance_and_inversion(step2, motion, folders, tmp_path):
    from vgen.data.video import decode_video
    from vgen.pipeline import VideoPipeline
    from vgen.sample import main

    straight = motion[0]
    motion_ckpt = Path(straight.default_root_dir) / "checkpoints" / "step0000004.ckpt"
    subject_ckpt = step2[0] / "checkpoints" / "step0000003.ckpt"
    pipe = VideoPipeline.from_checkpoint(motion_ckpt)
    assert list(pipe.adapters) == ["motion"] and pipe.text_encoder.placeholder is None
    assert pipe.add_adapters(subject_ckpt) == ["identity"]
    assert torch.equal(pipe.text_encoder.placeholder.embedding.detach(),
                       _ckpt(step2[0], 3)["placeholder"]["embedding"])
    image = tmp_path / "ref.png"
    Image.fromarray(_shape("ring", (16, 16), 6, 32)[0]).save(image)
    out = tmp_path / "v.mp4"
    assert main([f"motion={motion_ckpt}", f"subject={subject_ckpt}", "prompt=a * moving", f"appearance_image={image}",
                 "appearance_strength=1.0", "appearance_strength_uncond=0.5", f"start_video={folders['motion']}/clip0.mp4",
                 "inversion_strength=0.5", "num_frames=4", "steps=2", f"out={out}"]) == 0
    assert decode_video(out.read_bytes(), 4, sample_fps=8, start="first").frames.shape == (4, SIZE, SIZE, 3)
    # the appearance image steers the motion adapters: another image gives another video
    emb = pipe.image_encoder(torch.zeros(1, 3, SIZE, SIZE)).reshape(1, 1, -1)
    kwargs = {"num_frames": 4, "steps": 2, "seed": 0}
    with_image = pipe(["a * moving"], conditions={"appearance": emb}, **kwargs)
    other = pipe(["a * moving"], conditions={"appearance": emb + 1}, **kwargs)
    assert not torch.equal(with_image, other)


def test_a_stage_that_trains_nothing_is_refused(folders, tmp_path):
    with pytest.raises(ValueError, match="trains nothing"):
        run_training(_overrides("dreamvideo_subject_step1", tmp_path, f"data.root={folders['subject']}",
                                "data.num_frames=1", "data.caption=a dog", "stage.placeholder.train=false",
                                "stage.placeholder.token=null"),
                     tmp_path / "r")


# ------------------------------------------------------------------ 2 ranks (DDP, FSDP2) match one process
@pytest.mark.slow
def test_dreamvideo_trains_under_ddp_and_fsdp2_as_in_one_process(tmp_path):
    """The textual-inversion word, identity and motion adapters trained together on 2 CPU ranks (synthetic data,
    the word "circle" of its captions as the placeholder) give one process's losses and trained tensors; under
    FSDP2 the unsharded word's gradient is averaged over the ranks by the stage."""
    from hydra.utils import instantiate
    from safetensors.torch import load_file

    from test_strategies import BASE, compose_config, launch, mean_losses

    overrides = ["experiment=dreamvideo_motion", *BASE, "stage.placeholder.token=circle",
                 "stage.placeholder.train=true", "+model/adapter@stage.adapters.identity=dreamvideo_identity",
                 "model.unet.conditions.appearance.dropout=0.0", "model.unet.conditions.appearance.frame=first",
                 "stage.ema.enabled=false"]  # BASE's lr 1e-3 (see test_strategies on AdamW and near-zero gradients)
    cfg = compose_config(tmp_path / "probe", overrides)
    unet = instantiate(cfg.model.unet)
    reinit_by_name(unet)
    base = tmp_path / "base.ckpt"
    torch.save({"state_dict": {f"unet.{k}": v for k, v in unet.state_dict().items()}}, base)
    overrides += [f"stage.init.path={base}", "trainer.max_steps=3"]
    dumps = {}
    for strategy, devices, batch in (("auto", 1, 4), ("ddp", 2, 2), ("fsdp2", 2, 2)):
        out = tmp_path / strategy
        launch(out, [*overrides, f"strategy={strategy}", f"trainer.devices={devices}"],
               {"tag": strategy, "nan_step": None, "dump": True}, data={"batch_size": batch}, timeout=400)
        ckpt = out / "checkpoints" / "step0000003.ckpt"
        assert ckpt.exists()
        dumps[strategy] = (mean_losses(out, strategy, devices), load_file(str(out / f"{strategy}-model.safetensors")),
                           _placeholder(ckpt))
    ref_losses, ref_model, ref_word = dumps["auto"]
    assert len(ref_losses) == 3 and all(math.isfinite(v) for v in ref_losses.values())
    for strategy in ("ddp", "fsdp2"):
        losses, model, word = dumps[strategy]
        for step, loss in ref_losses.items():
            assert losses[step] == pytest.approx(loss, rel=1e-5), (strategy, losses, ref_losses)
        # AdamW moves every weight by up to lr (1e-3) per step whatever its gradient's size: where a gradient is
        # near zero (adapters deep in the tiny net), float-order noise can flip an update's sign; the losses above
        # agree to 1e-5, the weights to half a step
        for k in ref_model:
            torch.testing.assert_close(model[k], ref_model[k], rtol=0, atol=5e-4,
                                       msg=lambda m, k=k, s=strategy: f"{s} {k}: {m}")
        torch.testing.assert_close(word, ref_word, rtol=0, atol=5e-4)
    assert not torch.equal(ref_word, _placeholder_init(cfg)), "the word must have trained"


def _placeholder(ckpt: Path) -> torch.Tensor:
    from vgen.stages.dreamvideo import checkpoint_meta

    return checkpoint_meta(ckpt)["placeholder"]["embedding"]


def _placeholder_init(cfg) -> torch.Tensor:
    from hydra.utils import instantiate

    encoder = instantiate(cfg.model.text_encoder)
    return encoder.token_embedding.weight[encoder._base_tokenizer.encode("circle")[0]].detach()


def test_the_experiments_name_the_released_values():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    conf = Path(__file__).resolve().parents[1] / "conf"
    values = {}
    for name in ("dreamvideo_subject_step1", "dreamvideo_subject_step2", "dreamvideo_motion"):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            values[name] = compose(config_name="train", overrides=[f"experiment={name}"])
    step1, step2, motion = values.values()
    assert step1.stage.placeholder.train and step1.optim.lr == 1e-4 and step1.trainer.max_steps == 3000
    assert step2.optim.lr == 1e-5 and step2.trainer.max_steps == 1000 and "identity" in step2.stage.adapters
    assert motion.optim.lr == 1e-5 and motion.data.num_frames == 32 and "motion" in motion.stage.adapters
    assert motion.model.unet.conditions.text.dropout == 0.5 and motion.model.unet.conditions.appearance.dropout == 0.5
    for cfg in values.values():
        assert cfg.diffusion.prediction == "eps" and cfg.diffusion.schedule == "linear_sd"
        assert cfg.diffusion.offset_noise_strength == 0.1 and not cfg.diffusion.zero_terminal_snr
        assert not cfg.stage.ema.enabled and cfg.stage.conditioning.negative_prompt == ""
