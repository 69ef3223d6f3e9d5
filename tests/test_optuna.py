"""Adaptive search (sweeps/optuna_search.py): the search space, bad input, a configuration's seeds as one
fused group (each with its solo trial's numbers), the ASHA rungs, and two searches run through the real
script on a local Ray with a sqlite MLflow store: a 4-trial smoke search, and a 4-trial search whose driver
is SIGKILLed and which the same command resumes.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import servers
from smoke import QUICK

from provlae.config import TrialConfig
from sweeps import search
from sweeps.cli import run_main
from sweeps.optuna_search import main

ROOT = Path(__file__).resolve().parents[1]
# The smoke preset made smaller still: a pro_vlae trial trains 3 stages of 4 steps in a few seconds.
# A narrow network evaluated on 200 images (tests/smoke.py): what the search tests assert holds at any size
TINY = {"steps_per_stage": 4, "log_every": 2, "batch_size": 16, "subset": 256, "mi_samples": 64,
        "factor_train_votes": 20, "factor_eval_votes": 10, **QUICK}


def spec(family: str = "pro_vlae", objective: str = "mig_sup", mode: str | None = None, seeds=(0,),
         **overrides) -> search.SearchSpec:
    return search.build_spec("smoke", family, "dsprites", 4, objective, mode, list(seeds),
                             {"device": "cpu", **overrides})


# ------------------------------------------------------------------------------------- fast tests


def test_pro_vlae_searches_beta_gamma_fade_in_and_lr():
    s = spec()
    assert list(s.space) == ["beta", "gamma", "fade_in_steps", "lr"]
    beta, gamma, fade, lr = s.space.values()
    assert (beta.low, beta.high, beta.log) == (0.5, 32.0, True)
    assert (gamma.low, gamma.high, gamma.log) == (0.0, 1.0, False)
    assert (fade.low, fade.high) == (0, s.base.steps_per_stage) == (0, 10)  # the smoke preset's stage
    assert (lr.low, lr.high, lr.log) == (1e-4, 2e-3, True)
    assert s.rungs == [10, 20] and s.mode == "max"


@pytest.mark.parametrize("family", ["beta_vae", "vlae"])
def test_single_stage_families_search_beta_and_lr_and_are_never_stopped_early(family):
    s = spec(family)
    assert list(s.space) == ["beta", "lr"]
    assert s.rungs == []
    assert type(search.make_scheduler(s)).__name__ == "FIFOScheduler"


def test_set_fixes_a_field_and_takes_it_out_of_the_search():
    s = spec(lr="1e-3", steps_per_stage="7")
    assert "lr" not in s.space and s.base.lr == 1e-3
    assert s.space["fade_in_steps"].high == 7
    assert s.config_for({"beta": 2.0, "gamma": 0.1, "fade_in_steps": 3}, seed=5) == s.base.with_overrides(
        {"beta": 2.0, "gamma": 0.1, "fade_in_steps": 3, "seed": 5})


def test_objective_mode_defaults_to_min_for_recon_error_only():
    assert spec(objective="recon_error").mode == "min"
    assert spec(objective="factor_score").mode == "max"
    assert spec(objective="recon_error", mode="max").mode == "max"


@pytest.mark.parametrize("levels, steps", [(2, 10), (3, 10), (4, 7)])
def test_asha_rungs_fall_on_stage_ends(levels, steps):
    """The rungs Ray's AsyncHyperBandScheduler builds from our arguments are whole numbers of stages."""
    s = spec(levels=str(levels), steps_per_stage=str(steps))
    scheduler = search.make_scheduler(s)
    (bracket,) = scheduler._brackets
    milestones = sorted(m for m, _ in bracket._rungs if m < s.base.total_steps)
    assert milestones == s.rungs == search.asha_milestones(steps, levels * steps)
    assert milestones and all(m % steps == 0 for m in milestones)


def test_a_configuration_trains_every_seed_and_reports_their_mean_at_stage_ends(provlae_home, tmp_path,
                                                                                monkeypatch):
    """search_trial in-process (Tune's session calls stubbed): one MLflow run per seed, a report per stage
    end with the seed mean; run again (a configuration re-proposed after a resume), it trains nothing."""
    import torch

    from provlae import fused

    reports, client, exp, ctx = _in_process(monkeypatch, provlae_home, tmp_path, "lockstep", "t0001")
    config = {"trial": spec(objective="recon_error", **TINY).base.to_dict(), "beta": 2.0, "gamma": 0.3,
              "fade_in_steps": 2, "lr": 1e-3}

    threads = torch.get_num_threads()
    try:
        search.search_trial(config, ctx, seeds=[0, 1], objective="recon_error")
    finally:
        torch.set_num_threads(threads)
    runs = {int(r.data.params["seed"]): r for r in client.search_runs([exp], "tags.`provlae.role` = 'trial'")}
    assert sorted(runs) == [0, 1]
    assert all(r.info.status == "FINISHED" and r.data.tags["search"] == "optuna" for r in runs.values())
    assert [r["step"] for r in reports] == [4, 8, 12]
    for report in reports:
        per_seed = [next(m.value for m in client.get_metric_history(runs[s].info.run_id, "recon_error")
                         if m.step == report["step"]) for s in (0, 1)]
        assert [report["recon_error_s0"], report["recon_error_s1"]] == per_seed
        assert report["recon_error"] == pytest.approx(sum(per_seed) / 2)
    assert reports[-1]["mig_sup"] == pytest.approx(sum(r.data.metrics["mig_sup"] for r in runs.values()) / 2)

    first, reports[:] = list(reports), []
    monkeypatch.setattr(fused, "FusedTrainer", None)  # building the group would fail: nothing may train
    search.search_trial(config, ctx, seeds=[0, 1], objective="recon_error")
    assert [(r["step"], r["recon_error"]) for r in reports] == [(r["step"], r["recon_error"]) for r in first]
    assert len(client.search_runs([exp], "tags.`provlae.role` = 'trial'")) == 2


def test_a_configurations_seeds_train_as_one_group_with_their_solo_numbers(provlae_home, tmp_path,
                                                                          monkeypatch):
    """search_trial in-process: the three seeds are the members of one FusedTrainer, advanced together to
    each stage end (the solo Trainer.run loop is never used), and each seed's MLflow run holds exactly
    the numbers of its solo trial, Trainer(cfg).run() on its own: every logged value at every step, the
    final metrics and the per-seed objective Tune got."""
    import torch

    from provlae import fused
    from provlae.train import Trainer

    reports, client, exp, ctx = _in_process(monkeypatch, provlae_home, tmp_path, "group", "t0002")
    sampled = {"beta": 2.0, "gamma": 0.3, "fade_in_steps": 2, "lr": 1e-3}
    config = {"trial": spec(objective="recon_error", **TINY).base.to_dict(), **sampled}
    seeds = [0, 1, 2]

    groups, advances = [], []
    group_init, group_run = fused.FusedTrainer.__init__, fused.FusedTrainer.run

    def init(self, configs, *args, **kwargs):
        group_init(self, configs, *args, **kwargs)
        groups.append(self)

    def run(self, callback=None, until=None, on_checkpoint=None):
        out = group_run(self, callback, until, on_checkpoint)
        advances.append((until, [m.step for m in self.members]))
        return out

    def solo_loop(self, *args, **kwargs):
        raise AssertionError("a seed trained alone")

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # what search_trial sets, for the solo runs too
        with monkeypatch.context() as m:
            m.setattr(fused.FusedTrainer, "__init__", init)
            m.setattr(fused.FusedTrainer, "run", run)
            m.setattr(Trainer, "run", solo_loop)
            search.search_trial(config, ctx, seeds=seeds, objective="recon_error")
        solo = {}
        for seed in seeds:  # the configuration's trial on one seed, built here, not by the search
            cfg = TrialConfig.from_dict({**config["trial"], **sampled, "seed": seed})
            events = []
            final = Trainer(cfg).run(events.append)
            solo[seed] = (cfg, events, final)
    finally:
        torch.set_num_threads(threads)

    (group,) = groups
    assert group.configs == [solo[s][0] for s in seeds] and not group.failed
    assert advances == [(4, [4, 4, 4]), (8, [8, 8, 8]), (12, [12, 12, 12])]
    runs = {int(r.data.params["seed"]): r for r in client.search_runs([exp], "tags.`provlae.role` = 'trial'")}
    assert sorted(runs) == seeds and all(r.info.status == "FINISHED" for r in runs.values())
    for seed, (cfg, events, final) in solo.items():
        run = runs[seed]
        assert run.info.run_name == cfg.run_name
        assert client.list_artifacts(run.info.run_id, "figures")
        logged = {k: {m.step: m.value for m in client.get_metric_history(run.info.run_id, k)}
                  for k in run.data.metrics}
        want = {}
        for event in events:
            for k, v in event.metrics.items():
                if k != "img_s":  # a rate, not a number of the model
                    want.setdefault(k, {}).setdefault(event.step, v)  # MLflow keeps a step's first value
        assert {k: logged[k] for k in want} == want
        assert {k: run.data.metrics[k] for k in final} == final
        assert [r[f"recon_error_s{seed}"] for r in reports] == [
            e.metrics["recon_error"] for e in events if e.kind == "stage_end"]
    assert len({solo[s][2]["loss"] for s in seeds}) == len(seeds)  # three different networks


@pytest.mark.parametrize("argv, message", [
    (["--family", "nope", "--dataset", "dsprites", "--trials", "4"], "unknown family 'nope'"),
    (["--family", "pro_vlae", "--dataset", "dsprites", "--trials", "0"], "--trials must be >= 1"),
    (["--family", "pro_vlae", "--dataset", "dsprites", "--trials", "4", "--objective", "loss_kl"],
     "unknown objective 'loss_kl'"),
    (["--family", "vlae", "--dataset", "celeba", "--trials", "4"], "needs ground-truth factors"),
    (["--family", "vlae", "--dataset", "dsprites", "--trials", "4", "--seeds", "0,-1"], "non-negative"),
    (["--family", "vlae", "--dataset", "dsprites", "--trials", "4", "--set", "beta=2", "--set", "lr=1e-3"],
     "nothing left to search"),
])
def test_bad_input_is_one_error_line_before_ray_or_mlflow(argv, message, tmp_path, capsys):
    import ray

    store = tmp_path / "mlflow.db"
    argv = [*argv, "--preset", "smoke", "--tracking-uri", f"sqlite:///{store}", "--storage", str(tmp_path)]
    assert run_main(main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not store.exists() and not ray.is_initialized()
    assert list(tmp_path.iterdir()) == []


def test_dry_run_prints_the_search(capsys):
    assert main(["--family", "pro_vlae", "--dataset", "dsprites", "--trials", "4", "--preset", "smoke",
                 "--seeds", "0,1,2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "mean over seeds 0,1,2" in out and "beta           loguniform(0.5, 32)" in out
    assert "ASHA at stage ends, steps 10, 20" in out
    assert "\nplan: 12 trials in 4 Tune trials, " in out  # each configuration's 3 seeds as one fused group


# ------------------------------------------------------------------------------ searches on Ray


def search_cmd(store: Path, name: str, *extra: str) -> list[str]:
    tiny = [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
    return [sys.executable, "sweeps/optuna_search.py", "--dataset", "dsprites", "--preset", "smoke",
            "--objective", "recon_error", "--name", name, "--experiment", name,
            "--tracking-uri", f"sqlite:///{store / 'mlflow.db'}", "--storage", str(store / "ray"), *tiny, *extra]


def runs_of(store: Path, experiment: str) -> tuple:
    """(parent run, trial runs) of a search's experiment."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None, []
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("provlae.role") == "sweep"]
    return (parents[0] if parents else None), [r for r in runs if r.data.tags.get("provlae.role") == "trial"]


def best_line(stdout: str) -> dict:
    (line,) = [ln for ln in stdout.splitlines() if ln.startswith("best: ")]
    return json.loads(line[len("best: "):])


def run_until_killed(cmd: list[str], env: dict, store: Path, experiment: str, ready, what: str) -> None:
    """Start the search ``cmd`` and SIGKILL its driver once ``ready()`` (its output in first.log)."""
    runs_of(store, experiment)  # create the store's tables now: polling must not race the driver doing it
    with open(store / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            servers.wait_for(ready, 200, what, interval=0.5, proc=proc)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_smoke_search_tracks_each_trial_and_the_best(local_ray, provlae_home, tmp_path, capsys):
    env = {**os.environ, "PROVLAE_HOME": str(provlae_home)}
    cmd = search_cmd(tmp_path, "smoke", "--family", "pro_vlae", "--trials", "4", "--max-concurrent", "2",
                     "--address", local_ray)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    eta = [line for line in done.stdout.splitlines() if line.startswith("ETA: ")]  # under each status table
    assert eta and eta[-1].startswith("ETA: 4 of 4 trials finished, 0 running, 0 pending; "), eta[-1:]
    assert "(100%); ended after " in eta[-1]

    parent, trials = runs_of(tmp_path, "smoke")
    assert len(trials) == 4
    assert len({r.data.params["beta"] for r in trials}) == 4
    fields = set(TrialConfig.__dataclass_fields__)
    for run in trials:
        tags = run.data.tags
        assert tags["search"] == "optuna" and tags["mlflow.parentRunId"] == parent.info.run_id
        assert (tags["family"], tags["dataset"], tags["sweep"]) == ("pro_vlae", "dsprites", "smoke")
        assert tags["ray_trial_id"] and set(run.data.params) == fields
        assert run.info.status == "FINISHED" or (run.info.status == "KILLED" and "early_stopped" in tags)
    finished = [r for r in trials if r.info.status == "FINISHED"]
    top = min(finished, key=lambda r: r.data.metrics["recon_error"])

    best = best_line(done.stdout)
    assert best["run_ids"] == [top.info.run_id]
    assert best["recon_error"] == top.data.metrics["recon_error"]
    assert best["beta"] == float(top.data.params["beta"]) and best["lr"] == float(top.data.params["lr"])
    assert {k: parent.data.params[f"best.{k}"] for k in ("beta", "gamma", "fade_in_steps", "lr")} == {
        k: top.data.params[k] for k in ("beta", "gamma", "fade_in_steps", "lr")}
    assert parent.data.metrics["best_recon_error"] == best["recon_error"]
    assert parent.data.tags["search"] == "optuna" and parent.info.status == "FINISHED"
    assert parent.data.params["space.beta"] == "loguniform(0.5, 32)"

    import optuna

    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{tmp_path / 'ray' / 'smoke' / 'optuna.db'}")
    assert len(study.trials) == 4 and study.best_value == best["recon_error"]
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == len(finished)

    from analysis.__main__ import main as analysis

    capsys.readouterr()
    assert analysis(["trials", "--experiment", "smoke", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                     "--objective", "recon_error", "--search", "optuna", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["run_id"] == top.info.run_id and len(rows) == len(finished)


@pytest.mark.slow
def test_killed_search_resumes_the_study(local_ray, provlae_home, tmp_path):
    """SIGKILL the driver once two trials finished; the same command finishes the study: 3 runs in all,
    the first ones untouched."""
    env = {**os.environ, "PROVLAE_HOME": str(provlae_home)}
    cmd = search_cmd(tmp_path, "resume", "--family", "beta_vae", "--trials", "3", "--max-concurrent", "1",
                     "--address", local_ray)

    def finished_runs():
        return [r for r in runs_of(tmp_path, "resume")[1] if r.info.status == "FINISHED"]

    run_until_killed(cmd, env, tmp_path, "resume", lambda: len(finished_runs()) >= 2, "two finished trial runs")
    before = {r.info.run_id: r.info.end_time for r in finished_runs()}
    assert len(before) == 2  # the third was not finished

    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "resuming search 'resume'" in rerun.stdout
    parent, trials = runs_of(tmp_path, "resume")
    assert len(trials) == 3 and all(r.info.status == "FINISHED" for r in trials)
    assert len({r.info.run_name for r in trials}) == 3  # three configurations, none trained twice
    ended = {r.info.run_id: r.info.end_time for r in trials}
    assert all(ended[run_id] == end for run_id, end in before.items())  # the first runs untouched
    assert "3 of 3 trials finished" in rerun.stdout and parent.info.status == "FINISHED"


@pytest.mark.slow
def test_a_search_driver_killed_outright_leaves_runs_that_the_rerun_sets_right(local_ray, provlae_home, tmp_path,
                                                                              paced):
    """SIGKILL while a configuration trains (no chance to record anything): the rerun marks what the dead
    driver left RUNNING as KILLED, as the grid's does, and finishes the search in the same runs. The
    configuration is of the paced family (tests/paced.py): long enough to be killed, cheap to train."""
    env = {**os.environ, "PROVLAE_HOME": str(provlae_home)}
    cmd = search_cmd(tmp_path, "orphans", "--plugin", paced.MODULE, "--family", paced.FAMILY, "--trials", "1",
                     "--set", "steps_per_stage=20", "--address", local_ray)

    def running_trial_runs():
        return [r for r in runs_of(tmp_path, "orphans")[1] if r.info.status == "RUNNING"]

    run_until_killed(cmd, env, tmp_path, "orphans", running_trial_runs, "the trial's run")
    parent, (trial,) = runs_of(tmp_path, "orphans")
    assert (parent.info.status, trial.info.status) == ("RUNNING", "RUNNING")

    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "2 run(s) of search 'orphans' left RUNNING by a driver that died: marked KILLED" in rerun.stdout
    parent, trials = runs_of(tmp_path, "orphans")
    assert [r.info.run_id for r in trials] == [trial.info.run_id]  # the same run, resumed
    assert trials[0].info.status == "FINISHED" and parent.info.status == "FINISHED"
    from mlflow import MlflowClient

    steps = [m.step for m in MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(
        trial.info.run_id, "loss")]
    total = spec(paced.FAMILY, objective="recon_error", **{**TINY, "steps_per_stage": 20}).base.total_steps
    assert sorted(steps) == list(range(TINY["log_every"], total + 1, TINY["log_every"]))  # every step once


@pytest.mark.slow
def test_a_search_end_that_mlflow_cannot_record_is_recorded_by_the_rerun(local_ray, provlae_home, tmp_path,
                                                                         monkeypatch, capsys):
    """The tracking server goes away as the Tuner returns: the end waits --tracking-patience for it, then
    says that the rerun records it (exit 1, no traceback), as the grid's does; the rerun, with the server
    back, records the best configuration and ends the parent run."""
    import contextlib

    from ray import tune

    monkeypatch.setenv("PROVLAE_HOME", str(provlae_home))
    folder, port = tmp_path / "mlflow", servers.free_port()
    uri = f"http://127.0.0.1:{port}"
    argv = [*search_cmd(tmp_path, "away", "--family", "beta_vae", "--trials", "1", "--address", local_ray)[2:],
            "--tracking-uri", uri, "--tracking-patience", "3"]
    server = contextlib.ExitStack()
    fit = tune.Tuner.fit

    def fit_then_the_server_goes(self):
        results = fit(self)
        server.close()
        return results

    server.enter_context(servers.mlflow_server(folder, port=port))
    try:
        with monkeypatch.context() as m:
            m.setattr(tune.Tuner, "fit", fit_then_the_server_goes)
            assert run_main(main, argv) == 1
    finally:
        server.close()
    out = capsys.readouterr().out
    assert f"The search's end could not be recorded in MLflow at {uri} (" in out
    assert out.rstrip().endswith("rerun the same command to record it.")

    from mlflow import MlflowClient

    with servers.mlflow_server(folder, port=port):
        assert run_main(main, argv) == 0
        out = capsys.readouterr().out
        assert "1 of 1 trials finished" in out
        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("away").experiment_id])
        (parent,) = [r for r in runs if r.data.tags["provlae.role"] == "sweep"]
        (trial,) = [r for r in runs if r.data.tags["provlae.role"] == "trial"]
        assert parent.info.status == "FINISHED" and trial.info.status == "FINISHED"
        assert parent.data.metrics["best_recon_error"] == trial.data.metrics["recon_error"]


def test_a_diverging_seed_fails_the_configuration_and_its_retry_at_once(provlae_home, tmp_path, monkeypatch):
    """beta = 1e39 is inf in the float32 loss: the first member of the group to diverge fails the
    configuration, with every seed's run FAILED, and a retry of it fails at once, training nothing."""
    import torch

    from provlae import fused
    from provlae.errors import TrainingDiverged

    reports, client, exp, ctx = _in_process(monkeypatch, provlae_home, tmp_path, "diverge", "t0003")
    config = {"trial": spec(objective="recon_error", **TINY).base.to_dict(), "beta": 1e39, "gamma": 0.3,
              "fade_in_steps": 2, "lr": 1e-3}
    threads = torch.get_num_threads()
    try:
        with pytest.raises(TrainingDiverged, match="loss became"):
            search.search_trial(config, ctx, seeds=[0, 1], objective="recon_error")
        monkeypatch.setattr(fused, "FusedTrainer", None)  # the retry must not build (or train) a group
        with pytest.raises(TrainingDiverged, match="loss became"):
            search.search_trial(config, ctx, seeds=[0, 1], objective="recon_error")
    finally:
        torch.set_num_threads(threads)
    assert reports == []  # no stage end was reached
    runs = client.search_runs([exp], "tags.`provlae.role` = 'trial'")
    assert len(runs) == 2
    assert all(r.info.status == "FAILED" and r.data.tags["error"].startswith("TrainingDiverged") for r in runs)

def test_a_configuration_resumes_from_the_checkpoint_before_a_damaged_one(provlae_home, tmp_path, monkeypatch,
                                                                         caplog):
    """search_trial in-process: its worker is lost after the second stage end; the newest checkpoint is
    truncated (a full disk), so the retry resumes from the one Tune kept before it (the grid's fallback,
    sweeps/lifecycle.restore), and each seed's run holds its solo trial's numbers, every step once."""
    import shutil

    import torch
    from ray import tune

    from provlae.train import Trainer
    from sweeps.tracking import RESUMED_TAG

    reports, client, exp, ctx = _in_process(monkeypatch, provlae_home, tmp_path, "fallback", "t0004")
    sampled = {"beta": 2.0, "gamma": 0.3, "fade_in_steps": 2, "lr": 1e-3}
    config = {"trial": spec(objective="recon_error", **TINY).base.to_dict(), **sampled}
    trial = tmp_path / "trial"  # Tune's checkpoint_NNNNNN folders of the trial

    class WorkerLost(BaseException):
        """The worker's node went away: nothing is recorded, the runs stay RUNNING."""

    def report_and_keep(metrics, checkpoint=None):
        shutil.copytree(checkpoint.path, trial / f"checkpoint_{len(reports):06d}")
        reports.append(metrics)
        if len(reports) == 2:
            raise WorkerLost

    threads = torch.get_num_threads()
    try:
        with monkeypatch.context() as m:
            m.setattr(tune, "report", report_and_keep)
            with pytest.raises(WorkerLost):
                search.search_trial(config, ctx, seeds=[0, 1], objective="recon_error")
        newest = trial / "checkpoint_000001"
        members = sorted(newest.glob("*.pt"))
        assert len(members) == 2
        for member in members:
            member.write_bytes(member.read_bytes()[: member.stat().st_size // 2])
        monkeypatch.setattr(tune, "get_checkpoint", lambda: tune.Checkpoint(str(newest)))
        reports.clear()
        search.search_trial(config, ctx, seeds=[0, 1], objective="recon_error")
        torch.set_num_threads(1)  # what search_trial sets, for the solo runs too
        solo = {}
        for seed in (0, 1):
            events = []
            Trainer(TrialConfig.from_dict({**config["trial"], **sampled, "seed": seed})).run(events.append)
            solo[seed] = events
    finally:
        torch.set_num_threads(threads)

    assert "the newer checkpoint is damaged" in caplog.text
    assert [r["step"] for r in reports] == [8, 12]  # the second stage again, from step 4, then the third
    runs = {int(r.data.params["seed"]): r for r in client.search_runs([exp], "tags.`provlae.role` = 'trial'")}
    assert sorted(runs) == [0, 1]
    for seed, run in runs.items():
        assert run.info.status == "FINISHED" and run.data.tags[RESUMED_TAG] == "4"
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
        want = {}
        for event in solo[seed]:
            if "loss" in event.metrics:
                want.setdefault(event.step, event.metrics["loss"])  # MLflow keeps a step's first value
        assert logged == sorted(want.items())  # every step once, the solo trial's values


def _in_process(monkeypatch, provlae_home, tmp_path, name: str, trial_id: str):
    """Tune's session calls stubbed for an in-process search_trial: (reports, client, experiment, context)."""
    from ray import tune

    from sweeps import tracking

    monkeypatch.setenv("PROVLAE_HOME", str(provlae_home))
    monkeypatch.setattr(tune, "get_checkpoint", lambda: None)
    monkeypatch.setattr(tune, "get_context", lambda: SimpleNamespace(get_trial_id=lambda: trial_id))
    reports = []
    monkeypatch.setattr(tune, "report", lambda metrics, checkpoint=None: reports.append(metrics))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client(uri)
    exp = tracking.open_experiment(client, name)
    parent = tracking.find_or_create_parent(client, exp, name, {})
    return reports, client, exp, tracking.TrackingContext(uri, exp, name, parent, tags=(search.SEARCH_TAG,))
