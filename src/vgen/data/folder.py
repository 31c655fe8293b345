"""A folder of a few images or videos -> batches in the stream's format (DreamVideo's subject and motion data).

DreamVideo learns a subject from 3-5 images and a motion from a few videos: no shards to write. The folder::

    subject/                      motion/
        dog1.jpg                      turn1.mp4
        dog1.txt   "a * on grass"     turn1.txt   "a car turning"
        dog2.png                      turn2.mp4
        masks/                        turn2.txt
            dog1.png
            dog2.png

* media: images (jpg, jpeg, png, webp) *or* videos (mp4, webm, avi, mkv, mov), not both; read flat (no
  subfolders but ``masks/``); hidden files and other extensions are ignored;
* captions: ``<stem>.txt`` next to each file; ``caption`` (e.g. "a *") is the caption of files without one;
* masks (images only, optional): ``masks/<stem>.<image extension>`` of every image, the same size as its image;
  grey > 127 is the subject. Batches then carry ``subject_mask`` float32 [B, 1, 1, H, W] in {0, 1}, cropped and
  resized with the image (not ``mask``: that is VideoComposer's condition). A stage with DreamVideo's masked loss
  passes ``loss_mask=vgen.diffusion.latent_mask(batch["subject_mask"], latents)`` to ``diffusion.loss``.

Batches are those of :class:`vgen.data.VideoDataModule`: ``video`` float32 [B, 3, F, H, W] in [-1, 1] (images:
F = 1), ``caption`` list, ``key`` list (file names), ``has_caption`` bool [B], ``fps`` int64 [B] (images 1),
``kind`` ("image" / "video"), so every stage consumes them as they are. Each sample is a random crop (a side of
``crop_scale``..1 times the largest crop of the target's aspect, placed at random; centred without
``random_crop``) resized to ``resolution``; videos give ``num_frames`` frames at ``sample_fps`` (random window).

Order and resume: the files are drawn in endless passes, each a seeded permutation (``shuffle``). Draw ``j``
(counted over all ranks: micro-batch ``i`` of rank ``r`` of ``W`` holds draws ``(i W + r) b ..``) and its
augmentation are a pure function of ``(seed, j)``. The datamodule saves the micro-batches it consumed in each
checkpoint, so a resumed run continues with exactly the batches an uninterrupted one would have seen.

Bad inputs (an empty folder, an unreadable or empty file, a missing caption, a missing or mis-sized mask, a video
too short for one clip) stop the run before training with one line naming the file (:class:`DataError`).
"""

from __future__ import annotations

import io
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from vgen.data.errors import DataError, SampleError
from vgen.data.image import IMAGE_EXTENSIONS, decode_image
from vgen.data.shards import seeded
from vgen.data.stream import IMAGE_FPS, collate
from vgen.data.transforms import resize_center_crop
from vgen.data.video import VIDEO_EXTENSIONS, decode_video, frame_stride

log = logging.getLogger(__name__)

CONFIG_PREFIX = "data"
MASK_DIR = "masks"
STATE_VERSION = 1


@dataclass(frozen=True)
class FolderItem:
    """One media file of the folder, its caption and (images) its mask file."""

    path: Path
    caption: str
    mask: Path | None = None


def _media_files(folder: Path, extensions: Sequence[str]) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower().lstrip(".") in extensions)


def _read(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read the file ({err.strerror or err})") from None
    if not data:
        raise DataError(f"{path}: empty file (0 bytes)")
    return data


def _caption(path: Path, default: str | None) -> str:
    sidecar = path.with_suffix(".txt")
    if sidecar.is_file():
        try:
            text = sidecar.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"{sidecar}: unreadable caption ({err})") from None
        if text:
            return text
    if default is None:
        raise DataError(f"{path}: no caption: write it to {sidecar.name} next to it, or set "
                        f"{CONFIG_PREFIX}.caption (the caption of files without one)")
    return default


def decode_mask(data: bytes, path: Path) -> np.ndarray:
    """uint8 [H, W] in {0, 255}: grey > 127 is the subject (upright per EXIF, as images)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            grey = np.asarray(ImageOps.exif_transpose(image).convert("L"))
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: unreadable mask ({err})") from None
    return np.where(grey > 127, 255, 0).astype(np.uint8)


def scan_folder(root: str | Path, caption: str | None, num_frames: int, sample_fps: float
                ) -> tuple[str, list[FolderItem]]:
    """``(kind, items)`` of a folder (see the module docstring), every file checked: images and masks decoded,
    videos probed for one clip of ``num_frames`` at ``sample_fps``."""
    from vgen.data.clips import probe_video

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{CONFIG_PREFIX}.root: {root} is not a folder")
    images, videos = _media_files(root, IMAGE_EXTENSIONS), _media_files(root, VIDEO_EXTENSIONS)
    if not images and not videos:
        raise DataError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) or videos ({', '.join(VIDEO_EXTENSIONS)}) "
                        "in the folder")
    if images and videos:
        raise DataError(f"{root}: holds images ({images[0].name}, ...) and videos ({videos[0].name}, ...); put "
                        "subject images and motion videos in separate folders")
    masks = _mask_files(root)
    if videos and masks:
        raise DataError(f"{root / MASK_DIR}: masks are read for images only, but {root} holds videos")
    if masks:
        stems = {p.stem for p in images}
        orphan = sorted(set(masks) - stems)
        if orphan:
            raise DataError(f"{masks[orphan[0]]}: a mask of no image in {root} (masks/<stem> names its image)")
    items = []
    for path in images:
        text = _caption(path, caption)
        try:
            height, width = decode_image(_read(path)).shape[:2]
        except SampleError as err:
            raise DataError(f"{path}: {err}") from None
        mask = masks.get(path.stem)
        if masks and mask is None:
            raise DataError(f"{path}: no mask {MASK_DIR}/{path.stem}.png, but other images have masks: give every "
                            f"image its mask, or remove {root / MASK_DIR}")
        if mask is not None:
            mask_height, mask_width = decode_mask(_read(mask), mask).shape
            if (mask_height, mask_width) != (height, width):
                raise DataError(f"{mask}: mask is {mask_width}x{mask_height} but its image {path.name} is "
                                f"{width}x{height}; a mask must have its image's size")
        items.append(FolderItem(path, text, mask))
    for path in videos:
        text = _caption(path, caption)
        try:
            info = probe_video(_read(path))
        except SampleError as err:
            raise DataError(f"{path}: {err}") from None
        stride = frame_stride(info.fps, sample_fps)
        span = (num_frames - 1) * stride + 1
        if info.frames < span:
            raise DataError(f"{path}: {info.frames} frames at {info.fps:g} fps, but a clip of {CONFIG_PREFIX}."
                            f"num_frames={num_frames} at {CONFIG_PREFIX}.sample_fps={sample_fps:g} needs {span} "
                            f"(frame stride {stride}); lower them or use a longer video")
        items.append(FolderItem(path, text))
    return ("image" if images else "video"), items


def _mask_files(root: Path) -> dict[str, Path]:
    folder = root / MASK_DIR
    if not folder.is_dir():
        return {}
    masks: dict[str, Path] = {}
    for path in _media_files(folder, IMAGE_EXTENSIONS):
        if path.stem in masks:
            raise DataError(f"{path}: a second mask of {path.stem} (also {masks[path.stem].name}); keep one")
        masks[path.stem] = path
    return masks


def crop_box(size: tuple[int, int], target: tuple[int, int], crop_scale: float, rng: random.Random,
             random_position: bool) -> tuple[int, int, int, int]:
    """``(left, top, width, height)`` of a crop of a ``size`` = (width, height) frame with about the aspect of
    ``target`` = (width, height): the largest such crop scaled by a random factor in [``crop_scale``, 1], placed
    at random (or centred)."""
    (width, height), (target_width, target_height) = size, target
    aspect = target_width / target_height
    box_width, box_height = (height * aspect, height) if width / height > aspect else (width, width / aspect)
    scale = rng.uniform(crop_scale, 1.0) if crop_scale < 1.0 else 1.0
    box_width = min(width, max(1, round(box_width * scale)))
    box_height = min(height, max(1, round(box_height * scale)))
    if random_position:
        return rng.randint(0, width - box_width), rng.randint(0, height - box_height), box_width, box_height
    return (width - box_width) // 2, (height - box_height) // 2, box_width, box_height


class FolderDataset(Dataset):
    """Map-style dataset of the folder's files (:func:`scan_folder`): ``dataset[i]`` is file ``i`` as a training
    sample (augmented with a generator seeded by ``(seed, i)``); :meth:`draw` is the ``j``-th sample of the
    endless seeded sequence the loader reads. Samples are ``{video [3, F, H, W], caption, key, fps, has_caption}``
    plus ``subject_mask`` [1, F, H, W] for images with masks."""

    def __init__(self, root: str | Path, caption: str | None = None, num_frames: int = 16, sample_fps: float = 8,
                 resolution: Sequence[int] = (256, 256), seed: int = 0, shuffle: bool = True,
                 random_crop: bool = True, crop_scale: float = 1.0, random_start: bool = True):
        self.root, self.seed, self.shuffle = Path(root), seed, shuffle
        self.num_frames, self.sample_fps = num_frames, sample_fps
        self.width, self.height = int(resolution[0]), int(resolution[1])
        self.random_crop, self.crop_scale, self.random_start = random_crop, crop_scale, random_start
        self.kind, self.items = scan_folder(root, caption, num_frames, sample_fps)
        self._pass, self._order = -1, []

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self.items):
            raise IndexError(f"index {index} out of range for {len(self.items)} files")
        return self.sample(index, seeded(self.seed, "item", index))

    def item_of_draw(self, draw: int) -> int:
        """The file of draw ``draw``: pass ``draw // n`` is a seeded permutation of the ``n`` files (or file order)."""
        pass_index, position = divmod(draw, len(self.items))
        if not self.shuffle:
            return position
        if pass_index != self._pass:
            self._order = list(range(len(self.items)))
            seeded(self.seed, "pass", pass_index).shuffle(self._order)
            self._pass = pass_index
        return self._order[position]

    def draw(self, draw: int) -> dict:
        return self.sample(self.item_of_draw(draw), seeded(self.seed, "draw", draw))

    def sample(self, index: int, rng: random.Random) -> dict:
        item = self.items[index]
        if self.kind == "video":
            try:
                clip = decode_video(_read(item.path), self.num_frames, self.sample_fps,
                                    "random" if self.random_start else "center", rng)
            except SampleError as err:
                raise DataError(f"{item.path}: {err}") from None
            frames, fps = clip.frames, int(clip.fps + 0.5) if self.num_frames > 1 else IMAGE_FPS
        else:
            try:
                frames, fps = decode_image(_read(item.path))[None], IMAGE_FPS
            except SampleError as err:
                raise DataError(f"{item.path}: {err}") from None
        height, width = frames.shape[1:3]
        left, top, box_width, box_height = crop_box((width, height), (self.width, self.height), self.crop_scale, rng,
                                                    self.random_crop)
        window = (slice(None), slice(top, top + box_height), slice(left, left + box_width))
        sample = {"video": resize_center_crop(frames[window], width=self.width, height=self.height),
                  "caption": item.caption, "key": item.path.name, "fps": fps, "has_caption": True}
        if item.mask is not None:
            mask = decode_mask(_read(item.mask), item.mask)
            if mask.shape != (height, width):
                raise DataError(f"{item.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but its image "
                                f"{item.path.name} is {width}x{height}; a mask must have its image's size")
            pixels = np.repeat(mask[None, :, :, None], 3, axis=3)[window]
            resized = resize_center_crop(pixels, width=self.width, height=self.height)
            sample["subject_mask"] = (resized[:1] >= 0).float()
        return sample


def collate_folder(samples: list[dict], kind: str) -> dict:
    """The stream's batch (:func:`vgen.data.stream.collate`) plus ``subject_mask`` [B, 1, F, H, W] when every sample
    has one."""
    batch = collate(samples, kind)
    if all("subject_mask" in s for s in samples):
        batch["subject_mask"] = torch.stack([s["subject_mask"] for s in samples])
    return batch


class FolderBatches(IterableDataset):
    """Endless batches of rank ``rank`` of ``world_size``, from micro-batch ``start`` on; DataLoader worker ``w`` of
    ``n`` makes micro-batches ``start + w``, ``start + w + n``, ... (the DataLoader takes them round-robin, so the
    order is that of one process)."""

    def __init__(self, dataset: FolderDataset, batch_size: int, start: int = 0, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.dataset, self.batch_size, self.start = dataset, batch_size, start
        self.rank, self.world_size = rank, world_size

    def batch(self, micro: int) -> dict:
        first = (micro * self.world_size + self.rank) * self.batch_size
        samples = [self.dataset.draw(j) for j in range(first, first + self.batch_size)]
        return collate_folder(samples, self.dataset.kind)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        micro = self.start + worker
        while True:
            yield self.batch(micro)
            micro += workers


def _int_at_least(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{CONFIG_PREFIX}.{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{CONFIG_PREFIX}.{name} must be true or false, got {value!r}")
    return value


class FolderDataModule(L.LightningDataModule):
    """A folder of a few images (+ masks) or videos with captions as an endless, exactly resumable loader
    (see :mod:`vgen.data.folder`): ``batch_size`` samples per rank and step, at ``resolution`` [width, height].

    ``caption``: the caption of files without a ``<stem>.txt``. ``num_frames`` at ``sample_fps`` per video clip
    (``random_start``: random window, else the centre). ``random_crop`` / ``crop_scale``: crop position and size
    (1 = the largest crop of the target's aspect). ``shuffle``: each pass over the files in a seeded order.
    """

    def __init__(self, root: str, caption: str | None = None, num_frames: int = 16, sample_fps: float = 8,
                 resolution: Sequence[int] = (256, 256), batch_size: int = 4, num_workers: int = 2, seed: int = 0,
                 shuffle: bool = True, random_crop: bool = True, crop_scale: float = 1.0, random_start: bool = True):
        super().__init__()
        if not isinstance(root, (str, Path)) or not str(root):
            raise ValueError(f"{CONFIG_PREFIX}.root must be a folder path, got {root!r}")
        if caption is not None and (not isinstance(caption, str) or not caption.strip()):
            raise ValueError(f"{CONFIG_PREFIX}.caption must be null or a non-empty string, got {caption!r}")
        if not isinstance(sample_fps, (int, float)) or isinstance(sample_fps, bool) or sample_fps <= 0:
            raise ValueError(f"{CONFIG_PREFIX}.sample_fps must be a number > 0, got {sample_fps!r}")
        if isinstance(resolution, str) or len(resolution) != 2:
            raise ValueError(f"{CONFIG_PREFIX}.resolution must be [width, height], got {resolution!r}")
        if not isinstance(crop_scale, (int, float)) or isinstance(crop_scale, bool) or not 0 < crop_scale <= 1:
            raise ValueError(f"{CONFIG_PREFIX}.crop_scale must be a number in (0, 1], got {crop_scale!r}")
        self.options = {
            "root": str(root), "caption": caption, "num_frames": _int_at_least(num_frames, "num_frames"),
            "sample_fps": sample_fps, "seed": _int_at_least(seed, "seed", minimum=0),
            "resolution": (_int_at_least(resolution[0], "resolution[0] (width)"),
                           _int_at_least(resolution[1], "resolution[1] (height)")),
            "shuffle": _flag(shuffle, "shuffle"), "random_crop": _flag(random_crop, "random_crop"),
            "crop_scale": float(crop_scale), "random_start": _flag(random_start, "random_start"),
        }
        self.batch_size = _int_at_least(batch_size, "batch_size")
        self.num_workers = _int_at_least(num_workers, "num_workers", minimum=0)
        self.dataset: FolderDataset | None = None
        self._consumed = 0  # micro-batches of this rank that training has taken (the loader prefetches more)

    def check_sources(self) -> None:
        """Read and check every file (before any model is built); ``vgen.train`` calls this."""
        if self.dataset is None:
            self.dataset = FolderDataset(**self.options)
            log.info("%s.root %s: %d %s(s)%s", CONFIG_PREFIX, self.options["root"], len(self.dataset),
                     self.dataset.kind, " with masks" if self.dataset.items[0].mask else "")

    def setup(self, stage: str | None = None) -> None:
        self.check_sources()

    def _topology(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        self.check_sources()
        from vgen.callbacks.preemption import ignore_preemption_signals_in_worker

        rank, world_size = self._topology()
        batches = FolderBatches(self.dataset, self.batch_size, self._consumed, rank, world_size)
        return DataLoader(batches, batch_size=None, num_workers=self.num_workers,
                          worker_init_fn=ignore_preemption_signals_in_worker)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Count ``batch`` as trained on (it is about to be; Lightning prefers this hook to a LightningModule's)."""
        self._consumed += 1
        return batch

    def _fingerprint(self) -> list[str]:
        return [item.path.name for item in self.dataset.items] if self.dataset is not None else []

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "consumed": self._consumed, "seed": self.options["seed"],
                "files": self._fingerprint()}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("version") != STATE_VERSION:
            raise ValueError(f"checkpoint folder-loader state has version {state_dict.get('version')!r}, this vgen "
                             f"reads version {STATE_VERSION}")
        self.check_sources()
        saved = (state_dict.get("seed"), state_dict.get("files"))
        if saved != (self.options["seed"], self._fingerprint()):
            log.warning("data: the checkpoint's loader position is for seed %s over files %s; this run has seed %s "
                        "over %s: the batches after resume differ from those of an uninterrupted run", *saved,
                        self.options["seed"], self._fingerprint())
        self._consumed = int(state_dict["consumed"])
