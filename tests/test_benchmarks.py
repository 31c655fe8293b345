"""The benchmark scripts run (speed is measured there, never asserted here): benchmarks/gpu_step.py's CPU run at a
tiny size, and benchmarks/unet_step.py's smoke size; both refuse bad arguments with one line."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO
from vgen.models.fastpath import NAMES

SCRIPTS = REPO / "benchmarks"


def run(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / script), *args], cwd=REPO, capture_output=True, text=True, check=False,
                          timeout=timeout, env={**__import__("os").environ, "OMP_NUM_THREADS": "2"})


def test_gpu_step_cpu_run_reports_every_configuration(tmp_path):
    out = tmp_path / "rows.jsonl"
    result = run("gpu_step.py", "--tiny", "--device", "cpu", "--batch", "1", "--frames", "2", "--height", "64",
                 "--width", "64", "--steps", "1", "--warmup", "1", "--strategies", "single", "ddp", "fsdp2",
                 "--attention", "sdpa", "xformers", "--precision", "32-true", "bf16-mixed", "--compile", "off",
                 "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 * 2 * 2
    measured = [r for r in rows if "error" not in r]
    assert {(r["strategy"], r["precision"]) for r in measured} == {
        (s, p) for s in ("single", "ddp", "fsdp2") for p in ("32-true", "bf16-mixed")}
    assert all(r["attention"] == "sdpa" for r in measured)
    assert all("xformers unavailable" in r["error"] for r in rows if r["attention"] == "xformers")
    for r in measured:
        assert r["step_s"] > 0 and r["samples_per_s"] > 0 and r["tflops_per_device"] > 0 and r["params"] > 0
        assert r["mfu"] is None  # no known peak for a CPU
    # the same model and FLOPs whatever the strategy: TFLOPS x step time agree across rows of one precision
    for precision in ("32-true", "bf16-mixed"):
        work = {round(r["tflops_per_device"] * r["step_s"], 9) for r in measured if r["precision"] == precision}
        assert len(work) == 1
    assert "| strategy | attention | precision | compile |" in result.stdout
    again = run("gpu_step.py", "--tiny", "--device", "cpu", "--out", str(out))
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [f"gpu_step: --out {out} exists: not overwritten"]


def test_unet_step_smoke_size_compares_the_two_orders():
    result = run("unet_step.py", "--widths", "32", "--batch", "1", "--frames", "2", "--size", "8", "--rounds", "1",
                 "--no-compile", "--ablation")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    diff = next(line for line in lines if line.startswith("outputs, fast vs reference"))
    assert float(diff.split("difference| ")[1].split()[0]) < 1e-4
    rows = [line for line in lines if line.startswith("| ") and "---" not in line][1:]
    names = [row.split("|")[1].strip() for row in rows]
    assert names[:2] == ["reference op order (original)", "fast"] and len(names) == 2 + len(NAMES) + 1
    bad = run("unet_step.py", "--rounds", "0")
    assert bad.returncode == 2 and "--rounds" in bad.stderr.strip().splitlines()[-1]
