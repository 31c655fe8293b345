"""Inference as its own object: UNet + VAE + encoders + diffusion + sampler + adapters, never a training stage.

    from vgen import VideoPipeline
    pipe = VideoPipeline.from_checkpoint("outputs/demo/checkpoints/step0000800.ckpt")
    pipe.save(pipe("a red circle moving left"), "left.mp4")

A pipeline is built from a training checkpoint of any stage (a ``.ckpt`` file or a sharded DeepSpeed / FSDP2
directory: joint, HQ, refine, reward with its adapters, distill with the LCM sampler), from released weights plus a
run config (:meth:`VideoPipeline.from_config`), or from a stage in memory (:meth:`VideoPipeline.from_stage`, which
shares the stage's modules: the validation-video callback). It builds no optimizer, no reward model and no
teacher. Conditions are the UNet's own (:mod:`vgen.models.conditions`): their values come from the prompts, the
reference frames (a first-frame image), the fps, or explicitly from ``conditions=``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vgen.diffusion import Diffusion, ddim_invert, ddim_sample, denoise_from, lcm_sample, sdedit_timesteps
from vgen.models.adapters import Adapter, adapter_parameter_names, file_has_adapter_keys
from vgen.models.conditions import ConditionError, ConditionInputs
from vgen.models.conditions.classifier_free import guidance_pair
from vgen.models.encoding import FrozenEncoding
from vgen.stages.options import NEGATIVE_PROMPT, DistillOptions

log = logging.getLogger(__name__)

Sampler = Callable[..., torch.Tensor]


class PipelineError(ValueError):
    """A pipeline cannot be built or run as asked (the message says what to change)."""


def _sample_ddim(pipe: VideoPipeline, x_T: torch.Tensor, cond: dict, uncond: dict, *, steps: int | None,
                 guidance: float | None, generator: torch.Generator, seed: int, eta: float | None = None
                 ) -> torch.Tensor:
    d = pipe.diffusion
    return ddim_sample(pipe.unet, x_T, d.param, steps or d.ddim_steps, cond=cond, uncond=uncond,
                       guidance_scale=d.guidance_scale if guidance is None else guidance,
                       eta=d.ddim_eta if eta is None else eta, generator=generator,
                       frame_correlation=d.frame_noise_correlation, spacing=d.ddim_spacing)


def _sample_lcm(pipe: VideoPipeline, x_T: torch.Tensor, cond: dict, uncond: dict, *, steps: int | None,
                guidance: float | None, generator: torch.Generator, seed: int, eta: float | None = None
                ) -> torch.Tensor:
    if guidance is not None:
        raise PipelineError("guidance does not apply to sampler=lcm (consistency sampling uses no classifier-free "
                            "guidance)")
    lcm = pipe.lcm or DistillOptions()
    renoise = torch.Generator(device=x_T.device).manual_seed(seed + 1_000_003)  # never x_T's noise
    return lcm_sample(pipe.unet, x_T, pipe.diffusion.param, steps or lcm.sample_steps, cond=cond,
                      original_steps=lcm.solver_steps, sigma_data=lcm.sigma_data,
                      timestep_scaling=lcm.timestep_scaling, eta=1.0 if eta is None else eta, generator=renoise,
                      frame_correlation=pipe.diffusion.frame_noise_correlation)


# ``sampler=`` of vgen.sample and VideoPipeline.__call__: name -> fn(pipe, x_T, cond, uncond, *, steps, guidance,
# generator (x_T's, continued), seed, eta) -> clean latents.
SAMPLERS: dict[str, Sampler] = {"ddim": _sample_ddim, "lcm": _sample_lcm}


class _WithNegativePrompt:
    """The pipeline's encoders with another negative prompt (one sampling call's ``negative_prompt``)."""

    def __init__(self, pipe: VideoPipeline, prompt: str):
        self._pipe, self._prompt = pipe, prompt

    def negative_embedding(self, batch_size: int) -> torch.Tensor:
        return self._pipe.prompt_embedding(self._prompt, batch_size)

    def __getattr__(self, name: str):
        return getattr(self._pipe, name)


class VideoPipeline(FrozenEncoding, nn.Module):
    """Text(+image)-to-video inference. Build it with :meth:`from_checkpoint`, :meth:`from_config` or
    :meth:`from_stage`; call it with prompts; :meth:`refine` runs a video through a refinement model.

    Args:
        unet: the denoiser, with its adapters applied and weights loaded.
        diffusion: the recipe's schedule, parameterisation and sampler defaults.
        vae, text_encoder, image_encoder: frozen encoders (image encoder for image-embedding conditions).
        negative_prompt: the unconditional text of classifier-free guidance (None = VGen's).
        adapters: the adapters applied to ``unet`` (kept for :meth:`merge_adapters`).
        sampler: default sampler (``ddim``; ``lcm`` for consistency-distilled checkpoints).
        lcm: the distillation settings LCM sampling needs (solver grid, boundary scalings, default steps).
        noise_levels: a refinement model's SDEdit start level (``refine``).
        defaults: ``num_frames``, ``height``, ``width``, ``fps`` of the training run.
    """

    def __init__(self, unet: nn.Module, diffusion: Diffusion, vae: nn.Module, text_encoder: nn.Module,
                 image_encoder: nn.Module | None = None, *, negative_prompt: str | None = None,
                 adapters: Mapping[str, Adapter] | None = None, sampler: str = "ddim",
                 lcm: DistillOptions | None = None, noise_levels: int | None = None,
                 defaults: Mapping[str, int] | None = None, data_conditions: Mapping | None = None):
        super().__init__()
        if sampler not in SAMPLERS:
            raise PipelineError(f"sampler={sampler} is not one of {list(SAMPLERS)}")
        self.unet, self.diffusion = unet, diffusion
        self.vae, self.text_encoder, self.image_encoder = vae, text_encoder, image_encoder
        self.negative_prompt = NEGATIVE_PROMPT if negative_prompt is None else negative_prompt
        self.adapters = dict(adapters or {})
        self.sampler, self.lcm, self.noise_levels = sampler, lcm, noise_levels
        self.defaults = {"num_frames": 8, "height": 32, "width": 32, "fps": 8, **(defaults or {})}
        self.data_conditions = dict(data_conditions or {})  # the run's data.conditions: how its maps were made
        self._prompt_cache = None
        self.base_weights: dict | None = None  # the base weights file adapter-only weights were loaded over

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def samplers(self) -> list[str]:
        """The samplers this model supports (LCM only for consistency-distilled models)."""
        return ["lcm", "ddim"] if self.lcm is not None else ["ddim"]

    @property
    def needs_reference(self) -> bool:
        """Whether every call needs reference frames (``images``: image-to-video)."""
        return any(c.uses_reference and c.required and c.from_batch for c in self.unet.conditions.values())

    @property
    def uses_reference(self) -> bool:
        return any(c.uses_reference and c.from_batch for c in self.unet.conditions.values())

    # ------------------------------------------------------------------ building
    @classmethod
    def from_stage(cls, stage) -> VideoPipeline:
        """A pipeline over a training stage's own modules (no copy): its UNet, encoders, diffusion, negative prompt
        and adapters; a distillation stage's LCM settings; a refinement stage's noise levels."""
        lcm = getattr(stage, "distill_cfg", None)
        return cls(stage.unet, stage.diffusion, stage.vae, stage.text_encoder, stage.image_encoder,
                   negative_prompt=stage.negative_prompt, adapters=stage.adapters,
                   sampler="lcm" if lcm is not None else "ddim", lcm=lcm,
                   noise_levels=getattr(stage, "noise_levels", None))

    @classmethod
    def from_config(cls, config: Mapping[str, Any], weights: str | Path | Mapping[str, torch.Tensor] | None = None,
                    *, format: str = "auto", base_weights: Mapping[str, Any] | None = None,
                    placeholder: Mapping[str, Any] | None = None) -> VideoPipeline:
        """A pipeline from a resolved run config (``model``, ``diffusion``, ``stage``, ``data``) and UNet weights:
        a state dict (vgen keys: the whole UNet, or only its adapters when ``base_weights`` names the base), or a
        released weights file (any format of :func:`vgen.checkpoint.original.init_unet`). The frozen encoders load
        their own weights files, named in the config. ``placeholder`` (a DreamVideo checkpoint's learned token:
        ``token``, ``init_word``, ``embedding``) goes into the text encoder; without it, ``stage.placeholder`` of the
        config is followed (its ``path``)."""
        from hydra.utils import instantiate

        from vgen.checkpoint.original import init_unet

        model, stage = config.get("model", {}), config.get("stage", {})
        if "unet" not in model or "diffusion" not in config:
            raise PipelineError("the run config has no model.unet or diffusion (not written by vgen.train)")
        unet = instantiate(model["unet"])
        adapters = {name: instantiate(spec) for name, spec in (stage.get("adapters") or {}).items()}
        base = base_weights
        if base is not None:  # adapter-only weights: the base first (a file with adapters loads after them)
            if file_has_adapter_keys(base["path"], list(adapters.values())):
                _apply(unet, adapters)
                init_unet(unet, base["path"], base.get("format", "auto"))
            else:
                init_unet(unet, base["path"], base.get("format", "auto"))
                _apply(unet, adapters)
        else:
            _apply(unet, adapters)
        if isinstance(weights, (str, Path)):
            init_unet(unet, weights, format)
        elif weights is not None:
            _load_weights(unet, dict(weights), adapters if base is not None else None)
        distill = stage.get("distill")
        data, shown = config.get("data") or {}, (config.get("callbacks") or {}).get("sample_videos") or {}
        width, height = data.get("resolution") or [shown.get("width", 32), shown.get("height", 32)]
        defaults = {"num_frames": data.get("num_frames", 8), "height": height, "width": width,
                    "fps": data.get("sample_fps", 8)}
        lcm = DistillOptions(**distill) if distill is not None else None
        text_encoder = instantiate(model["text_encoder"])
        _add_placeholder(text_encoder, placeholder, stage.get("placeholder") or {})
        pipe = cls(unet.eval(), instantiate(config["diffusion"]), instantiate(model["vae"]), text_encoder,
                   instantiate(model["image_encoder"]) if model.get("image_encoder") else None,
                   negative_prompt=(stage.get("conditioning") or {}).get("negative_prompt"), adapters=adapters,
                   sampler="lcm" if lcm is not None else "ddim", lcm=lcm,
                   noise_levels=stage.get("noise_levels"), defaults=defaults,
                   data_conditions=data.get("conditions"))
        pipe.base_weights = dict(base) if base is not None else None
        return pipe

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, *, ema: bool | None = None) -> VideoPipeline:
        """A pipeline from a vgen training checkpoint of any stage (``.ckpt`` file or sharded directory).

        ``ema``: None = the EMA weights when the checkpoint has them, True = require them, False = raw weights.
        Adapter-only checkpoints (reward fine-tuning) load their base weights from the file they name.
        """
        from vgen.checkpoint.export import load_unet_weights

        try:
            weights, meta = load_unet_weights(checkpoint, ema=ema is not False)
        except KeyError:  # no EMA weights saved (stage.ema.enabled=false)
            if ema:
                raise
            weights, meta = load_unet_weights(checkpoint, ema=False)
        config = meta.get("vgen_config")
        if config is None:
            raise PipelineError(f"{checkpoint} has no vgen_config (not written by vgen.train)")
        base = meta.get("base_weights")
        if base is not None and not Path(base["path"]).exists():
            raise PipelineError(f"{checkpoint} holds adapters only; their base weights {base['path']} (stage.init.path "
                                "of the run) are missing")
        return cls.from_config(config, weights, base_weights=base, placeholder=meta.get("placeholder"))

    def add_adapters(self, checkpoint: str | Path) -> list[str]:
        """Compose: apply the adapters of another adapter-only checkpoint to this pipeline's UNet, with their
        weights, and its learned placeholder (e.g. a DreamVideo subject checkpoint onto a motion pipeline; both
        over the same base weights). Returns the names of the adapters added."""
        from hydra.utils import instantiate

        from vgen.checkpoint.export import load_unet_weights
        from vgen.models.adapters import load_adapter_state

        weights, meta = load_unet_weights(checkpoint, ema=False)
        specs = ((meta.get("vgen_config") or {}).get("stage") or {}).get("adapters") or {}
        placeholder = meta.get("placeholder")
        if not specs and placeholder is None:
            raise PipelineError(f"{checkpoint} holds neither adapters nor a learned placeholder: nothing to compose")
        base, own = meta.get("base_weights"), getattr(self, "base_weights", None)
        if base is None and specs:
            raise PipelineError(f"{checkpoint} holds a whole UNet, not adapters over named base weights: "
                                "sample from it alone")
        if base is not None and own is not None and Path(base["path"]).resolve() != Path(own["path"]).resolve():
            log.warning("%s was trained over %s, this pipeline's base is %s: composing anyway", checkpoint,
                        base["path"], own["path"])
        added = []
        for name, spec in specs.items():
            if name in self.adapters:
                raise PipelineError(f"{checkpoint}: an adapter named {name!r} is already applied")
            adapter = instantiate(spec)
            try:
                adapter.apply(self.unet)
            except ValueError as err:
                raise PipelineError(f"{checkpoint}: adapter {name!r}: {err}") from None
            names = set(adapter.parameter_names(self.unet))
            try:
                load_adapter_state(self.unet, adapter, {k: v for k, v in weights.items() if k in names},
                                   str(checkpoint))
            except KeyError as err:
                raise PipelineError(str(err.args[0])) from None
            self.adapters[name] = adapter
            added.append(name)
        if placeholder is not None:
            current = getattr(self.text_encoder, "placeholder", None)
            if current is not None and current.token != placeholder["token"]:
                raise PipelineError(f"{checkpoint} learned the placeholder {placeholder['token']!r}, this pipeline "
                                    f"already has {current.token!r}: one placeholder at a time")
            _add_placeholder(self.text_encoder, placeholder, {})
            self._prompt_cache = None
        self.unet.eval()
        return added

    # ------------------------------------------------------------------ sampling
    def __call__(self, prompts: str | Sequence[str], **kwargs) -> torch.Tensor:
        """Videos [B, 3, F, H, W] in [-1, 1] for ``prompts`` (see :meth:`sample`); a HiGen model samples its two
        passes (:meth:`higen`) unless ``conditions`` give its cues."""
        cues = {n for n, c in self.unet.conditions.items()
                if type(c).__name__ in ("SpatialPrior", "MotionCue", "AppearanceCue")}
        if self.hierarchical and not cues <= set(kwargs.get("conditions") or {}):
            higen = {k: kwargs.pop(k) for k in ("motion_factor", "appearance_factor") if k in kwargs}
            return self.higen(prompts, **higen, **kwargs)
        return self.sample(prompts, **kwargs)

    @torch.no_grad()
    def sample(
        self,
        prompts: str | Sequence[str],
        *,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int = 0,
        negative_prompt: str | None = None,
        images: torch.Tensor | None = None,
        fps: int | None = None,
        sampler: str | None = None,
        eta: float | None = None,
        conditions: Mapping[str, torch.Tensor] | None = None,
        uncond_conditions: Mapping[str, torch.Tensor] | None = None,
        start_video: torch.Tensor | None = None,
        inversion_strength: float = 0.0,
        output: str = "video",
    ) -> torch.Tensor:
        """Videos [B, 3, F, H, W] in [-1, 1] for ``prompts``.

        ``images`` ([B, 3, H, W] in [-1, 1]) are the first frames of image-to-video models; ``conditions`` gives
        condition values by name directly (e.g. a TF-T2V image embedding, or a condition of your own); ``fps``
        is the fps condition of fps-conditioned models. Defaults come from the training run; ``sampler`` is
        ``ddim`` (classifier-free guidance against each condition's null) or ``lcm`` (distilled models).
        ``uncond_conditions`` replaces values in the unconditional branch only (e.g. DreamVideo's own appearance
        strength there). ``start_video`` ([B, 3, F, H, W] in [-1, 1]) with ``inversion_strength`` s in (0, 1]:
        the start noise is ``sqrt(s) x`` its DDIM inversion (unconditional branch) ``+ sqrt(1 - s) x`` fresh noise
        (DreamVideo's ``inverse_noise_strength``). ``output="latent"`` returns the sampled latents undecoded.
        """
        if output not in ("video", "latent"):
            raise PipelineError(f"output must be video or latent, got {output!r}")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        b = len(prompts)
        num_frames = num_frames or self.defaults["num_frames"]
        height, width = height or self.defaults["height"], width or self.defaults["width"]
        fps = fps or self.defaults["fps"]
        sampler = sampler or self.sampler
        if sampler not in self.samplers:
            raise PipelineError(f"sampler={sampler} is not available for this model; valid choices: "
                                f"{', '.join(self.samplers)}")
        ds = getattr(self.vae, "downsample", 1)
        if height % ds or width % ds:
            raise PipelineError(f"height/width must be multiples of the VAE downsampling factor {ds}")
        device = self.device
        batch: dict[str, Any] = {"caption": prompts, "fps": torch.full((b,), int(fps), device=device)}
        latents = None
        if images is not None:
            if not self.uses_reference:
                raise PipelineError("this model takes no image (no condition reads reference frames): drop image")
            if images.ndim != 4 or images.shape[0] != b or images.shape[1] != 3:
                raise PipelineError(f"images must be [B={b}, 3, H, W] in [-1, 1], got {tuple(images.shape)}")
            images = images.to(device, torch.float32)
            if images.shape[-2:] != (height, width):
                images = F.interpolate(images, size=(height, width), mode="bilinear", antialias=True,
                                       align_corners=False)
            batch["video"] = images[:, :, None]
            latents = self.vae.encode(batch["video"])
        elif self.needs_reference:
            raise PipelineError("this model is image-to-video: pass a first-frame image per prompt (image=)")
        encoders = self if negative_prompt is None else _WithNegativePrompt(self, negative_prompt)
        given = {}
        for name, value in (conditions or {}).items():
            if name not in self.unet.conditions:
                raise PipelineError(f"unknown condition {name!r}; this model's conditions: {list(self.unet.conditions)}")
            given[name] = torch.as_tensor(value, device=device)
        try:
            values = self.condition_values(ConditionInputs(batch=batch, encoders=encoders, num_frames=num_frames,
                                                           latents=latents), given=given)
        except ConditionError as err:
            raise PipelineError(str(err)) from None
        cond, uncond = guidance_pair(self.unet.conditions, values, encoders)
        for name, value in (uncond_conditions or {}).items():
            if name not in self.unet.conditions:
                raise PipelineError(f"unknown condition {name!r}; this model's conditions: {list(self.unet.conditions)}")
            uncond[name] = torch.as_tensor(value, device=device)
        generator = torch.Generator(device=device).manual_seed(seed)
        shape = (b, self.vae.latent_channels, num_frames, height // ds, width // ds)
        noise = self.diffusion.noise(shape, generator=generator, device=device)
        was_training = self.unet.training
        self.unet.eval()
        try:
            if inversion_strength:
                noise = self._inverted_start(start_video, noise, uncond, inversion_strength, steps)
            out = SAMPLERS[sampler](self, noise, cond, uncond, steps=steps, guidance=guidance, generator=generator,
                                    seed=seed, eta=eta)
        except ConditionError as err:
            raise PipelineError(str(err)) from None
        finally:
            self.unet.train(was_training)
        return out if output == "latent" else self.vae.decode(out).clamp(-1, 1)

    def _inverted_start(self, video: torch.Tensor | None, noise: torch.Tensor, uncond: dict, strength: float,
                        steps: int | None) -> torch.Tensor:
        if video is None:
            raise PipelineError("inversion_strength needs start_video (the clip whose DDIM inversion starts sampling)")
        if not 0.0 < strength <= 1.0:
            raise PipelineError(f"inversion_strength must be in (0, 1], got {strength}")
        b, _, f, h, w = noise.shape
        ds = getattr(self.vae, "downsample", 1)
        if video.ndim != 5 or video.shape[0] not in (1, b) or video.shape[1] != 3 or video.shape[2] != f:
            raise PipelineError(f"start_video must be [1 or B={b}, 3, F={f}, H, W] in [-1, 1], got "
                                f"{tuple(video.shape)}")
        video = video.to(noise.device, torch.float32).expand(b, -1, -1, -1, -1)
        if video.shape[-2:] != (h * ds, w * ds):
            folded = F.interpolate(video.transpose(1, 2).flatten(0, 1), size=(h * ds, w * ds), mode="bilinear",
                                   antialias=True, align_corners=False)
            video = folded.reshape(b, f, 3, h * ds, w * ds).transpose(1, 2)
        latents = self.vae.encode(video.clamp(-1, 1))
        inverted = ddim_invert(self.unet, latents, self.diffusion.param, steps or self.diffusion.ddim_steps,
                               model_kwargs=uncond)
        return strength ** 0.5 * inverted.to(noise.dtype) + (1 - strength) ** 0.5 * noise

    @property
    def hierarchical(self) -> bool:
        """Whether the model is HiGen's (a spatial prior and motion / appearance cues): sample with :meth:`higen`."""
        kinds = {type(c).__name__ for c in self.unet.conditions.values()}
        return {"SpatialPrior", "MotionCue", "AppearanceCue"} <= kinds

    def _higen_names(self) -> tuple[str, str, str]:
        if not self.hierarchical:
            raise PipelineError("higen sampling needs a HiGen model (spatial prior, motion and appearance cues)")
        names = {type(c).__name__: n for n, c in self.unet.conditions.items()}
        return names["SpatialPrior"], names["MotionCue"], names["AppearanceCue"]

    @torch.no_grad()
    def key_frame(self, prompts: str | Sequence[str], *, seed: int = 0, **kwargs) -> torch.Tensor:
        """HiGen's first pass: one frame per prompt with the neutral cues (zero prior, motion 0, appearance all
        ones) -> key-frame latents [B, C, 1, h, w] (decode with ``pipe.vae.decode``). Other arguments as
        :meth:`sample`."""
        from vgen.data.conditions.cues import appearance_schedule

        prior, motion, appearance = self._higen_names()
        width = self.unet.conditions[appearance].max_frames
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        b, device = len(prompts), self.device
        height, width_px = kwargs.get("height") or self.defaults["height"], kwargs.get("width") or self.defaults["width"]
        ds = getattr(self.vae, "downsample", 1)
        extra = kwargs.pop("conditions", None) or {}
        neutral = {motion: torch.zeros(b, dtype=torch.long, device=device),
                   appearance: appearance_schedule(1, max_frames=width).to(device).expand(b, 1, -1),
                   prior: torch.zeros(b, self.vae.latent_channels, height // ds, width_px // ds, device=device)}
        kwargs.pop("num_frames", None)
        return self.sample(prompts, num_frames=1, seed=seed, conditions={**extra, **neutral}, output="latent",
                           **kwargs)

    @torch.no_grad()
    def higen(self, prompts: str | Sequence[str], *, motion_factor: float = 500, appearance_factor: float = 1.0,
              num_frames: int | None = None, seed: int = 0, key: torch.Tensor | None = None,
              **kwargs) -> torch.Tensor:
        """HiGen's two passes: a key frame (:meth:`key_frame`; or ``key``, latents [B, C, 1, h, w] or
        [B, C, h, w] from it), then the video conditioned on it (the key frame's latent as spatial prior,
        ``motion_factor`` for every adjacent-frame pair, appearance ``1 - appearance_factor |k - j| / (F - 1)``).
        Other arguments as :meth:`sample` -> videos [B, 3, F, H, W]."""
        from vgen.data.conditions.cues import appearance_schedule

        prior, motion, appearance = self._higen_names()
        width = self.unet.conditions[appearance].max_frames
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        b, frames = len(prompts), num_frames or self.defaults["num_frames"]
        if not 1 <= frames <= width:
            raise PipelineError(f"num_frames must be in [1, {width}] (the appearance cue's width), got {frames}")
        device = self.device
        extra = kwargs.pop("conditions", None) or {}
        if key is None:
            key = self.key_frame(prompts, seed=seed, conditions=extra, **kwargs)
        key = key[:, :, 0] if key.ndim == 5 else key
        if key.ndim != 4 or key.shape[0] != b:
            raise PipelineError(f"key must be key-frame latents [B={b}, C, 1, h, w], got {tuple(key.shape)}")
        cues = {prior: key.to(device),
                motion: torch.full((b, max(frames - 1, 1)), round(motion_factor), dtype=torch.long, device=device)
                if frames > 1 else torch.zeros(b, dtype=torch.long, device=device),
                appearance: appearance_schedule(frames, appearance_factor, width).to(device).expand(b, -1, -1)}
        return self.sample(prompts, num_frames=frames, seed=seed + 1, conditions={**extra, **cues}, **kwargs)

    @torch.no_grad()
    def refine(self, videos: torch.Tensor, prompts: str | Sequence[str], *, height: int | None = None,
               width: int | None = None, steps: int | None = None, guidance: float | None = None,
               noise_levels: int | None = None, invert: bool = False, negative_prompt: str | None = None,
               seed: int = 0) -> torch.Tensor:
        """SDEdit refinement (the cascade's second stage): low-resolution videos [B, 3, F, h, w] in [-1, 1] are
        resized, VAE-encoded, noised to ``noise_levels - 1`` (forward process, or deterministic DDIM inversion with
        ``invert``) and denoised with guided DDIM -> videos [B, 3, F, height, width]."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if videos.ndim != 5 or videos.shape[1] != 3 or videos.shape[0] != len(prompts):
            raise PipelineError(f"videos must be [B={len(prompts)}, 3, F, H, W] in [-1, 1], got {tuple(videos.shape)}")
        levels = noise_levels or self.noise_levels or self.diffusion.param.num_timesteps
        height, width = height or self.defaults["height"], width or self.defaults["width"]
        steps = steps or self.diffusion.ddim_steps
        b, _, frames = videos.shape[:3]
        device = self.device
        videos = videos.to(device, torch.float32)
        folded = videos.transpose(1, 2).reshape(b * frames, 3, *videos.shape[-2:])
        folded = F.interpolate(folded, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
        upsampled = folded.reshape(b, frames, 3, height, width).transpose(1, 2).clamp(-1, 1)
        latents = self.vae.encode(upsampled)
        encoders = self if negative_prompt is None else _WithNegativePrompt(self, negative_prompt)
        values = self.condition_values(ConditionInputs(batch={"caption": prompts}, encoders=encoders,
                                                       num_frames=frames, latents=None))
        cond, uncond = guidance_pair(self.unet.conditions, values, encoders)
        param = self.diffusion.param
        was_training = self.unet.training
        self.unet.eval()
        try:
            if invert:
                x = ddim_invert(self.unet, latents, param, steps, model_kwargs=uncond, num_levels=levels)
            else:
                generator = torch.Generator(device=device).manual_seed(seed)
                noise = self.diffusion.noise(latents.shape, generator=generator, device=device)
                x = param.q_sample(latents, torch.full((b,), levels - 1, dtype=torch.long, device=device), noise)
            scale = self.diffusion.guidance_scale if guidance is None else guidance
            latents = denoise_from(self.unet, x, param, sdedit_timesteps(levels, steps), cond=cond, uncond=uncond,
                                   guidance_scale=scale)
        finally:
            self.unet.train(was_training)
        return self.vae.decode(latents).clamp(-1, 1)

    def reference_conditions(self, frames, names: Sequence[str] | None = None, *, height: int | None = None,
                             width: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
        """Condition maps of a reference clip (uint8 frames [F, H, W, 3], or mp4 bytes / a path decoded at the run's
        fps), resized and cropped to the sampling size: ``{name: [1, ...]}`` for ``conditions=``.

        ``names`` are the model's condition names or their kinds (``depthmap``, ``motion``, ...; default: every
        map the run trained with). Each map is made as the run's ``data.conditions`` made it (its kind and weights).
        """
        import random

        import numpy as np

        from vgen.data.condition_maps import KINDS, extract
        from vgen.data.transforms import resize_center_crop

        height, width = height or self.defaults["height"], width or self.defaults["width"]
        if isinstance(frames, (str, Path, bytes)):
            from vgen.data.video import decode_video

            data = Path(frames).read_bytes() if not isinstance(frames, bytes) else frames
            frames = decode_video(data, self.defaults["num_frames"], self.defaults["fps"], start="first").frames
        video = resize_center_crop(np.asarray(frames), width=width, height=height)
        pixels = ((video + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
        kinds = {}  # condition name -> (kind, weights)
        for name, condition in self.unet.conditions.items():
            spec = self.data_conditions.get(name) or {}
            kind = spec.get("kind", getattr(condition, "composition", None))
            if kind in KINDS:
                kinds[name] = (kind, spec.get("weights"))
        wanted = list(names) if names else [n for n in kinds if n in self.data_conditions] or list(kinds)
        out, rng = {}, random.Random(seed)
        for item in wanted:
            name = item if item in kinds else next((n for n, (k, _) in kinds.items() if k == item), None)
            if name is None:
                raise PipelineError(f"condition {item!r}: the model has no condition map of that name or kind; it has "
                                    f"{', '.join(f'{n} ({k})' for n, (k, _) in kinds.items()) or 'none'}")
            kind, weights = kinds[name]
            if kind == "depthmap" and weights is None:
                raise PipelineError(f"condition {name!r} (depthmap) needs the DPT model: the run's "
                                    f"data.conditions.{name}.weights")
            out[name] = extract(kind, pixels, rng, weights)[None]
        return out

    # ------------------------------------------------------------------ adapters and output
    def merge_adapters(self) -> None:
        """Fold every adapter into the base weights (faster inference; unsharded weights only)."""
        for adapter in self.adapters.values():
            adapter.merge(self.unet)

    @staticmethod
    def save(video: torch.Tensor, path: str | Path, fps: int = 8, upscale: int = 1) -> Path:
        """Write ``video`` ([3, F, H, W] or a batch of one, in [-1, 1]) as an H.264 mp4; ``upscale`` enlarges
        each pixel to a block (for viewing tiny videos)."""
        from vgen.media import to_uint8_frames, upscale_frames, write_mp4

        if video.ndim == 5:
            if video.shape[0] != 1:
                raise PipelineError(f"save writes one video; got a batch of {video.shape[0]}")
            video = video[0]
        return write_mp4(upscale_frames(to_uint8_frames(video), upscale), path, fps=fps)


def _add_placeholder(text_encoder: nn.Module, saved: Mapping[str, Any] | None, options: Mapping[str, Any]) -> None:
    """A DreamVideo placeholder into ``text_encoder`` (frozen): the ``saved`` one of a checkpoint, else the one
    ``stage.placeholder`` names (its ``path``; no path: the initializer word's embedding)."""
    if saved is None and not options.get("token"):
        return
    if not hasattr(text_encoder, "add_placeholder"):
        raise PipelineError(f"a learned placeholder needs an OpenCLIP text encoder, got {type(text_encoder).__name__}")
    if saved is not None:
        embedding = saved.get("embedding")
        if not isinstance(embedding, torch.Tensor) or tuple(embedding.shape) != (text_encoder.dim,):
            raise PipelineError(f"the checkpoint's placeholder embedding does not fit the text encoder (width "
                                f"{text_encoder.dim})")
        token, init_word = str(saved["token"]), str(saved.get("init_word", ""))
    elif options.get("path"):
        from vgen.stages.dreamvideo import read_placeholder_source

        try:
            token, init_word, embedding = read_placeholder_source(options["path"], text_encoder.dim)
        except (ValueError, FileNotFoundError) as err:
            raise PipelineError(f"stage.placeholder.path: {err}") from None
    else:
        token, init_word, embedding = options["token"], options.get("init_word", "dog"), None
    text_encoder.add_placeholder(token, init_word or "dog", embedding).requires_grad_(False)


def _apply(unet: nn.Module, adapters: Mapping[str, Adapter]) -> None:
    for adapter in adapters.values():
        adapter.apply(unet)


def _load_weights(unet: nn.Module, weights: dict[str, torch.Tensor], adapters: Mapping[str, Adapter] | None) -> None:
    """Strictly: the whole UNet, or (``adapters`` given) exactly the adapters' parameters onto the loaded base."""
    if adapters is None:
        unet.load_state_dict(weights, strict=True)
        return
    expected = set(adapter_parameter_names(unet, adapters))
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise PipelineError(f"the checkpoint's adapter weights do not match its adapters: missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}")
    unet.load_state_dict({**unet.state_dict(), **weights}, strict=True)
