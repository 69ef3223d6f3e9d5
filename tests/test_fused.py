"""Fused trial groups against the solo trainer, the reference: float64 on CPU, the batched kernels (the GPU's
path) forced, every logged term at every step, every stage-end metric and the final parameters within
relative 1e-7; divergence isolation; group resume after SIGKILL; a member's checkpoint resumed solo."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from provlae import data as datasets
from provlae import fused
from provlae.config import TrialConfig
from provlae.errors import ConfigError, TrainingDiverged
from provlae.fused import FusedTrainer, check_group, make_groups, member_key
from provlae.models import FAMILIES
from provlae.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-7
# Small: float64 convolutions on a CPU take the slow reference kernels, and every comparison below holds
# at any batch size and width (8 conv channels, 32 dense units: a quarter of the default's and less).
BASE = dict(dataset="dsprites", subset=400, steps_per_stage=5, batch_size=8, log_every=1, fade_in_steps=3,
            mi_samples=40, factor_train_votes=40, factor_eval_votes=20, eval_subset=120, dtype="float64",
            device="cpu", channels=8, hidden=32)
# three members that differ in everything a member may: seed, beta and the family's own member fields
# (gamma for pro-VLAE, the teacher-student lambdas); ``members`` keeps those of one family
MEMBERS = [dict(seed=0, beta=1.0, gamma=0.5, lambda_y=1.0, lambda_jac=1.0),
           dict(seed=3, beta=4.0, gamma=0.1, lambda_y=0.5, lambda_jac=2.0),
           dict(seed=7, beta=2.0, gamma=0.0, lambda_y=2.0, lambda_jac=0.5)]


@pytest.fixture(autouse=True)
def _home(provlae_home, monkeypatch):
    monkeypatch.setenv("PROVLAE_HOME", str(provlae_home))


def members(family: str) -> list[dict]:
    varying = fused.MEMBER_FIELDS + FAMILIES[family].member_fields
    return [{k: v for k, v in m.items() if k in varying} for m in MEMBERS]


def configs(family: str, **kw) -> list[TrialConfig]:
    return [TrialConfig.from_dict({**BASE, "family": family, **m, **kw}) for m in members(family)]


def recorder(store: list):
    return lambda event: store.append((event.kind, event.step, {k: v for k, v in event.metrics.items()
                                                                if k != "img_s"}))


_SOLO: dict = {}


def solo(cfg: TrialConfig):
    """(events, final parameters) of the solo trainer, computed once per config."""
    key = json.dumps(cfg.to_dict(), sort_keys=True)
    if key not in _SOLO:
        events, trainer = [], Trainer(cfg)
        trainer.run(recorder(events))
        _SOLO[key] = (events, {n: p.detach().clone() for n, p in trainer.model.named_parameters()})
    return _SOLO[key]


def fused_events(fz: FusedTrainer, **kw) -> list[list]:
    events = [[] for _ in fz.members]
    fz.run(lambda i, e: recorder(events[i])(e), **kw)
    return events


def assert_close_events(got: list, want: list) -> None:
    assert [(k, s) for k, s, _ in got] == [(k, s) for k, s, _ in want]
    for (kind, step, a), (_, _, b) in zip(got, want):
        assert a.keys() == b.keys(), (kind, step)
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=RTOL, abs=1e-12), (kind, step, key)


def assert_close_params(model, want: dict) -> None:
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), want[name], rtol=RTOL, atol=1e-12, msg=name)


@pytest.mark.parametrize("family", ["beta_vae", "vlae", "pro_vlae", "teacher_student"])
def test_batched_group_reproduces_each_solo_trial(family):
    cfgs = configs(family)
    fz = FusedTrainer(cfgs, kernels="batched")
    events = fused_events(fz)
    assert not fz.failed
    for i, cfg in enumerate(cfgs):
        want_events, want_params = solo(cfg)
        kinds = [k for k, _, _ in want_events]
        assert kinds.count("stage_end") == cfg.num_stages and kinds.count("step") == cfg.total_steps
        assert_close_events(events[i], want_events)
        assert_close_params(fz.members[i].model, want_params)
    # the members really differ: the group did not train one network three times
    assert events[0][-1][2]["loss"] != events[1][-1][2]["loss"]


def test_sequential_group_is_the_solo_computation():
    cfgs = configs("pro_vlae")[:2]
    fz = FusedTrainer(cfgs, kernels="sequential")
    events = fused_events(fz)
    for i, cfg in enumerate(cfgs):
        assert events[i] == solo(cfg)[0]  # bitwise: the same steps in the same order


def test_a_diverging_member_is_retired_alone():
    cfgs = configs("pro_vlae")
    fz = FusedTrainer(cfgs, kernels="batched")
    with torch.no_grad():  # member 1's log-variance head starts at exp(1000) = inf: its first loss is inf
        fz.members[1].model.heads[-1][-1].bias.fill_(1000.0)
    events = fused_events(fz)
    assert list(fz.failed) == [1] and isinstance(fz.failed[1], TrainingDiverged)
    assert "loss became inf" in str(fz.failed[1]) and cfgs[1].run_name in str(fz.failed[1])
    assert events[1][-1][0] == "failed" and [k for k, _, _ in events[1]] == ["failed"]
    for i in (0, 2):
        assert_close_events(events[i], solo(cfgs[i])[0])
        assert_close_params(fz.members[i].model, solo(cfgs[i])[1])


def test_member_checkpoint_resumes_in_the_solo_trainer(tmp_path):
    cfgs = configs("teacher_student", checkpoint_every=3)
    fz = FusedTrainer(cfgs, kernels="batched")
    fz.run(until=8)  # mid-stage 1: the teacher exists, Adam has state
    folder = fz.save_checkpoint(tmp_path / "group")
    group = json.loads((folder / "group.json").read_text())
    assert group["step"] == 8 and [m["run_name"] for m in group["members"]] == [c.run_name for c in cfgs]
    single = Trainer(cfgs[2])
    single.load_checkpoint(folder / f"{member_key(cfgs[2])}.pt")
    assert single.step == 8
    events = []
    single.run(recorder(events))
    want_events, want_params = solo(cfgs[2])
    assert_close_events(events, [e for e in want_events if e[1] > 8])
    assert_close_params(single.model, want_params)
    # and the group resumed from the same folder ends like the uninterrupted group
    again = FusedTrainer(cfgs, kernels="batched")
    again.load_checkpoint(folder)
    assert fused_events(again)[0] == [e for e in _uninterrupted(cfgs)[0] if e[1] > 8]


_GROUPS: dict = {}


def _uninterrupted(cfgs):
    key = tuple(c.run_name for c in cfgs) + (cfgs[0].family, cfgs[0].checkpoint_every)
    if key not in _GROUPS:
        _GROUPS[key] = fused_events(FusedTrainer(cfgs, kernels="batched"))
    return _GROUPS[key]


GROUP_SCRIPT = """
import json, sys
from pathlib import Path
from provlae.config import TrialConfig
from provlae.fused import FusedTrainer
import torch
torch.set_num_threads(int(sys.argv[4]))  # the test's own count: a reduction's order follows it
cfgs = [TrialConfig.from_dict(c) for c in json.loads(Path(sys.argv[1]).read_text())]
folder = Path(sys.argv[2])
fz = FusedTrainer(cfgs, kernels="batched")
if (folder / "group.json").exists():
    fz.load_checkpoint(folder)
    print("resumed at", fz.step, flush=True)
def on_checkpoint(step):
    fz.save_checkpoint(folder)
    print("checkpoint", step, flush=True)
finals = fz.run(on_checkpoint=on_checkpoint)
Path(sys.argv[3]).write_text(json.dumps(finals))
"""


def test_group_resumes_after_sigkill_with_the_same_numbers(tmp_path):
    # float32: a resume is bitwise in any dtype, and float32 convolutions take the fast kernels
    cfgs = configs("pro_vlae", checkpoint_every=2, steps_per_stage=8, log_every=4, dtype="float32")
    (tmp_path / "cfgs.json").write_text(json.dumps([c.to_dict() for c in cfgs]))
    (tmp_path / "run.py").write_text(GROUP_SCRIPT)
    args = [sys.executable, str(tmp_path / "run.py"), str(tmp_path / "cfgs.json"), str(tmp_path / "ckpt"),
            str(tmp_path / "finals.json"), str(torch.get_num_threads())]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        for line in proc.stdout:  # kill once a mid-stage checkpoint past stage 0 is on disk
            if line.startswith("checkpoint") and int(line.split()[1]) >= 10 or time.monotonic() > deadline:
                break
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    killed_at = json.loads((tmp_path / "ckpt" / "group.json").read_text())["step"]
    assert 10 <= killed_at < cfgs[0].total_steps
    resumed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed at {killed_at}" in resumed.stdout
    finals = json.loads((tmp_path / "finals.json").read_text())
    straight = FusedTrainer(cfgs, kernels="batched").run()
    assert finals == straight  # bitwise on CPU


def test_groups_are_formed_only_from_compatible_trials():
    a, b, c = configs("vlae")
    other = a.with_overrides({"lr": 1e-3, "seed": 9})
    with pytest.raises(ConfigError, match=r"differ in lr"):
        check_group([a, other])
    with pytest.raises(ConfigError, match="same trial twice"):
        check_group([a, a])
    groups = make_groups([a, other, b, c], 2)
    assert [[g.run_name for g in grp] for grp in groups] == [[a.run_name, b.run_name], [c.run_name],
                                                           [other.run_name]]
    with pytest.raises(ConfigError, match="at least one member"):
        make_groups([a], 0)
    with pytest.raises(ConfigError, match="unknown fused kernels"):
        FusedTrainer([a], kernels="fast")


def test_bad_precision_settings_are_refused(monkeypatch, capsys):
    from provlae import __main__ as cli
    from provlae import device

    for field, value, message in (("dtype", "float16", "unknown dtype"), ("compile", "yes", "unknown compile")):
        with pytest.raises(ConfigError, match=message):
            TrialConfig.from_dict({**BASE, field: value})
    monkeypatch.setattr(device, "_cpu_has_bf16", lambda: False)
    with pytest.raises(ConfigError, match="no bfloat16 support"):
        Trainer(TrialConfig.from_dict({**BASE, "dtype": "bfloat16"}))
    code = cli.main(["train", "--set", "dtype=bfloat16", "--set", "device=cpu", "--set", "subset=400",
                     "--out", "/nonexistent/never-made"])
    assert code == 2
    assert capsys.readouterr().err.strip().startswith("error: dtype bfloat16")
    assert not Path("/nonexistent/never-made").exists()


def test_bfloat16_trains_with_the_loss_in_float32():
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no bfloat16 support")
    cfg = TrialConfig.from_dict({**BASE, "family": "vlae", "dtype": "bfloat16", "steps_per_stage": 2})
    trainer = Trainer(cfg)
    terms = trainer.train_step()
    assert next(trainer.model.parameters()).dtype == torch.float32  # autocast: weights stay float32
    assert terms["loss"].dtype == torch.float32 and torch.isfinite(terms["loss"])


def test_checkpoint_from_another_device_type_resumes(tmp_path, monkeypatch):
    cfg = TrialConfig.from_dict({**BASE, "family": "vlae", "dtype": "float32"})
    first = Trainer(cfg)
    first.run(until=3)
    state = first.state_dict()
    state["device_type"] = "cuda"  # as written on a GPU node: its noise generator state is not a CPU one
    torch.save(state, tmp_path / "gpu.pt")
    again = Trainer(cfg)
    again.load_checkpoint(tmp_path / "gpu.pt")
    assert again.resumed_across_devices and again.step == 3
    assert torch.equal(again.perm, first.perm) and again.pos == first.pos  # the batch order carries over
    assert all(torch.isfinite(torch.tensor(v)) for v in again.run().values())
    data = datasets.load(cfg.dataset, subset=cfg.subset, seed=cfg.data_seed)
    same = Trainer(cfg, dataset=data)
    same.load_state_dict(first.state_dict())
    assert not same.resumed_across_devices


def test_compiled_steps_follow_the_eager_ones():
    """compile=torch (solo and fused) across a stage boundary: the fade-in is a tensor, so one graph per
    stage; the losses are the eager ones up to float32 reassociation."""
    kw = dict(BASE, family="pro_vlae", dtype="float32", levels=2, steps_per_stage=3, fade_in_steps=2)
    eager = [TrialConfig.from_dict({**kw, **m}) for m in members("pro_vlae")[:2]]
    compiled = [c.with_overrides({"compile": "torch"}) for c in eager]

    def losses(events):
        return [e[2]["loss"] for e in events if e[0] == "step"]

    want = [[], []]
    for i, cfg in enumerate(eager):
        Trainer(cfg).run(recorder(want[i]), until=5)
    got = []
    Trainer(compiled[0]).run(recorder(got), until=5)
    assert losses(got) == pytest.approx(losses(want[0]), rel=1e-5)
    group = fused_events(FusedTrainer(compiled, kernels="batched"), until=5)
    for i in range(2):
        assert losses(group[i]) == pytest.approx(losses(want[i]), rel=1e-5)
        assert [e[2]["alpha"] for e in group[i] if e[0] == "step"] == [1.0, 1.0, 1.0, 0.0, 0.5]


def test_compiled_steps_stay_compiled_past_the_recompile_limit(monkeypatch):
    """A reused Tune actor trains trial after trial in one process, each stage compiled: more compiled
    stages, solo and fused, than Dynamo's recompile limit (here 2, to keep the test short; 8 by default),
    and every step still runs a compiled graph, each solo (family, stage, shape) compiled once and reused
    by the trainer of another beta."""
    import functools

    from provlae import train

    graphs, calls = [], [0]

    def counting(gm, example_inputs):  # a backend that runs the captured graph as it is, and counts
        graphs.append(gm)

        def run(*args):
            calls[0] += 1
            return gm.forward(*args)

        return run

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counting))
    monkeypatch.setattr(train, "_STAGE_LOSSES", {})  # none compiled by an earlier test
    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    with torch._dynamo.config.patch(**{name: 2}):
        _train_compiled_stages(graphs, calls)


def _train_compiled_stages(graphs: list, calls: list) -> None:
    torch._dynamo.reset()
    kw = dict(BASE, dtype="float32", steps_per_stage=2, fade_in_steps=1, compile="torch", eval_subset=24,
              mi_samples=20, factor_train_votes=10, factor_eval_votes=5)
    steps, stages = 0, set()
    for family, beta in [("pro_vlae", 1.0), ("vlae", 1.0), ("pro_vlae", 4.0)]:
        cfg = TrialConfig.from_dict({**kw, "family": family, "beta": beta})
        Trainer(cfg).run()
        steps += cfg.total_steps
        stages |= {(family, s) for s in range(cfg.num_stages)}
    assert len(stages) == 4
    assert (len(graphs), calls[0]) == (len(stages), steps)

    del graphs[:]
    calls[0] = 0
    cfgs = [TrialConfig.from_dict({**kw, "family": "pro_vlae", **m}) for m in members("pro_vlae")[:2]]
    FusedTrainer(cfgs, kernels="batched").run()  # a stack per stage, each compiled
    assert (len(graphs), calls[0]) == (cfgs[0].num_stages, cfgs[0].total_steps)


@pytest.mark.parametrize("compile_mode", ["none", "torch"])
def test_trainers_and_stacks_are_freed_without_the_cycle_collector(compile_mode):
    """A finished group, its stack and its members, and a solo trainer with a compiled loss, are freed when
    the last reference goes, not left to the cycle collector: their device memory goes with them (a reused
    Tune actor does not keep the previous trial's)."""
    import gc
    import weakref

    kw = dict(BASE, family="pro_vlae", dtype="float32", steps_per_stage=3, compile=compile_mode)
    cfgs = [TrialConfig.from_dict({**kw, **m}) for m in members("pro_vlae")[:2]]
    # The first optimizer a process makes keeps its caller's frames (torch's one-time set-up holds them):
    # made here, so that the trainers below are not the first.
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    gc.collect()
    gc.disable()
    try:
        group = [FusedTrainer(cfgs, kernels="batched")]  # the only reference, dropped below
        stacks = []

        def keep_stack(i, event):  # mid-run, the stack holds the members' state and its vmapped loss
            stack = group[0]._stack
            if stack is not None and stack._fn is not None:
                stacks.append(weakref.ref(stack))

        group[0].run(keep_stack, until=2)
        assert stacks and group[0]._stack is None  # dropped at the end of the run
        refs = [weakref.ref(group[0]), *stacks, *(weakref.ref(m) for m in group[0].members)]
        group.clear()
        solo = Trainer(cfgs[0])
        solo.run(until=2)
        refs.append(weakref.ref(solo))
        del solo
        # The evaluation's worker threads may still hold a reference for a moment: wait for them, never
        # for the collector (it is off).
        deadline = time.monotonic() + 5
        while any(r() is not None for r in refs) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [r() is None for r in refs] == [True] * len(refs)
    finally:
        gc.enable()
