"""DreamVideo (arXiv 2312.04433): customise a frozen text-to-video model with a subject and a motion.

One stage, three recipes (``conf/experiment/dreamvideo_*.yaml``); every base weight stays frozen and EMA is off:

* **subject step 1, textual inversion** (``stage.placeholder.train: true``, no adapters): the embedding row of a
  placeholder token (``*``) in the text encoder is the only trainable tensor, learned on 3-5 images of the subject
  ("a *"), optionally with a subject-masked loss (``masked_loss``: the target outside the mask is ignored, the
  denominator stays the full element count, as VGen's ``use_mask_diffusion``).
* **subject step 2, identity adapter** (``stage.adapters.identity``; ``stage.placeholder.path`` loads the step-1
  embedding, frozen): bottleneck adapters parallel to every spatial cross-attention train on the same images.
* **motion** (``stage.adapters.motion`` on ``model/unet: dreamvideo``): temporal adapters, each adding the
  appearance term lambda W_c c (c: the CLIP embedding of a random frame, dropped with
  ``model.unet.conditions.appearance.dropout`` = VGen's p_image_zero), train on a few videos with the text dropped
  to the empty prompt with probability ``model.unet.conditions.text.dropout`` (p_zero).

Checkpoints hold what trained: the adapters (named by their class and settings) and the placeholder (its token and
embedding, also as ``checkpoint["placeholder"]``), plus the base weights file they go with (``stage.init.path``).
:class:`vgen.pipeline.VideoPipeline` rebuilds the text encoder's placeholder and the adapters from them and composes
a subject checkpoint with a motion checkpoint at sampling (``vgen.sample subject=... motion=...``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from vgen.diffusion.loss import latent_mask
from vgen.models.conditions.standard import TextTokens
from vgen.stages.base import DiffusionStage
from vgen.stages.options import PlaceholderOptions, parse

log = logging.getLogger(__name__)

PLACEHOLDER_KEY = "text_encoder.placeholder.embedding"  # the learned row in the stage's state dict


def read_placeholder_source(path: str | Path, width: int) -> tuple[str, str, torch.Tensor]:
    """``(token, init_word, embedding [width])`` from a placeholder ``.safetensors`` file
    (``OpenCLIPTextEncoder.save_placeholder``) or a DreamVideo training checkpoint (``.ckpt`` or sharded directory);
    one-line errors naming the file."""
    from vgen.models.textual_inversion import read_placeholder

    path = Path(path)
    if path.suffix == ".safetensors":
        return read_placeholder(path, width)
    meta = checkpoint_meta(path)
    saved = meta.get("placeholder")
    if not isinstance(saved, Mapping) or "embedding" not in saved or "token" not in saved:
        raise ValueError(f"{path}: holds no learned placeholder (not a DreamVideo subject checkpoint)")
    embedding = saved["embedding"]
    if not isinstance(embedding, torch.Tensor) or tuple(embedding.shape) != (width,):
        shape = tuple(embedding.shape) if isinstance(embedding, torch.Tensor) else type(embedding).__name__
        raise ValueError(f"{path}: placeholder embedding {shape} does not fit this text encoder (width {width})")
    return str(saved["token"]), str(saved.get("init_word", "")), embedding.float()


def checkpoint_meta(path: str | Path) -> dict:
    """A training checkpoint's metadata (everything but the weights): a ``.ckpt`` file read weights-only, or a
    sharded directory's metadata file."""
    from vgen.checkpoint.export import load_training_checkpoint

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        from vgen.checkpoint.sharded import consolidate

        return consolidate(path)[1]
    return load_training_checkpoint(path)


class DreamVideoStage(DiffusionStage):
    """Args (besides the base's): ``placeholder`` (:class:`vgen.stages.options.PlaceholderOptions`: ``token``,
    ``init_word``, ``path``, ``train``) and ``masked_loss`` (weight the loss by ``batch["subject_mask"]``, from
    ``data=folder`` with ``masks/``). Trains the placeholder and/or ``adapters``; nothing else."""

    def __init__(self, unet: nn.Module, *args, placeholder: Mapping | None = None, masked_loss: bool = False,
                 **kwargs):
        self.placeholder_cfg = parse(PlaceholderOptions, "placeholder", placeholder)
        if not isinstance(masked_loss, bool):
            raise TypeError(f"stage.masked_loss must be true or false, got {masked_loss!r}")
        self.masked_loss = masked_loss
        super().__init__(unet, *args, **kwargs)
        if not self.adapters and not self.placeholder_cfg.train:
            raise ValueError("this DreamVideo stage trains nothing: set stage.placeholder.train (subject step 1) or "
                             "give stage.adapters (identity: subject step 2; motion: motion learning)")
        cfg = self.placeholder_cfg
        self.text_condition = next((n for n, c in unet.conditions.items() if isinstance(c, TextTokens)), None)
        if cfg.token is not None:
            if not hasattr(self.text_encoder, "add_placeholder"):
                raise ValueError(f"stage.placeholder needs an OpenCLIP text encoder (model.text_encoder), got "
                                 f"{type(self.text_encoder).__name__}")
            if self.text_condition is None:
                raise ValueError("stage.placeholder: model.unet has no caption-token condition to learn a word for")
            if cfg.train:
                self.text_encoder.add_placeholder(cfg.token, cfg.init_word)
            elif cfg.path is None:
                rank_zero_warn(f"stage.placeholder.path is null: {cfg.token!r} is not a learned subject but the "
                               f"embedding of {cfg.init_word!r} (set it to the step-1 checkpoint for a real run)")
                self.text_encoder.add_placeholder(cfg.token, cfg.init_word).requires_grad_(False)
            else:
                try:
                    token, init_word, embedding = read_placeholder_source(cfg.path, self.text_encoder.dim)
                except (ValueError, FileNotFoundError) as err:  # CheckpointError is a ValueError
                    raise ValueError(f"stage.placeholder.path={cfg.path}: {err}") from None
                if token != cfg.token.strip().lower():
                    raise ValueError(f"stage.placeholder.path={cfg.path} learned the token {token!r}, but "
                                     f"stage.placeholder.token is {cfg.token!r}")
                self.text_encoder.add_placeholder(token, init_word, embedding).requires_grad_(False)
                log.info("placeholder %r loaded from %s (frozen)", token, cfg.path)

    # ------------------------------------------------------------------ what trains
    @property
    def placeholder(self) -> nn.Module | None:
        return getattr(self.text_encoder, "placeholder", None)

    @property
    def trains_placeholder(self) -> bool:
        return self.placeholder_cfg.train

    def configure_trainable(self, unet: nn.Module) -> None:
        """The adapters alone (the base's rule); without adapters (textual inversion) the whole UNet is frozen."""
        if self.adapters:
            super().configure_trainable(unet)
        else:
            unet.requires_grad_(False)

    @property
    def saves_adapters_only(self) -> bool:
        """Checkpoints hold only what trains (adapters, the placeholder) when the base weights have a file."""
        return self.init_cfg.path is not None

    def _saved_names(self) -> set[str] | None:
        if not self.saves_adapters_only:
            return None
        return super()._saved_names() if self.adapters else set()

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = [p for p in self.unet.parameters() if p.requires_grad]
        if self.trains_placeholder:
            params += list(self.placeholder.parameters())
        return params

    def configure_optimizers(self):
        from vgen.training.optim import build_optimizer, warmup_decay_lambda

        cfg = self.optim_cfg
        optimizer = build_optimizer(self.trainable_parameters(), cfg.lr, cfg.betas, cfg.eps, cfg.weight_decay,
                                    cfg.implementation)
        factor = warmup_decay_lambda(cfg.warmup_steps, cfg.total_steps, cfg.decay, cfg.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ persistence
    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        if self.placeholder is not None:
            embedding = self.placeholder.embedding
            state[PLACEHOLDER_KEY] = embedding if keep_vars else embedding.detach()
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        state = dict(state_dict)
        embedding = state.pop(PLACEHOLDER_KEY, None)
        if self.placeholder is not None:
            if embedding is None:
                raise KeyError(f"checkpoint has no {PLACEHOLDER_KEY} but this run has stage.placeholder")
            with torch.no_grad():
                self.placeholder.embedding.copy_(embedding)
        elif embedding is not None:
            raise KeyError(f"checkpoint holds a learned placeholder ({PLACEHOLDER_KEY}) but this run has "
                           "stage.placeholder.token null")
        return super().load_state_dict(state, strict=strict, assign=assign)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["base_weights"] = ({"path": self.init_cfg.path, "format": self.init_cfg.format}
                                      if self.saves_adapters_only else None)
        if self.placeholder is not None:
            checkpoint["placeholder"] = {**self.placeholder.metadata(),
                                         "embedding": self.placeholder.embedding.detach().float().cpu().clone()}

    # ------------------------------------------------------------------ training
    def training_conditions(self, batch: dict, latents: torch.Tensor) -> dict[str, Any]:
        """The base's condition values and dropout; when the placeholder trains, the captions are encoded with
        gradients to its embedding (the null prompt stays the cached one: it has no placeholder)."""
        with torch.no_grad():
            values = self.condition_values(self.condition_inputs(batch, latents, latents.shape[2]))
        if self.trains_placeholder:
            if "caption" not in batch:
                raise ValueError("textual inversion needs captions in the batch (latent shards with cached text "
                                 "embeddings cannot learn a new word)")
            values[self.text_condition] = self.text_encoder(list(batch["caption"]))
        return self.drop_conditions(values)

    def compute_loss(self, batch: dict) -> torch.Tensor:
        latents = self.batch_latents(batch)
        conditions = self.training_conditions(batch, latents)
        mask = None
        if self.masked_loss:
            if "subject_mask" not in batch:
                raise ValueError("stage.masked_loss is true but the batch has no subject_mask: give the images' "
                                 "masks (data=folder, a masks/ folder beside them)")
            mask = latent_mask(batch["subject_mask"], latents)
        per_sample = self.diffusion.loss(self.unet, latents, conditions, loss_mask=mask,
                                         **self._seeded_noise(batch, latents))
        loss = per_sample.mean()
        if self.trains_placeholder:  # every rank's graph reaches the embedding, even without the placeholder
            loss = loss + 0.0 * self.placeholder.embedding.sum()
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        """Under FSDP2 only the sharded UNet reduces its gradients: average the placeholder's over the ranks."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        if (self.trains_placeholder and not self.step_skipped and self._trainer is not None
                and isinstance(self.trainer.strategy, ModelParallelStrategy) and self.trainer.world_size > 1):
            grad = self.placeholder.embedding.grad
            if grad is None:
                grad = self.placeholder.embedding.grad = torch.zeros_like(self.placeholder.embedding)
            torch.distributed.all_reduce(grad, op=torch.distributed.ReduceOp.SUM)
            grad /= self.trainer.world_size
        super().on_before_optimizer_step(optimizer)
        if self.trains_placeholder and self.placeholder.embedding.grad is not None and not self.step_skipped:
            self.log("train/placeholder_grad_norm", self.placeholder.embedding.grad.norm())
