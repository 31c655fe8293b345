"""data_pipelines: raw mp4s + captions -> make_shards -> filter -> 2 training steps, and the shared CLI plumbing
(--shard-range, SLURM array slices, resumable reruns), reading video2dataset/img2dataset-style shards."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO
from test_data_resume import write_tar
from vgen.data import decode_video, encode_video
from vgen.data.shardio import task_shards
from vgen.data.synthetic import render_clip, sample_motion

TOOLS = REPO / "data_pipelines"


def tool(name: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a data_pipelines tool as a command, as a user or a SLURM array task would."""
    command = [sys.executable, str(TOOLS / f"{name}.py"), *args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env={**os.environ, **(env or {})},
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def run_tool(name: str, *args: str, capsys=None) -> str:
    """Call a tool's ``main`` in this process (no interpreter start-up); returns what it printed."""
    spec = importlib.util.spec_from_file_location(f"pipeline_{name}", TOOLS / f"{name}.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # --workers pickles its functions
    spec.loader.exec_module(module)
    assert module.main(list(args)) == 0
    return capsys.readouterr().out if capsys is not None else ""


def members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """6 raw videos at 24 or 12 fps (two with a scene cut in the middle, one without a caption), a still image
    and a broken file, with sidecar captions."""
    root = tmp_path_factory.mktemp("raw")
    rng = np.random.default_rng(0)
    for i in range(6):
        clip = render_clip("red", "circle", "right", sample_motion("right", 24, 64, rng), 24, 64)
        if i in (0, 3):
            second = render_clip("blue", "square", "down", sample_motion("down", 24, 64, rng), 24, 64)
            second[..., 1] = 200  # a different background: a hard cut
            clip = np.concatenate([clip, second])
        (root / f"v{i}.mp4").write_bytes(encode_video(clip, fps=12 if i == 5 else 24))
        if i != 4:
            (root / f"v{i}.txt").write_text(f"video number {i}")
    Image.new("RGB", (80, 60), (10, 200, 30)).save(root / "still.jpg")
    (root / "still.txt").write_text("a green still")
    (root / "broken.mp4").write_bytes(b"not a video")
    return root


MAKE = ["--fps", "8", "--size", "32", "--split", "scenes", "--min-clip-seconds", "0.5", "--inputs-per-shard", "3"]


@pytest.fixture(scope="module")
def shards(raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("made")
    run_tool("make_shards", "--input", str(raw), "--out", str(out), *MAKE, "--workers", "2")
    return out


def test_make_shards_cuts_scenes_resamples_and_writes_metadata_and_stats(shards):
    assert sorted(p.name for p in shards.glob("*.tar")) == ["clips-000000.tar", "clips-000001.tar", "clips-000002.tar"]
    clips = {}
    for shard in sorted(shards.glob("*.tar")):
        for name, data in members(shard).items():
            key, extension = name.split(".", 1)
            clips.setdefault(key, {})[extension] = data
    metas = {key: json.loads(m["json"]) for key, m in clips.items()}
    videos = {k: m for k, m in metas.items() if "mp4" in clips[k]}
    by_source = {}
    for key, meta in sorted(videos.items()):
        by_source.setdefault(Path(meta["source"]).name, []).append(meta)
    # v0 and v3 have a cut after 1 s (24 source frames): two 1-s clips of 8 frames at 8 fps; the others one.
    assert {name: len(ms) for name, ms in by_source.items()} == {"v0.mp4": 2, "v1.mp4": 1, "v2.mp4": 1,
                                                                "v3.mp4": 2, "v4.mp4": 1, "v5.mp4": 1}
    assert by_source["v5.mp4"][0]["frames"] == 16 and by_source["v5.mp4"][0]["source_fps"] == 12  # 2 s at 12 fps
    for key, meta in videos.items():
        clip = decode_video(clips[key]["mp4"], meta["frames"], sample_fps=8, start="first")
        assert clip.frames.shape == (meta["frames"], 32, 32, 3) and clip.fps == meta["fps"] == 8
        assert meta["duration"] == meta["frames"] / 8 and meta["motion_score"] > 0
        assert (clips[key].get("txt", b"").decode() or None) == meta["caption"]
    assert by_source["v4.mp4"][0]["caption"] is None and "txt" not in clips[next(
        k for k, m in videos.items() if m["source"].endswith("v4.mp4"))]
    [still] = [m for k, m in metas.items() if "jpg" in clips[k]]
    assert (still["width"], still["height"], still["caption"]) == (42, 32, "a green still")
    stats = json.loads((shards / "stats.json").read_text())
    assert stats["inputs"] == 8 and stats["failed_inputs"] == 1 and "broken.mp4" in next(iter(stats["failures"]))
    assert stats["clips"] == 8 and stats["images"] == 1 and stats["without_caption"] == 1
    assert stats["hours"] == pytest.approx(9 / 3600, abs=1e-6)  # 7 clips of 1 s and one of 2 s


def test_slurm_array_tasks_and_shard_ranges_split_the_work_and_resume(raw, shards, tmp_path, monkeypatch, capsys):
    out = tmp_path / "array"
    tool("make_shards", "--input", str(raw), "--out", str(out), *MAKE,
         env={"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "2"})
    assert sorted(p.name for p in out.glob("*.tar")) == ["clips-000000.tar"]
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    run_tool("make_shards", "--input", str(raw), "--out", str(out), *MAKE)
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == {p.name: p.read_bytes() for p in shards.glob("*.tar")}
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    stamp = (out / "clips-000001.tar").stat().st_mtime_ns
    printed = run_tool("make_shards", "--input", str(raw), "--out", str(out), *MAKE, "--shard-range", "1:3",
                       capsys=capsys)
    assert "wrote 0 of shards 1..2" in printed and (out / "clips-000001.tar").stat().st_mtime_ns == stamp
    for name in ("make_shards", "filter"):
        with pytest.raises(SystemExit):
            run_tool(name, "--help")
        assert "SLURM_ARRAY_TASK_ID" in capsys.readouterr().out


@pytest.mark.parametrize("env,expected", [
    ({}, range(10)),
    ({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "3"}, range(3)),
    ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3"}, range(6, 10)),
    ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "4"}, range(5, 10)),
])
def test_task_shards_slices_the_range_for_array_tasks(env, expected):
    assert task_shards(10, None, env) == expected
    assert task_shards(10, (2, 6), {}) == range(2, 6)
    with pytest.raises(ValueError, match="outside an array of 2 tasks"):
        task_shards(10, None, {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "2"})


def test_make_shards_reads_csv_and_jsonl_lists(raw, tmp_path):
    with open(tmp_path / "list.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "caption"])
        writer.writerow([str(raw / "v1.mp4"), "from the csv"])
        writer.writerow(["still.jpg", ""])
    (raw / "list.jsonl").write_text(json.dumps({"video": "v2.mp4", "text": "from jsonl"}) + "\n")
    for listing, caption in ((tmp_path / "list.csv", "from the csv"), (raw / "list.jsonl", "from jsonl")):
        out = tmp_path / listing.suffix[1:]
        run_tool("make_shards", "--input", str(listing), "--out", str(out), "--fps", "8", "--size", "16",
                 "--clip-seconds", "0.5")
        found = members(out / "clips-000000.tar")
        assert caption in {data.decode() for name, data in found.items() if name.endswith(".txt")}
    (raw / "list.jsonl").unlink()


def test_filter_drops_by_each_bound_and_reads_video2dataset_and_img2dataset_shards(tmp_path):
    wide = np.zeros((8, 20, 60, 3), np.uint8)
    wide[:, :, :, 0] = (np.arange(8) * 30)[:, None, None]  # moving brightness: motion > 0
    still = np.zeros((24, 40, 40, 3), np.uint8)
    buffer = io.BytesIO()
    Image.new("RGB", (300, 200)).save(buffer, format="JPEG")
    # video2dataset-style metadata has no sizes or motion: the filter measures them from the media.
    write_tar(tmp_path / "00000.tar", {
        "a.mp4": encode_video(wide, fps=8), "a.txt": b"wide", "a.json": json.dumps({"url": "http://x/a"}).encode(),
        "b.mp4": encode_video(still, fps=8), "b.txt": b"long and still", "b.json": b'{"caption": "x"}',
        "c.jpg": buffer.getvalue(), "c.txt": b"image", "c.json": json.dumps({"width": 300, "height": 200}).encode(),
        "d.mp4": encode_video(still[:4], fps=8), "d.txt": b"short",
        "e.mp4": encode_video(wide, fps=8), "e.pth": b"refused",
    })
    out = tmp_path / "filtered"
    run_tool("filter", "--input", str(tmp_path / "00000.tar"), "--out", str(out), "--min-duration", "0.9",
         "--min-motion", "0.01", "--max-aspect", "2.5", "--min-short-side", "20")
    kept = members(out / "00000.tar")
    assert sorted(kept) == ["c.jpg", "c.json", "c.txt"]
    assert kept["c.jpg"] == buffer.getvalue()  # copied byte for byte
    stats = json.loads((out / "filter_stats.json").read_text())
    assert stats["kept"] == 1
    assert stats["dropped"] == {"max_aspect": 1, "min_motion": 1, "min_duration": 1, "unsafe_member": 1}


def train_two_steps(tmp_path: Path, overrides: list[str], experiment: str = "demo"):
    """``vgen.train`` of a tiny demo experiment for 2 steps on the given data overrides; returns the trainer."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from conftest import CONF_DIR
    from vgen.train import train

    overrides = [f"experiment={experiment}", "debug=tiny", f"paths.log_dir={tmp_path}", f"paths.data_dir={tmp_path}",
                 "data.sources.1.weight=0", "data.num_frames=4", "data.sample_fps=8", "data.resolution=[16,16]",
                 "trainer.max_steps=2", *overrides]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    cfg.hydra.runtime.output_dir = str(tmp_path / "run")
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    trainer = train(cfg)
    assert trainer.global_step == 2
    assert [p.name for p in (tmp_path / "run" / "checkpoints").glob("*.ckpt")] == ["step0000002.ckpt"]
    return trainer


def test_raw_videos_to_shards_to_filter_to_two_training_steps(shards, tmp_path):
    filtered = tmp_path / "filtered"
    run_tool("filter", "--input", str(shards), "--out", str(filtered), "--min-duration", "0.9",
             "--min-short-side", "32")
    assert json.loads((filtered / "filter_stats.json").read_text())["kept"] == 9  # the still has no duration
    urls = ",".join(f"'{p}'" for p in sorted(filtered.glob("*.tar")))
    train_two_steps(tmp_path, [f"data.sources.0.urls=[{urls}]"])


# the tiny encoders of debug=tiny, at its clip shape (4 frames of 16 x 16 at 8 fps)
ENCODE = ["--vae", "tiny", "--text-encoder", "tiny", "--image-encoder", "tiny", "--frames", "4", "--fps", "8",
          "--width", "16", "--height", "16", "--batch-size", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def latent_shards(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("latents")
    run_tool("encode", "--input", *(str(p) for p in sorted(shards.glob("*.tar"))), "--out", str(out), *ENCODE)
    return out


def test_encoded_latent_shards_train_through_the_same_loader(shards, latent_shards):
    from vgen.data import Bucket, SampleDecoder, VideoDataModule
    from vgen.data.shardio import shard_samples

    out = latent_shards
    stats = json.loads((out / "clips-000001.tar.stats.json").read_text())
    assert stats["encoded"] == 4  # v1, v2 and the 2 scenes of v3
    module = VideoDataModule([{"urls": str(out / "clips-000001.tar"), "type": "latent"}], num_frames=4,
                             resolution=[16, 16], batch_size=3, num_workers=0, shuffle_buffer=0)
    batch = next(iter(module.train_dataloader()))
    assert batch["latent"].shape == (3, 4, 4, 8, 8) and batch["text_embedding"].shape == (3, 77, 64)
    assert "video" not in batch and batch["fps"].tolist() == [8, 8, 8]
    # The stored latents are the VAE mean of exactly the clip the pixel loader decodes (centre window).
    models = sys.modules["pipeline_encode"]._ENCODERS
    raw = {sample["__key__"]: sample for sample in shard_samples(str(shards / "clips-000001.tar"))[0]}
    decoder = SampleDecoder("video", 8, start="center", caption_required=False)
    for index, key in enumerate(batch["key"]):
        video = decoder(raw[key], random.Random(0), Bucket(4, 16, 16, 1))["video"]
        with torch.no_grad():
            expected = models["vae"].encode(video[None], sample=False)[0]
            text = models["text_encoder"]([batch["caption"][index]])[0]
        torch.testing.assert_close(batch["latent"][index], expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(batch["text_embedding"][index], text, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("experiment", ["demo", "demo_i2v"])
def test_training_reads_encoded_latent_shards_without_the_vae(experiment, latent_shards, tmp_path, monkeypatch):
    """demo-style shards -> data_pipelines/encode.py -> a ``type: latent`` source -> 2 ``vgen.train`` steps; the
    VAE never encodes (its decoder still renders the end-of-training sample videos, and the first frames of the
    image-to-video ones)."""
    from vgen.callbacks import SampleVideos
    from vgen.stages.base import DiffusionStage

    monkeypatch.setattr(DiffusionStage, "encode_video", lambda *a, **k: pytest.fail("the VAE encoded a latent batch"))
    urls = ",".join(f"'{p}'" for p in sorted(latent_shards.glob("clips-*.tar")))
    trainer = train_two_steps(tmp_path, [f"data.sources.0.urls=[{urls}]", "data.sources.0.type=latent",
                                         "model.text_encoder.max_length=77"], experiment)  # as the shards' encoder
    [sampler] = [c for c in trainer.callbacks if isinstance(c, SampleVideos)]
    assert sorted(p.name for p in (tmp_path / "run" / "samples").glob("*.mp4")) == [
        f"step_0000002_{i}.mp4" for i in range(len(sampler.prompts))]
