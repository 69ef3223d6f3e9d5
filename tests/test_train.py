"""The trainer and `python -m provlae train`: determinism, resume equality, divergence, bad input."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from commands import run_command

from provlae.config import TrialConfig
from provlae.errors import ConfigError, DataError, TrainingDiverged
from provlae.models.ladder import check_image_shape
from provlae.train import Event, Trainer, check_data

ROOT = Path(__file__).resolve().parents[1]
# A narrow network (8 conv channels, 32 dense units): what these tests check holds at any width.
TINY = dict(dataset="dsprites", subset=600, steps_per_stage=8, batch_size=16, log_every=4, fade_in_steps=4,
            mi_samples=200, factor_train_votes=60, factor_eval_votes=40, eval_subset=200, channels=8, hidden=32)


def tiny(**kw) -> TrialConfig:
    return TrialConfig.from_dict({**TINY, **kw})


def cli(args, env_home, timeout=240):
    env = {**os.environ, "PROVLAE_HOME": str(env_home)}
    return subprocess.run([sys.executable, "-m", "provlae", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def sets(d: dict) -> list[str]:
    return [a for k, v in d.items() for a in ("--set", f"{k}={v}")]


@pytest.fixture(autouse=True)
def _home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PROVLAE_HOME", str(tmp_path_factory.getbasetemp() / "home"))


@pytest.mark.parametrize("family", ["beta_vae", "vlae", "pro_vlae", "teacher_student"])
def test_each_family_trains_reports_and_is_deterministic(family):
    cfg = tiny(family=family, checkpoint_every=3)
    events: list[Event] = []
    m1 = Trainer(cfg).run(events.append)
    kinds = [e.kind for e in events]
    assert kinds[-1] == "end" and kinds.count("stage_end") == cfg.num_stages
    assert "checkpoint" in kinds
    steps = [e.step for e in events if e.kind == "step"]
    assert steps == sorted(set(steps)) and steps[-1] == cfg.total_steps
    for key in ("recon_error", "mig", "mig_sup", "factor_score", "mi_total", "loss", "active_units"):
        assert math.isfinite(m1[key]), key
    assert any(k.startswith("eval_kl_z") for k in m1) and any(k.startswith("mi_z") for k in m1)
    stage_ends = [e.metrics for e in events if e.kind == "stage_end"]
    assert all(k.startswith("eval_") for m in stage_ends for k in m if "kl_z" in k)  # not the step keys
    m2 = Trainer(cfg).run()
    assert m1 == m2  # same seed, same numbers
    m3 = Trainer(tiny(family=family, seed=1)).run()
    assert m3["loss"] != m1["loss"]


def test_pro_vlae_reports_alpha_and_stages():
    cfg = tiny(family="pro_vlae", log_every=1)
    events = []
    Trainer(cfg).run(events.append)
    steps = [e for e in events if e.kind == "step"]
    stage1 = [e.metrics["alpha"] for e in steps if e.stage == 1]
    assert stage1[0] == pytest.approx(0.0) and stage1[-1] == pytest.approx(1.0)
    assert sorted({e.stage for e in steps}) == [0, 1, 2]
    # every stage end measures I(x; z_l) of every level, grown or not; MIG and the factor score count the
    # latents in use: z3, then z2..z3, then all (z_dim each)
    ends = [e.metrics for e in events if e.kind == "stage_end"]
    assert all({"mi_z1", "mi_z2", "mi_z3", "eval_kl_z1"} <= set(m) for m in ends)
    assert [m["active_units"] <= cfg.z_dim * (s + 1) for s, m in enumerate(ends)] == [True] * 3


@pytest.mark.parametrize("family", ["pro_vlae", "teacher_student"])
def test_resume_mid_stage_is_bitwise_identical(family, tmp_path):
    cfg = tiny(family=family, checkpoint_every=5)
    full = Trainer(cfg).run()

    class Killed(Exception):
        pass

    first = Trainer(cfg)

    def stop_at_12(event):
        if event.kind == "checkpoint" and event.step == 10:  # mid stage 1
            first.save_checkpoint(tmp_path / "c.pt")
        if event.step == 12:
            raise Killed

    with pytest.raises(Killed):
        first.run(stop_at_12)
    resumed = Trainer(cfg)
    resumed.load_checkpoint(tmp_path / "c.pt")
    assert resumed.step == 10 and resumed.stage == 1
    assert resumed.run() == full


def test_a_checkpoint_is_read_to_the_cpu_and_adams_step_counters_stay_there(tmp_path, monkeypatch):
    """Read onto the training device, Adam's ``step`` counters would land on a GPU, and each step would then
    read them back to the host once per parameter tensor; read to the CPU, ``load_state_dict`` places the
    moments with their parameters and keeps the counters on the CPU, as a fresh optimizer has them."""
    import provlae.train as train

    class Stop(Exception):
        pass

    first = Trainer(tiny(checkpoint_every=4))

    def save_at_4(event):
        if event.kind == "checkpoint" and event.step == 4:
            first.save_checkpoint(tmp_path / "c.pt")
            raise Stop

    with pytest.raises(Stop):
        first.run(save_at_4)
    asked = []
    real = train.read_checkpoint
    monkeypatch.setattr(train, "read_checkpoint", lambda path, device: asked.append(device) or real(path, device))
    resumed = Trainer(tiny(checkpoint_every=4))
    resumed.load_checkpoint(tmp_path / "c.pt")
    assert asked == ["cpu"] and resumed.step == 4
    states = list(resumed.opt.state.values())
    assert states and all(s["step"].device.type == "cpu" for s in states)
    params = [p for group in resumed.opt.param_groups for p in group["params"]]
    assert all(resumed.opt.state[p]["exp_avg"].device == p.device for p in params if p in resumed.opt.state)


def test_adam_is_fused_on_cuda_and_the_default_loop_elsewhere():
    """On CUDA the optimizer's step is Adam's fused kernels (not a loop of launches per tensor); on a CPU,
    PyTorch's default, which the CPU's numbers are made with."""
    import torch

    from provlae.device import adam

    w = torch.nn.Parameter(torch.zeros(3))
    assert adam([w], 1e-3, torch.device("cuda")).defaults["fused"] is True
    cpu = adam([w], 1e-3, torch.device("cpu")).defaults
    assert not cpu["fused"] and not cpu["foreach"]
    assert Trainer(tiny(lr=1e-3)).opt.defaults == cpu


def test_checkpoint_of_another_config_is_refused(tmp_path):
    t = Trainer(tiny())
    t.save_checkpoint(tmp_path / "c.pt")
    with pytest.raises(ConfigError, match="differs in: beta"):
        Trainer(tiny(beta=2)).load_checkpoint(tmp_path / "c.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # atomic write leaves no temp file


def test_check_data_refuses_what_a_trial_could_not_train_on(tmp_path):
    check_data(tiny())  # fine: nothing rendered, nothing raised
    with pytest.raises(ConfigError, match="batch_size 700 is larger"):
        check_data(tiny(batch_size=700))
    with pytest.raises(ConfigError, match="subset 800000 is larger"):
        check_data(tiny(subset=800_000))
    npz = tmp_path / "bad.npz"
    np.savez(npz, imgs=np.zeros((4, 64, 64), np.float32))
    with pytest.raises(DataError, match="missing key"):
        check_data(tiny(data_path=str(npz)))
    with pytest.raises(ConfigError, match="divisible by 2"):
        check_image_shape((1, 28, 28), 3)


def test_divergence_raises_a_clear_error():
    with pytest.raises(TrainingDiverged, match="loss became"):
        Trainer(tiny(family="vlae", lr=1e30, steps_per_stage=30)).run()


def test_shapes3d_trains():
    m = Trainer(tiny(dataset="shapes3d", family="vlae", z_dim=3, steps_per_stage=3)).run()
    assert math.isfinite(m["recon_error"]) and m["recon_error"] > 0


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_writes_result_and_figures(tmp_path):
    out = tmp_path / "run"
    r = cli(["train", *sets({**TINY, "family": "pro_vlae"}), "--out", str(out)], tmp_path)
    assert r.returncode == 0, r.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["config"]["family"] == "pro_vlae" and result["config"]["subset"] == 600
    assert {"recon_error", "mig", "mig_sup", "factor_score", "mi_z1", "mi_total", "loss", "kl_z1", "kl_z3"} <= set(
        result["metrics"])
    assert result["metrics"]["kl_z2"] == result["metrics"]["eval_kl_z2"]
    assert "run_s" in result["timing"] and "run_s" not in result["metrics"]
    assert [s["stage"] for s in result["stages"]] == [0, 1, 2]
    names = {str(p.relative_to(out)) for p in (out / "figures").rglob("*.png")}
    assert {"figures/traversal_z1.png", "figures/traversal_z3.png", "figures/prior_z2.png",
            "figures/information_per_stage.png", "figures/information.png", "figures/traversal.png"} <= names
    assert {f"figures/stage{s}/{n}" for s in range(3) for n in ("information.png", "traversal.png")} <= names
    assert set(result["figures"]) == names
    assert all((out / n).stat().st_size > 2000 for n in names)
    assert "stage 2" in r.stderr and "img/s" in r.stderr and "ETA" in r.stderr


def test_cli_resumes_after_sigkill_with_identical_metrics(tmp_path, capsys, monkeypatch):
    import torch

    args = sets({**TINY, "family": "pro_vlae", "steps_per_stage": 20, "checkpoint_every": 7, "log_every": 1})
    # the uninterrupted reference and the resume in this process; the killed run in a process of its own,
    # with this one's thread count (a reduction's order follows it)
    ref = run_command("provlae", "train", *args, "--out", str(tmp_path / "ref"), capsys=capsys,
                      monkeypatch=monkeypatch, env={"PROVLAE_HOME": str(tmp_path)})
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    env = {**os.environ, "PROVLAE_HOME": str(tmp_path), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, "-m", "provlae", "train", *args, "--out", str(out)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not (out / "checkpoint.pt").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "result.json").exists()
    again = run_command("provlae", "train", *args, "--out", str(out), capsys=capsys, monkeypatch=monkeypatch,
                        env={"PROVLAE_HOME": str(tmp_path)})
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stderr
    assert (json.loads((out / "result.json").read_text())["metrics"]
            == json.loads((tmp_path / "ref" / "result.json").read_text())["metrics"])


def _write_corrupt_npz(path: Path) -> Path:
    np.savez(path, imgs=np.zeros((4, 64, 64), np.float32))  # wrong dtype, missing keys
    return path


@pytest.mark.parametrize("bad, message", [
    ({"family": "bogus"}, "unknown family 'bogus'"),
    ({"beta": "-1"}, "beta must be"),
    ({"betta": "2"}, "unknown config key(s): betta"),
    ({"seed": "1.5"}, "seed must be an integer"),
    ({"data_path": "/nonexistent/dsprites.npz"}, "data_path does not exist"),
    ({"data_path": "CORRUPT"}, "missing key"),
])
def test_cli_refuses_bad_input(tmp_path, bad, message, capsys, monkeypatch):
    if bad.get("data_path") == "CORRUPT":
        bad = {"data_path": str(_write_corrupt_npz(tmp_path / "bad.npz"))}
    out = tmp_path / "run"
    r = run_command("provlae", "train", *sets({**TINY, **bad}), "--out", str(out), capsys=capsys,
                    monkeypatch=monkeypatch, env={"PROVLAE_HOME": str(tmp_path)})
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()


def test_trainers_sharing_a_process_do_not_perturb_each_other():
    import torch

    alone = Trainer(tiny(family="teacher_student")).run()
    a = Trainer(tiny(family="teacher_student"))
    b = Trainer(tiny(family="pro_vlae", seed=3))  # built after a: re-seeds torch's global RNG
    assert a.run(until=10) == {}  # paused mid stage 1
    b.run(until=12)
    torch.manual_seed(12345)  # anyone else drawing from the global RNG
    torch.rand(100)
    assert a.run() == alone


class _Payload:
    """Unpickling this calls open(path, "w"): a file appears if the checkpoint's pickle is run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("kind", ["payload", "truncated"])
def test_cli_refuses_a_planted_or_truncated_checkpoint_without_running_it(tmp_path, kind):
    import torch

    out, marker = tmp_path / "run", tmp_path / "payload-ran"
    out.mkdir()
    if kind == "payload":
        torch.save({"version": 2, "model": _Payload(marker)}, out / "checkpoint.pt")
        message = "holds more than tensors and plain values"
    else:
        trainer = Trainer(tiny(family="vlae"))
        trainer.run(until=4)
        trainer.save_checkpoint(out / "checkpoint.pt")
        data = (out / "checkpoint.pt").read_bytes()
        (out / "checkpoint.pt").write_bytes(data[: len(data) // 2])
        message = "is unreadable"
    r = cli(["train", *sets({**TINY, "family": "vlae"}), "--out", str(out)], tmp_path, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint ") and message in lines[0], r.stderr
    assert not marker.exists()  # the pickle's code never ran
    assert not (out / "result.json").exists()


def test_device_memory_counts_what_the_caching_allocator_holds_free(monkeypatch):
    """The driver's free memory leaves out what PyTorch's caching allocator keeps reserved for reuse (a
    finished trial's freed tensors): this process can allocate that too. (No GPU here: the CUDA calls are
    stood in for.)"""
    import torch

    from provlae import device as devices

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (1 * gib, 8 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 3 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 1 * gib)
    cuda = torch.device("cuda", 0)
    assert devices.available_memory(cuda) == (3 * gib, 8 * gib)
    devices.check_device_memory(cuda, int(2.5 * gib), "the images")  # 2.75 GiB with headroom: fits in 3
    with pytest.raises(ConfigError, match=r"the images \(2.80 GiB\) do not fit on cuda:0 \(3.00 GiB free of 8.00"):
        devices.check_device_memory(cuda, int(2.8 * gib), "the images")


def test_a_trial_measures_its_training_rate_and_evaluations():
    trainer = Trainer(tiny())
    trainer.run()
    m = trainer.measured()
    assert (m.device, m.fuse, m.kernels, m.source, m.batch_size) == ("cpu", 1, "solo", "trial", 16)
    assert m.train_img_s == pytest.approx(trainer.step * 16 / trainer.train_seconds)
    assert trainer.evaluations == 3 and m.eval_s == pytest.approx(trainer.eval_seconds / 3) and m.eval_s > 0
    assert m.eval_images == 200 and m.mi_samples == 200
    assert trainer.measured(fuse=4, kernels="batched").train_img_s == pytest.approx(4 * m.train_img_s)
    assert Trainer(tiny()).measured() is None  # nothing trained or evaluated yet
