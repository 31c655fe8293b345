"""``data_pipelines/cues.py``: HiGen's appearance-cue embeddings stored per source frame, which the data stream
(``data.cues``) turns into the cues the stage would measure for any window; skip-complete reruns, ``--overwrite``,
one-line errors."""

import importlib.util
import random
import subprocess
import sys
import tarfile
from types import SimpleNamespace

import pytest
import torch

from conftest import REPO
from vgen.data.buckets import Bucket
from vgen.data.conditions.cues import CUES_MEMBER, encode_cues, window_cues
from vgen.data.errors import SampleError
from vgen.data.shardio import shard_samples
from vgen.data.stream import SampleDecoder, collate
from vgen.models.conditions.base import ConditionInputs, UNetDims
from vgen.models.conditions.higen import AppearanceCue, MotionCue
from vgen.models.image_encoder import OpenCLIPImageEncoder

TOOL = REPO / "data_pipelines" / "cues.py"
FRAMES, SIZE = 12, 32  # 12-frame 32x32 clips at 8 fps


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two video shards and one image shard of the synthetic demo data, and the tool's output for them."""
    root = tmp_path_factory.mktemp("cues")
    subprocess.run([sys.executable, str(REPO / "data_pipelines" / "synthetic.py"), "--out", str(root / "raw"),
                    "--videos", "6", "--images", "2", "--shard-size", "3", "--frames", str(FRAMES), "--size",
                    str(SIZE)], check=True, capture_output=True)
    result = run_tool(root / "raw", root / "out")
    assert result.returncode == 0, result.stderr
    return root


def tool_args(raw, out, *extra) -> list[str]:
    return ["--input", str(raw), "--out", str(out), "--image-encoder", "tiny", "--size", str(SIZE), "--device", "cpu",
            *extra]


def run_tool(raw, out, *extra):
    return subprocess.run([sys.executable, str(TOOL), *tool_args(raw, out, *extra)], capture_output=True, text=True,
                          check=False)


@pytest.fixture(scope="module")
def tool():
    """The tool's module, for runs in this process (the fixture's run is a real process)."""
    spec = importlib.util.spec_from_file_location("cues_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stage_cues(video: torch.Tensor, encoder) -> dict:
    """The cues the HiGen stage measures on the fly from a batch's clips (no stored members)."""
    dims = UNetDims(model_channels=32, embed_dim=128, context_dim=64, latent_channels=4, image_dim=32)
    inputs = ConditionInputs(batch={"video": video, "caption": [""] * len(video)}, num_frames=video.shape[2],
                             encoders=SimpleNamespace(device=torch.device("cpu"), image_encoder=encoder))
    cues = {"motion": MotionCue(dims), "appearance": AppearanceCue(dims)}
    for name, cue in cues.items():
        cue.name = name  # as the UNet names its conditions: the batch member it would read (absent here)
    return {name: cue.extract(inputs) for name, cue in cues.items()}


def test_stored_cues_give_the_stage_cues_for_any_window(shards):
    out = shards / "out"
    assert sorted(p.name for p in out.glob("*.tar")) == ["images-000000.tar", "videos-000000.tar", "videos-000001.tar"]
    with tarfile.open(out / "videos-000000.tar") as tar:
        assert f"00000000.{CUES_MEMBER}" in tar.getnames() and "00000000.mp4" in tar.getnames()
    with tarfile.open(out / "images-000000.tar") as tar:
        assert not any(name.endswith(CUES_MEMBER) for name in tar.getnames())  # stills get neutral cues
    samples = list(shard_samples(str(out / "videos-000000.tar"))[0])
    encoder = OpenCLIPImageEncoder("tiny").eval()  # the tool's encoder (a fixed random init)
    for sample_fps, frames in ((8, 5), (4, 4)):  # strides 1 and 2, random starts
        decoder = SampleDecoder("video", sample_fps, caption_required=False, cues=True)
        bucket = Bucket(frames=frames, width=SIZE, height=SIZE, batch_size=len(samples))
        decoded = [decoder(s, random.Random(seed), bucket) for seed, s in enumerate(samples)]
        batch = collate(decoded, "video")
        assert batch["motion"].shape == (3, frames - 1) and batch["appearance"].shape == (3, frames, 32)
        expected = stage_cues(batch["video"], encoder)
        assert torch.equal(batch["motion"], expected["motion"])
        torch.testing.assert_close(batch["appearance"], expected["appearance"], rtol=0, atol=2e-3)  # float16
        assert (batch["motion"] > 0).all() and (batch["appearance"][:, :, :frames] < 1 - 1e-4).any()
    # a clip without the member still gets its motion; its batch leaves appearance to the stage
    bare = {k: v for k, v in samples[0].items() if k != CUES_MEMBER}
    mixed = collate([decoder(bare, random.Random(0), bucket), decoder(samples[1], random.Random(0), bucket)], "video")
    assert "motion" in mixed and "appearance" not in mixed
    frames = torch.zeros(2, 8, 8, 3, dtype=torch.uint8)
    for member, needle, reason in ((encode_cues(torch.rand(2, 8), [0, 1]), r"no embedding of source frame\(s\) \[2\]",
                                    "missing_condition"),
                                   (b"garbage", "undecodable cue member", "undecodable")):
        with pytest.raises(SampleError, match=needle) as error:
            window_cues({CUES_MEMBER: member}, frames, [0, 2])
        assert error.value.reason == reason


def test_the_datamodule_brings_the_cues_of_clips_not_stills(shards):
    from vgen.data import VideoDataModule

    sources = [{"urls": str(shards / "out" / "videos-{000000..000001}.tar"), "type": "video"},
               {"urls": str(shards / "out" / "images-000000.tar"), "type": "image"}]
    data = VideoDataModule(sources, num_frames=4, sample_fps=4, resolution=[SIZE, SIZE], batch_size=2,
                           image_batch_size=2, num_workers=0, cues=True)
    data.setup("fit")
    batches = iter(data.train_dataloader())
    kinds = set()
    for _ in range(6):
        batch = data.consume(next(batches))
        kinds.add(batch["kind"])
        if batch["kind"] == "video":
            assert batch["motion"].shape == (2, 3) and batch["appearance"].shape == (2, 4, 32)
        else:
            assert "motion" not in batch and "appearance" not in batch  # the stage's neutral cues
    assert kinds == {"video", "image"}
    with pytest.raises(ValueError, match="data.cues: HiGen's appearance cue spans 32 frames at most"):
        VideoDataModule(sources, num_frames=33, cues=True)
    with pytest.raises(ValueError, match="rename data.conditions.motion"):
        VideoDataModule(sources, cues=True, conditions={"motion": {"kind": "motion"}})


def test_reruns_skip_complete_shards_and_never_overwrite_without_the_flag(shards, tool, capsys):
    out = shards / "out"
    stamps = {p.name: p.stat().st_ino for p in out.glob("*.tar")}  # a written shard is a new file (renamed)
    assert tool.main(tool_args(shards / "raw", out)) == 0
    printed = capsys.readouterr().out
    assert "wrote 0 of shards 0..2" in printed and "6 clips with cues" in printed, printed
    assert {p.name: p.stat().st_ino for p in out.glob("*.tar")} == stamps
    assert tool.main(tool_args(shards / "raw", out, "--overwrite", "--shard-range", "1:2")) == 0
    assert "wrote 1 of shards 1..1" in capsys.readouterr().out
    changed = [name for name, stamp in stamps.items() if (out / name).stat().st_ino != stamp]
    assert changed == ["videos-000000.tar"]  # input shards sorted: images-000000, videos-000000, videos-000001


def test_bad_arguments_and_unreadable_shards_stop_with_one_line(shards, tool, tmp_path, capsys):
    raw = str(shards / "raw" / "videos-000000.tar")
    for bad, needle in ((["--image-encoder", "open_clip_vit_h14"], "needs --image-encoder-weights FILE"),
                        (["--image-encoder", "tiny", "--size", "4"], "need --size >= 8"),
                        (["--image-encoder", "tiny", "--image-encoder-weights", "nope.bin"], "nope.bin: no such file"),
                        (["--image-encoder", "huge"], "invalid choice: 'huge'")):
        with pytest.raises(SystemExit) as exit_:
            tool.main(["--input", raw, "--out", str(tmp_path / "x"), *bad])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()

    whole = shards / "raw" / "videos-000000.tar"
    with tarfile.open(whole) as tar:
        last = tar.getmembers()[-1]
    truncated = tmp_path / "in" / whole.name
    truncated.parent.mkdir()
    truncated.write_bytes(whole.read_bytes()[:last.offset_data + last.size // 2])  # inside the last member's data
    with pytest.raises(SystemExit) as exit_:
        tool.main(tool_args(truncated, tmp_path / "y"))
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and str(truncated) in err and err.count("\n") == 1, err
    assert not (tmp_path / "y" / "videos-000000.tar").exists()
