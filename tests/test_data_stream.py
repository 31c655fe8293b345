"""The batch stream at scale: equal batch counts per rank by construction, every bad-sample kind skipped and
counted, pickle refusal, pipe sources, bucketed joint image-video batches, text-free videos."""

from __future__ import annotations

import json
import logging
import pickle
from collections import Counter
from itertools import islice
from types import SimpleNamespace

import pytest
import torch

from test_data_resume import UnpicklingWouldWriteAFile, tiny_clip, tiny_jpeg, write_tar
from vgen.data import VideoDataModule


def module_for(sources, rank=0, world_size=1, **settings) -> VideoDataModule:
    settings = {"num_frames": 3, "resolution": [8, 8], "batch_size": 2, "image_batch_size": 2, "num_workers": 0,
                "shuffle_buffer": 0, **settings}
    module = VideoDataModule(sources, **settings)
    module.trainer = SimpleNamespace(global_rank=rank, world_size=world_size)  # what Lightning sets under DDP
    module.setup("fit")
    return module


def consumed(module: VideoDataModule, n: int) -> list[dict]:
    """The first ``n`` batches, each recorded as trained on (as Lightning's batch hook does)."""
    return [module.consume(batch) for batch in islice(iter(module.train_dataloader()), n)]


@pytest.fixture(scope="module")
def unequal_shards(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("unequal")
    sizes, paths, number = (9, 1, 4), [], 0
    for index, size in enumerate(sizes):
        members = {}
        for _ in range(size):
            members[f"c{number:03d}.mp4"], members[f"c{number:03d}.txt"] = tiny_clip(number), b"a clip"
            number += 1
        paths.append(str(write_tar(root / f"u-{index}.tar", members)))
    return paths


def test_every_rank_gets_the_same_number_of_full_batches_from_3_unequal_shards(unequal_shards):
    # 2 ranks x 2 workers = 4 readers share 3 shards of 9, 1 and 4 clips: nobody runs dry, nobody waits.
    sources = [{"urls": unequal_shards, "type": "video"}]
    per_rank = []
    for rank in range(2):
        module = module_for(sources, rank=rank, world_size=2, num_workers=2)
        batches = consumed(module, 30)
        assert [len(batch["key"]) for batch in batches] == [2] * 30
        per_rank.append([tuple(batch["key"]) for batch in batches])
    assert per_rank[0] != per_rank[1]
    seen = Counter(key for keys in per_rank for batch in keys for key in batch)
    assert len(seen) == 14  # over 120 clips read, all 14 clips of the 3 shards came up


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory) -> dict:
    """One shard with a good sample after every kind of bad one, a non-tar 'shard' and good images."""
    root = tmp_path_factory.mktemp("bad")
    good = tiny_clip(1)
    marker = root / "unpickled"
    evil = pickle.dumps(UnpicklingWouldWriteAFile(marker))
    videos = write_tar(root / "videos.tar", {
        "a.mp4": good, "a.txt": b"good",
        "empty.mp4": b"", "empty.txt": b"zero bytes",
        "cut.mp4": good[: len(good) // 3], "cut.txt": b"truncated",
        "noise.mp4": bytes(range(256)) * 8, "noise.txt": b"not a video",
        "short.mp4": tiny_clip(2, frames=2), "short.txt": b"two frames",
        "nocap.mp4": good,
        "badjson.mp4": good, "badjson.json": b"{not json",
        "listjson.mp4": good, "listjson.json": b"[1, 2]",
        "numcap.mp4": good, "numcap.json": json.dumps({"caption": 7}).encode(),
        "pyd.mp4": good, "pyd.txt": b"x", "pyd.pyd": evil,
        "pkl.mp4": good, "pkl.txt": b"x", "pkl.pickle": evil,
        "pth.mp4": good, "pth.txt": b"x", "pth.pth": evil,
        "wrongtype.jpg": tiny_jpeg(1), "wrongtype.txt": b"an image in a video source",
        "b.mp4": good, "b.txt": b"good too",
    })
    images = write_tar(root / "images.tar", {
        "p.jpg": tiny_jpeg(1), "p.txt": b"good image",
        "broken.jpg": tiny_jpeg(2)[:40], "broken.txt": b"corrupt image",
        "q.jpg": tiny_jpeg(3), "q.txt": b"good image",
    })
    not_a_tar = root / "not-a-tar.tar"
    not_a_tar.write_bytes(b"this is not a tar archive" * 40)
    return {"videos": str(videos), "images": str(images), "not_a_tar": str(not_a_tar), "marker": marker}


def test_every_bad_sample_kind_is_skipped_counted_and_named(bad_shards, caplog):
    sources = [
        {"urls": [bad_shards["not_a_tar"], bad_shards["videos"], "pipe:exit 3"], "type": "video", "weight": 1.0},
        {"urls": bad_shards["images"], "type": "image", "weight": 1.0},
    ]
    module = module_for(sources, batch_size=1, image_batch_size=1, seed=3)
    with caplog.at_level(logging.WARNING, logger="vgen.data.stream"):
        batches = consumed(module, 12)
    keys = Counter(key for batch in batches for key in batch["key"])
    assert set(keys) == {"a", "b", "p", "q"}  # the run went on past every bad sample, only good ones arrive
    assert not bad_shards["marker"].exists()
    videos, images = module.skip_counts()["data.sources[0]"], module.skip_counts()["data.sources[1]"]
    assert videos["empty_member"] >= 1 and videos["too_short"] >= 1 and videos["no_caption"] >= 1
    assert videos["undecodable"] >= 2  # truncated and noise
    assert videos["bad_metadata"] >= 3  # unparsable json, a json list, a numeric caption
    assert videos["unsafe_member"] >= 3 and videos["missing_member"] >= 1
    assert videos["unreadable_shard"] >= 2  # the non-tar file and the failing pipe command
    assert images["undecodable"] >= 1
    messages = [record.getMessage() for record in caplog.records]
    for key, words in {"empty": "0 bytes", "cut": "undecodable video", "short": "too few frames",
                       "nocap": "no caption", "badjson": "unreadable .json", "listjson": "not an object",
                       "numcap": "not text", "pyd": "refusing pickle-capable member(s) ['pyd']",
                       "pkl": "['pickle']", "pth": "['pth']", "wrongtype": "no member of type mp4"}.items():
        assert any(f"sample '{key}' of shard {bad_shards['videos']}" in m and words in m for m in messages), key
    assert any(f"sample 'broken' of shard {bad_shards['images']}" in m and "undecodable image" in m
               for m in messages)
    assert any("could not read shard pipe:exit 3" in m for m in messages)
    assert any(f"could not read shard {bad_shards['not_a_tar']}" in m for m in messages)


def test_pipe_sources_stream_shards_through_a_command(unequal_shards):
    sources = [{"urls": [f"pipe:cat {path}" for path in unequal_shards], "type": "video"}]
    batches = consumed(module_for(sources, num_workers=2), 8)
    assert all(batch["video"].shape == (2, 3, 3, 8, 8) for batch in batches)
    local = consumed(module_for([{"urls": unequal_shards, "type": "video"}], num_workers=2), 8)
    assert [b["key"] for b in batches] == [b["key"] for b in local]  # same shards, same stream
    assert all(torch.equal(a["video"], b["video"]) for a, b in zip(batches, local))


BUCKETS = [
    {"frames": 4, "width": 8, "height": 8, "batch_size": 2, "probability": 0.5},
    {"frames": 2, "width": 12, "height": 6, "batch_size": 3, "probability": 0.2},
    {"frames": 1, "width": 10, "height": 4, "batch_size": 5, "probability": 0.3},
]


@pytest.fixture(scope="module")
def joint_sources(tmp_path_factory) -> list[dict]:
    root = tmp_path_factory.mktemp("joint")
    videos = write_tar(root / "v.tar", {f"v{i}.{ext}": data for i in range(12)
                                        for ext, data in (("mp4", tiny_clip(i)), ("txt", b"clip"))})
    images = write_tar(root / "i.tar", {f"i{i}.{ext}": data for i in range(12)
                                        for ext, data in (("jpg", tiny_jpeg(i)), ("txt", b"still"))})
    return [{"urls": str(videos), "type": "video"}, {"urls": str(images), "type": "image"}]


def test_bucketed_batches_have_the_bucket_shapes_in_the_bucket_ratios(joint_sources):
    module = module_for(joint_sources, buckets=BUCKETS, seed=1)
    counts, samples = Counter(), 0
    for batch in iter(module.train_dataloader()):
        shape = tuple(batch["video"].shape)
        counts[shape] += 1
        samples += shape[0]
        if samples >= 2000:
            break
    assert set(counts) == {(2, 3, 4, 8, 8), (3, 3, 2, 6, 12), (5, 3, 1, 4, 10)}
    total = sum(counts.values())
    for bucket, shape in zip(BUCKETS, [(2, 3, 4, 8, 8), (3, 3, 2, 6, 12), (5, 3, 1, 4, 10)]):
        assert counts[shape] / total == pytest.approx(bucket["probability"], abs=0.05), (shape, counts)


def test_bucket_kinds_take_samples_from_fitting_sources(joint_sources):
    module = module_for(joint_sources, buckets=BUCKETS, seed=2)
    for batch in consumed(module, 30):
        frames = batch["video"].shape[2]
        assert batch["kind"] == ("image" if frames == 1 else "video")
        assert all(key.startswith("i" if frames == 1 else "v") for key in batch["key"])
        assert batch["fps"].tolist() == [1 if frames == 1 else 8] * len(batch["key"])


def test_per_rank_bucket_mode_fixes_each_ranks_shape(joint_sources):
    for rank in range(4):
        module = module_for(joint_sources, rank=rank, world_size=4, buckets=BUCKETS, bucket_mode="rank")
        shapes = {tuple(batch["video"].shape[:3]) for batch in consumed(module, 6)}
        bucket = BUCKETS[rank % 3]
        assert shapes == {(bucket["batch_size"], 3, bucket["frames"])}


def test_python_bucket_mapping_matches_the_config_list(joint_sources):
    mapping = {(b["frames"], b["height"], b["width"]): (b["probability"], b["batch_size"]) for b in BUCKETS}
    a = [tuple(b["key"]) for b in consumed(module_for(joint_sources, buckets=mapping, seed=4), 10)]
    b = [tuple(b["key"]) for b in consumed(module_for(joint_sources, buckets=BUCKETS, seed=4), 10)]
    assert a == b


@pytest.mark.parametrize("buckets,message", [
    ([{"frames": 0, "width": 8, "height": 8, "batch_size": 2}], r"data\.buckets\[0\]\.frames must be"),
    ([{"frames": 2, "width": 8, "height": 8}], r"data\.buckets\[0\] must be a mapping with keys"),
    ([{"frames": 2, "width": 8, "height": 8, "batch_size": 1, "probability": 0}], r"probability > 0"),
])
def test_bad_bucket_configs_name_the_key(buckets, message):
    with pytest.raises(ValueError, match=message):
        VideoDataModule([{"urls": "x.tar", "type": "video"}], buckets=buckets)


def test_a_video_bucket_without_a_video_source_fails_at_setup(joint_sources):
    with pytest.raises(ValueError, match=r"data\.buckets\[0\] \(video, 4 frames\) has no enabled source"):
        module_for(joint_sources[1:], buckets=BUCKETS)
    with pytest.raises(ValueError, match=r"data\.bucket_mode must be one of \['batch', 'rank'\]"):
        VideoDataModule(joint_sources, bucket_mode="sometimes")


def test_text_free_videos_have_an_empty_caption_and_a_flag(tmp_path):
    shard = write_tar(tmp_path / "tf.tar", {"x.mp4": tiny_clip(1), "y.mp4": tiny_clip(2), "y.txt": b"captioned"})
    module = module_for([{"urls": str(shard), "type": "video", "caption_required": False}], batch_size=2)
    [batch] = consumed(module, 1)
    by_key = dict(zip(batch["key"], zip(batch["caption"], batch["has_caption"].tolist())))
    assert by_key == {"x": ("", False), "y": ("captioned", True)}
    assert batch["has_caption"].dtype == torch.bool


def test_a_changed_topology_restarts_the_streams_with_a_warning(unequal_shards, caplog):
    sources = [{"urls": unequal_shards, "type": "video"}]
    first = module_for(sources, num_workers=0)
    stream = iter(first.train_dataloader())
    for batch in islice(stream, 3):
        first.consume(batch)
    state = first.state_dict()
    again = module_for(sources, num_workers=0)
    again.load_state_dict(state)
    resumed = [b["key"] for b in consumed(again, 2)]
    assert resumed == [b["key"] for b in islice(stream, 2)]  # same topology: exact
    moved = module_for(sources, num_workers=2)
    with caplog.at_level(logging.WARNING, logger="vgen.data.datamodule"):
        moved.load_state_dict(state)
    assert any("Starting fresh shard streams" in r.getMessage() for r in caplog.records)
    assert moved.dataset.resume["seed"] == "0+3" and len(consumed(moved, 2)) == 2


def test_the_loader_position_survives_torch_load_weights_only(unequal_shards, tmp_path):
    module = module_for([{"urls": unequal_shards, "type": "video"}])
    consumed(module, 4)
    torch.save({"VideoDataModule": module.state_dict()}, tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)["VideoDataModule"]
    assert loaded == module.state_dict() and loaded["consumed"] == [4]


def test_skip_counters_are_logged_summed_over_workers(bad_shards, tmp_path):
    import csv

    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from vgen.callbacks.data_stats import DataStats

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            return (self.weight * batch["video"].mean() + self.weight**2).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    sources = [{"urls": [bad_shards["videos"], bad_shards["not_a_tar"]], "type": "video"}]
    module = VideoDataModule(sources, num_frames=3, resolution=[8, 8], batch_size=1, num_workers=2, shuffle_buffer=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=8, logger=CSVLogger(tmp_path), callbacks=[DataStats(1)],
                        log_every_n_steps=1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Tiny(), datamodule=module)
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        last = list(csv.DictReader(f))[-1]
    counts = module.skip_counts()["data.sources[0]"]
    assert float(last["data/skipped/total"]) == sum(counts.values()) >= 10
    assert float(last["data/skipped/unsafe_member"]) == counts["unsafe_member"] >= 3
    with pytest.raises(ValueError, match=r"callbacks\.data_stats\.log_every_n_steps"):
        DataStats(0)


def test_a_module_that_hides_the_batch_hook_is_refused(unequal_shards):
    import lightning as L

    class Hiding(L.LightningModule):
        def on_before_batch_transfer(self, batch, dataloader_idx):
            return batch

    module = module_for([{"urls": unequal_shards, "type": "video"}])
    module.trainer = SimpleNamespace(global_rank=0, world_size=1, lightning_module=Hiding())
    with pytest.raises(TypeError, match="Hiding overrides on_before_batch_transfer"):
        module.train_dataloader()
    module.trainer.lightning_module = L.LightningModule()
    assert module.train_dataloader() is not None
