"""analysis/ against a real MLflow sqlite store holding runs whose answers are computed here by hand.

Expected numbers come from the raw values logged (sorted() and statistics), never from analysis/.
"""
from __future__ import annotations

import json
import math
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from commands import run_command

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric, Param  # noqa: E402

import analysis  # noqa: E402
from analysis.__main__ import main  # noqa: E402
from analysis.runs import label_stages  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT, EMPTY, SEARCH = "grid", "empty", "search"
REPORTED = ("factor_score", "mig", "mig_sup", "recon_error")
SEEDS = {  # (dataset, family, beta) -> number of finished seeds
    ("dsprites", "pro_vlae", 1.0): 5,
    ("dsprites", "pro_vlae", 4.0): 2,  # incomplete cell
    ("dsprites", "vlae", 1.0): 4,
    ("shapes3d", "beta_vae", 2.0): 3,
    ("shapes3d", "teacher_student", 1.0): 3,
}


def raw_values() -> dict:
    """(dataset, family, beta) -> seed -> metric -> final value, distinct so rankings have no ties."""
    rng = random.Random(7)
    return {cell: {seed: {"mig": round(rng.uniform(0.0, 0.6), 4), "mig_sup": round(rng.uniform(0.0, 0.8), 4),
                          "factor_score": round(rng.uniform(0.4, 1.0), 4),
                          "recon_error": round(rng.uniform(20.0, 200.0), 3)}
                   for seed in range(n)}
            for cell, n in SEEDS.items()}


RAW = raw_values()


def config_params(dataset: str, family: str, beta: float, seed: int) -> dict[str, str]:
    return {"family": family, "dataset": dataset, "beta": f"{beta:g}" if seed % 2 else str(beta),
            "seed": str(seed), "levels": "3", "z_dim": "2", "gamma": "0.5", "fade_in_steps": "50",
            "steps_per_stage": "100", "batch_size": "32", "lr": "0.0005", "subset": "None",
            "data_path": "None", "device": "cpu", "checkpoint_every": "0", "mi_samples": "1000",
            "factor_train_votes": "100", "factor_eval_votes": "50", "include_shape": "False", "note": "x"}


def log_trial(client, exp_id, parent, cell, seed, finals, status="FINISHED", extra_tags=None, stages=False,
              start=None):
    dataset, family, beta = cell
    tags = {"mlflow.parentRunId": parent, "provlae.role": "trial", "family": family, "dataset": dataset,
            "sweep": "grid", "ray_trial_id": f"t{seed}", **(extra_tags or {})}
    run = client.create_run(exp_id, run_name=f"{family}-{dataset}-b{beta:g}-s{seed}", tags=tags, start_time=start)
    t0 = 1_700_000_000_000
    metrics = [Metric(k, -1.0, t0, 100) for k in finals]  # an earlier stage-end value: must not win
    metrics += [Metric(k, v, t0 + 10, 300) for k, v in finals.items()]
    metrics += [Metric("loss", 500.0 - s, t0 + s, s) for s in (0, 150, 299)]
    if stages:
        metrics += STAGE_HISTORY
    client.log_batch(run.info.run_id, metrics=metrics,
                     params=[Param(k, v) for k, v in config_params(dataset, family, beta, seed).items()])
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


# Fig. 5 history of one pro-VLAE run: stage logged as training goes, I(x; z_l) at each stage end and
# again at the end of training (same step as the last stage end, later timestamp).
MI_AT_STAGE = {0: (0.02, 0.01, 10.59, 10.61, 0.01), 1: (0.03, 5.98, 6.94, 12.84, 0.11),
               2: (0.05, 6.01, 6.90, 12.90, 0.06)}
STAGE_HISTORY = (
    [Metric("stage", float(s // 100), 1_700_000_000_000 + s, s) for s in range(0, 300, 50)]
    + [Metric(key, value, 1_700_000_001_000 + 10 * st, 100 * st + 99)
       for st, values in MI_AT_STAGE.items()
       for key, value in zip(("mi_z1", "mi_z2", "mi_z3", "mi_total", "mi_over"), values)]
    + [Metric("mi_z3", 6.91, 1_700_000_002_000, 299)]  # the end-of-training evaluation
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment(EXPERIMENT)
    client.create_experiment(EMPTY)
    parent = client.create_run(exp_id, run_name="sweep-grid", tags={"provlae.role": "sweep", "sweep": "grid"})
    parent_id = parent.info.run_id
    client.log_batch(parent_id, metrics=[Metric("mig", 9.0, 0, 0)],
                     params=[Param(k, v) for k, v in config_params("dsprites", "pro_vlae", 1.0, 0).items()])
    client.set_terminated(parent_id)
    ids = {}
    for cell, seeds in RAW.items():
        for seed, finals in seeds.items():
            ids[cell, seed] = log_trial(client, exp_id, parent_id, cell, seed, finals,
                                        stages=(cell, seed) == (("dsprites", "pro_vlae", 1.0), 0))
    best = {"mig": 0.99, "mig_sup": 0.99, "factor_score": 1.0, "recon_error": 1.0}
    failed = log_trial(client, exp_id, parent_id, ("dsprites", "pro_vlae", 1.0), 5, best, status="FAILED",
                       extra_tags={"error": "RuntimeError: boom"})
    # A parent without the sweep tag (e.g. a nested run group): excluded because it has a child.
    group = client.create_run(exp_id, run_name="group")
    client.log_batch(group.info.run_id, metrics=[Metric("mig", 8.0, 0, 0)],
                     params=[Param(k, v) for k, v in config_params("shapes3d", "beta_vae", 2.0, 9).items()])
    client.set_terminated(group.info.run_id)
    client.set_tag(ids[("shapes3d", "beta_vae", 2.0), 0], "mlflow.parentRunId", group.info.run_id)

    search_id = client.create_experiment(SEARCH)
    for i, (objective, tagged) in enumerate([(0.3, True), (0.7, True), (0.5, True), (0.9, False)]):
        tags = {"provlae.role": "trial", **({"search": "optuna"} if tagged else {})}
        run = client.create_run(search_id, run_name=f"opt-{i}", tags=tags)
        params = {**config_params("dsprites", "pro_vlae", 1.0, 0), "lr": str(10.0 ** -(3 + i))}
        client.log_batch(run.info.run_id, metrics=[Metric("objective", objective, 0, 10)],
                         params=[Param(k, v) for k, v in params.items()])
        client.set_terminated(run.info.run_id)
    return {"uri": uri, "ids": ids, "failed": failed, "parents": {parent_id, group.info.run_id}}


def expected(cell, metric, rank_by=None, k=3):
    """(mean, sample std, seeds best first) of the k best seeds, straight from RAW."""
    seeds = RAW[cell]
    key = rank_by or metric
    sign = 1 if key == "recon_error" else -1
    chosen = sorted(seeds, key=lambda s: sign * seeds[s][key])[:k]
    values = [seeds[s][metric] for s in chosen]
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else math.nan, chosen


def check_numbers(top: pd.DataFrame, rank_by=None) -> None:
    assert len(top) == len(RAW) * len(REPORTED)
    for row in top.itertuples():
        cell = (row.dataset, row.family, row.beta)
        mean, std, seeds = expected(cell, row.metric, rank_by)
        assert row.top_k_mean == pytest.approx(mean, rel=1e-12), (cell, row.metric)
        if math.isnan(std):
            assert math.isnan(row.top_k_std)
        else:
            assert row.top_k_std == pytest.approx(std, rel=1e-9), (cell, row.metric)
        assert list(row.seeds) == seeds
        assert row.n_runs == SEEDS[cell]
        assert row.incomplete == (SEEDS[cell] < 3)


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "analysis", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_load_runs_casts_params_and_keeps_only_finished_trials(store, monkeypatch):
    df = analysis.load_runs(EXPERIMENT, tracking_uri=store["uri"])
    assert set(df["run_id"]) == set(store["ids"].values())  # no parents, no failed run
    monkeypatch.setattr("analysis.runs.PAGE_SIZE", 4)  # every page is read
    assert sorted(analysis.load_runs(EXPERIMENT, tracking_uri=store["uri"])["run_id"]) == sorted(df["run_id"])
    assert (df["status"] == "FINISHED").all()
    assert df["beta"].dtype == float and df["seed"].dtype == "int64" and df["levels"].dtype == "int64"
    assert df["lr"].dtype == float and (df["lr"] == 0.0005).all() and (df["gamma"] == 0.5).all()
    assert df["subset"].map(lambda v: v is None).all() and df["data_path"].map(lambda v: v is None).all()
    assert df["include_shape"].dtype == bool and df["mig"].dtype == float
    assert isinstance(df["start_time"].dtype, pd.DatetimeTZDtype)
    row = df.set_index("run_id").loc[store["ids"][("dsprites", "vlae", 1.0), 2]]
    assert row["run_name"] == "vlae-dsprites-b1-s2" and row["sweep"] == "grid"
    assert row["mig"] == RAW[("dsprites", "vlae", 1.0)][2]["mig"]  # the latest value, not the first

    everything = analysis.load_runs(EXPERIMENT, tracking_uri=store["uri"], include_failed=True)
    assert len(everything) == len(df) + 1
    failed = everything.set_index("run_id").loc[store["failed"]]
    assert failed["status"] == "FAILED" and failed["error"] == "RuntimeError: boom"


def test_top_k_matches_hand_computed_top_three(store):
    df = analysis.load_runs(EXPERIMENT, tracking_uri=store["uri"], include_failed=True)
    top = analysis.top_k(df, k=3)  # the failed run, best on every metric, must not count
    assert list(top.columns) == ["dataset", "family", "beta", "metric", "top_k_mean", "top_k_std",
                                 "n_runs", "seeds", "incomplete"]
    check_numbers(top)
    ranked = analysis.top_k(df, k=3, rank_by="mig")
    check_numbers(ranked, rank_by="mig")
    for _, cell in ranked.groupby(["dataset", "family", "beta"]):
        assert len({tuple(s) for s in cell["seeds"]}) == 1  # one ranking picks every metric's seeds
    with pytest.raises(ValueError, match=r"'nope'.*mig_sup"):
        analysis.top_k(df, rank_by="nope")


def test_compare_names_each_leader_and_margin(store):
    top = analysis.top_k(analysis.load_runs(EXPERIMENT, tracking_uri=store["uri"]))
    verdicts = analysis.compare(top).set_index(["dataset", "metric"])
    for dataset in ("dsprites", "shapes3d"):
        for metric in REPORTED:
            sign = 1 if metric == "recon_error" else -1
            best = {}  # family -> its best top-3 mean over β
            for cell in RAW:
                if cell[0] == dataset:
                    value = expected(cell, metric)[0]
                    if cell[1] not in best or sign * value < sign * best[cell[1]]:
                        best[cell[1]] = value
            (lead, v1), (second, v2) = sorted(best.items(), key=lambda item: sign * item[1])[:2]
            got = verdicts.loc[(dataset, metric)]
            assert (got["leader"], got["runner_up"]) == (lead, second)
            assert got["margin"] == pytest.approx(abs(v1 - v2))
    text = analysis.verdict(analysis.compare(top))
    assert "dsprites" in text and "shapes3d" in text and "leads at β=" in text


def test_stage_information_reads_fig5_history(store):
    run_id = store["ids"][("dsprites", "pro_vlae", 1.0), 0]
    info = analysis.stage_information(run_id, tracking_uri=store["uri"])
    assert list(info.index) == [0, 1, 2] and list(info["step"]) == [99, 199, 299]
    for stage, (z1, z2, z3, total, over) in MI_AT_STAGE.items():
        assert info.loc[stage, ["mi_z1", "mi_z2", "mi_total", "mi_over"]].tolist() == [z1, z2, total, over]
    assert info.loc[2, "mi_z3"] == 6.91 and info.loc[1, "mi_z3"] == 6.94  # the later evaluation wins
    # Evaluations at every stage end plus a separate final one: each joins the stage last logged.
    assert label_stages([99, 199, 299, 300], [(0, 0, 0.0), (100, 1, 1.0), (200, 2, 2.0)]) == [0, 1, 2, 2]
    assert label_stages([10, 20], []) == [0, 1]


def test_cli_top3_csv_columns_and_numbers(store, capsys, monkeypatch):
    result = run_command("analysis", "top3", "--experiment", EXPERIMENT, "--tracking-uri", store["uri"], "--format",
                         "csv", capsys=capsys, monkeypatch=monkeypatch)
    assert result.returncode == 0, result.stderr
    from io import StringIO
    top = pd.read_csv(StringIO(result.stdout))
    assert list(top.columns) == ["dataset", "family", "beta", "metric", "top_k_mean", "top_k_std",
                                 "n_runs", "seeds", "incomplete"]
    top["seeds"] = top["seeds"].map(lambda s: [int(x) for x in str(s).split(";")])
    check_numbers(top)


def test_cli_export_parquet_round_trip(store, tmp_path, capsys, monkeypatch):
    out = tmp_path / "runs.parquet"
    result = run_command("analysis", "export", "--experiment", EXPERIMENT, "--tracking-uri", store["uri"], "--out",
                         str(out), capsys=capsys, monkeypatch=monkeypatch)
    assert result.returncode == 0, result.stderr
    back = pd.read_parquet(out)
    assert sorted(back["run_id"]) == sorted([*store["ids"].values(), store["failed"]])
    statuses = dict(zip(back["run_id"], back["status"]))
    assert statuses.pop(store["failed"]) == "FAILED" and set(statuses.values()) == {"FINISHED"}
    assert back["beta"].dtype == float and back["seed"].dtype == "int64" and back["subset"].isna().all()


def test_cli_bad_input_is_one_line_and_status_2(store, capsys, tmp_path):
    result = cli("top3", "--experiment", "nope", "--tracking-uri", store["uri"])
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: ")
    assert "'nope'" in result.stderr and "Traceback" not in result.stderr
    for args in (["top3", "--experiment", EMPTY], ["top3", "--experiment", EXPERIMENT, "--rank-by", "nope"],
                 ["trials", "--experiment", SEARCH, "--objective", "nope"],
                 ["figures", "--experiment", EXPERIMENT, "--out", str(tmp_path), "--run", "0" * 32]):
        assert main([*args, "--tracking-uri", store["uri"]]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.strip().count("\n") == 0, err
    assert not any(tmp_path.iterdir())  # a bad --run writes no figure at all
    missing = f"sqlite:///{store['uri'].split('///')[1]}.missing"
    assert main(["top3", "--experiment", EXPERIMENT, "--tracking-uri", missing]) == 2
    assert "no MLflow store" in capsys.readouterr().err


def test_cli_figures_are_real_pngs(store, tmp_path):
    run_id = store["ids"][("dsprites", "pro_vlae", 1.0), 0]
    assert main(["figures", "--experiment", EXPERIMENT, "--tracking-uri", store["uri"],
                 "--out", str(tmp_path), "--run", run_id]) == 0
    names = {"fig2_dsprites.png", "fig2_shapes3d.png", "fig3_dsprites.png", "fig3_shapes3d.png",
             "fig5_pro_vlae-dsprites-b1-s0.png"}
    assert {p.name for p in tmp_path.iterdir()} == names
    from matplotlib.image import imread
    for name in names:
        path = tmp_path / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
        pixels = imread(path)
        assert min(pixels.shape[:2]) > 200 and pixels.std() > 0.01  # not a blank canvas


def test_cli_table_compare_and_trials(store, capsys):
    assert main(["top3", "--experiment", EXPERIMENT, "--tracking-uri", store["uri"]]) == 0
    table = capsys.readouterr().out
    assert "±" in table and table.count("incomplete") == 1
    assert main(["compare", "--experiment", EXPERIMENT, "--tracking-uri", store["uri"]]) == 0
    assert capsys.readouterr().out.count(" leads at β=") == 2 * len(REPORTED)
    assert main(["trials", "--experiment", SEARCH, "--tracking-uri", store["uri"], "--search", "optuna",
                 "--format", "csv"]) == 0
    from io import StringIO
    ranked = pd.read_csv(StringIO(capsys.readouterr().out))
    assert list(ranked["objective"]) == [0.7, 0.5, 0.3] and list(ranked["rank"]) == [1, 2, 3]
    assert "lr" in ranked.columns  # the searched param varies, so it is shown


def test_top3_and_compare_read_one_sweep_with_sweep(tmp_path, capsys):
    """Two sweeps in one experiment (an older demo and the current one): --sweep counts only its own."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment("shared")
    cell = ("dsprites", "pro_vlae", 4.0)
    for sweep, mig in (("old", 0.9), ("new", 0.3)):
        parent = client.create_run(exp_id, run_name=sweep, tags={"provlae.role": "sweep", "sweep": sweep})
        log_trial(client, exp_id, parent.info.run_id, cell, 0, {"mig": mig, "mig_sup": mig, "recon_error": 90.0},
                  extra_tags={"sweep": sweep})
    assert main(["top3", "--experiment", "shared", "--tracking-uri", uri, "--sweep", "new", "--k", "1",
                 "--format", "json"]) == 0
    rows = [r for r in json.loads(capsys.readouterr().out) if r["metric"] == "mig"]
    assert [(r["top_k_mean"], r["n_runs"]) for r in rows] == [(0.3, 1)]
    assert main(["top3", "--experiment", "shared", "--tracking-uri", uri, "--k", "1", "--format", "json"]) == 0
    rows = [r for r in json.loads(capsys.readouterr().out) if r["metric"] == "mig"]
    assert [(r["top_k_mean"], r["n_runs"]) for r in rows] == [(0.9, 2)]  # pooled: the best of both sweeps
    assert main(["compare", "--experiment", "shared", "--tracking-uri", uri, "--sweep", "gone"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: experiment 'shared' has no runs of sweep 'gone' (sweeps: new, old)"


def test_a_trial_logged_twice_counts_once(tmp_path, capsys):
    """A store holding copies of one trial (by its trial key, or for older runs by sweep and run name):
    the top-k table counts each trial once, with the numbers of the copy the sweep keeps (the earliest
    FINISHED one); a FAILED copy or a never-ended ghost never stands in for it."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment("dups")
    cell, t0 = ("dsprites", "pro_vlae", 4.0), 1_700_000_000_000
    parent = client.create_run(exp_id, run_name="demo", tags={"provlae.role": "sweep", "sweep": "demo"})
    values = {0: 0.21, 1: 0.35, 2: 0.12, 3: 0.28, 4: 0.05}  # mig of each seed's kept run
    demo = {"sweep": "demo"}
    for seed, mig in values.items():
        key = {"provlae.trial_key": f"key{seed}"} if seed < 4 else {}  # seed 4: an older run, no key
        log_trial(client, exp_id, parent.info.run_id, cell, seed, {"mig": mig, "recon_error": 90.0 + seed},
                  extra_tags={**demo, **key}, start=t0 + seed)
    copies = [(0, {"provlae.trial_key": "key0"}, "FINISHED", 0.99),  # a later FINISHED copy
              (1, {"provlae.trial_key": "key1"}, "FAILED", 0.98),  # a failed copy
              (4, {}, "FINISHED", 0.97)]  # an older run logged twice under one name in one sweep
    for seed, key, status, mig in copies:
        log_trial(client, exp_id, parent.info.run_id, cell, seed, {"mig": mig, "recon_error": 1.0},
                  status=status, extra_tags={**demo, **key}, start=t0 + 100 + seed)
    ghost = client.create_run(exp_id, run_name="pro_vlae-dsprites-b4-s2", start_time=t0 - 1,
                              tags={**demo, "provlae.role": "trial", "provlae.trial_key": "key2",
                                    "mlflow.parentRunId": parent.info.run_id})  # RUNNING, nothing logged
    other = client.create_run(exp_id, run_name="paper", tags={"provlae.role": "sweep", "sweep": "paper"})
    log_trial(client, exp_id, other.info.run_id, cell, 0, {"mig": 0.5, "recon_error": 50.0},
              extra_tags={"sweep": "paper", "provlae.trial_key": "paper0"})

    df = analysis.load_runs("dups", tracking_uri=uri, sweep="demo")
    assert list(df.columns[:3]) == ["run_id", "run_name", "sweep"] and set(df["sweep"]) == {"demo"}
    assert sorted(df["seed"]) == sorted(values) and dict(zip(df["seed"], df["mig"])) == values
    everything = analysis.load_runs("dups", tracking_uri=uri, include_failed=True, sweep="demo")
    assert len(everything) == len(values) and ghost.info.run_id not in set(everything["run_id"])
    assert analysis.sweep_counts(analysis.load_runs("dups", tracking_uri=uri)) == {"demo": 5, "paper": 1}

    assert main(["top3", "--experiment", "dups", "--tracking-uri", uri, "--sweep", "demo", "--format", "json"]) == 0
    top = {r["metric"]: r for r in json.loads(capsys.readouterr().out)}
    best3 = sorted(values.values(), reverse=True)[:3]  # 0.35, 0.28, 0.21
    assert top["mig"]["n_runs"] == 5 and top["mig"]["seeds"] == [1, 3, 0]
    assert top["mig"]["top_k_mean"] == pytest.approx(statistics.mean(best3), rel=1e-12)
    assert top["mig"]["top_k_std"] == pytest.approx(statistics.stdev(best3), rel=1e-9)
    assert top["recon_error"]["top_k_mean"] == pytest.approx(statistics.mean([90.0, 91.0, 92.0]), rel=1e-12)

    with pytest.raises(analysis.AnalysisError, match=r"no runs of sweep 'gone' \(sweeps: demo, paper\)"):
        analysis.load_runs("dups", tracking_uri=uri, sweep="gone")


def test_cli_names_the_sweeps_it_pools(tmp_path, capsys, monkeypatch):
    """Without --sweep, top3, compare and report say on stderr which sweeps they pooled (the numbers on stdout stay
    parseable); with --sweep, or with one sweep only, they say nothing."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment("pooled")
    cell = ("dsprites", "vlae", 1.0)
    sizes = {"demo": 2, "paper": 3}
    for sweep, n in sizes.items():
        parent = client.create_run(exp_id, run_name=sweep, tags={"provlae.role": "sweep", "sweep": sweep})
        for seed in range(n):
            log_trial(client, exp_id, parent.info.run_id, cell, seed, {"mig": 0.1 * (seed + 1)},
                      extra_tags={"sweep": sweep, "provlae.trial_key": f"{sweep}{seed}"})
    untagged = client.create_run(exp_id, run_name="old")  # a run of before the sweep tag, its own trial
    client.log_batch(untagged.info.run_id, metrics=[Metric("mig", 0.4, 0, 1)],
                     params=[Param(k, v) for k, v in config_params(*cell, 7).items()])
    client.set_terminated(untagged.info.run_id)

    pooled = run_command("analysis", "top3", "--experiment", "pooled", "--tracking-uri", uri, "--format", "json",
                         capsys=capsys, monkeypatch=monkeypatch)
    assert pooled.returncode == 0, pooled.stderr
    assert pooled.stderr.strip().splitlines() == [
        "pooled 3 sweeps: demo (2 runs), paper (3 runs), (no sweep tag) (1 run); pass --sweep NAME for one"]
    assert [r["n_runs"] for r in json.loads(pooled.stdout) if r["metric"] == "mig"] == [6]
    for args in (["compare"], ["report", "--out", str(tmp_path / "report")]):
        assert main([*args, "--experiment", "pooled", "--tracking-uri", uri]) == 0
        assert capsys.readouterr().err.startswith("pooled 3 sweeps: demo (2 runs), "), args
    one = run_command("analysis", "top3", "--experiment", "pooled", "--tracking-uri", uri, "--sweep", "paper",
                      "--format", "json", capsys=capsys, monkeypatch=monkeypatch)
    assert one.returncode == 0 and one.stderr == ""
    assert [r["n_runs"] for r in json.loads(one.stdout) if r["metric"] == "mig"] == [3]
