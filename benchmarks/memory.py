"""Memory of the distribution strategies and of activation checkpointing, measured, and vgen.plan's predictions.

    .venv/bin/python benchmarks/memory.py [--precision 32-true] [--steps 2] [--channels 128] [--frames 8] [--size 32]
        [--skip-strategies] [--skip-activations]

1. Per-rank parameter + optimizer bytes after a few training steps of the tiny UNet on 2 CPU ranks (gloo) for
   ddp, deepspeed_zero2, deepspeed_zero3 and fsdp2: counted from the live tensors (local parameter shards,
   AdamW moments and any fp32 master copy the optimizer steps), next to ``vgen.plan.model_state_bytes``.
2. Peak memory of one forward+backward of a UNet3D (t2v architecture at ``--channels`` width, one clip of
   ``--frames`` x ``--size``^2 latents, fp32) with and without per-block activation checkpointing: the rise of
   the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) over the steady state with
   weights, gradients and optimizer state allocated; each setting runs in a fresh process with
   ``MALLOC_MMAP_THRESHOLD_`` low so freed tensors leave the resident set. Next to it, vgen.plan's activation
   estimate for the same model and size, scaled from its probe (width 32, latent 4x16x16), and the saved-tensor
   count of the model itself.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "src")]
STRATEGIES = ("ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp2")


# ---------------------------------------------------------------------------------------------------- part 1
def local_tensor(t):
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        return t.to_local()
    return t.ds_tensor if getattr(t, "ds_tensor", None) is not None else t


def state_bytes(trainer, stage) -> dict:
    """Bytes this rank holds for UNet parameters, optimizer state (moments + master copies) and EMA."""
    import torch

    params = [local_tensor(p) for p in stage.unet.parameters()]
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    optimizer = trainer.optimizers[0]
    optimizer = getattr(optimizer, "_optimizer", optimizer)
    base = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed's ZeRO optimizer wraps the torch AdamW
    seen, optim = set(), 0
    tensors = [t for s in base.state.values() for t in s.values() if torch.is_tensor(t)]
    tensors += [p for g in base.param_groups for p in g["params"]]
    # fp32 master shards: ZeRO-3 hands them to AdamW only for the duration of its step
    for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):
        tensors += [t for t in getattr(optimizer, name, []) if torch.is_tensor(t)]
    for t in (local_tensor(t) for t in tensors):
        ptr = t.untyped_storage().data_ptr()
        if ptr in param_ptrs or ptr in seen or t.numel() <= 1:
            continue
        seen.add(ptr)
        optim += t.untyped_storage().nbytes()
    ema = sum(local_tensor(v).numel() * local_tensor(v).element_size() for v in stage.ema.shadow.values())
    return {"params": sum(p.numel() * p.element_size() for p in params), "optimizer": optim, "ema": ema,
            "trainable": sum(getattr(p, "ds_numel", p.numel()) for p in stage.unet.parameters())}


def strategy_worker(spec: dict) -> None:
    import lightning as L
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from test_strategies import compose_config

    class Measure(L.Callback):
        def on_train_end(self, trainer, pl_module):
            result = state_bytes(trainer, pl_module)
            Path(spec["out"], f"bytes-rank{trainer.global_rank}.json").write_text(json.dumps(result))

    out = Path(spec["out"])
    cfg = compose_config(out, ["debug=tiny", "logger=csv", f"strategy={spec['strategy']}", "trainer.devices=2",
                               f"trainer.max_steps={spec['steps']}", f"trainer.precision={spec['precision']}"])
    stage = instantiate(cfg.stage)
    stage.run_config = OmegaConf.to_container(cfg, resolve=True)
    trainer = instantiate(cfg.trainer, strategy=instantiate(cfg.strategy), logger=False,
                          callbacks=[Measure()], enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(stage, datamodule=instantiate(cfg.data))


def measure_strategies(precision: str, steps: int) -> list[dict]:
    from vgen.plan import model_state_bytes

    rows = []
    for name in STRATEGIES:
        with tempfile.TemporaryDirectory() as tmp:
            spec = {"out": tmp, "strategy": name, "steps": steps, "precision": precision}
            env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": f"{REPO / 'tests'}{os.pathsep}{REPO / 'src'}"}
            subprocess.run([sys.executable, __file__, "--strategy-worker", json.dumps(spec)], env=env, check=True,
                           cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=900)
            ranks = [json.loads(Path(tmp, f"bytes-rank{r}.json").read_text()) for r in range(2)]
        measured = max(r["params"] + r["optimizer"] for r in ranks)
        predicted = model_state_bytes(name, ranks[0]["trainable"], 2, precision, ema=True)
        rows.append({"strategy": name, "params": ranks[0]["params"], "optimizer": ranks[0]["optimizer"],
                     "ema": ranks[0]["ema"], "measured": measured, "trainable": ranks[0]["trainable"],
                     "predicted": predicted.params + predicted.optimizer})
    return rows


# ---------------------------------------------------------------------------------------------------- part 2
def _hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def activation_worker(spec: dict) -> None:
    import torch

    from vgen.plan import _probe_inputs, probe_unet

    torch.set_num_threads(1)
    unet = probe_unet(spec["unet"], spec["channels"])
    unet.set_gradient_checkpointing(spec["checkpointing"])
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    levels = len(spec["unet"]["channel_mult"]) - 1
    for size in ((2, 2**levels, 2**levels), (spec["frames"], spec["size"], spec["size"])):  # allocate grads + Adam
        x, t, kwargs = _probe_inputs(unet, 1, *size)
        unet(x, t, **kwargs).float().pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    x, t, kwargs = _probe_inputs(unet, 1, spec["frames"], spec["size"], spec["size"])
    base = _rss_kib()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    unet(x, t, **kwargs).float().pow(2).mean().backward()
    print(json.dumps({"peak_rise": (_hwm_kib() - base) * 1024}))


def measure_activations(channels: int, frames: int, size: int) -> dict:
    from omegaconf import OmegaConf

    from vgen.plan import activation_estimate, probe_unet, saved_activation_bytes

    unet_cfg = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / "unet" / "t2v.yaml"))
    unet_cfg.pop("defaults", None)
    result = {}
    for checkpointing in (False, True):
        spec = {"unet": unet_cfg, "channels": channels, "frames": frames, "size": size, "checkpointing": checkpointing}
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(REPO / "src")}
        out = subprocess.run([sys.executable, __file__, "--activation-worker", json.dumps(spec)], env=env,
                             check=True, capture_output=True, text=True, timeout=1800, cwd=REPO)
        result[checkpointing] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rise"]
    model = probe_unet(unet_cfg, channels)
    direct = {c: saved_activation_bytes(model, frames, size, size, c) for c in (False, True)}
    est = activation_estimate({**unet_cfg, "model_channels": channels, "head_dim": model.config.head_dim},
                              probe_channels=32, probe_shape=(4, 16, 16))
    return {"measured": result, "saved": direct, "plan": {c: est.bytes(frames, size, size, c) for c in (False, True)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--skip-strategies", action="store_true")
    parser.add_argument("--skip-activations", action="store_true")
    parser.add_argument("--strategy-worker")
    parser.add_argument("--activation-worker")
    args, _ = parser.parse_known_args()  # Lightning appends hydra.* overrides when it starts rank 1
    if args.strategy_worker:
        return strategy_worker(json.loads(args.strategy_worker))
    if args.activation_worker:
        return activation_worker(json.loads(args.activation_worker))
    mib = 2**20
    if not args.skip_strategies:
        rows = measure_strategies(args.precision, args.steps)
        ddp = next(r for r in rows if r["strategy"] == "ddp")["measured"]
        print(f"## per-rank parameter + optimizer bytes, 2 CPU ranks, tiny UNet ({rows[0]['trainable']:,} "
              f"parameters), precision {args.precision}\n")
        print("| strategy | parameters MiB | optimizer MiB | EMA MiB | params + optimizer MiB | vs ddp | "
              "vgen.plan MiB | measured / plan |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in rows:
            print(f"| {r['strategy']} | {r['params'] / mib:.2f} | {r['optimizer'] / mib:.2f} | {r['ema'] / mib:.2f} | "
                  f"{r['measured'] / mib:.2f} | {r['measured'] / ddp:.2f} | {r['predicted'] / mib:.2f} | "
                  f"{r['measured'] / r['predicted']:.3f} |")
        print()
    if args.skip_activations:
        return None
    act = measure_activations(args.channels, args.frames, args.size)
    print(f"## activation memory, one clip, t2v UNet at width {args.channels}, latent {args.frames}x{args.size}x"
          f"{args.size}, fp32\n")
    print("| checkpointing | measured peak rise MiB | saved tensors MiB | vgen.plan estimate MiB | "
          "measured / plan |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for c in (False, True):
        print(f"| {'on' if c else 'off'} | {act['measured'][c] / mib:.1f} | {act['saved'][c] / mib:.1f} | "
              f"{act['plan'][c] / mib:.1f} | {act['measured'][c] / act['plan'][c]:.3f} |")
    print(f"\ncheckpointing saves {1 - act['measured'][True] / act['measured'][False]:.1%} of the peak rise")


if __name__ == "__main__":
    main()
