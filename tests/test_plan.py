"""A sweep's compute plan (provlae/plan.py) and the throughput table it reads (provlae/throughput.py): the
arithmetic against hand-computed grids, which measurement is used, a plan with nothing measured, a damaged
table, bad --plan-for, the dry runs' plan lines; and `python -m provlae calibrate` on this CPU."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
from commands import run_command

from provlae.config import TrialConfig
from provlae.errors import ConfigError
from provlae.fused import make_groups
from provlae.plan import Target, make_plan, parse_plan_for
from provlae.throughput import Measurement, ThroughputError, add, nearest, read_table

ROOT = Path(__file__).resolve().parents[1]


def cfg(**kw) -> TrialConfig:
    base = dict(dataset="dsprites", family="pro_vlae", subset=1000, steps_per_stage=100, batch_size=50,
                eval_subset=500, device="cpu")
    return TrialConfig.from_dict({**base, **kw})


def measured(**kw) -> Measurement:
    base = dict(device="cpu", device_name="Test CPU, 1 threads", dataset="dsprites", family="pro_vlae",
                batch_size=50, fuse=1, kernels="solo", dtype="float32", compile="none", train_img_s=1000.0,
                eval_s=2.0, eval_images=1000, source="calibrate", measured_at=1.0)
    return Measurement(**{**base, **kw})


def test_a_solo_grid_by_hand():
    # 4 pro-VLAE trials: 3 stages x 100 steps x 50 images = 15,000 images each; 3 evaluations of 500 images.
    configs = [cfg(seed=s) for s in range(4)]
    plan = make_plan([[c] for c in configs], Target("cpu", 2, 1.0), [measured()])
    assert (plan.trials, plan.tune_trials, plan.train_images, plan.evaluations) == (4, 4, 60_000, 12)
    per_trial = 15_000 / 1000 + 3 * 2.0 * 500 / 1000  # 15 s training, 3 s evaluating
    assert [c.seconds for c in plan.costs] == [pytest.approx(per_trial)] * 4
    assert plan.compute_s == pytest.approx(4 * per_trial)
    assert plan.wall_s == pytest.approx(4 * per_trial / 2)  # two at once
    assert math.isnan(plan.device_hours)  # a CPU plan counts core-hours instead
    lines = plan.lines()
    assert lines[0] == "plan: 4 trials in 4 Tune trials, 60k training images, 12 evaluations"
    assert "estimated wall time 36 s" in lines[2] and "0.02 core-hours" in lines[2]
    assert lines[3].startswith("  from: cpu Test CPU, 1 threads: pro_vlae on dsprites, batch 50")
    # Measured with 5,000 estimator points, the trials' 10,000 cost twice as much per evaluation.
    halved = make_plan([[configs[0]]], Target("cpu", 1, 1.0), [measured(mi_samples=5000)])
    assert halved.costs[0].eval_s == pytest.approx(2 * 3 * 2.0 * 500 / 1000)


def test_fused_groups_and_gpus_by_hand():
    configs = [cfg(seed=s, beta=b) for s in range(3) for b in (1.0, 4.0)]  # 6 trials
    groups = make_groups(configs, 4)  # 4 + 2 members
    assert [len(g) for g in groups] == [4, 2]
    table = [measured(device="cuda", device_name="NVIDIA H100 80GB HBM3", fuse=1, train_img_s=5000.0),
             measured(device="cuda", device_name="NVIDIA H100 80GB HBM3", fuse=4, kernels="batched",
                      train_img_s=16000.0),
             measured(device="cuda", device_name="NVIDIA A100", fuse=4, kernels="batched", train_img_s=9000.0)]
    target = Target("cuda", 2, 1.0, "H100")
    plan = make_plan(groups, target, table)
    assert plan.tune_trials == 2 and target.slots == 2
    four, two = plan.costs
    assert four.measurement.fuse == 4 and four.measurement.device_name.startswith("NVIDIA H100")
    assert four.train_s == pytest.approx(4 * 15_000 / 16000)  # a group's rate counts all its members
    assert two.measurement.fuse == 1  # K = 2 was not measured: the largest K below it, a lower bound
    assert two.train_s == pytest.approx(2 * 15_000 / 5000)
    assert four.eval_s == pytest.approx(4 * 3 * 2.0 * 500 / 1000)  # members evaluate one after another
    assert plan.wall_s == pytest.approx(max(plan.compute_s / 2, four.seconds))
    assert plan.device_hours == pytest.approx(plan.wall_s * 2 / 3600)
    assert any("groups of 2, 4 planned from the rate measured at another K" in n for n in plan.notes)
    # A quarter GPU per trial packs four trials on a GPU, which share its throughput: still 2 at once.
    assert Target("cuda", 2, 0.25).slots == 2 and Target("cuda", 8, 2.0).slots == 4


def test_the_nearest_measurement_and_a_plan_without_one():
    table = [measured(fuse=1, dataset="shapes3d"), measured(fuse=4, measured_at=5.0), measured(fuse=1)]
    assert nearest(table, "cpu", None, "dsprites", "pro_vlae", 50, 1, "float32") is table[2]
    assert nearest(table, "cpu", None, "dsprites", "pro_vlae", 50, 4, "float32") is table[1]
    assert nearest(table, "cpu", None, "dsprites", "pro_vlae", 50, 8, "float32") is table[1]
    assert nearest(table, "cpu", None, "dsprites", "pro_vlae", 50, 3, "float32") is table[2]
    assert nearest(table[1:2], "cpu", None, "dsprites", "pro_vlae", 50, 2, "float32") is table[1]
    assert nearest(table, "cuda", None, "dsprites", "pro_vlae", 50, 1, "float32") is None
    assert nearest(table, "cpu", "EPYC", "dsprites", "pro_vlae", 50, 1, "float32") is None
    plan = make_plan([[cfg()]], Target("cuda", 8, 1.0, "H100"), table)
    assert not plan.measured and math.isnan(plan.wall_s)
    assert plan.lines()[-1] == ("  nothing measured on H100 yet: no estimate. Measure it there with `python -m "
                                "provlae calibrate` (under a minute; --fuse K to measure fused groups)")
    assert plan.params()["plan_measured"] == "none"
    other = make_plan([[cfg(batch_size=25)]], Target("cpu", 1, 1.0), [measured(dataset="shapes3d")])
    assert any("differs in dataset, batch size" in n for n in other.notes)


def test_the_table_appends_whole_and_a_damaged_one_is_named(tmp_path, capsys, monkeypatch):
    path = tmp_path / "throughput.json"
    assert read_table(path) == []
    add([measured()], path)
    add([measured(fuse=4)], path)
    assert [m.fuse for m in read_table(path)] == [1, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["throughput.json", "throughput.json.lock"]  # no temp file
    path.write_text('[{"device": "cpu"')
    with pytest.raises(ThroughputError, match=f"throughput table {path} cannot be read"):
        read_table(path)
    with pytest.raises(ThroughputError):
        add([measured()], path)
    assert path.read_text() == '[{"device": "cpu"'  # left as it was
    path.rename(tmp_path / "throughput.json.bak")
    (tmp_path / "throughput.json").write_text("{}")
    out = dry_run(tmp_path, capsys, monkeypatch)
    assert out.returncode == 0, out.stderr
    assert f"throughput table {tmp_path / 'throughput.json'} cannot be read" in out.stdout


@pytest.mark.parametrize("text, want", [("cpu×16", ("cpu", None, 16)), ("cuda x 8", ("cuda", None, 8)),
                                        ("H100*8", ("cuda", "H100", 8)), ("gpu×1", ("cuda", None, 1))])
def test_plan_for(text, want):
    assert parse_plan_for(text) == want


@pytest.mark.parametrize("text", ["H100×0", "×8", "cpu", "cpu×-2", ""])
def test_a_bad_plan_for_is_refused(text):
    with pytest.raises(ConfigError, match="--plan-for must be DEVICE×N"):
        parse_plan_for(text)


def dry_run(home: Path, capsys, monkeypatch, *args: str) -> subprocess.CompletedProcess:
    """The smoke grid's dry run with ``home`` as PROVLAE_HOME (where the throughput table is)."""
    return run_command("full_grid", "--preset", "smoke", "--dry-run", *args, capsys=capsys,
                       monkeypatch=monkeypatch, env={"PROVLAE_HOME": str(home)})


def test_calibrate_measures_this_cpu_and_the_dry_run_plans_from_it(tmp_path, capsys, monkeypatch):
    out = run_command("provlae", "calibrate", "--device", "cpu", "--fuse", "1,2", "--batch-size", "32",
                      "--seconds", "1", "--threads", "1", "--eval-images", "512", "--set", "mi_samples=500",
                      "--set", "factor_train_votes=100", "--set", "factor_eval_votes=50", capsys=capsys,
                      monkeypatch=monkeypatch, env={"PROVLAE_HOME": str(tmp_path)})  # in this process
    assert out.returncode == 0, out.stderr[-3000:]
    table = read_table(tmp_path / "throughput.json")
    assert [(m.device, m.fuse, m.batch_size, m.source) for m in table] == [("cpu", 1, 32, "calibrate"),
                                                                           ("cpu", 2, 32, "calibrate")]
    assert all(m.train_img_s > 0 and m.eval_s > 0 and m.eval_images == 512 for m in table)
    assert out.stdout.strip().splitlines()[-1] == f"added 2 measurement(s) to {tmp_path / 'throughput.json'}"
    # pro-VLAE of the smoke grid planned from it: batch 32 as measured, so no note about a rougher estimate.
    plan = dry_run(tmp_path, capsys, monkeypatch, "--families", "pro_vlae", "--seeds", "4", "--set",
                   "batch_size=32").stdout
    assert "plan: 4 trials in 4 Tune trials" in plan and "estimated wall time" in plan
    assert "from: cpu " in plan and "rougher" not in plan
    bad = run_command("provlae", "calibrate", "--fuse", "0", capsys=capsys, monkeypatch=monkeypatch)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: --fuse must be a comma list of group sizes >= 1, got '0'"]
    for images in ("0", "8193"):
        bad = run_command("provlae", "calibrate", "--eval-images", images, capsys=capsys, monkeypatch=monkeypatch)
        assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
            f"error: --eval-images must be 1 to 8192, got {images}"]
    assert len(read_table(tmp_path / "throughput.json")) == 2


def test_writers_at_once_lose_no_measurement(tmp_path):
    """The trials of a node finish at the same time, each adding to the table: none is lost."""
    code = ("import sys; from provlae.throughput import Measurement, add; "
            "m = Measurement('cpu', 'x', 'dsprites', 'pro_vlae', 8, 1, 'solo', 'float32', 'none', float(sys.argv[1]), "
            "None, None, 'trial'); [add([m], sys.argv[2]) for _ in range(20)]")
    path = tmp_path / "throughput.json"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i + 1), str(path)], cwd=ROOT) for i in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0] * 4
    assert sorted({m.train_img_s for m in read_table(path)}) == [1.0, 2.0, 3.0, 4.0]
    assert len(read_table(path)) == 80


def test_a_bad_plan_for_stops_the_sweep_script_with_one_line(tmp_path, capsys, monkeypatch):
    out = dry_run(tmp_path, capsys, monkeypatch, "--plan-for", "H100×0")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == ["error: --plan-for must be DEVICE×N with N >= 1 (cpu×16, "
                                               "cuda×8, H100×8), got 'H100×0'"]


def test_fuse_auto_is_one_on_a_cpu_and_sized_by_memory_on_a_gpu():
    from provlae.plan import FUSE_CAP, choose_fuse, largest_group

    assert choose_fuse("cpu", 40) == (1, "on a CPU a fused group trains no faster than its trials one after another")
    gib, mib = 2**30, 2**20
    # 10 GiB free x 0.8 = 8 GiB over 500 MiB per member: 16 fit; the grid allows 40; the cap is 32.
    assert choose_fuse("cuda", 40, 500 * mib, 10 * gib) == (16, "K = 16: limited by 10.0 GiB free x 0.8 over "
                                                                 "500 MiB per member")
    assert choose_fuse("cuda", 5, 500 * mib, 10 * gib) == (5, "K = 5: limited by the grid's trials that may "
                                                               "share a group")
    assert choose_fuse("cuda", 80, 10 * mib, 70 * gib)[0] == FUSE_CAP
    assert choose_fuse("cuda", 8, 20 * gib, 10 * gib)[0] == 1  # not even one more: alone
    with pytest.raises(ConfigError, match="needs one member's memory"):
        choose_fuse("cuda", 8)
    # the smoke grid: four families, one seed: no two trials may share a group
    smoke = [cfg(family=f) for f in ("beta_vae", "vlae", "pro_vlae", "teacher_student")]
    assert largest_group(smoke) == 1
    assert largest_group([cfg(seed=s, beta=b) for s in range(3) for b in (1.0, 2.0)]) == 6


@pytest.mark.parametrize("args, message", [
    (["--fuse", "0"], "error: --fuse must be auto or >= 1 (trials per fused group), got 0"),
    (["--fuse", "auto", "--gpus-per-trial", "1", "--fused-kernels", "sequential"],
     "error: --fuse auto sizes groups for the batched kernels of a GPU: pass --fuse K with --fused-kernels "
     "sequential"),
])
def test_fuse_auto_bad_input(tmp_path, args, message, capsys, monkeypatch):
    out = dry_run(tmp_path, capsys, monkeypatch, *args)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [message]


def test_fuse_auto_on_this_cpu_says_why(tmp_path, capsys, monkeypatch):
    out = dry_run(tmp_path, capsys, monkeypatch, "--fuse", "auto", "--seeds", "4")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == ("--fuse auto: 1 (on a CPU a fused group trains no faster than its "
                                          "trials one after another)")
    assert "\ngroup 1 " not in out.stdout and "plan: 16 trials in 16 Tune trials" in out.stdout
