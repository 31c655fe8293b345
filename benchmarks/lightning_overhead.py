"""What Lightning costs per step: the demo stage trained through vgen.train's Trainer against a bare PyTorch loop.

Both train the same stage (``experiment=demo``: its UNet, text encoder, diffusion loss, AdamW + LR schedule,
gradient clipping at 1.0, EMA) on the same batches, decoded from the demo shards once and held in memory, so data
loading is not measured. The Trainer run is built from the composed config exactly as ``vgen.train`` builds it
(strategy, precision, plugins, the config's callbacks and loggers: the Rich progress bar, throughput and LR
monitors, W&B offline), with the per-interval callbacks that do work of their own switched off (checkpoints,
sample videos, evaluation: they cost the same in any loop). The bare loop calls ``stage.compute_loss``, backward,
``clip_grad_norm_``, the optimizer and scheduler and the EMA update by hand.

Runs alternate (Trainer, bare, Trainer, bare, ...) in this one process; each times ``--steps`` steps after
``--warmup`` untimed ones (the Trainer's setup is not timed: it is paid once per run). The ratio is of the median
per-step times.

    python benchmarks/lightning_overhead.py [--rounds 3] [--steps 60] [--data data/demo]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from bench_cli import parser as one_line_parser
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

REPO = Path(__file__).resolve().parents[1]


def compose_demo(data_dir: Path, log_dir: Path, steps: int) -> object:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=[
            "experiment=demo", f"paths.data_dir={data_dir}", f"paths.log_dir={log_dir}", f"paths.output_dir={log_dir}/run", f"trainer.max_steps={steps}",
            "data.num_workers=0", "callbacks.checkpoint=null", "callbacks.sample_videos=null",
            "callbacks.evaluation.enabled=false", "resume=null"])


def load_batches(cfg, count: int) -> list[dict]:
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    batches = []
    for batch in datamodule.train_dataloader():
        batches.append(batch)
        if len(batches) == count:
            return batches
    raise RuntimeError(f"the demo shards gave only {len(batches)} batches, {count} needed")


class StepTimer(L.Callback):
    """Wall time from the start of batch ``warmup`` to the end of the last batch (between-step work included)."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end, self.steps = warmup, None, None, 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.end = time.perf_counter()
        self.steps = batch_idx + 1 - self.warmup


def lightning_run(cfg, batches: list[dict]) -> float:
    from vgen.train import precision_setup
    from vgen.training.checkpointing import AtomicCheckpointIO

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    stage = instantiate(cfg.stage)
    timer = StepTimer(WARMUP)
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    loggers = [instantiate(c) for c in cfg.logger.values() if c is not None] if cfg.logger else False
    strategy = instantiate(cfg.strategy)
    precision, plugins = precision_setup(cfg.trainer, strategy)
    trainer = instantiate(cfg.trainer, strategy=strategy, callbacks=[*callbacks, timer], logger=loggers,
                          precision=precision, plugins=[AtomicCheckpointIO(), *plugins])
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    trainer.fit(stage, train_dataloaders=loader)
    return (timer.end - timer.start) / timer.steps


def bare_run(cfg, batches: list[dict]) -> float:
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    stage = instantiate(cfg.stage)
    stage.train()
    config = stage.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    params = [p for p in stage.parameters() if p.requires_grad]
    clip = cfg.trainer.gradient_clip_val
    start = None
    for step, batch in enumerate(batches):
        if step == WARMUP:
            start = time.perf_counter()
        loss = stage.compute_loss(batch)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if stage.ema is not None:
            stage.ema.update(stage.unet, step + 1)
    return (time.perf_counter() - start) / (len(batches) - WARMUP)


WARMUP = 5


def main() -> None:
    global WARMUP
    parser = one_line_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of each run")
    parser.add_argument("--data", type=Path, default=REPO / "data", help="paths.data_dir (holding demo/)")
    args = parser.parse_args()
    if args.rounds < 1 or args.steps < 1 or args.warmup < 1:
        parser.error("--rounds, --steps and --warmup must be >= 1")
    if not (args.data / "demo").is_dir():
        sys.exit(f"lightning_overhead: --data {args.data} has no demo/ shards: run `make demo-data` first")
    WARMUP = args.warmup
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as log_dir:
        cfg = compose_demo(args.data, Path(log_dir), args.steps + args.warmup)
        batches = load_batches(cfg, args.steps + args.warmup)
        lightning, bare = [], []
        for _ in range(args.rounds):
            lightning.append(lightning_run(cfg, batches))
            bare.append(bare_run(cfg, batches))
    ratio = statistics.median(lightning) / statistics.median(bare)
    print(f"demo stage, {args.steps} timed steps per run after {args.warmup} warm-up, {args.rounds} alternating rounds")
    print("| loop | per step (s), each round | median (s) |\n| --- | --- | ---: |")
    print(f"| vgen.train Trainer (callbacks, W&B offline) | {', '.join(f'{s:.3f}' for s in lightning)} | "
          f"{statistics.median(lightning):.3f} |")
    print(f"| bare PyTorch loop | {', '.join(f'{s:.3f}' for s in bare)} | {statistics.median(bare):.3f} |")
    print(f"Trainer / bare: {ratio:.3f}x")


if __name__ == "__main__":
    main()
