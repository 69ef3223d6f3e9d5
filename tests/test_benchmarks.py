"""Benchmarks as scripts: benchmarks/fused_throughput.py --quick, benchmarks/gpu_suite.py --tiny and
benchmarks/metric_suite.py --quick run to the end on this machine and their last line is the JSON their
docstrings promise, with figures that are positive, finite and consistent with one another; gpu_suite
refuses a machine without CUDA unless --tiny.

The fused-group ones run with --threads 1: the suite may share this 2-core machine with other jobs, and two OpenMP
threads on a contended pair of cores run several times slower than one."""
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sweeps.grid import build_trials

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str, home: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PROVLAE_HOME": str(home)}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def last_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) > 1, proc.stdout  # human-readable lines first
    return json.loads(lines[-1])


def positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_fused_throughput_quick(provlae_home):
    proc = run_script("fused_throughput.py", "--quick", "--k", "3", "--threads", "1", home=provlae_home)
    out = last_json(proc)
    assert out["name"] == "fused_throughput"
    assert out["k"] == 3
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert out["device"] == device
    assert out["kernels"] == ("batched" if device == "cuda" else "sequential")  # what auto resolves to
    for key in ("fused_img_s", "solo_img_s", "ratio"):
        assert positive(out[key]), (key, out[key])
    assert out["ratio"] == pytest.approx(out["fused_img_s"] / out["solo_img_s"], rel=1e-3)
    if device == "cpu":  # both kernels timed and printed; the JSON ratio is auto's (sequential)
        assert set(out["ratio_by_kernels"]) == {"sequential", "batched"}
        assert all(positive(v) for v in out["ratio_by_kernels"].values())
        assert out["ratio_by_kernels"]["sequential"] == out["ratio"]
        printed = proc.stdout.splitlines()[:-1]
        assert any("sequential" in line and "img/s" in line for line in printed)
        assert any("batched" in line and "img/s" in line for line in printed)


# A bare GPU machine has PyTorch, numpy, h5py, pandas, matplotlib, scipy and scikit-learn, but no Ray, MLflow
# or Optuna: gpu_suite.py runs there as it comes (`PYTHONPATH=. python3 benchmarks/gpu_suite.py`).
WITHOUT_SERVICE_LIBRARIES = ("import runpy, sys\n"
                             "for name in ('ray', 'mlflow', 'optuna'):\n"
                             "    sys.modules[name] = None  # importing it raises ImportError\n"
                             "sys.argv = sys.argv[1:]\n"
                             "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def run_bare(name: str, *args: str, home: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PROVLAE_HOME": str(home), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", WITHOUT_SERVICE_LIBRARIES, str(ROOT / "benchmarks" / name), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def strict_json(line: str) -> dict:
    """The line as JSON that other tools read: NaN and Infinity are not JSON."""
    def refuse(constant):
        raise ValueError(f"{constant} in the JSON line")
    return json.loads(line, parse_constant=refuse)


def test_gpu_suite_tiny(provlae_home):
    started = time.time()
    proc = run_bare("gpu_suite.py", "--tiny", "--threads", "1", home=provlae_home)
    out = last_json(proc)
    strict_json(proc.stdout.strip().splitlines()[-1])
    assert out["name"] == "gpu_suite" and out["tiny"] is True
    assert out["errors"] == {}, out["errors"]  # --tiny skips nothing; no section failed
    for key in ("solo_img_s", "fused_k2_img_s", "fused_k3_img_s", "eval_s", "eval_encode_s", "data_images",
                "paper_train_images", "gpu_hours_best", "gpu_hours_solo_eager", "total_s"):
        assert positive(out[key]), (key, out.get(key))
    assert out["eval_encode_s"] <= out["eval_s"]
    for k in (2, 3):
        assert out[f"fused_k{k}_ratio"] == pytest.approx(out[f"fused_k{k}_img_s"] / out["solo_img_s"], rel=1e-3)
    # what a step launches (on a CPU the operators it dispatches): a group's member-step fewer than a solo step
    assert out["launch_unit"] == "CPU operators" and out["solo_launches_per_step"] > 100
    assert out["fused_k3_launches_per_member_step"] < out["fused_k2_launches_per_member_step"] \
        < out["solo_launches_per_step"]
    trials = build_trials("paper")
    assert out["paper_trials"] == len(trials) == 250
    assert out["paper_evaluations"] == sum(c.num_stages for c in trials)
    assert out["paper_train_images"] == pytest.approx(sum(c.total_steps * c.batch_size for c in trials), rel=1e-4)
    solo_hours = (out["paper_train_images"] / out["solo_img_s"] + out["paper_eval_hours"] * 3600) / 3600
    assert out["gpu_hours_solo_eager"] == pytest.approx(solo_hours, rel=1e-3)
    hours = {k[len("gpu_hours_"):]: v for k, v in out.items() if k.startswith("gpu_hours_") and k != "gpu_hours_best"}
    assert set(hours) == {"solo_eager", "fused_k2", "fused_k3"}  # compile is left out with --tiny
    assert out["best_setting"] == min(hours, key=hours.get)
    assert out["gpu_hours_best"] == hours[out["best_setting"]]
    # Its rates land in the throughput table that sweep plans read: solo and each K.
    from provlae.throughput import read_table

    # the session's table: trials of other test files running beside this one append to it too
    table = [m for m in read_table(out["table"]) if m.source == "gpu_suite" and m.measured_at >= started]
    assert out["table_entries"] == 3 and [m.fuse for m in table] == [1, 2, 3]
    assert [m.train_img_s for m in table] == pytest.approx([out["solo_img_s"], out["fused_k2_img_s"],
                                                            out["fused_k3_img_s"]], rel=1e-3)


def test_gpu_suite_says_a_failed_data_section_in_its_json_line(provlae_home):
    proc = run_bare("gpu_suite.py", "--tiny", "--threads", "1", "--subset", "900000", home=provlae_home)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = strict_json(proc.stdout.strip().splitlines()[-1])
    assert out["name"] == "gpu_suite" and list(out["errors"]) == ["data"]
    assert "900000" in out["errors"]["data"] and "solo_img_s" not in out
    assert any(line.startswith("data: failed: ") for line in proc.stdout.splitlines())


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_suite_refuses_a_machine_without_cuda(provlae_home):
    proc = run_script("gpu_suite.py", home=provlae_home, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: gpu_suite needs a CUDA device (use --tiny on CPU)"]
    assert proc.stdout == ""


@pytest.mark.slow  # starts a local Ray twice
def test_metric_suite_quick(provlae_home):
    proc = run_script("metric_suite.py", "--quick", "--runs", "2", home=provlae_home, timeout=300)
    out = last_json(proc)
    assert out["name"] == "metric_suite" and (out["train_points"], out["test_points"]) == (1000, 500)
    assert set(out["seconds"]) == {"mig_hist", "sap", "modularity", "beta_vae", "udr"}  # --quick: no DCI
    assert all(positive(v) for v in out["seconds"].values())
    assert out["runs"] == 2 and out["evaluate_metrics"] == ["mig_hist", "sap", "modularity", "beta_vae", "udr"]
    assert out["ratio"] == pytest.approx(out["evaluate_1_worker_s"] / out["evaluate_2_workers_s"], rel=1e-2)
    printed = proc.stdout.splitlines()[:-1]
    for metric, seconds in out["seconds"].items():  # each metric's line, its seconds as in the JSON
        shown = [float(line.split()[1]) for line in printed if line.split()[:1] == [metric]]
        assert len(shown) == 1 and abs(shown[0] - seconds) <= 0.006, (metric, shown, seconds)


def test_launch_count_quick_counts_fewer_operators_per_member_in_a_group(provlae_home):
    """The CPU proxy of a launch-bound GPU's cost: operators dispatched per member-step. Counts, not times:
    the same on any machine, so the guard is firm (K = 40 is at 30x in the full run; K = 8 at about 7x)."""
    proc = run_script("launch_count.py", "--quick", home=provlae_home, timeout=300)
    out = last_json(proc)
    assert out["name"] == "launch_count" and set(out["per_member_step"]) == {"1", "8"}
    assert out["solo_ops_per_step"] > 100
    for k, per in out["per_member_step"].items():
        assert out["ratio"][k] == pytest.approx(out["solo_ops_per_step"] / per, rel=1e-2)
    assert out["ratio"]["8"] >= 6  # a group of 8 dispatches at least 6x fewer operators per member-step
