"""Plain sbatch scripts: a training run (settings from ``conf/hydra/launcher/slurm.yaml``, the same ones the Hydra
submitit launcher uses) and a job array that splits a data pipeline's shards between its tasks."""

from __future__ import annotations

import re
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

# hydra.launcher keys that are sbatch options of the same name (underscores become dashes)
SBATCH_KEYS = ("partition", "account", "qos", "comment", "constraint", "exclude", "gres", "cpus_per_task",
               "gpus_per_node", "gpus_per_task", "cpus_per_gpu", "mem_per_gpu", "mem_per_cpu")


class LaunchError(ValueError):
    """A launch problem reported as one line (the option or config key, what was wrong)."""


def sbatch_lines(options: Mapping[str, object]) -> list[str]:
    """``#SBATCH --key=value`` lines; ``True`` gives a bare flag, ``None``/``False`` leave the option out."""
    lines = []
    for key, value in options.items():
        if value is None or value is False:
            continue
        flag = "--" + str(key).replace("_", "-")
        lines.append(f"#SBATCH {flag}" if value is True else f"#SBATCH {flag}={shlex.quote(str(value))}")
    return lines


def check_devices(devices) -> int:
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        raise LaunchError(f"trainer.devices must be an integer >= 1 for a SLURM launch (one task per device on "
                          f"each node), got {devices!r}")
    return devices


def launcher_options(launcher: Mapping, num_nodes: int, devices) -> dict[str, object]:
    """sbatch options from a ``hydra.launcher`` (submitit SLURM) config, checked against the trainer's layout."""
    check_devices(devices)
    nodes, tasks = launcher.get("nodes"), launcher.get("tasks_per_node")
    if nodes != num_nodes or tasks != devices:
        raise LaunchError(f"hydra.launcher.nodes={nodes} and hydra.launcher.tasks_per_node={tasks} must equal "
                          f"trainer.num_nodes={num_nodes} and trainer.devices={devices} (Lightning checks them "
                          f"against SLURM_NNODES and SLURM_NTASKS_PER_NODE)")
    options: dict[str, object] = {"nodes": nodes, "ntasks_per_node": tasks}
    options.update({key: launcher.get(key) for key in SBATCH_KEYS})
    if launcher.get("mem_gb") is not None:
        options["mem"] = f"{launcher['mem_gb']}G"
    options["time"] = launcher.get("timeout_min")
    options.update(launcher.get("additional_parameters") or {})
    return options


def render_train_script(name: str, run_dir: Path, workdir: Path, options: Mapping[str, object],
                        setup: Sequence[str], command: Sequence[str]) -> str:
    """The sbatch script of one training run: ``srun`` starts one task per device on every node."""
    header = {"job_name": name, **options, "open_mode": "append", "output": f"{run_dir}/slurm-%j.out",
              "chdir": str(workdir)}
    return "\n".join([
        "#!/bin/bash",
        f"# vgen training run {name!r}, rendered by `python -m vgen.launch train`. Submit: sbatch <this file>.",
        f"# Outputs and checkpoints: {run_dir}. A requeued job (preemption, time limit) resumes there.",
        *sbatch_lines(header),
        *setup,
        "srun --kill-on-bad-exit=1 " + shlex.join(command),
        "",
    ])


def shard_ranges(tasks: int, shards: int) -> list[tuple[int, int]]:
    """Split shards ``[0, shards)`` into ``tasks`` contiguous, disjoint ranges whose sizes differ by at most 1."""
    if tasks < 1 or shards < tasks:
        raise LaunchError(f"--tasks={tasks} must be between 1 and --shards={shards} (each task writes at least "
                          f"one shard)")
    base, extra = divmod(shards, tasks)
    ranges, start = [], 0
    for task in range(tasks):
        stop = start + base + (task < extra)
        ranges.append((start, stop))
        start = stop
    return ranges


def render_array_script(name: str, log_dir: Path, workdir: Path, ranges: Sequence[tuple[int, int]],
                        options: Mapping[str, object], setup: Sequence[str], command: Sequence[str],
                        range_flag: str = "--shard-range") -> str:
    """A job array: task ``i`` runs ``command <range_flag> A:B`` with its own shard range ``ranges[i]``."""
    header = {"job_name": name, "array": f"0-{len(ranges) - 1}", "ntasks": 1, **options, "open_mode": "append",
              "output": f"{log_dir}/slurm-%A_%a.out", "chdir": str(workdir)}
    table = " ".join(f"{a}:{b}" for a, b in ranges)
    return "\n".join([
        "#!/bin/bash",
        f"# vgen job array {name!r}, rendered by `python -m vgen.launch array`: {len(ranges)} tasks, task i writes",
        "# only the shards RANGES[i] (disjoint outputs). Rerun one task alone: sbatch --array=<i> <this file>.",
        *sbatch_lines(header),
        *setup,
        f"RANGES=({table})",
        'range=${RANGES[${SLURM_ARRAY_TASK_ID:-none}]:-}',
        'if [ -z "$range" ]; then',
        f'  echo "array task ${{SLURM_ARRAY_TASK_ID:-unset}}: no shard range (tasks 0-{len(ranges) - 1})" >&2; exit 2',
        "fi",
        'echo "array task $SLURM_ARRAY_TASK_ID: shards $range"',
        "# the range is this task's whole share: hide the array variables from tools that would split it again",
        "srun env -u SLURM_ARRAY_TASK_ID -u SLURM_ARRAY_TASK_COUNT " + shlex.join(command)
        + f" {shlex.quote(range_flag)} \"$range\"",
        "",
    ])


def submit(script: Path, *sbatch_args: str) -> str:
    """``sbatch --parsable [args] script`` -> the job id."""
    try:
        result = subprocess.run(["sbatch", "--parsable", *sbatch_args, str(script)], check=False,
                                capture_output=True, text=True, timeout=120)
    except FileNotFoundError as err:
        raise LaunchError("sbatch not found: run on a SLURM login node (or bring up launch/local_cluster/up.sh)"
                          ) from err
    if result.returncode != 0:
        message = (result.stderr.strip() or result.stdout.strip() or f"exit {result.returncode}").splitlines()[-1]
        raise LaunchError(f"sbatch {script} failed: {message}")
    job = result.stdout.strip().split(";")[0]
    if not re.fullmatch(r"[0-9]+", job):
        raise LaunchError(f"sbatch {script}: unexpected output {result.stdout.strip()!r}")
    return job


__all__ = ["LaunchError", "check_devices", "launcher_options", "render_array_script", "render_train_script", "sbatch_lines",
           "shard_ranges", "submit"]
