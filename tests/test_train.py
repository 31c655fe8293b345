"""End-to-end: `python -m vgen.train` composes and trains every experiment at tiny size, writes checkpoints that
`resume=auto` continues from, `vgen.sample` turns them into real mp4 files, `vgen.checkpoint export` writes
safetensors, and bad configs fail with one line naming the key."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from safetensors.torch import load_file

from conftest import CONF_DIR, REPO
from vgen.media import read_mp4

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "demo"
    subprocess.run([sys.executable, str(REPO / "data_pipelines" / "synthetic.py"), "--out", str(out), "--videos", "64",
                    "--images", "32", "--shard-size", "8"], check=True, capture_output=True)
    return out.parent


def run_training(overrides: list[str], output_dir: Path):
    """Compose ``conf/train.yaml`` with overrides and train in this process (as `python -m vgen.train` does)."""
    from vgen.train import train

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # as in @hydra.main, the task sees the config without the hydra node
    return train(cfg)


def fixed_batch_loss(stage, batch, seed=0):
    """Diffusion loss of ``stage`` on ``batch`` at fixed timesteps and noise (no CFG dropout)."""
    g = torch.Generator().manual_seed(seed)
    latents = stage.encode_video(batch["video"])
    t = torch.linspace(50, 950, latents.shape[0]).long()
    noise = torch.randn(latents.shape, generator=g)
    with torch.no_grad():
        return stage.diffusion.loss(stage.unet, latents, {"text": stage.encode_text(batch["caption"])}, t=t,
                                    noise=noise).mean().item()


def test_loss_decreases_on_the_demo_data(demo_data, tmp_path):
    from hydra.utils import instantiate

    overrides = tiny_overrides("demo", demo_data, tmp_path, "model/vae=identity", "model.unet.in_channels=3",
                               "model.unet.out_channels=3", "trainer.max_steps=40", "optim.lr=2e-3",
                               "optim.warmup_steps=5", "data.sources.1.weight=0", "stage.ema.enabled=false")
    trainer = run_training(overrides, tmp_path / "run")
    trained = trainer.lightning_module.cpu()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    torch.manual_seed(123)
    untrained = instantiate(cfg.stage)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    before, after = fixed_batch_loss(untrained, batch), fixed_batch_loss(trained, batch)
    assert after < 0.6 * before, f"loss {before:.4f} -> {after:.4f}"


def tiny_overrides(experiment, data_dir, log_dir, *extra):
    # 8 video and 4 image shards, as conf/data/demo.yaml expects
    return [f"experiment={experiment}", "debug=tiny", f"paths.data_dir={data_dir}", f"paths.log_dir={log_dir}",
            *extra]


def cli(*args, cwd=REPO, env=None):
    env = {**os.environ, "WANDB_MODE": "offline", **(env or {})}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600, check=False)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_trains_two_steps_at_tiny_size(experiment, demo_data, tmp_path):
    trainer = run_training(tiny_overrides(experiment, demo_data, tmp_path), tmp_path / "run")
    assert trainer.global_step == 2
    ckpts = list((tmp_path / "run" / "checkpoints").glob("*.ckpt"))
    assert [p.name for p in ckpts] == ["step0000002.ckpt"]


@pytest.fixture(scope="module")
def trained(demo_data, tmp_path_factory):
    """Tiny t2v and i2v runs of 2 steps, then resumed to 4 with resume=auto."""
    runs = {}
    for experiment in ("demo", "demo_i2v"):
        out = tmp_path_factory.mktemp(experiment) / "run"
        run_training(tiny_overrides(experiment, demo_data, out.parent), out)
        trainer = run_training(tiny_overrides(experiment, demo_data, out.parent, "resume=auto",
                                              "trainer.max_steps=4"), out)
        runs[experiment] = (out, trainer)
    return runs


def test_resume_auto_continues_from_the_last_checkpoint(trained):
    out, trainer = trained["demo"]
    assert trainer.global_step == 4
    assert sorted(p.name for p in (out / "checkpoints").glob("*.ckpt")) == ["step0000002.ckpt", "step0000004.ckpt"]
    ckpt = torch.load(out / "checkpoints" / "step0000004.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4
    first = torch.load(out / "checkpoints" / "step0000002.ckpt", map_location="cpu", weights_only=True)
    assert first["global_step"] == 2
    changed = [k for k in first["state_dict"] if not torch.equal(first["state_dict"][k], ckpt["state_dict"][k])]
    assert changed, "steps 3-4 must have updated the weights"
    # losses were logged for steps 3 and 4 only in the resumed run
    with open(max((out / "csv").glob("version_*/metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    assert {int(r["step"]) for r in rows if r.get("train/loss")} == {2, 3}


@pytest.mark.parametrize("experiment", ["demo", "demo_i2v"])
def test_sample_writes_decodable_mp4(trained, experiment, tmp_path):
    from vgen.sample import main

    out, _ = trained[experiment]
    args = [f"checkpoint={out / 'checkpoints' / 'step0000004.ckpt'}", "prompt=a red circle moving left",
            "num_frames=5", "height=16", "width=24", "steps=2", "guidance=3.0", "seed=1", "fps=8",
            f"out={tmp_path / 'v.mp4'}"]
    if experiment == "demo_i2v":
        from PIL import Image

        Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "first.png")
        assert main(args) == 2, "an i2v checkpoint without image= must be refused"
        args.append(f"image={tmp_path / 'first.png'}")
    assert main(args) == 0
    frames, fps = read_mp4(tmp_path / "v.mp4")
    assert frames.shape == (5, 16, 24, 3) and fps == 8
    if experiment == "demo":  # upscale=k: each pixel a k x k block
        from vgen.media import upscale_frames

        big_path = tmp_path / "big.mp4"
        assert main([*args[:-1], f"out={big_path}", "upscale=3"]) == 0
        assert read_mp4(big_path)[0].shape == (5, 48, 72, 3)
        small = np.arange(2 * 2 * 3 * 3, dtype=np.uint8).reshape(2, 2, 3, 3)
        big = upscale_frames(small, 3)
        assert big.shape == (2, 6, 9, 3) and (big[:, 4, 7] == small[:, 1, 2]).all() and (big[:, ::3, ::3] == small).all()
        for bad in ("upscale=0", "upscale=two", "upscale=1000"):
            assert main([*args, bad]) == 2


def _checksums(folder: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*")
            if p.is_file()}


@pytest.mark.parametrize("arguments,needle", [
    (["steps=0"], "steps=0: expected an integer in [1, 1000]"),
    (["steps=-5"], "steps=-5: expected an integer"),
    (["steps=100000000"], "steps=100000000: expected an integer in [1, 1000]"),
    (["steps=abc"], "steps=abc: expected an integer"),
    (["guidance=nan"], "guidance=nan: expected a number"),
    (["image={corrupt}", "i2v"], "not a readable image"),
    (["image={png}"], "text-to-video model (no condition reads an image); drop image="),
    (["out={existing}"], "file exists (pass overwrite=true to replace it)"),
    (["out={existing_txt}"], "the output must be an .mp4 file"),
    (["out={under_file}"], "is a file, not a directory"),
    (["sampler=lcm"], "sampler=lcm: not available for this checkpoint"),
    (["checkpoint={corrupt}"], "not a readable checkpoint"),
])
def test_sample_refuses_bad_arguments_with_one_line_and_touches_nothing(trained, arguments, needle, tmp_path, capsys):
    from PIL import Image

    from vgen.sample import main

    out, _ = trained["demo_i2v" if "i2v" in arguments else "demo"]
    files = tmp_path / "files"
    files.mkdir()
    (files / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 10)
    Image.new("RGB", (16, 16), (200, 30, 30)).save(files / "first.png")
    (files / "existing.mp4").write_bytes(b"an old video")
    (files / "notes.txt").write_text("my notes")
    paths = {"corrupt": files / "corrupt.png", "png": files / "first.png", "existing": files / "existing.mp4",
             "existing_txt": files / "notes.txt", "under_file": files / "notes.txt" / "v.mp4"}
    before = {**_checksums(files), **{f"ckpt/{k}": v for k, v in _checksums(out / "checkpoints").items()}}
    args = {"checkpoint": str(out / "checkpoints" / "step0000004.ckpt"), "prompt": "a red circle", "steps": "2",
            "num_frames": "2", "out": str(files / "new.mp4")}
    for item in (a for a in arguments if a != "i2v"):
        key, _, value = item.format(**paths).partition("=")
        args[key] = value
    capsys.readouterr()
    assert main([f"{k}={v}" for k, v in args.items()]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vgen.sample: error: ") and needle in err, err
    assert "Traceback" not in err and "weights_only" not in err
    after = {**_checksums(files), **{f"ckpt/{k}": v for k, v in _checksums(out / "checkpoints").items()}}
    assert after == before and not (files / "new.mp4").exists()


def test_sample_overwrites_only_when_asked_and_the_cli_prints_one_line(trained, tmp_path):
    out, _ = trained["demo"]
    target = tmp_path / "v.mp4"
    target.write_bytes(b"an old video")
    args = [f"checkpoint={out / 'checkpoints' / 'step0000004.ckpt'}", "prompt=a red circle", "steps=2",
            "num_frames=2", f"out={target}"]
    result = cli("vgen.sample", *args)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and "file exists" in result.stderr
    assert target.read_bytes() == b"an old video"
    assert cli("vgen.sample", *args, "overwrite=true").returncode == 0
    assert read_mp4(target)[0].shape[0] == 2


def test_the_pipeline_from_python_in_three_lines(trained, tmp_path):
    """The README's Python sampling example."""
    from vgen import VideoPipeline

    out, _ = trained["demo"]
    pipe = VideoPipeline.from_checkpoint(out / "checkpoints" / "step0000004.ckpt")
    path = pipe.save(pipe("a red circle moving left", steps=2), tmp_path / "left.mp4")
    frames, _ = read_mp4(path)
    assert frames.shape[0] == pipe.defaults["num_frames"]


def test_checkpoint_export_model_and_ema(trained, tmp_path):
    out, _ = trained["demo"]
    ckpt = out / "checkpoints" / "step0000004.ckpt"
    raw = tmp_path / "model.safetensors"
    ema = tmp_path / "ema.safetensors"
    assert cli("vgen.checkpoint", "export", str(ckpt), str(raw)).returncode == 0
    assert cli("vgen.checkpoint", "export", str(ckpt), str(ema), "--ema").returncode == 0
    model_w, ema_w = load_file(str(raw)), load_file(str(ema))
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert set(model_w) == {k[len("unet."):] for k in state}
    assert all(torch.equal(model_w[k], state["unet." + k]) for k in model_w)
    assert any(not torch.equal(model_w[k], ema_w[k]) for k in model_w), "EMA weights must differ after 4 steps"
    i2v, _ = trained["demo_i2v"]
    original = tmp_path / "original.safetensors"
    assert cli("vgen.checkpoint", "export", str(i2v / "checkpoints" / "step0000004.ckpt"), str(original),
               "--original-keys").returncode == 0
    names = set(load_file(str(original)))
    assert {"context_embedding.0.weight", "fps_embedding.0.weight", "local_image_concat.0.weight",
            "local_temporal_encoder.layers.0.0.norm.weight", "local_image_embedding.0.weight"} <= names
    assert not any(k.startswith("conditions.") for k in names)


@pytest.mark.parametrize("override,needle", [
    ("model/unet=nope", "model/unet"),
    ("data.batch_size=-1", "data.batch_size"),
    ("paths.data_dir=/nonexistent/vgen-data", "data.sources[0].urls"),
    ("model.unet.conditions.text.dropout=1.5", "model.unet.conditions.text"),
    ("stage.conditioning.p_zero=0.1", "stage.conditioning.p_zero"),
    ("trainer.max_step=3", "trainer.max_step"),
])
def test_bad_overrides_fail_with_one_line_naming_the_key(override, needle, demo_data, tmp_path):
    result = cli("vgen.train", "experiment=demo", "debug=tiny", f"paths.log_dir={tmp_path}",
                 f"paths.data_dir={demo_data}", override)
    assert result.returncode != 0
    assert needle in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
