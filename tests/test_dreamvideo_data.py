"""DreamVideo's folder inputs (vgen.data.folder): a few images (+ masks) or videos with captions -> the stream's
batches, seeded order and augmentation, exact resume, and one-line errors naming the bad file."""

import random

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

from conftest import CONF_DIR
from vgen.data.errors import DataError
from vgen.data.folder import FolderBatches, FolderDataModule, FolderDataset, crop_box
from vgen.diffusion.loss import latent_mask
from vgen.media import write_mp4

SIZES = {"dog1": (40, 30), "dog2": (30, 40), "dog3": (32, 32)}  # (width, height)


def _square_image(width, height, box):
    """A white square (``box`` = left, top, right, bottom) on black, and its mask."""
    pixels = np.zeros((height, width, 3), np.uint8)
    mask = np.zeros((height, width), np.uint8)
    left, top, right, bottom = box
    pixels[top:bottom, left:right] = 255
    mask[top:bottom, left:right] = 255
    return pixels, mask


@pytest.fixture
def subject(tmp_path):
    folder = tmp_path / "subject"
    (folder / "masks").mkdir(parents=True)
    for stem, (width, height) in SIZES.items():
        pixels, mask = _square_image(width, height, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
        Image.fromarray(pixels).save(folder / f"{stem}.png")
        Image.fromarray(mask).save(folder / "masks" / f"{stem}.png")
    (folder / "dog1.txt").write_text("a * on grass\n")
    (folder / "notes.md").write_text("ignored")
    return folder


@pytest.fixture
def motion(tmp_path):
    folder = tmp_path / "motion"
    folder.mkdir()
    for index in range(2):
        frames = np.stack([np.full((16, 24, 3), 20 * k, np.uint8) for k in range(12)])  # grey level = 20 x frame
        write_mp4(frames, folder / f"clip{index}.mp4", fps=8)
        (folder / f"clip{index}.txt").write_text(f"a car turning {index}")
    return folder


def _images(folder, **options):
    return FolderDataset(folder, caption="a *", resolution=(16, 16), **options)


def test_image_folder_gives_the_streams_batch_format_with_masks(subject):
    dataset = _images(subject)
    assert dataset.kind == "image" and len(dataset) == 3
    batch = FolderBatches(dataset, batch_size=3).batch(0)
    assert set(batch) == {"video", "caption", "key", "fps", "has_caption", "kind", "subject_mask"}
    assert batch["video"].shape == (3, 3, 1, 16, 16) and batch["video"].dtype == torch.float32
    assert -1 <= batch["video"].min() and batch["video"].max() <= 1
    assert batch["kind"] == "image" and batch["fps"].dtype == torch.int64 and batch["fps"].tolist() == [1, 1, 1]
    assert batch["has_caption"].tolist() == [True] * 3
    assert sorted(batch["key"]) == ["dog1.png", "dog2.png", "dog3.png"]  # one pass: each file once
    captions = dict(zip(batch["key"], batch["caption"]))
    assert captions == {"dog1.png": "a * on grass", "dog2.png": "a *", "dog3.png": "a *"}
    mask = batch["subject_mask"]
    assert mask.shape == (3, 1, 1, 16, 16) and set(mask.unique().tolist()) == {0.0, 1.0}
    # the mask is cropped and resized with its image: it marks the white square
    white = batch["video"].mean(1, keepdim=True) > 0
    assert (white == mask.bool()).float().mean() > 0.95
    assert latent_mask(mask, torch.zeros(3, 4, 1, 2, 2)).shape == (3, 1, 1, 2, 2)  # the loss mask of the batch


def test_crops_are_random_but_seeded(subject):
    first = [_images(subject, crop_scale=0.6).draw(j)["video"] for j in range(6)]
    again = [_images(subject, crop_scale=0.6).draw(j)["video"] for j in range(6)]
    other = [_images(subject, crop_scale=0.6, seed=1).draw(j)["video"] for j in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    assert len({tuple(t.shape) for t in first}) == 1
    rng = random.Random(0)
    for _ in range(50):
        left, top, width, height = crop_box((40, 30), (16, 16), 0.5, rng, True)
        assert 15 <= width <= 30 and width == height and left + width <= 40 and top + height <= 30
    assert crop_box((40, 30), (16, 16), 1.0, rng, False) == (5, 0, 30, 30)


def test_every_pass_draws_each_file_once_in_a_seeded_order(subject):
    dataset = _images(subject)
    passes = [[dataset.item_of_draw(p * 3 + k) for k in range(3)] for p in range(4)]
    assert all(sorted(order) == [0, 1, 2] for order in passes)
    assert len({tuple(order) for order in passes}) > 1
    assert [_images(subject, shuffle=False).item_of_draw(j) for j in range(6)] == [0, 1, 2, 0, 1, 2]


def test_video_folder_samples_frames_at_the_configured_fps(motion):
    dataset = FolderDataset(motion, num_frames=4, sample_fps=4, resolution=(8, 8))
    assert dataset.kind == "video"
    batch = FolderBatches(dataset, batch_size=2).batch(0)
    assert batch["video"].shape == (2, 3, 4, 8, 8) and "subject_mask" not in batch
    assert batch["fps"].tolist() == [4, 4] and batch["kind"] == "video"
    assert sorted(batch["caption"]) == ["a car turning 0", "a car turning 1"]
    grey = (batch["video"].mean(dim=(1, 3, 4)) + 1) * 127.5  # [B, F]
    steps = grey.diff(dim=1)
    assert torch.all((steps - 40).abs() < 6), steps  # 8 fps source at 4 fps: every second frame (20 grey each)


def _run(module: FolderDataModule, batches: int) -> list[dict]:
    out = []
    for batch in module.train_dataloader():
        out.append(module.on_before_batch_transfer(batch, 0))
        if len(out) == batches:
            return out
    return out


def _same(a: list[dict], b: list[dict]) -> bool:
    return all(x["key"] == y["key"] and torch.equal(x["video"], y["video"]) for x, y in zip(a, b, strict=True))


def test_resume_continues_with_the_batches_of_an_uninterrupted_run_also_with_workers(subject):
    options = {"root": str(subject), "caption": "a *", "resolution": (8, 8), "batch_size": 2, "crop_scale": 0.7}
    straight = _run(FolderDataModule(**options, num_workers=0), 5)
    assert _same(_run(FolderDataModule(**options, num_workers=2), 5), straight)
    first = FolderDataModule(**options, num_workers=0)
    assert _same(_run(first, 3), straight[:3])
    resumed = FolderDataModule(**options, num_workers=0)
    resumed.load_state_dict(first.state_dict())
    assert _same(_run(resumed, 2), straight[3:])


def test_ranks_split_the_draws_of_one_process(subject):
    dataset = _images(subject)
    whole = FolderBatches(dataset, batch_size=4).batch(1)
    ranks = [FolderBatches(dataset, batch_size=2, rank=r, world_size=2).batch(1) for r in range(2)]
    assert whole["key"] == ranks[0]["key"] + ranks[1]["key"]
    assert torch.equal(whole["video"], torch.cat([r["video"] for r in ranks]))


class _Recorder(L.LightningModule):
    """A one-parameter module that records the keys of the batches it trains on."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[tuple] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((*batch["key"], batch["video"].sum().item()))
        return (batch["video"].mean() - self.weight).square()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_checkpoints_and_restores_the_loader_position(subject, tmp_path):
    def fit(steps, ckpt_path=None):
        module = _Recorder()
        trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=tmp_path, enable_checkpointing=False)
        data = FolderDataModule(str(subject), caption="a *", resolution=(8, 8), batch_size=2, num_workers=0)
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        return trainer, module

    _, straight = fit(7)
    trainer, first = fit(4)
    trainer.save_checkpoint(tmp_path / "step4.ckpt")
    _, resumed = fit(7, tmp_path / "step4.ckpt")
    assert len(resumed.seen) == 3 and resumed.seen[0] != straight.seen[0]
    assert first.seen + resumed.seen == straight.seen


def test_hydra_config_builds_the_folder_datamodule(subject):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["data=folder", f"data.root={subject}", "data.caption=a *"])
    data = instantiate(cfg.data)
    assert isinstance(data, FolderDataModule)
    data.check_sources()
    assert len(data.dataset) == 3


def _one_line_error(folder, match, error=DataError, **options):
    with pytest.raises(error, match=match) as info:
        FolderDataset(folder, **options)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_bad_folders_stop_with_one_line_naming_the_file(subject, motion, tmp_path):
    _one_line_error(tmp_path / "nowhere", "is not a folder", FileNotFoundError)
    (tmp_path / "empty").mkdir()
    _one_line_error(tmp_path / "empty", "empty: no images")
    assert "dog2.png: no caption: write it to dog2.txt" in _one_line_error(subject, "no caption")

    Image.fromarray(np.zeros((7, 9), np.uint8)).save(subject / "masks" / "dog3.png")
    _one_line_error(subject, r"masks/dog3.png: mask is 9x7 but its image dog3.png is 32x32", caption="a *")
    (subject / "masks" / "dog3.png").unlink()
    _one_line_error(subject, r"dog3.png: no mask masks/dog3.png, but other images have masks", caption="a *")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(subject / "masks" / "dog3.png")

    (subject / "dog4.jpg").write_bytes(b"")
    _one_line_error(subject, r"dog4.jpg: empty file \(0 bytes\)", caption="a *")
    (subject / "dog4.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    _one_line_error(subject, r"dog4.jpg: undecodable image", caption="a *")
    (subject / "dog4.jpg").unlink()

    _one_line_error(motion, r"clip0.mp4: 12 frames at 8 fps, but a clip of data.num_frames=8 at "
                            r"data.sample_fps=4 needs 15", num_frames=8, sample_fps=4)
    (motion / "clip1.mp4").write_bytes(b"\x00" * 64)
    _one_line_error(motion, "clip1.mp4: ", num_frames=2)
    (motion / "still.png").write_bytes((subject / "dog1.png").read_bytes())
    _one_line_error(motion, "holds images .* and videos")
