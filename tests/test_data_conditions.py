"""Condition maps in the data stream (``data.conditions``): read from shard members by source frame index (resized
like the frames), extracted on the fly from the decoded clip, or skipped and counted as ``missing_condition``."""

import io
import json
import random
import tarfile

import numpy as np
import pytest
import torch

from vgen.data import conditions as extractors
from vgen.data.buckets import Bucket
from vgen.data.condition_maps import ConditionMap, encode_maps, parse_conditions
from vgen.data.errors import SampleError
from vgen.data.stream import SampleDecoder
from vgen.data.synthetic import render_clip, sample_motion
from vgen.data.video import encode_video

FRAMES, SIZE = 12, 32


def clip_sample(key="000000", direction="right", seed=0, **members) -> dict:
    rng = np.random.default_rng(seed)
    frames = render_clip("red", "square", direction, sample_motion(direction, FRAMES, SIZE, rng), FRAMES, SIZE)
    return {"__key__": key, "__url__": "mem.tar", "mp4": encode_video(frames, fps=8),
            "txt": f"a red square moving {direction}".encode(), **members}, frames


def decoder(*conditions, start="first"):
    return SampleDecoder("video", sample_fps=4, start=start, conditions=tuple(conditions))


BUCKET = Bucket(frames=4, width=16, height=16, batch_size=2)


def test_stored_maps_are_picked_by_source_frame_and_resized_like_the_frames():
    sample, _ = clip_sample()
    stored = torch.rand(1, FRAMES, SIZE, SIZE)  # a map per source frame, at the clip's own size
    sample["sketch.safetensors"] = encode_maps(stored, range(FRAMES), "sketch")
    out = decoder(ConditionMap("sketch", "sketch", extract=False))(sample, random.Random(0), BUCKET)
    window = [0, 2, 4, 6]  # start first, 8 fps -> 4 fps: stride 2
    expected = torch.nn.functional.interpolate((stored[0, window] * 255).round()[:, None] / 255, size=(16, 16),
                                               mode="bilinear", antialias=True, align_corners=False)[:, 0]
    assert out["conditions"]["sketch"].shape == (1, 4, 16, 16)
    torch.testing.assert_close(out["conditions"]["sketch"][0], expected, rtol=0, atol=1e-6)

    motion = torch.tensor([2.0, -1.0]).view(2, 1, 1, 1).expand(2, FRAMES, SIZE, SIZE)  # in the stored size's pixels
    sample["motion.safetensors"] = encode_maps(motion, range(FRAMES), "motion")
    field = decoder(ConditionMap("motion", "motion", extract=False))(sample, random.Random(0), BUCKET)
    assert field["conditions"]["motion"].shape == (2, 4, 16, 16)  # displacements halve with the frames
    torch.testing.assert_close(field["conditions"]["motion"], (motion[:, :4, :16, :16] / 2).contiguous())


def test_missing_maps_are_extracted_from_the_decoded_clip_or_skipped_as_missing_condition():
    sample, _ = clip_sample()
    out = decoder(ConditionMap("sketch", "sketch"), ConditionMap("first", "local_image"),
                  ConditionMap("masked", "mask"), ConditionMap("palette", "palette"))(sample, random.Random(3), BUCKET)
    pixels = ((out["video"] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    torch.testing.assert_close(out["conditions"]["sketch"], extractors.sketch(pixels))
    torch.testing.assert_close(out["conditions"]["first"], extractors.first_frame_map(pixels))
    assert out["conditions"]["masked"].shape == (4, 4, 16, 16) and out["conditions"]["palette"].shape == (4, 156)
    again = decoder(ConditionMap("masked", "mask"))(sample, random.Random(3), BUCKET)
    assert torch.equal(again["conditions"]["masked"], out["conditions"]["masked"])  # the sample's own draws

    with pytest.raises(SampleError, match="no condition member .depthmap.safetensors.gz") as err:
        decoder(ConditionMap("depth", "depthmap", extract=False))(sample, random.Random(0), BUCKET)
    assert err.value.reason == "missing_condition"
    partial = {**sample, "sketch.safetensors": encode_maps(torch.rand(1, 3, SIZE, SIZE), [0, 1, 2], "sketch")}
    with pytest.raises(SampleError, match=r"no map of source frame\(s\) \[4, 6\]") as err:
        decoder(ConditionMap("sketch", "sketch", extract=False))(partial, random.Random(0), BUCKET)
    assert err.value.reason == "missing_condition"


def test_motion_extracted_from_a_clip_points_along_its_motion():
    sample, _ = clip_sample(direction="right")
    big = Bucket(frames=4, width=32, height=32, batch_size=1)
    field = decoder(ConditionMap("motion", "motion"))(sample, random.Random(0), big)["conditions"]["motion"]
    moving = field[:, 1:].flatten(1)
    moving = moving[:, moving.norm(dim=0) > 0]
    assert moving.shape[1] > 0 and moving[0].mean() > 0 and moving[0].mean() > 3 * moving[1].mean().abs()


def test_a_stream_skips_and_counts_samples_without_their_condition(tmp_path):
    from vgen.data import VideoDataModule

    with tarfile.open(tmp_path / "clips-000000.tar", "w") as tar:
        for i in range(8):
            sample, _ = clip_sample(key=f"{i:06d}", seed=i)
            if i % 2 == 0:
                sample["sketch.safetensors"] = encode_maps(torch.rand(1, FRAMES, SIZE, SIZE), range(FRAMES), "sketch")
            for ext in ("mp4", "txt", "sketch.safetensors"):
                if ext in sample:
                    info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                    info.size = len(sample[ext])
                    tar.addfile(info, io.BytesIO(sample[ext]))
    data = VideoDataModule([{"urls": str(tmp_path / "clips-000000.tar"), "type": "video"}], num_frames=4,
                           sample_fps=4, resolution=[16, 16], batch_size=2, num_workers=0, shuffle_buffer=0,
                           conditions={"sketch": {"kind": "sketch", "extract": False}})
    data.setup("fit")
    batch = data.consume(next(iter(data.train_dataloader())))
    assert batch["sketch"].shape == (2, 1, 4, 16, 16)
    assert all(int(k) % 2 == 0 for k in batch["key"])
    assert sum(counts["missing_condition"] for counts in data.skip_counts().values()) >= 1


def test_bad_condition_configs_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="data.conditions.d.kind must be one of"):
        parse_conditions({"d": {"kind": "normals"}})
    with pytest.raises(ValueError, match="data.conditions.depth: extracting depth maps needs the DPT model"):
        parse_conditions({"depth": {"kind": "depthmap"}})
    with pytest.raises(ValueError, match=r"data.conditions.depth.weights=.*nope: no such file"):
        parse_conditions({"depth": {"kind": "depthmap", "weights": str(tmp_path / "nope")}})
    with pytest.raises(ValueError, match="unknown key data.conditions.s.size"):
        parse_conditions({"s": {"kind": "sketch", "size": 3}})
    with pytest.raises(ValueError, match="data.conditions.m.weights: kind motion extracts without a network"):
        parse_conditions({"m": {"kind": "motion", "weights": "x"}})
    assert parse_conditions({"d": {"kind": "depthmap", "extract": False}})[0].member_names == (
        "depthmap.safetensors.gz", "depthmap.safetensors")
    assert json.loads(json.dumps([c.kind for c in parse_conditions({"a": {"kind": "canny"}})])) == ["canny"]


def test_the_conditions_tool_stores_maps_that_training_reads(tmp_path):
    import subprocess
    import sys

    from conftest import REPO
    from vgen.data import VideoDataModule

    with tarfile.open(tmp_path / "clips-000000.tar", "w") as tar:
        for i, direction in enumerate(["right", "right", "left", "left"]):
            sample, _ = clip_sample(key=f"{i:06d}", direction=direction, seed=i)
            for ext in ("mp4", "txt"):
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(sample[ext])
                tar.addfile(info, io.BytesIO(sample[ext]))
    tool = [sys.executable, str(REPO / "data_pipelines" / "conditions.py")]
    out = tmp_path / "out"
    args = ["--input", str(tmp_path / "clips-000000.tar"), "--out", str(out), "--kinds", "sketch", "motion",
            "--fps", "4", "--size", "32"]
    result = subprocess.run([*tool, *args], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    with tarfile.open(out / "clips-000000.tar") as tar:
        names = tar.getnames()
    assert "000000.sketch.safetensors.gz" in names and "000003.motion.safetensors.gz" in names
    stamp = (out / "clips-000000.tar").stat().st_mtime_ns
    assert subprocess.run([*tool, *args], capture_output=True, check=False).returncode == 0
    assert (out / "clips-000000.tar").stat().st_mtime_ns == stamp  # complete shards are skipped on a rerun

    data = VideoDataModule([{"urls": str(out / "clips-000000.tar"), "type": "video"}], num_frames=4, sample_fps=4,
                           resolution=[32, 32], batch_size=4, num_workers=0, shuffle_buffer=0, random_start=False,
                           conditions={"sketch": {"kind": "sketch", "extract": False},
                                       "motion": {"kind": "motion", "extract": False}})
    data.setup("fit")
    batch = data.consume(next(iter(data.train_dataloader())))
    assert batch["sketch"].shape == (4, 1, 4, 32, 32) and batch["sketch"].max() > 0.5
    for key, field in zip(batch["key"], batch["motion"]):
        dx = field[0, 1:][field[:, 1:].norm(dim=0) > 0].mean()  # motion between the window's own frames
        assert (dx > 0) == (int(key) < 2), (key, dx)

    for bad, needle in ((["--kinds", "depthmap"], "--kinds depthmap needs --depth-weights"),
                        (["--kinds", "sketch", "--sketch-weights", "nope.pth"], "--sketch-weights nope.pth: no such"),
                        (["--kinds", "sketch", "--fps", "0"], "need --fps > 0")):
        result = subprocess.run([*tool, "--input", str(tmp_path / "clips-000000.tar"), "--out", str(tmp_path / "x"),
                                 *bad], capture_output=True, text=True, check=False)
        assert result.returncode == 2 and needle in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_a_gzip_member_that_expands_too_far_is_refused(monkeypatch):
    import gzip

    from vgen.data import condition_maps

    sample, _ = clip_sample()
    sample["sketch.safetensors.gz"] = gzip.compress(encode_maps(torch.zeros(1, FRAMES, SIZE, SIZE), range(FRAMES),
                                                                "sketch"))
    monkeypatch.setattr(condition_maps, "MAX_MEMBER_BYTES", 1000)
    with pytest.raises(SampleError, match="expands past 1000 bytes: refused"):
        decoder(ConditionMap("sketch", "sketch", extract=False))(sample, random.Random(0), BUCKET)
    sample["sketch.safetensors.gz"] = b"\x1f\x8b" + b"garbage" * 10
    with pytest.raises(SampleError, match="undecodable condition member"):
        decoder(ConditionMap("sketch", "sketch", extract=False))(sample, random.Random(0), BUCKET)
