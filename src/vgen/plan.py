"""Memory and throughput planner: ``python -m vgen.plan experiment=<name> trainer.num_nodes=16 trainer.devices=8``.

For the configured UNet (built on the meta device, so the full 1.4B model costs nothing) it prints, per GPU and
for every strategy:

* model state: parameters, gradients, optimizer state (AdamW moments and fp32 master copies) and EMA, from the
  ZeRO arithmetic below, plus the frozen encoders;
* activation memory per sample, measured on a narrow *probe* UNet (same architecture at ``--probe-channels``
  width) at a small clip size by summing the tensors autograd saves for backward, block by block, then scaled
  to the configured UNet and clip: each block by the ratio of its widest layer, everything by the ratio of
  latent voxels (frames x height x width); with and without per-block activation checkpointing;
* the largest per-GPU batch that fits ``--gpu-memory-gib``, and a throughput estimate from the forward FLOPs
  (counted on the meta device at full size) at ``--tflops`` x ``--mfu``.

ZeRO arithmetic, per GPU, for P trainable parameters, W data-parallel ranks, AdamW (8 bytes/param of moments):

| strategy | parameters | gradients | optimizer (moments + fp32 master) | EMA (fp32) |
| --- | --- | --- | --- | --- |
| ddp (Lightning AMP keeps fp32 weights) | 4P | 4P (views of DDP's buckets) | 8P | 4P |
| deepspeed_zero2 | bP | bP/W | (8 + 4)P/W | 4P |
| deepspeed_zero3 | bP/W | bP/W | (8 + 4)P/W | 4P/W |
| fsdp2 (fp32 shards, b-wide gathered blocks) | 4P/W | 4P/W | 8P/W | 4P/W |

with b = 2 under bf16/fp16 and 4 under fp32; ``*_offload`` moves the optimizer (and ZeRO-3 parameters) to
host memory. ``benchmarks/memory.py`` checks these numbers and the activation estimate against measurements.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

import torch
from torch import nn

GIB = 2**30
STRATEGY_NAMES = ("ddp", "deepspeed_zero2", "deepspeed_zero2_offload", "deepspeed_zero3", "deepspeed_zero3_offload",
                  "fsdp2")
HALF = {"bf16-mixed", "16-mixed", "bf16-true", "16-true"}


@dataclass
class ModelState:
    params: float
    grads: float
    optimizer: float
    ema: float
    host: float = 0.0  # bytes per GPU kept in host memory (offload)

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.ema


def model_state_bytes(strategy: str, params: int, world: int, precision: str = "bf16-mixed",
                      ema: bool = True) -> ModelState:
    """Per-GPU bytes of parameters, gradients, optimizer state and EMA (see the module table)."""
    if strategy not in STRATEGY_NAMES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {list(STRATEGY_NAMES)}")
    p, w = float(params), float(world)
    b = 2.0 if precision in HALF else 4.0
    e = 4 * p if ema else 0.0
    if strategy == "ddp":
        return ModelState(4 * p, 4 * p, 8 * p, e)
    if strategy == "fsdp2":
        return ModelState(4 * p / w, 4 * p / w, 8 * p / w, e / w)
    zero3 = strategy.startswith("deepspeed_zero3")
    state = ModelState(b * p / w if zero3 else b * p, b * p / w, 12 * p / w, e / w if zero3 else e)
    if strategy.endswith("_offload"):
        state.host = state.optimizer + (state.params if zero3 else 0.0)
        state.optimizer = 0.0
        if zero3:
            state.params = 0.0
    return state


# ---------------------------------------------------------------------------------------------------- activations
def _probe_inputs(unet: nn.Module, batch: int, frames: int, height: int, width: int, dtype=torch.float32):
    cfg = unet.config
    x = torch.randn(batch, cfg.in_channels, frames, height, width, dtype=dtype)
    t = torch.randint(0, 1000, (batch,))
    kwargs = {name: cond.example(batch, frames, height, width, dtype) for name, cond in unet.conditions.items()}
    return x, t, kwargs


@dataclass
class ActivationProfile:
    """Bytes autograd saves for backward in one forward, split by UNet block (parameters not counted)."""

    outside: int  # saved outside the blocks (embeddings, input/output layers, resamplers)
    blocks: list[int]  # each block's own saved tensors, in call order
    inputs: list[int]  # each block's input hidden state (what per-block checkpointing keeps instead)

    def total(self, checkpointing: bool) -> float:
        if not checkpointing:
            return self.outside + sum(self.blocks)
        # checkpointing keeps the blocks' inputs; recomputing one block's backward needs its saved tensors plus
        # the incoming and outgoing gradients (two hidden states)
        return self.outside + sum(self.inputs) + max(self.blocks) + 2 * max(self.inputs)


def activation_profile(unet: nn.Module, frames: int, height: int, width: int, batch: int = 1) -> ActivationProfile:
    """Profile one forward of ``unet`` on ``batch`` latent clips [C, frames, height, width]."""
    from vgen.training.parallelize import unet_blocks

    param_ptrs = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    seen: set[int] = set()
    total = [0]
    blocks, inputs, starts = [], [], {}

    def pack(tensor):
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in param_ptrs and ptr not in seen:
            seen.add(ptr)
            total[0] += tensor.untyped_storage().nbytes()
        return tensor

    def before(module, args):
        starts[id(module)] = total[0]
        inputs.append(args[0].untyped_storage().nbytes())

    hooks = []
    for block in unet_blocks(unet):
        hooks.append(block.register_forward_pre_hook(before))
        hooks.append(block.register_forward_hook(lambda m, a, o: blocks.append(total[0] - starts[id(m)])))
    was = unet.gradient_checkpointing
    unet.set_gradient_checkpointing(False)
    x, t, kwargs = _probe_inputs(unet, batch, frames, height, width)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            unet(x, t, **kwargs)
    finally:
        for h in hooks:
            h.remove()
        unet.set_gradient_checkpointing(was)
    return ActivationProfile(total[0] - sum(blocks), blocks, inputs)


def saved_activation_bytes(unet: nn.Module, frames: int, height: int, width: int, checkpointing: bool,
                           batch: int = 1) -> float:
    """Activation bytes of one forward+backward of ``unet`` (see :class:`ActivationProfile`)."""
    return activation_profile(unet, frames, height, width, batch).total(checkpointing)


def probe_unet(unet_cfg: dict, channels: int) -> nn.Module:
    """The configured UNet at width ``channels`` (head_dim shrunk so every level keeps whole heads)."""
    from vgen.models import UNet3D

    cfg = {k: v for k, v in unet_cfg.items() if not k.startswith("_") and k != "defaults"}
    ratio = channels / cfg["model_channels"]
    cfg["model_channels"] = channels
    cfg["head_dim"] = max(8, int(cfg.get("head_dim", 64) * ratio) // 8 * 8)
    while channels % cfg["head_dim"] or channels % 32:
        cfg["head_dim"] //= 2
    cfg["dropout"] = 0.0
    torch.manual_seed(0)
    return UNet3D(**cfg)


def block_widths(unet: nn.Module) -> list[int]:
    """Each block's widest layer (its activations scale with it); works on the meta device."""
    from vgen.training.parallelize import unet_blocks

    widths = []
    for block in unet_blocks(unet):
        outs = [m.out_features if isinstance(m, nn.Linear) else m.out_channels for m in block.modules()
                if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
        widths.append(max(outs))
    return widths


@dataclass
class ActivationEstimate:
    """A probe's profile, scaled block by block to the configured UNet: each block by its width ratio, the
    hidden states and the rest by the width ratio of the UNet, all by the ratio of latent voxels."""

    probe: ActivationProfile
    block_ratio: list[float]
    channel_ratio: float
    probe_shape: tuple[int, int, int]
    probe_channels: int

    def bytes(self, frames: int, height: int, width: int, checkpointing: bool, dtype_bytes: int = 4) -> float:
        voxels = frames * height * width / math.prod(self.probe_shape)
        scaled = ActivationProfile(
            self.probe.outside * self.channel_ratio * voxels,
            [b * r * voxels for b, r in zip(self.probe.blocks, self.block_ratio)],
            [i * self.channel_ratio * voxels for i in self.probe.inputs])
        return scaled.total(checkpointing) * dtype_bytes / 4


def activation_estimate(unet_cfg: dict, probe_channels: int = 64, probe_shape: tuple[int, int, int] = (4, 32, 32)
                        ) -> ActivationEstimate:
    """Profile a ``probe_channels``-wide probe at latent ``probe_shape`` and scale it to ``unet_cfg``."""
    from vgen.models import UNet3D

    levels = len(unet_cfg["channel_mult"]) - 1
    f, h, w = probe_shape
    h, w = max(h, 2**levels), max(w, 2**levels)
    probe = probe_unet(unet_cfg, probe_channels)
    with torch.device("meta"):
        target = UNet3D(**{k: v for k, v in unet_cfg.items() if not k.startswith("_") and k != "defaults"})
    ratios = [t / p for t, p in zip(block_widths(target), block_widths(probe))]
    profile = activation_profile(probe, f, h, w)
    return ActivationEstimate(profile, ratios, unet_cfg["model_channels"] / probe_channels, (f, h, w),
                              probe_channels)


def forward_flops(unet_cfg: dict, frames: int, height: int, width: int) -> float:
    """FLOPs of one forward on one clip, counted on the meta device at full size."""
    from torch.utils.flop_counter import FlopCounterMode

    from vgen.models import UNet3D

    cfg = {k: v for k, v in unet_cfg.items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet3D(**cfg)
        x, t, kwargs = _probe_inputs(unet, 1, frames, height, width)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            unet(x, t, **kwargs)
    return float(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------------- report
def frozen_parameters(cfg) -> int:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    total = 0
    for key in ("vae", "text_encoder", "image_encoder"):
        node = cfg.model.get(key)
        if node is None:
            continue
        node = OmegaConf.merge(node, {"weights": None}) if "weights" in node else node
        with torch.device("meta"):
            total += sum(p.numel() for p in instantiate(node).parameters())
    return total


def latent_geometry(cfg) -> tuple[int, int]:
    """(latent channels, downsampling factor) of the configured autoencoder."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    node = cfg.model.vae
    node = OmegaConf.merge(node, {"weights": None}) if "weights" in node else node
    with torch.device("meta"):
        vae = instantiate(node)
    return getattr(vae, "latent_channels", 3), getattr(vae, "downsample", 1)


def plan(cfg, gpu_memory_gib: float = 80.0, tflops: float = 989.0, mfu: float = 0.4, reserve_gib: float = 4.0,
         probe_channels: int = 64) -> dict:
    """Everything the report prints, as numbers (bytes, samples/s)."""
    from omegaconf import OmegaConf

    unet_cfg = OmegaConf.to_container(cfg.model.unet, resolve=True)
    with torch.device("meta"):
        from vgen.models import UNet3D

        unet = UNet3D(**{k: v for k, v in unet_cfg.items() if not k.startswith("_")})
    params = sum(p.numel() for p in unet.parameters())
    nodes, devices = int(cfg.trainer.num_nodes), cfg.trainer.devices
    devices = 1 if devices in ("auto", None) else int(devices)
    world = nodes * devices
    precision = str(cfg.trainer.precision)
    dtype_bytes = 2 if precision in HALF else 4
    ema = bool(cfg.stage.get("ema", {}).get("enabled", False))
    frames, (width, height) = int(cfg.data.num_frames), (int(v) for v in cfg.data.resolution)
    _, ds = latent_geometry(cfg)
    lf, lh, lw = frames, height // ds, width // ds
    est = activation_estimate(unet_cfg, probe_channels)
    act = {c: est.bytes(lf, lh, lw, c, dtype_bytes) for c in (False, True)}
    frozen = frozen_parameters(cfg) * dtype_bytes
    checkpointing = bool(cfg.stage.get("gradient_checkpointing", False))
    per_sample = act[checkpointing]
    flops = forward_flops(unet_cfg, lf, lh, lw) * (4 if checkpointing else 3)
    budget = gpu_memory_gib * GIB - reserve_gib * GIB
    rows = {}
    for name in STRATEGY_NAMES:
        state = model_state_bytes(name, params, world, precision, ema)
        free = budget - state.total - frozen
        rows[name] = {"state": state, "max_batch": max(0, int(free // per_sample)),
                      "max_batch_no_ckpt": max(0, int(free // act[False])),
                      "max_batch_ckpt": max(0, int(free // act[True]))}
    samples_per_s = tflops * 1e12 * mfu / flops
    return {"params": params, "world": world, "precision": precision, "ema": ema, "latent": (lf, lh, lw),
            "frozen_bytes": frozen, "activation": act, "probe": est, "checkpointing": checkpointing, "rows": rows,
            "train_flops_per_sample": flops, "samples_per_s_per_gpu": samples_per_s,
            "samples_per_s": samples_per_s * world, "batch_size": int(cfg.data.batch_size),
            "strategy": cfg.strategy.get("name", "auto")}


def report(result: dict, gpu_memory_gib: float) -> str:
    act, probe = result["activation"], result["probe"]
    lf, lh, lw = result["latent"]
    lines = [
        (f"UNet: {result['params']:,} trainable parameters; world size {result['world']}; "
        f"precision {result['precision']}; EMA {'on' if result['ema'] else 'off'}; configured strategy "
        f"{result['strategy']}, batch {result['batch_size']} per GPU"),
        (f"latent clip [{lf}, {lh}, {lw}] (frames, height, width); frozen encoders {result['frozen_bytes'] / GIB:.2f} "
        "GiB per GPU"),
        (f"activations per sample: {act[False] / GIB:.2f} GiB, with per-block checkpointing "
        f"{act[True] / GIB:.2f} GiB (scaled from a probe of width {probe.probe_channels} at latent "
        f"{probe.probe_shape})"),
        "",
        (f"{'strategy':<24}{'params':>9}{'grads':>9}{'optim':>9}{'EMA':>8}{'total':>9}{'host':>8}"
        f"{'max batch @ ' + format(gpu_memory_gib, 'g') + ' GiB':>22}{'(ckpt off/on)':>15}"),
    ]
    for name, row in result["rows"].items():
        s = row["state"]
        lines.append(f"{name:<24}{s.params / GIB:>9.2f}{s.grads / GIB:>9.2f}{s.optimizer / GIB:>9.2f}"
                     f"{s.ema / GIB:>8.2f}{s.total / GIB:>9.2f}{s.host / GIB:>8.2f}{row['max_batch']:>22}"
                     f"{str(row['max_batch_no_ckpt']) + '/' + str(row['max_batch_ckpt']):>15}")
    lines += ["", "(GiB per GPU; 'host' is offloaded to CPU memory per GPU)",
              (f"training FLOPs per sample {result['train_flops_per_sample'] / 1e12:.2f} TFLOP -> "
              f"{result['samples_per_s_per_gpu']:.2f} samples/s per GPU, {result['samples_per_s']:.1f} samples/s "
              f"in total at the given TFLOPS x MFU")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from hydra import compose, initialize_config_dir

    from vgen.config import CONF_DIR, precheck_overrides

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m vgen.plan", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for vgen.train")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (default 80)")
    parser.add_argument("--reserve-gib", type=float, default=4.0, help="kept free for CUDA context/fragmentation")
    parser.add_argument("--tflops", type=float, default=989.0, help="peak dense bf16 TFLOPS of one GPU (H100 SXM)")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation")
    parser.add_argument("--probe-channels", type=int, default=64, help="width of the activation probe UNet")
    args = parser.parse_args(argv)
    precheck_overrides("vgen.plan", "train", args.overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=args.overrides)
    result = plan(cfg, args.gpu_memory_gib, args.tflops, args.mfu, args.reserve_gib, args.probe_channels)
    print(report(result, args.gpu_memory_gib))
    return 0


if __name__ == "__main__":
    sys.exit(main())
