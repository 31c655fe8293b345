"""Every bad input gets one clear line, and nothing is overwritten or silently wrong (issue 18).

Each case runs the command as a user would and checks the exit code, that stderr is exactly one line naming the
argument and the problem (no traceback), and that every file that existed before is unchanged (checksums) and
nothing was created where the case says so. ``vgen.sample``'s own arguments are tested with vgen.sample.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CONF_DIR, REPO
from test_data_resume import UnpicklingWouldWriteAFile, tiny_clip, write_tar

TOOLS = REPO / "data_pipelines"
TINY = ["experiment=demo", "debug=tiny"]


# ---------------------------------------------------------------------------------------------------- helpers
def checksums(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (and the set of directories), to compare before and after."""
    found = {}
    for root in roots:
        if root.is_file():
            found[str(root)] = hashlib.sha256(root.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*")) if root.is_dir() else []:
            found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return found


def command(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def train(*overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return command("-m", "vgen.train", *overrides, timeout=timeout)


def tool(name: str, *args: str) -> subprocess.CompletedProcess:
    return command(str(TOOLS / f"{name}.py"), *args)


def one_error_line(result: subprocess.CompletedProcess, code: int, prog: str, *needles: str) -> str:
    """The single stderr line of a failed command, checked: exit ``code``, ``<prog>: error:``, every needle."""
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    line = lines[0]
    assert line.startswith(f"{prog}: error: "), line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def demo_shards(root: Path, frames: int = 16) -> Path:
    """``root/demo`` with the 8 video and 4 image shards ``conf/data/demo.yaml`` names (one sample each)."""
    subprocess.run([sys.executable, str(TOOLS / "synthetic.py"), "--out", str(root / "demo"), "--videos", "8",
                    "--images", "4", "--shard-size", "1", "--frames", str(frames)], check=True, capture_output=True)
    return root


# ---------------------------------------------------------------------------------------------------- checkpoints
def bad_checkpoints(directory: Path) -> dict[str, Path]:
    """An empty, a random-bytes and a truncated .ckpt, and pickles with a malicious ``__reduce__`` saved with
    torch.save and with plain pickle (protocols 0, 2 and 4); unpickling any of these would create ``pwned``."""
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / "pwned"
    files = {name: directory / f"{name}.ckpt" for name in ("empty", "random", "truncated", "torch_save",
                                                            "pickle0", "pickle2", "pickle4")}
    files["empty"].write_bytes(b"")
    files["random"].write_bytes(np.random.default_rng(0).bytes(4096))
    good = directory / "good.ckpt"
    torch.save({"state_dict": {"unet.w": torch.ones(64)}, "global_step": 1}, good)
    files["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    good.unlink()
    torch.save({"state_dict": {}, "global_step": 1, "x": UnpicklingWouldWriteAFile(marker)}, files["torch_save"])
    for protocol in (0, 2, 4):
        files[f"pickle{protocol}"].write_bytes(pickle.dumps(UnpicklingWouldWriteAFile(marker), protocol=protocol))
    return files


UNREADABLE = {"empty": "empty file (0 bytes)", "random": "neither a torch zip archive nor a complete pickle",
              "truncated": "truncated or corrupt"}
MALICIOUS = ("torch_save", "pickle0", "pickle2", "pickle4")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    return bad_checkpoints(tmp_path_factory.mktemp("ckpt"))


@pytest.mark.parametrize("kind", [*UNREADABLE, *MALICIOUS])
def test_the_checkpoint_loader_names_the_file_in_one_line(kind, checkpoints):
    from vgen.checkpoint.export import load_training_checkpoint, load_unet_weights
    from vgen.checkpoint.safe_load import CheckpointError, load_weights_only

    path = checkpoints[kind]
    before = checksums(path.parent)
    expected = UNREADABLE.get(kind, "not a weights-only checkpoint: refused")
    for load in (load_weights_only, load_training_checkpoint, load_unet_weights):
        with pytest.raises(CheckpointError) as err:
            load(path)
        message = str(err.value)
        assert message.startswith(f"{path}: ") and expected in message and "\n" not in message, message
        assert "weights_only" not in message, "never suggest loading a checkpoint unsafely"
    if kind in MALICIOUS:
        assert "would import and call builtins.open" in message or "io.open" in message, message
    assert checksums(path.parent) == before and not (path.parent / "pwned").exists()


@pytest.mark.parametrize("kind", ["empty", "random", "truncated", "torch_save", "pickle2", "pickle4"])
def test_checkpoint_export_refuses_a_bad_file_in_one_line(kind, checkpoints, tmp_path):
    out = tmp_path / "unet.safetensors"
    out.write_bytes(b"the user's earlier export")
    before = checksums(checkpoints[kind].parent, tmp_path)
    result = command("-m", "vgen.checkpoint", "export", str(checkpoints[kind]), str(out))
    line = one_error_line(result, 2, "vgen.checkpoint", str(checkpoints[kind]),
                          UNREADABLE.get(kind, "not a weights-only checkpoint: refused"))
    assert "weights_only" not in line
    assert checksums(checkpoints[kind].parent, tmp_path) == before and not (checkpoints[kind].parent / "pwned").exists()


@pytest.mark.parametrize("kind", ["empty", "truncated", "pickle2"])
def test_train_resume_from_a_bad_checkpoint_is_one_line_and_writes_nothing(kind, checkpoints, tmp_path):
    before = checksums(checkpoints[kind].parent)
    result = train(*TINY, f"paths.log_dir={tmp_path / 'outputs'}", f"resume={checkpoints[kind]}")
    line = one_error_line(result, 2, "vgen.train", f"resume={checkpoints[kind]}",
                          UNREADABLE.get(kind, "not a weights-only checkpoint: refused"))
    assert "weights_only" not in line
    assert not (tmp_path / "outputs").exists(), "a config error creates no run directory"
    assert checksums(checkpoints[kind].parent) == before and not (checkpoints[kind].parent / "pwned").exists()


def test_resume_auto_skips_unreadable_checkpoints_naming_each(tmp_path, caplog):
    from vgen.training.checkpointing import find_resume_checkpoint

    files = bad_checkpoints(tmp_path / "bad")
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    torch.save({"state_dict": {}, "global_step": 1}, directory / "step0000001.ckpt")
    skipped = []
    for step, kind in enumerate(["empty", "random", "truncated", "torch_save", "pickle2"], 2):
        target = directory / f"step{step:07d}.ckpt"
        target.write_bytes(files[kind].read_bytes())
        skipped.append(target)
    before = checksums(directory)
    with caplog.at_level(logging.WARNING, logger="vgen.training.checkpointing"):
        assert find_resume_checkpoint(directory) == directory / "step0000001.ckpt"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for path in skipped:
        assert any(f"skipping {path}:" in w for w in warnings), (path, warnings)
    assert not any("weights_only" in w for w in warnings)
    assert checksums(directory) == before and not (tmp_path / "bad" / "pwned").exists()


# ---------------------------------------------------------------------------------------------------- vgen.train
@pytest.mark.parametrize("override,needles", [
    ("trainer.max_stepz=5", ["unknown key trainer.max_stepz", "nearest valid keys: trainer.max_steps"]),
    ("+trainer.max_stepz=5", ["unknown key trainer.max_stepz", "takes no argument 'max_stepz'",
                              "trainer.max_steps"]),
    ("trainer.max_steps=abc", ["trainer.max_steps must be an integer, got 'abc'"]),
    ("data.batch_size=-1", ["data.batch_size must be an integer >= 1, got -1"]),
    ("paths.data_dir=/nonexistent/vgen-data", ["data.sources[0].urls"]),
])
def test_a_config_error_is_one_line_and_creates_nothing(override, needles, tmp_path):
    result = train(*TINY, f"paths.log_dir={tmp_path / 'outputs'}", override)
    line = one_error_line(result, 2, "vgen.train", *needles)
    assert "+trainer" not in line, "no '+key' advice for a target that takes fixed arguments"
    assert not (tmp_path / "outputs").exists(), "nothing may be created before the config is valid"


def test_the_plus_advice_is_given_only_where_the_target_takes_extra_arguments():
    from omegaconf import OmegaConf

    from vgen.config import check_override, unknown_key_message

    cfg = OmegaConf.create({"fixed": {"_target_": "vgen.callbacks.checkpoint.StepCheckpoint", "dirpath": "x"},
                            "open": {"_target_": "logging.basicConfig"}, "plain": {"a": 1}})
    message = unknown_key_message("fixed.save_top", cfg, "3")
    assert message == "unknown key fixed.save_top; nearest valid keys: fixed.save_top_k", message
    assert "nearest valid keys: fixed.dirpath" in unknown_key_message("fixed.dirpat", cfg)
    assert unknown_key_message("fixed.save_top_k", cfg, "3") == (
        "fixed.save_top_k is not set in the config, but vgen.callbacks.checkpoint.StepCheckpoint takes it: add it "
        "with +fixed.save_top_k=3")  # an argument the target takes: "+" works there
    assert "add it with +open.anything=1" in unknown_key_message("open.anything", cfg, "1")
    assert "+" not in unknown_key_message("plain.b", cfg)
    cfg.fixed.save_top = 3
    assert "takes no argument 'save_top'" in check_override(cfg, "fixed.save_top")
    cfg.fixed.save_top_k = "three"
    assert check_override(cfg, "fixed.save_top_k") == "fixed.save_top_k must be an integer, got 'three'"


def test_a_config_error_leaves_an_existing_run_as_it_was(tmp_path):
    run = tmp_path / "outputs" / "demo"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("the run's config\n")
    (run / "train.log").write_text("the run's log\n")
    before = checksums(tmp_path)
    result = train(*TINY, f"paths.log_dir={tmp_path / 'outputs'}", "resume=auto", "data.batch_size=-1")
    one_error_line(result, 2, "vgen.train", "data.batch_size")
    assert checksums(tmp_path) == before


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory) -> Path:
    """The demo's 8 video shards with a zero-byte-mp4 sample added to each (counted as empty_member), and its 4
    image shards."""
    root = demo_shards(tmp_path_factory.mktemp("mixed"))
    for shard in sorted((root / "demo").glob("videos-*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        members |= {"zero_bytes.mp4": b"", "zero_bytes.txt": b"a caption"}
        write_tar(shard, members)
    return root


@pytest.fixture(scope="module")
def trained_run(mixed_data, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, list[str]]:
    """A 2-step tiny demo run on ``mixed_data`` through the command line."""
    common = [*TINY, f"paths.data_dir={mixed_data}", f"paths.log_dir={tmp_path_factory.mktemp('runs')}"]
    result = train(*common)
    assert result.returncode == 0, result.stderr[-3000:]
    run = Path(common[-1].split("=", 1)[1]) / "demo"
    return run, result, common


def test_skip_counts_go_to_train_log_and_are_logged_at_the_end(trained_run):
    import csv

    run, _, _ = trained_run
    log = (run / "train.log").read_text()
    assert re.search(r"data\.sources\[0\]: samples skipped in all \(2 steps\) on rank 0 by reason: .*'empty_member'",
                     log), log[-3000:]
    assert "a training clip (data.num_frames=4 at data.sample_fps=2) needs 13 source frames" in log
    with open(run / "csv" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("data/skipped/total")]
    assert rows, "data/skipped/* must be logged at the end even though log_every_n_steps (50) never came"
    assert float(rows[-1]["data/skipped/empty_member"]) >= 1 and rows[-1]["step"] == "2"
    assert (run / ".hydra" / "config.yaml").is_file()


def test_rerunning_a_name_with_checkpoints_without_resume_is_refused(trained_run):
    run, _, common = trained_run
    before = checksums(run)
    result = train(*common)
    one_error_line(result, 2, "vgen.train", str(run / "checkpoints"), "step0000002.ckpt", "resume=auto", "name=")
    assert checksums(run) == before


def test_a_resumed_run_warns_naming_the_keys_that_differ_from_the_checkpoint(trained_run, tmp_path):
    import shutil

    run, _, common = trained_run
    copy = tmp_path / "outputs" / "demo"
    shutil.copytree(run, copy)
    result = train(*common[:-1], f"paths.log_dir={tmp_path / 'outputs'}", "resume=auto", "data.batch_size=3",
                   "trainer.max_steps=3")
    assert result.returncode == 0, result.stderr[-3000:]
    log = (copy / "train.log").read_text()
    warning = next(line for line in log.splitlines() if "resume: this run's config differs" in line)
    assert "data.batch_size: 2 -> 3" in warning and "trainer.max_steps: 2 -> 3" in warning
    assert "data.num_frames" not in warning and "model.unet" not in warning, "only the keys that differ"


def test_config_changes_lists_every_differing_leaf():
    from vgen.train import config_changes

    saved = {"data": {"batch_size": 2, "sources": [{"urls": "a"}]}, "resume": None, "name": "x"}
    now = {"data": {"batch_size": 3, "sources": [{"urls": "a"}]}, "resume": "auto", "name": "x", "new": 1}
    assert config_changes(now, saved) == [("data.batch_size", 2, 3), ("new", "<absent>", 1)]


@pytest.mark.parametrize("kind,needles", [
    ("random_bytes", ["data.sources[0]: none of its 8 shards gave a sample"]),
    ("unusable", ["data.sources[0]: 100 samples in a row could not be used", "empty_member"]),
])
def test_a_source_that_cannot_feed_training_stops_with_one_line(kind, needles, tmp_path):
    data = tmp_path / "data" / "demo"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(8):
        if kind == "random_bytes":
            (data / f"videos-{index:06d}.tar").write_bytes(rng.bytes(20000))
        else:  # 20 samples whose mp4 is empty (0 bytes)
            write_tar(data / f"videos-{index:06d}.tar",
                      {name: body for k in range(20) for name, body in ((f"s{k}.mp4", b""), (f"s{k}.txt", b"x"))})
    for index in range(4):
        (data / f"images-{index:06d}.tar").write_bytes(rng.bytes(2000))
    before = checksums(tmp_path / "data")
    workers = "data.num_workers=1" if kind == "unusable" else "data.num_workers=0"  # a worker's error, too
    result = train(*TINY, f"paths.data_dir={tmp_path / 'data'}", f"paths.log_dir={tmp_path / 'outputs'}", workers)
    one_error_line(result, 1, "vgen.train", *needles)
    assert checksums(tmp_path / "data") == before


def test_clips_too_short_for_the_configured_fps_fail_up_front(tmp_path):
    data = demo_shards(tmp_path / "data", frames=12)  # 12 frames at 8 fps; the demo's sample_fps 2 needs 13
    before = checksums(data)
    result = train(*TINY, f"paths.data_dir={data}", f"paths.log_dir={tmp_path / 'outputs'}")
    one_error_line(result, 2, "vgen.train", "data.sources[0]: no clip is long enough", "data.num_frames=4",
                   "data.sample_fps=2 needs 13 source frames of a 8-fps clip", "at most 12")
    assert not (tmp_path / "outputs").exists() and checksums(data) == before


def test_each_video_source_says_how_many_frames_a_clip_needs(tmp_path, caplog):
    from vgen.data import VideoDataModule

    data = demo_shards(tmp_path, frames=12)
    module = VideoDataModule([{"urls": f"{data}/demo/videos-{{000000..000007}}.tar", "type": "video"}],
                             num_frames=4, sample_fps=4, num_workers=0)
    with caplog.at_level(logging.INFO, logger="vgen.data.datamodule"):
        module.check_sources()
    assert any("data.sources[0]: a training clip (data.num_frames=4 at data.sample_fps=4) needs 7 source frames of "
               "a 8-fps clip (frame stride 2)" in r.getMessage() for r in caplog.records), caplog.text


# ---------------------------------------------------------------------------------------------------- data tools
def test_filter_with_missing_input_shards_names_them_and_writes_nothing(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(shards / "clips-000000.tar", {"a.mp4": tiny_clip(0), "a.txt": b"one"})
    before = checksums(shards)
    result = tool("filter", "--input", str(shards / "clips-{000000..000099}.tar"), "--out", str(tmp_path / "out"))
    one_error_line(result, 2, "filter.py", "--input: 99 of 100 shards are missing or empty",
                   str(shards / "clips-000001.tar"))
    assert not (tmp_path / "out").exists() and checksums(shards) == before


def test_filter_writes_no_output_for_a_shard_it_could_not_read_whole(tmp_path):
    shards, out = tmp_path / "shards", tmp_path / "out"
    shards.mkdir()
    write_tar(shards / "clips-000000.tar", {"a.mp4": tiny_clip(0), "a.txt": b"one"})
    whole = write_tar(tmp_path / "whole.tar", {f"{k}.mp4": tiny_clip(k, frames=12, size=32) for k in range(4)})
    with tarfile.open(whole) as tar:
        last = tar.getmembers()[-1]
    cut = last.offset_data + last.size // 2  # inside the last member's data
    (shards / "clips-000001.tar").write_bytes(whole.read_bytes()[:cut])
    before = checksums(shards)
    result = tool("filter", "--input", str(shards / "clips-{000000..000001}.tar"), "--out", str(out))
    one_error_line(result, 1, "filter.py", "1 input shard(s) could not be read whole",
                   str(shards / "clips-000001.tar"))
    assert (out / "clips-000000.tar").is_file() and not (out / "clips-000001.tar").exists()
    assert checksums(shards) == before
    (shards / "clips-000001.tar").write_bytes(whole.read_bytes())  # the shard arrives whole: a rerun does it
    assert tool("filter", "--input", str(shards / "clips-{000000..000001}.tar"), "--out", str(out)).returncode == 0
    assert (out / "clips-000001.tar").is_file()


def test_encode_without_weight_files_refuses_naming_the_flags(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(shards / "clips-000000.tar", {"a.mp4": tiny_clip(0), "a.txt": b"one"})
    before = checksums(shards)
    result = tool("encode", "--input", str(shards / "clips-000000.tar"), "--out", str(tmp_path / "out"))
    one_error_line(result, 2, "encode.py", "--vae sd21 has no weights file", "--vae-weights",
                   "--text-encoder open_clip_vit_h14 has no weights file", "--text-encoder-weights")
    result = tool("encode", "--input", str(shards / "clips-000000.tar"), "--out", str(tmp_path / "out"),
                  "--vae-weights", str(tmp_path / "nope.ckpt"), "--text-encoder", "tiny")
    one_error_line(result, 2, "encode.py", f"--vae-weights: no such file {tmp_path / 'nope.ckpt'}")
    assert not (tmp_path / "out").exists() and checksums(shards) == before


def test_zero_byte_members_are_empty_member_in_the_loader_filter_and_encode(tmp_path):
    import random

    from vgen.data import Bucket, SampleDecoder, SampleError

    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(shards / "clips-000000.tar", {"a.mp4": tiny_clip(0), "a.txt": b"one", "b.mp4": b"", "b.txt": b"two",
                                            "c.jpg": b"", "c.txt": b"three"})
    with pytest.raises(SampleError) as err:
        SampleDecoder("video", 8)({"__key__": "b", "mp4": b"", "txt": b"two"}, random.Random(0), Bucket(2, 8, 8, 1))
    assert err.value.reason == "empty_member"
    assert tool("filter", "--input", str(shards / "clips-000000.tar"), "--out", str(tmp_path / "f")).returncode == 0
    assert json.loads((tmp_path / "f" / "filter_stats.json").read_text())["dropped"] == {"empty_member": 2}
    result = tool("encode", "--input", str(shards / "clips-000000.tar"), "--out", str(tmp_path / "e"), "--vae", "tiny",
                  "--text-encoder", "tiny", "--frames", "2", "--width", "8", "--height", "8")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "e" / "encode_stats.json").read_text())["skipped"] == {"empty_member": 2}
    assert "encode: shard 0 clips-000000.tar done: 1 samples encoded" in result.stdout, "progress per shard"


def test_make_shards_counts_inputs_that_give_no_clip_by_reason(tmp_path):
    from vgen.data import encode_video

    raw = tmp_path / "raw"
    raw.mkdir()
    frames = np.zeros((16, 32, 32, 3), np.uint8)
    frames[:, :, :, 0] = np.arange(16)[:, None, None] * 10
    (raw / "long.mp4").write_bytes(encode_video(frames, fps=8))
    (raw / "short.mp4").write_bytes(encode_video(frames[:3], fps=8))  # 3 frames: shorter than a 1 s clip
    (raw / "empty.mp4").write_bytes(b"")
    (raw / "broken.mp4").write_bytes(b"not a video")
    before = checksums(raw)
    result = tool("make_shards", "--input", str(raw), "--out", str(tmp_path / "out"), "--fps", "8", "--size", "16",
                  "--split", "scenes", "--min-clip-seconds", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["inputs"] == 4 and stats["clips"] == 1
    assert stats["skipped_inputs"] == {"too_short": 1, "empty_member": 1, "undecodable": 1}
    assert stats["failures"][str(raw / "short.mp4")].startswith("too_short: shorter than one clip")
    assert "inputs gave no sample" in result.stdout
    assert checksums(raw) == before


def test_a_missing_make_shards_input_is_one_line(tmp_path):
    result = tool("make_shards", "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "out"))
    one_error_line(result, 2, "make_shards.py", f"--input: no such folder or list: {tmp_path / 'nope'}")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------- README
def readme() -> str:
    return (REPO / "README.md").read_text()


def test_the_readme_documents_every_skip_reason_in_a_table():
    from vgen.data.errors import SKIP_REASONS

    section = readme().split("* Skip reasons:", 1)[1].split("\n* ", 1)[0]
    rows = dict(re.findall(r"^\s*\| `(\w+)` \| (.+?) \|$", section, flags=re.MULTILINE))
    assert list(rows) == list(SKIP_REASONS), "the README's table lists exactly vgen.data.errors.SKIP_REASONS"
    assert all(len(cause) > 20 for cause in rows.values())


def test_the_readme_commands_use_checkpoints_written_by_the_lines_before_them():
    """Training lines write ``step{k*every:07d}`` and the final step; sample/export lines may only name those."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    block = readme().split("## Training, sampling, export", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    written = set()
    for line in block.splitlines():
        if "vgen.train experiment=demo" in line:
            overrides = [w for w in line.split("#")[0].split()[3:] if "=" in w and not w.startswith("resume=")]
            GlobalHydra.instance().clear()
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                cfg = compose(config_name="train", overrides=overrides)
            every, last = cfg.callbacks.checkpoint.every_n_train_steps, cfg.trainer.max_steps
            written |= {f"step{s:07d}.ckpt" for s in (*range(every, last + 1, every), last)}
        for name in re.findall(r"outputs/demo/checkpoints/(step\d+\.ckpt)", line):
            assert name in written, f"{name} is used before a training line above writes it: {line.strip()}"
    GlobalHydra.instance().clear()
    assert "step0000800.ckpt" in written
