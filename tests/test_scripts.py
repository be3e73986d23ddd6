"""Every benchmark and tool script under scripts/ still starts: a moved import shows here, not on the day it runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# liveclients.py is a module the others import, not a command.
SCRIPTS = [p for p in sorted((Path(__file__).resolve().parents[1] / "scripts").glob("*.py"))
           if '__name__ == "__main__"' in p.read_text()]


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_script_starts_and_prints_its_help(script, tmp_path):
    # From another folder: a script must find the package and the test helpers itself.
    proc = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout


def _gpu_check(*args: str) -> dict:
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"
    proc = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=400,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_gpu_check_dry_run_on_the_cpu_runs_every_step_and_prints_one_json_object():
    report = _gpu_check("--cpu")
    assert report["mode"] == "cpu-dry-run" and report["skipped"] == []
    steps = {"tests_sim", "bench_model_eager_fp32", "bench_engine", "bench_live", "bench_model_selfie"}
    assert steps <= set(report["steps"])
    assert report["ok"], {k: v["tail"] for k, v in report["steps"].items() if v["rc"] != 0}
    assert report["steps"]["bench_model_eager_fp32"]["result"]["fps"] > 0


def test_gpu_check_lists_the_steps_its_time_budget_leaves_out_instead_of_running_past_it():
    report = _gpu_check("--cpu", "--budget", "5")
    assert report["steps"] == {} and len(report["skipped"]) == 5 and report["elapsed_s"] < 5


BENCH_REFERENCE = Path(__file__).resolve().parents[1] / "scripts" / "bench_reference.py"


def test_bench_reference_without_a_clone_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH_REFERENCE), "--reference", str(tmp_path / "absent")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and "does not exist" in proc.stderr


def test_bench_reference_matches_birefnets_own_code_on_the_same_weights(tmp_path):
    # Needs the user's `git clone https://github.com/ZhengPeng7/BiRefNet` (plus einops and timm).
    clone = os.environ.get("RMBG_BIREFNET_REFERENCE")
    if not clone:
        pytest.skip("set RMBG_BIREFNET_REFERENCE to a clone of github.com/ZhengPeng7/BiRefNet to run")
    proc = subprocess.run([sys.executable, str(BENCH_REFERENCE), "--reference", clone, "--size", "64",
                           "--iters", "1", "--warmup", "0"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["max_abs_diff"] < 1e-3
    assert result["ours"]["fps"] > 0 and result["reference"]["fps"] > 0
