"""The sweep grid and the full_grid.py command line, up to the point where Ray would start.

No Ray here: these check the grid's arithmetic, the presets, the overrides, the dry run, and that every
bad input is one `error:` line with exit status 2 and no MLflow store written.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import servers
from commands import run_command

from provlae.errors import ConfigError
from provlae.models import FAMILIES
from provlae.plan import count
from sweeps import grid
from sweeps.full_grid import main

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "sweeps" / "full_grid.py"


def script(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "RAY_ADDRESS": ""})


# ------------------------------------------------------------------------------------------- grid


def test_paper_grid_is_the_papers_study():
    trials = grid.build_trials("paper")
    # 2 datasets x (3 families x 8 betas + teacher_student once) x 5 seeds
    assert len(trials) == 2 * (3 * 8 + 1) * 5 == 250
    assert len({t.run_name for t in trials}) == 250
    by_dataset = {d: [t for t in trials if t.dataset == d] for d in ("dsprites", "shapes3d")}
    for t in by_dataset["dsprites"]:
        assert (t.z_dim, t.batch_size, t.steps_per_stage) == (2, 128, 30 * (737_280 // 128))
    for t in by_dataset["shapes3d"]:
        assert (t.z_dim, t.batch_size, t.steps_per_stage) == (3, 100, 15 * (480_000 // 100))
    assert {t.beta for t in trials if t.family != "teacher_student"} == set(grid.PAPER_BETAS)
    assert {t.seed for t in trials} == {0, 1, 2, 3, 4}
    assert {t.family for t in trials} == set(FAMILIES)


def test_teacher_student_is_not_crossed_with_beta():
    trials = grid.build_trials("smoke", betas=[1.0, 4.0, 16.0], seeds=[0, 1])
    counts = Counter(t.family for t in trials)
    assert counts == {"beta_vae": 6, "vlae": 6, "pro_vlae": 6, "teacher_student": 2}
    assert {t.beta for t in trials if t.family == "teacher_student"} == {1.0}
    assert sorted(t.run_name for t in trials if t.family == "teacher_student") == [
        "teacher_student-dsprites-b1-s0", "teacher_student-dsprites-b1-s1"]


def test_seeds_are_an_explicit_axis():
    assert grid.parse_seeds("5") == [0, 1, 2, 3, 4]
    assert grid.parse_seeds("0,3,7") == [0, 3, 7]
    assert grid.parse_seeds("7,") == [7]
    assert grid.parse_seeds("2,2,1") == [2, 1]
    for bad in ("1.5", "a", "-1,2", "0", ""):
        with pytest.raises(ConfigError):
            grid.parse_seeds(bad)
    trials = grid.build_trials("smoke", families=["vlae"], seeds=[3, 9])
    assert [t.seed for t in trials] == [3, 9]


def test_set_overrides_every_trial_but_not_the_axes():
    trials = grid.build_trials("smoke", betas=[1.0, 2.0], overrides=["lr=1e-3", "gamma=0.25"])
    assert all(t.lr == 1e-3 and t.gamma == 0.25 for t in trials)
    with pytest.raises(ConfigError, match="grid axes"):
        grid.build_trials("smoke", overrides=["beta=4"])
    with pytest.raises(ConfigError, match="unknown config key"):
        grid.build_trials("smoke", overrides=["nope=1"])


def test_steps_per_stage_follow_epochs_unless_set():
    sub = grid.build_trials("paper", datasets=["dsprites"], families=["vlae"], betas=[1.0], seeds=[0],
                            overrides={"subset": "12800"})
    assert sub[0].steps_per_stage == 30 * 100
    fixed = grid.build_trials("paper", datasets=["dsprites"], families=["vlae"], betas=[1.0], seeds=[0],
                              overrides={"subset": "12800", "steps_per_stage": "7"})
    assert fixed[0].steps_per_stage == 7


def test_presets_scale():
    assert len(grid.build_trials("smoke")) == 4
    demo = grid.build_trials("demo")
    assert {t.family for t in demo} == {"beta_vae", "vlae", "pro_vlae"} and {t.dataset for t in demo} == {"dsprites"}
    assert len(demo) == 6 and all(t.total_steps <= 1500 and t.eval_subset == 20_000 for t in demo)
    study = grid.build_trials("study")
    assert {t.family for t in study} == set(FAMILIES) and len(study) == 4 * 3
    paper = {(t.dataset, t.family): t for t in grid.build_trials("paper")}
    # the authors' scripts: fade-in for dSprites' pro-VLAE, none for 3DShapes'
    assert paper["dsprites", "pro_vlae"].fade_in_steps > 0 and paper["shapes3d", "pro_vlae"].fade_in_steps == 0
    assert len(grid.build_trials("paper")) == 250


# ------------------------------------------------------------------------------------ the command


def test_dry_run_prints_one_line_per_trial(capsys):
    assert main(["--preset", "smoke", "--betas", "1,4", "--seeds", "0,5", "--set", "lr=2e-3",
                 "--gpus-per-trial", "0.25", "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[14] == "trials: 14"  # (3 x 2 + 1) x 2
    assert all("device=cuda" in line for line in lines[:14])
    assert any(line.startswith("teacher_student-dsprites-b1-s5 ") for line in lines)
    # then the plan: the trials' images and evaluations, on this machine's GPUs (none here: one assumed)
    trials = grid.build_trials("smoke", betas=[1.0, 4.0], seeds=[0, 5], overrides={"lr": "2e-3", "device": "cuda"})
    images = sum(c.total_steps * c.batch_size for c in trials)
    assert lines[15] == (f"plan: 14 trials in 14 Tune trials, {count(images)} training images, "
                         f"{sum(c.num_stages for c in trials)} evaluations")
    assert lines[16] == "  on 1 GPU, 0.25 per Tune trial: 1 at once"


def test_dry_run_of_the_real_script():
    out = script("--dry-run")
    assert out.returncode == 0, out.stderr
    assert "\ntrials: 250\nplan: 250 trials in 250 Tune trials, " in out.stdout


@pytest.mark.parametrize("args, message", [
    (["--families", "vlae,nope"], "unknown family 'nope'"),
    (["--betas", "1,-2"], "beta must be a finite number > 0"),
    (["--betas", "0"], "beta must be a finite number > 0"),
    (["--seeds", "0,1.5"], "seed must be an integer"),
    (["--set", "nope=1"], "unknown config key"),
    (["--set", "lr=abc"], "lr must be a float"),
    (["--name", "a/b"], "--name must be one folder name"),
    (["--name", "a..b"], "--name must be one folder name"),
    (["--name", "/abs"], "--name must be one folder name"),
    (["--experiment", "../outside"], "--experiment must be one folder name"),
    (["--experiment", "/tmp/x"], "--experiment must be one folder name"),
    (["--experiment", "a/b"], "--experiment must be one folder name"),
])
def test_bad_input_is_one_error_line_and_status_2(tmp_path, args, message, capsys, monkeypatch):
    db = tmp_path / "mlflow.db"
    out = run_command("full_grid", "--preset", "smoke", "--tracking-uri", f"sqlite:///{db}", "--storage",
                      str(tmp_path / "ray"), *args, capsys=capsys, monkeypatch=monkeypatch, env={"RAY_ADDRESS": ""})
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]  # one line
    assert out.stderr.startswith("error: ") and message in out.stderr
    assert not db.exists() and not (tmp_path / "ray").exists()  # no MLflow store, no sweep folder


def test_unreachable_tracking_server_fails_fast(tmp_path):
    port = servers.free_port()  # nothing listens there
    start = time.monotonic()
    out = script("--preset", "smoke", "--tracking-uri", f"http://127.0.0.1:{port}",
                 "--storage", str(tmp_path / "ray"))
    assert out.returncode == 2
    assert out.stderr.startswith(f"error: tracking server http://127.0.0.1:{port} is not reachable")
    assert time.monotonic() - start < 30
    assert not (tmp_path / "ray").exists()  # stopped before the sweep folder and Ray


def test_the_patience_for_an_absent_tracking_server_is_spent_once(monkeypatch):
    """A driver's end makes one call per failed trial: once a call has waited the whole patience, the next
    that finds the server away gives up at once; a call that reaches the server starts the patience again."""
    from mlflow.exceptions import MlflowException

    from sweeps import store

    class Away:
        calls, up, tracking_uri = 0, False, "http://127.0.0.1:1"

        def get_run(self, run_id):
            Away.calls += 1
            if not Away.up:
                raise MlflowException("API request to http://127.0.0.1:1/api failed with exception refused")
            return run_id

    monkeypatch.setattr(store, "RETRY_EVERY", 0.05)
    client = store.PatientClient(Away(), patience=0.4)
    waited = []
    for _ in range(3):
        start = time.monotonic()
        with pytest.raises(store.TrackingError, match="unreachable for more than 0.4 s"):
            client.get_run("r")
        waited.append(time.monotonic() - start)
    assert waited[0] >= 0.4 and max(waited[1:]) < 0.2, waited
    assert Away.calls >= 1 + 8 + 2  # the first call tried every RETRY_EVERY, the next two once each
    Away.up = True
    assert client.get_run("r") == "r"
    Away.up = False
    start = time.monotonic()
    with pytest.raises(store.TrackingError):
        client.get_run("r")
    assert time.monotonic() - start >= 0.4  # back, then away again: a new wait


def test_a_sweep_name_resumes_only_its_own_grid(tmp_path):
    from sweeps.launch import check_manifest

    folder, store = str(tmp_path / "ray" / "name"), ("sqlite:////tmp/a.db", "exp")
    check_manifest(folder, grid.build_trials("smoke"), 1, *store)
    check_manifest(folder, grid.build_trials("smoke"), 1, *store)  # the same grid: resumable
    with pytest.raises(ConfigError, match="different grid"):
        check_manifest(folder, grid.build_trials("smoke", betas=[1.0, 2.0]), 1, *store)


def _as_before(cfg) -> dict:
    """The config dict an earlier version wrote: without the fields added since (dtype, tf32, compile)."""
    from provlae.config import LATER_FIELDS

    return {k: v for k, v in cfg.to_dict().items() if k not in LATER_FIELDS}


def test_records_of_an_earlier_version_are_found_again(tmp_path, provlae_home, monkeypatch):
    """A sweep started before dtype/tf32/compile existed resumes: its trial keys, its folder's manifest and
    its checkpoints name the same trials (a non-default dtype does not match them)."""
    import hashlib
    import json

    import torch

    from provlae.train import Trainer
    from sweeps.launch import check_manifest
    from sweeps.tracking import TrackingContext

    monkeypatch.setenv("PROVLAE_HOME", str(provlae_home))
    configs = grid.build_trials("smoke", overrides={"device": "cpu"})
    ctx = TrackingContext("sqlite:////tmp/x.db", "1", "old", "parent")
    for cfg in configs:  # the key an earlier version tagged the run with
        before = hashlib.sha256(f"old\n{json.dumps(_as_before(cfg), sort_keys=True)}".encode()).hexdigest()[:24]
        assert ctx.trial_key(cfg, "") == before
        assert ctx.trial_key(cfg.with_overrides({"dtype": "float64"}), "") != before
    folder = tmp_path / "old-sweep"
    folder.mkdir()
    digests = sorted(hashlib.sha256(json.dumps(_as_before(c), sort_keys=True).encode()).hexdigest()
                     for c in configs)
    (folder / "provlae_sweep.json").write_text(json.dumps({"trials": digests}))  # no "fuse" key then
    store = ("sqlite:////tmp/a.db", "exp")
    check_manifest(str(folder), configs, 1, *store)  # no error: the same grid
    with pytest.raises(ConfigError, match="was started with --fuse 1"):
        check_manifest(str(folder), configs, 2, *store)

    cfg = configs[0].with_overrides({"steps_per_stage": 2})
    trainer = Trainer(cfg)
    trainer.run(until=1)
    state = trainer.state_dict()
    state["config"] = _as_before(cfg)
    torch.save(state, tmp_path / "old.pt")
    again = Trainer(cfg)
    again.load_checkpoint(tmp_path / "old.pt")
    assert again.step == 1
    with pytest.raises(ConfigError, match="differs in: dtype"):
        Trainer(cfg.with_overrides({"dtype": "float64"})).load_checkpoint(tmp_path / "old.pt")


def test_experiments_are_tagged_as_model_training(tmp_path):
    """Experiments are of MLflow's kind for model training (custom_model_development), not GenAI."""
    from mlflow import MlflowClient

    from sweeps import tracking

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    made = tracking.open_experiment(client, "new")
    assert client.get_experiment(made).tags[tracking.KIND_TAG] == "custom_model_development"
    older = client.create_experiment("older")  # as an earlier version made it: no kind
    assert tracking.open_experiment(client, "older") == older
    assert client.get_experiment(older).tags[tracking.KIND_TAG] == "custom_model_development"
    chosen = client.create_experiment("chosen", tags={tracking.KIND_TAG: "genai_development"})
    tracking.open_experiment(client, "chosen")
    assert client.get_experiment(chosen).tags[tracking.KIND_TAG] == "genai_development"  # a user's choice
