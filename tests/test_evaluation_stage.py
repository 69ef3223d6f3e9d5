"""The evaluation stage (analysis/evaluate.py, provlae/metrics/scoring.py): metrics computed from stored
representations, as Ray tasks, into the runs' MLflow record.

The scoring functions are checked on arrays. The stage itself runs on an in-process local Ray against
real sqlite MLflow stores: synthetic sweeps whose trial runs hold representations of known codes (an
identity code, a permuted sign-flipped copy of it, a random code, a dataset without factors, a run logged
before representations were stored, a damaged file), and one real smoke sweep run with ``--evaluate``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from commands import run_command

from analysis import record
from analysis.__main__ import main as analysis_main
from provlae import representation
from provlae.metrics import names, scoring

SIZES = (4, 5)  # the synthetic dataset's factor sizes
N = 600  # stored points per representation
STAGES = 3
STEP = 100  # stage s ends at step (s + 1) * STEP


# ------------------------------------------------------------------------------------------ scoring


def factors_and_identity(n: int = N, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    f = np.stack([rng.integers(s, size=n) for s in SIZES], 1)
    codes = f / np.array(SIZES) + 0.01 * rng.normal(size=f.shape)
    return f, codes


def test_metric_names_in_catalogue_order_and_unknown_ones_named():
    assert names.check_names("udr, mig_hist") == ("mig_hist", "udr")
    assert names.check_names(["all"]) == names.METRIC_NAMES
    with pytest.raises(ValueError, match="unknown metric 'mig'; known: mig_hist, dci"):
        names.check_names("mig_hist,mig")
    with pytest.raises(ValueError, match="no metric named"):
        names.check_names(" , ")
    assert set(record.EVALUATED_METRICS) == {v for vs in names.SUITE.values() for v in vs} | {"udr"}


def test_score_computes_the_metrics_asked_for_on_disjoint_points():
    f, codes = factors_and_identity()
    out = scoring.score(codes, f, ("mig_hist", "modularity"), train=300, test=200)
    assert set(out["values"]) == {"mig_hist", "modularity", "explicitness_train", "explicitness_test"}
    assert set(out["seconds"]) == {"mig_hist", "modularity"}
    assert out["values"]["mig_hist"] >= 0.9 and out["values"]["modularity"] >= 0.9
    assert out["notes"] == []
    shuffled = scoring.score(np.random.default_rng(1).permutation(codes), f, ("mig_hist",), train=300, test=200)
    assert shuffled["values"]["mig_hist"] <= 0.2
    few = scoring.score(codes[:100], f[:100], ("sap",))
    assert few["notes"] == ["100 points stored: 67 train and 33 test points instead of 10000 and 5000"]
    with pytest.raises(ValueError, match="not a metric of the suite: 'udr'"):
        scoring.score(codes, f, ("udr",))


def test_score_without_factors_logs_nothing_and_says_why():
    _, codes = factors_and_identity()
    out = scoring.score(codes, np.zeros((N, 0), np.int64), ("mig_hist", "dci", "beta_vae"))
    assert out["values"] == {}
    assert out["notes"] == ["no ground-truth factors: mig_hist, dci, beta_vae skipped"]


def test_udr_compares_models_on_the_rows_they_all_stored():
    f, codes = factors_and_identity(800)
    rng = np.random.default_rng(3)
    copy = -codes[:, ::-1] * 2.0 + 0.01 * rng.normal(size=codes.shape)  # permuted, sign-flipped, rescaled
    other = rng.normal(size=codes.shape)
    rows = [np.arange(800), np.arange(100, 800), np.arange(800)]  # model 1 stored rows 100..799 only
    order = rng.permutation(700)  # and in another order
    means = [codes, copy[100:][order], other]
    out = scoring.udr_scores(means, [np.ones(2)] * 3, [rows[0], rows[1][order], rows[2]])
    assert out["points"] == 700
    assert out["pairwise"][0, 1] >= 0.8 and out["pairwise"][1, 0] >= 0.8  # aligned row by row
    assert out["pairwise"][0, 2] < 0.6 and out["pairwise"][2, 1] < 0.6
    assert min(out["model_scores"][:2]) > out["model_scores"][2]
    with pytest.raises(ValueError, match="share 0 evaluation images"):
        scoring.udr_scores(means[:2], [np.ones(2)] * 2, [np.arange(800), np.arange(800, 1500)])


def test_a_representations_stage_is_read_from_its_path_only():
    assert record.representation_stage(record.representation_path(12)) == 12
    assert [record.representation_stage(p) for p in ("representation/stage.npz", "representation/x.npz",
                                                       "representation/stage1.npy")] == [None, None, None]


# ------------------------------------------------------------------------------ a synthetic sweep


def codes_for(kind: str, f: np.ndarray, base: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(len(kind))
    if kind == "identity":
        return base
    if kind == "copy":  # the identity's latents permuted and sign-flipped
        return -base[:, ::-1] + 0.01 * rng.normal(size=base.shape)
    return rng.normal(size=base.shape)


def write_rep(folder: Path, stage: int, codes: np.ndarray, f: np.ndarray) -> Path:
    d = codes.shape[1] + 1  # one more latent, constant: not in use
    mu = np.concatenate([codes, np.zeros((len(codes), 1))], 1).astype(np.float32)
    logvar = np.full_like(mu, -4.0)
    logvar[:, -1] = 0.0
    rep = representation.Representation(
        stage=stage, step=(stage + 1) * STEP, mu=mu, logvar=logvar, index=np.arange(len(mu)) * 3,
        factors=f, kl=representation.kl_per_latent(mu, logvar), in_use=np.arange(d) < d - 1,
        level=np.arange(1, d + 1))
    return representation.write(folder / f"stage{stage}.npz", rep)


@pytest.fixture
def synthetic(tmp_path):
    """A sweep 'syn' in experiment 'syn' of a fresh sqlite store; returns (uri, {run name: run id}, parent)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("syn", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(exp, run_name="syn", tags={record.ROLE_TAG: record.SWEEP_ROLE,
                                                          record.SWEEP_TAG: "syn"}).info.run_id
    f, base = factors_and_identity()
    trials = {  # run name -> (dataset, beta, seed, code kind, what is stored)
        "ds-b1-s0": ("dsprites", 1.0, 0, "identity", "stages"),
        "ds-b1-s1": ("dsprites", 1.0, 1, "copy", "stages"),
        "ds-b1-s2": ("dsprites", 1.0, 2, "random", "stages"),
        "ds-b4-s0": ("dsprites", 4.0, 0, "identity", "none"),  # logged before representations were stored
        "ds-b4-s1": ("dsprites", 4.0, 1, "identity", "damaged"),
        "cel-b1-s0": ("celeba", 1.0, 0, "identity", "stages"),
        "cel-b1-s1": ("celeba", 1.0, 1, "copy", "stages"),
    }
    ids = {}
    for name, (dataset, beta, seed, kind, stored) in trials.items():
        run = client.create_run(exp, run_name=name, tags={
            record.ROLE_TAG: record.TRIAL_ROLE, record.SWEEP_TAG: "syn", record.PARENT_TAG: parent,
            record.KEY_TAG: name, "family": "pro_vlae", "dataset": dataset}).info.run_id
        for key, value in (("family", "pro_vlae"), ("dataset", dataset), ("beta", beta), ("seed", seed),
                           ("levels", 3)):
            client.log_param(run, key, str(value))
        logged = {"recon_error": 10.0 + seed, **({"mig_sup": 0.1 * seed} if dataset == "dsprites" else {})}
        for key, value in logged.items():  # seed 2 leads on MIG-sup
            client.log_metric(run, key, value, step=STAGES * STEP)
        factors = f if dataset == "dsprites" else np.zeros((N, 0), np.int64)
        folder = tmp_path / "reps" / name
        folder.mkdir(parents=True)
        for s in range(STAGES if stored != "none" else 0):
            path = write_rep(folder, s, codes_for(kind, f, base), factors)
            if stored == "damaged" and s == STAGES - 1:
                path.write_bytes(b"PK\x03\x04 not a zip")
            client.log_artifact(run, str(path), record.REPRESENTATION_DIR)
        client.set_terminated(run, "FINISHED")
        ids[name] = run
    client.set_terminated(parent, "FINISHED")
    return uri, ids, parent


def snapshot(uri: str, ids: dict) -> dict:
    """Every run's metric histories and tags."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    out = {}
    for name, run_id in ids.items():
        run = client.get_run(run_id)
        out[name] = ({k: [(m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, k)]
                      for k in run.data.metrics}, dict(run.data.tags))
    return out


def steps(snap: dict, name: str, key: str) -> list[int]:
    return sorted(s for s, _, _ in snap[name][0].get(key, []))


def test_evaluate_logs_each_metric_once_at_the_stage_step(local_ray, synthetic):
    from analysis.evaluate import evaluate

    uri, ids, parent = synthetic
    lines = []
    outcome = evaluate("syn", uri, metrics="mig_hist,sap,udr", say=lines.append)
    last = STAGES * STEP
    snap = snapshot(uri, ids)
    for name in ("ds-b1-s0", "ds-b1-s1", "ds-b1-s2"):
        for key in ("mig_hist", "sap", "udr"):
            assert steps(snap, name, key) == [last], (name, key)
        assert snap[name][1][record.evaluated_tag(STAGES - 1)] == "mig_hist,sap,udr"
    value = {n: {k: v[-1][1] for k, v in snap[n][0].items()} for n in snap}
    assert value["ds-b1-s0"]["mig_hist"] >= 0.9 and value["ds-b1-s2"]["mig_hist"] <= 0.2
    assert min(value["ds-b1-s0"]["udr"], value["ds-b1-s1"]["udr"]) > value["ds-b1-s2"]["udr"]
    for name in ("cel-b1-s0", "cel-b1-s1"):  # no factors: UDR alone, the suite said so
        assert steps(snap, name, "udr") == [last] and "mig_hist" not in snap[name][0]
        assert value[name]["udr"] >= 0.8
    assert any("cel-b1-s0 stage 2: no value [no ground-truth factors: mig_hist, sap skipped]" in x for x in lines)
    # A run logged before representations were stored: listed once. A damaged file: one line, nothing logged.
    assert outcome.skipped_runs == ["ds-b4-s0"]
    assert sum("ds-b4-s0" in x for x in lines) == 1 and "store no representation" in lines[0]
    damaged = [x for x in lines if "ds-b4-s1" in x]
    assert len(damaged) == 1 and damaged[0].startswith("skipped run ds-b4-s1") and "stage2.npz" in damaged[0]
    assert outcome.failures == [damaged[0].replace("skipped run ", "run ").replace("; nothing logged", "")]
    for name in ("ds-b4-s0", "ds-b4-s1"):
        assert set(snap[name][0]) == {"mig_sup", "recon_error"}
        assert not any(t.startswith("provlae.evaluated") for t in snap[name][1])
    assert (outcome.scored, outcome.cells) == (5, 2)
    # The parent run holds each cell's pairwise matrix.
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    logged = sorted(a.path for a in client.list_artifacts(parent, record.UDR_DIR))
    assert logged == [record.udr_path("celeba_pro_vlae_beta1", 2), record.udr_path("dsprites_pro_vlae_beta1", 2)]
    path = client.download_artifacts(parent, record.udr_path("dsprites_pro_vlae_beta1", 2), str(Path(uri[10:]).parent))
    cell = json.loads(Path(path).read_text())
    assert [r["run_name"] for r in cell["runs"]] == ["ds-b1-s0", "ds-b1-s1", "ds-b1-s2"]
    assert [r["udr"] for r in cell["runs"]] == [value[r["run_name"]]["udr"] for r in cell["runs"]]
    pairwise = np.array(cell["pairwise"])
    assert pairwise.shape == (3, 3) and np.all(np.diag(pairwise) == 0) and pairwise[0, 1] >= 0.8
    assert cell["points"] == N

    # Again: nothing is missing, nothing is computed or logged.
    again = evaluate("syn", uri, metrics="mig_hist,sap,udr", say=lines.append)
    assert (again.scored, again.cells, again.up_to_date) == (0, 0, 5)
    assert snapshot(uri, ids) == snap


def test_a_new_metric_and_every_stage_add_only_what_is_missing(local_ray, synthetic):
    from analysis.evaluate import evaluate

    uri, ids, _ = synthetic
    evaluate("syn", uri, metrics="mig_hist", say=lambda line: None)
    before = snapshot(uri, ids)
    outcome = evaluate("syn", uri, metrics="mig_hist,modularity", stage="all", say=lambda line: None)
    after = snapshot(uri, ids)
    every = [(s + 1) * STEP for s in range(STAGES)]
    for name in ("ds-b1-s0", "ds-b1-s1", "ds-b1-s2"):
        assert steps(after, name, "mig_hist") == every  # the last stage's value not logged again
        assert [m for m in after[name][0]["mig_hist"] if m[0] == STAGES * STEP] == before[name][0]["mig_hist"]
        assert steps(after, name, "modularity") == every
        assert after[name][1][record.evaluated_tag(0)] == "mig_hist,modularity"
    assert outcome.scored == 3 * STAGES + 2 * STAGES + (STAGES - 1)  # ds-b4-s1's first stages are readable
    # --force computes again: one more value at the step, the tag unchanged.
    evaluate("syn", uri, metrics="mig_hist", stage="0", force=True, say=lambda line: None)
    forced = snapshot(uri, ids)
    assert steps(forced, "ds-b1-s0", "mig_hist") == [STEP, STEP, 2 * STEP, 3 * STEP]
    assert forced["ds-b1-s0"][1] == after["ds-b1-s0"][1]


@pytest.mark.parametrize("argv, message", [
    (["--metrics", "mig_hist,mig"], "error: --metrics: unknown metric 'mig'; known: mig_hist, dci, sap"),
    (["--sweep", "nope"], "error: experiment 'syn' has no runs of sweep 'nope' (sweeps: syn)"),
    (["--stage", "3"], "error: --stage 3 is out of range: the runs store stage(s) 0, 1, 2"),
    (["--stage", "first"], "error: --stage must be last, all or a stage's number"),
    (["--experiment", "nope"], "error: no MLflow experiment named 'nope'"),
])
def test_bad_input_is_one_error_line_and_nothing_logged(synthetic, capsys, argv, message):
    uri, ids, _ = synthetic
    before = snapshot(uri, ids)
    assert analysis_main(["evaluate", "--experiment", "syn", "--tracking-uri", uri, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err
    assert snapshot(uri, ids) == before


def test_top3_ranks_seeds_by_udr_without_labels(local_ray, synthetic, capsys):
    from analysis.evaluate import evaluate

    uri, _, _ = synthetic
    evaluate("syn", uri, metrics="udr", say=lambda line: None)
    capsys.readouterr()
    assert analysis_main(["top3", "--experiment", "syn", "--tracking-uri", uri, "--rank-by", "udr", "--k", "2",
                          "--format", "json"]) == 0
    top = json.loads(capsys.readouterr().out)
    cell = {(r["dataset"], r["beta"], r["metric"]): r for r in top}
    # dSprites: the two seeds that agree with each other, not the random one that leads on MIG-sup.
    assert set(cell[("dsprites", 1.0, "mig_sup")]["seeds"]) == {0, 1}
    assert cell[("dsprites", 1.0, "udr")]["seeds"] == cell[("dsprites", 1.0, "mig_sup")]["seeds"]
    # CelebA, a dataset without factors: ranked all the same.
    assert set(cell[("celeba", 1.0, "recon_error")]["seeds"]) == {0, 1}
    assert cell[("celeba", 1.0, "udr")]["top_k_mean"] >= 0.8 and ("celeba", 1.0, "mig_sup") not in cell
    # compare and the report show the suite beside the paper's metrics.
    assert analysis_main(["compare", "--experiment", "syn", "--tracking-uri", uri]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [x.split()[0] for x in lines if not x.startswith(("celeba", "dsprites"))] == [
        "recon_error", "udr", "mig_sup", "recon_error", "udr"]  # per dataset, the paper's first


def test_the_report_has_the_suite_per_dataset_and_udrs_agreement_with_mig_sup(local_ray, synthetic, tmp_path):
    import re

    from analysis.evaluate import evaluate
    from analysis.report import write_report

    uri, _, _ = synthetic
    empty = write_report("syn", tmp_path / "before", tracking_uri=uri).read_text()
    assert "No metric of the suite is logged yet" in empty and "python -m analysis evaluate --experiment syn" in empty
    evaluate("syn", uri, metrics="mig_hist,udr", say=lambda line: None)
    html = write_report("syn", tmp_path / "after", tracking_uri=uri).read_text()
    section = html[html.index("<h2>The disentanglement_lib suite</h2>"):html.index("<h2>Fig. 2")]
    assert 'id="suite-dsprites"' in section and 'id="suite-celeba"' in section
    assert "MIG (histogram)" in section and "UDR" in section
    # UDR ranks the three dSprites seeds 0 and 1 above 2; MIG-sup (0.1 * seed) the other way round.
    (agreement,) = re.findall(r'<p class="agreement" data-cell-rho="([^"]+)" data-pooled-rho="([^"]+)"', section)
    assert float(agreement[0]) < 0 and float(agreement[1]) < 0
    assert section.count('class="agreement"') == 1  # CelebA has no MIG-sup to agree with


def test_udr_agreement_is_spearmans_rho_per_cell_and_pooled():
    import pandas as pd

    from analysis.topk import udr_agreement

    runs = pd.DataFrame({"dataset": ["d"] * 6 + ["e"] * 3, "family": ["a"] * 3 + ["b"] * 3 + ["a"] * 3,
                         "beta": [1.0] * 9, "status": ["FINISHED"] * 9,
                         "udr": [0.1, 0.2, 0.3, 0.3, 0.2, 0.1, 0.5, 0.6, 0.7],
                         "mig_sup": [1.0, 2.0, 3.0, 1.0, 2.0, 3.0, None, None, None]})
    out = udr_agreement(runs).set_index("dataset")
    assert list(out.index) == ["d"]  # e reports no MIG-sup
    assert out.at["d", "cells"] == 2 and out.at["d", "cell_rho"] == 0.0  # +1 and -1
    assert out.at["d", "runs"] == 6 and abs(out.at["d", "pooled_rho"]) < 1


# ------------------------------------------------------------------------------------- a real sweep


def test_a_smoke_sweep_evaluates_at_its_end_and_the_cli_adds_nothing_twice(local_ray, tmp_path, capsys,
                                                                          check_sweep_runs, monkeypatch):
    import smoke

    from sweeps import grid
    from sweeps.full_grid import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["--preset", "smoke", "--families", "pro_vlae", "--seeds", "2", "--name", "ev", "--experiment", "ev",
            "--tracking-uri", uri, "--storage", str(tmp_path / "ray"), "--no-report", *smoke.quick_args(),
            "--evaluate", "mig_hist,udr"]
    assert main(args) == 0
    out = capsys.readouterr().out
    configs = {c.run_name: c for c in grid.build_trials("smoke", overrides=smoke.quick({"device": "cpu"}),
                                                          families=["pro_vlae"], seeds=[0, 1])}
    runs = check_sweep_runs(uri, "ev", "ev", configs)
    assert "Evaluating mig_hist, udr from the stored representations" in out
    last = configs["pro_vlae-dsprites-b1-s0"].total_steps
    snap = snapshot(uri, {n: r.info.run_id for n, r in runs.items()})
    for name in runs:
        assert steps(snap, name, "mig_hist") == [last] and steps(snap, name, "udr") == [last]
        assert f"{name} stage 2: mig_hist " in out
    assert "udr dsprites_pro_vlae_beta1 stage 2: seed 0 " in out

    cli = run_command("analysis", "evaluate", "--experiment", "ev", "--tracking-uri", uri, "--metrics", "udr,mig_hist",
                      capsys=capsys, monkeypatch=monkeypatch)  # in this process (tests/commands.py)
    assert cli.returncode == 0, cli.stderr
    assert "nothing to compute: 2 run-stage(s) already hold mig_hist, udr" in cli.stdout
    assert snapshot(uri, {n: r.info.run_id for n, r in runs.items()}) == snap
