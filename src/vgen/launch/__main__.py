"""``python -m vgen.launch``: render (and optionally submit) plain sbatch scripts.

    python -m vgen.launch train [--submit] [--script PATH] <vgen.train overrides, incl. hydra.launcher.*=...>
    python -m vgen.launch array --tasks N --shards S --log-dir DIR [--submit] [sbatch options] -- <command ...>

``train`` composes the run's config with ``hydra/launcher=slurm`` (partition, nodes, time, signal, ... as in
``conf/hydra/launcher/slurm.yaml``), writes ``<run dir>/launch.sbatch`` that runs
``srun python -m vgen.train <overrides> resume=auto`` on ``trainer.num_nodes`` nodes with ``trainer.devices``
tasks each, and with ``--submit`` prints the job id. ``array`` writes a job array whose task ``i`` runs
``<command> --shard-range A:B`` on its own disjoint shard range; rerun one task with ``sbatch --array=i <script>``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from vgen.launch.sbatch import (
    LaunchError,
    check_devices,
    launcher_options,
    render_array_script,
    render_train_script,
    shard_ranges,
    submit,
)

PROG = "vgen.launch"


def _launch_only(override: str) -> bool:
    key = override.lstrip("+~").split("=", 1)[0]
    return key == "hydra/launcher" or key.startswith("hydra.launcher.")


def compose_train(overrides: list[str]):
    """The run's config with ``hydra/launcher=slurm`` (unless another launcher is chosen), hydra node included."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from vgen.config import CONF_DIR, one_line

    if not any(o.lstrip("+~").startswith("hydra/launcher=") for o in overrides):
        overrides = ["hydra/launcher=slurm", *overrides]
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="train", overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as err:
        raise LaunchError(one_line(str(err))) from err


def train_script(overrides: list[str], script: Path | None, workdir: Path) -> Path:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    cfg = compose_train(overrides)
    check_devices(cfg.trainer.devices)
    try:
        launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
        run_dir = (workdir / str(cfg.hydra.run.dir)).resolve()
        options = launcher_options(launcher, cfg.trainer.num_nodes, cfg.trainer.devices)
    except OmegaConfBaseException as err:
        raise LaunchError(f"{getattr(err, 'full_key', '') or 'config'}: {str(err).splitlines()[0]}") from err
    train_overrides = [o for o in overrides if not _launch_only(o)]
    if not any(o.split("=", 1)[0] == "resume" for o in train_overrides):
        train_overrides.append("resume=auto")  # a resubmitted script continues the run instead of restarting it
    command = [sys.executable, "-u", "-m", "vgen.train", *train_overrides]
    text = render_train_script(str(cfg.name), run_dir, workdir, options, launcher.get("setup") or [], command)
    script = (script or run_dir / "launch.sbatch").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)  # SLURM does not create the --output directory
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(text)
    return script


def array_script(args, workdir: Path) -> Path:
    if not args.command:
        raise LaunchError("array: give the command after `--`, e.g. -- python data_pipelines/synthetic.py --out X")
    log_dir = (workdir / args.log_dir).resolve()
    options = {"partition": args.partition, "account": args.account, "qos": args.qos, "time": args.time,
               "cpus_per_task": args.cpus_per_task, "mem": f"{args.mem_gb}G" if args.mem_gb else None}
    for item in args.sbatch:
        key, sep, value = item.partition("=")
        if not key:
            raise LaunchError(f"--sbatch {item!r}: expected OPTION=VALUE or OPTION (e.g. --sbatch mail-type=END)")
        options[key.lstrip("-")] = value if sep else True
    name = args.name or Path(args.command[-1] if len(args.command) == 1 else args.command[1]).stem
    text = render_array_script(name, log_dir, workdir, shard_ranges(args.tasks, args.shards), options, args.setup,
                               args.command, args.range_flag)
    script = (args.script or log_dir / f"{name}.sbatch").resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(text)
    return script


def parse(argv: list[str]):
    parser = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    train = sub.add_parser("train", help="sbatch script for a vgen.train run")
    train.add_argument("--submit", action="store_true", help="submit with sbatch and print the job id")
    train.add_argument("--script", type=Path, help="where to write the script (default <run dir>/launch.sbatch)")
    train.add_argument("overrides", nargs="*", help="vgen.train overrides, incl. hydra.launcher.* settings")
    array = sub.add_parser("array", help="job array splitting a data pipeline's shards between tasks")
    array.add_argument("--tasks", type=int, required=True, help="number of array tasks")
    array.add_argument("--shards", type=int, required=True, help="number of shards, split into --tasks ranges")
    array.add_argument("--log-dir", type=Path, required=True, help="directory for the script and the task logs")
    array.add_argument("--name", help="job name (default: the command's script name)")
    array.add_argument("--range-flag", default="--shard-range", help="the command's flag that takes A:B")
    array.add_argument("--partition", help="sbatch --partition")
    array.add_argument("--account", help="sbatch --account")
    array.add_argument("--qos", help="sbatch --qos")
    array.add_argument("--time", type=int, help="sbatch --time, minutes per task")
    array.add_argument("--cpus-per-task", type=int, help="sbatch --cpus-per-task")
    array.add_argument("--mem-gb", type=int, help="sbatch --mem, GB per task")
    array.add_argument("--sbatch", action="append", default=[], metavar="OPTION=VALUE",
                       help="any other sbatch option (repeatable)")
    array.add_argument("--setup", action="append", default=[], metavar="LINE",
                       help="shell line run before the command (repeatable)")
    array.add_argument("--script", type=Path, help="where to write the script (default <log dir>/<name>.sbatch)")
    array.add_argument("--submit", action="store_true", help="submit with sbatch and print the job id")
    array.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command of one task")
    args = parser.parse_args(argv)
    if args.mode == "array" and args.command[:1] == ["--"]:
        args.command = args.command[1:]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    workdir = Path(os.getcwd())
    try:
        script = train_script(args.overrides, args.script, workdir) if args.mode == "train" \
            else array_script(args, workdir)
        print(f"{PROG}: wrote {script}", file=sys.stderr)
        if args.submit:
            job = submit(script)
            print(f"{PROG}: submitted job {job} (logs: {shlex.quote(str(script.parent))}/slurm-*.out)",
                  file=sys.stderr)
            print(job)
    except LaunchError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
