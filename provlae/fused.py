"""Fused trial groups (docs/architecture.md §6): trials that differ only in their seed and loss weights
train as one batched network in one process.

Every member is a whole ``Trainer``: its own initial weights, batch order, posterior noise, evaluation,
history and checkpoint in the solo format. The group replaces only the training step, with one of two
kernels that compute the same numbers:

- ``batched``: the members' parameters stacked on a leading K axis and one ``torch.func.vmap`` over the
  family's loss, so every convolution runs as one grouped convolution and every dense layer as one batched
  matmul. The group's loss is the sum of the member losses (each a batch mean), so each member's gradient is
  its solo gradient, and one Adam over the stacked tensors equals K Adams (Adam is elementwise). The path a
  GPU takes: one launch per layer for the whole group instead of one per member.
- ``sequential``: each member's own step, one after another (the solo computation itself). On a CPU the
  batched kernels are slower than the members' layers in turn (benchmarks/fused_throughput.py), so ``auto``
  takes this path there and the batched one on CUDA.

A member whose loss goes NaN/Inf fails alone (``TrainingDiverged``, as its solo trial would) and leaves the
group; the others go on with the same numbers.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from provlae import data as datasets
from provlae.atomic import write_atomic
from provlae.config import TrialConfig
from provlae.device import adam, compiled
from provlae.errors import CheckpointError, ConfigError, TrainingDiverged
from provlae.evaluate import batches_to_float
from provlae.train import Event, Trainer

MEMBER_FIELDS = ("seed", "beta")  # may differ in any group; each family adds its own (Family.member_fields)
KERNELS = ("auto", "batched", "sequential")
GROUP_FILE = "group.json"
GROUP_VERSION = 1


# ------------------------------------------------------------------------------------------ groups


def member_fields(cfg: TrialConfig) -> tuple[str, ...]:
    """The fields members of ``cfg``'s group may differ in: seed, beta and its family's coefficients."""
    from provlae.models.families import family_class

    return MEMBER_FIELDS + tuple(family_class(cfg.family).member_fields)


def shared_fields(cfg: TrialConfig) -> dict:
    """The fields every member of a group must have alike: all but its member fields."""
    varying = member_fields(cfg)
    return {k: v for k, v in cfg.to_dict().items() if k not in varying}


def check_group(configs: list[TrialConfig]) -> None:
    """ConfigError unless ``configs`` can train as one group."""
    if not configs:
        raise ConfigError("a fused group needs at least one trial config")
    keys = [member_key(c) for c in configs]
    twice = sorted({c.run_name for c, k in zip(configs, keys) if keys.count(k) > 1})
    if twice:
        raise ConfigError(f"a fused group holds the same trial twice: {', '.join(twice)}")
    first = shared_fields(configs[0])
    for cfg in configs[1:]:
        other = shared_fields(cfg)
        differ = sorted(k for k in first if first[k] != other[k])
        if differ:
            raise ConfigError(f"{cfg.run_name} cannot share a fused group with {configs[0].run_name}: they "
                              f"differ in {', '.join(differ)} (members may differ only in "
                              f"{', '.join(member_fields(configs[0]))})")


def member_key(cfg: TrialConfig) -> str:
    """A member's name in a group checkpoint: its run name and a digest of its whole config (run names
    alone do not tell apart members that differ only in gamma or the lambdas)."""
    digest = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
    return f"{cfg.run_name}-{digest}"


def make_groups(configs: list[TrialConfig], size: int) -> list[list[TrialConfig]]:
    """The configs in groups of at most ``size`` members that can share a group, in the order given
    (the groups of a config set are the same every time it is grouped)."""
    if size < 1:
        raise ConfigError(f"a fused group needs at least one member, got {size}")
    buckets: dict[str, list[TrialConfig]] = {}
    for cfg in configs:
        buckets.setdefault(json.dumps(shared_fields(cfg), sort_keys=True), []).append(cfg)
    return [bucket[i:i + size] for bucket in buckets.values() for i in range(0, len(bucket), size)]


def resolve_kernels(kernels: str, device: torch.device) -> str:
    if kernels not in KERNELS:
        raise ConfigError(f"unknown fused kernels {kernels!r} (choose from {', '.join(KERNELS)})")
    if kernels == "auto":
        return "batched" if device.type == "cuda" else "sequential"
    return kernels


# ----------------------------------------------------------------------------------- the trainer


class FusedTrainer:
    """K trials trained as one group. ``members[i]`` is trial i's ``Trainer``; between steps it holds the
    member's whole state whenever the group is not inside ``run`` (and at every checkpoint or stage end)."""

    def __init__(self, configs: list[TrialConfig], dataset=None, kernels: str = "auto"):
        check_group(configs)
        first = configs[0]
        data = dataset if dataset is not None else datasets.load(
            first.dataset, path=first.data_path, subset=first.subset, seed=first.data_seed)
        self.configs = list(configs)
        self.members = [Trainer(cfg, dataset=data) for cfg in configs]  # one copy of the data for all
        self.kernels = resolve_kernels(kernels, self.members[0].device)
        self.failed: dict[int, BaseException] = {}  # member -> the error that retired it
        self._stack: _Stack | None = None

    @property
    def live(self) -> list[int]:
        return [i for i in range(len(self.members)) if i not in self.failed]

    @property
    def step(self) -> int:
        return max(m.step for m in self.members)

    # ------------------------------------------------------------------ the loop
    def run(self, callback: Callable[[int, Event], None] | None = None, until: int | None = None,
            on_checkpoint: Callable[[int], None] | None = None) -> list[dict[str, float] | None]:
        """Train every live member to the end (or to global step ``until``) and return each member's final
        metrics ({} while paused, None for a failed member).

        ``callback(i, event)`` gets member i's events, as a solo trainer's callback would, plus
        ``Event("failed", ...)`` when the member is retired (its error in ``failed[i]``). ``on_checkpoint``
        is called with the step after the events of every checkpoint or stage-end step, with every member's
        state in place, so ``save_checkpoint`` may be called."""
        cb = callback or (lambda i, event: None)
        self._check_aligned()
        end = self.members[0].end_step(until)
        for i in self.live:
            self.members[i].model.train()
            self.members[i].start_clock()
        self._stack = None  # the members hold the state: stack it afresh
        try:
            while self.live and self.members[self.live[0]].step < end:
                self._one_step(cb, end, on_checkpoint)
        finally:
            self._write_back()
            self._stack = None  # outside run, the members hold the state (and may be changed there)
        return [None if i in self.failed else self.members[i].finish(lambda e, i=i: cb(i, e))
                for i in range(len(self.members))]

    def _one_step(self, cb, end: int, on_checkpoint) -> None:
        live = self.live
        for i in live:
            self.members[i].enter_stage()
        if self.kernels == "batched":
            terms = self._batched_step(live)
        else:
            terms = {i: self.members[i].train_step() for i in live}
        lead = self.members[live[0]]
        stateful = lead.needs_state(end)
        if stateful:
            self._write_back()
        for i in live:
            try:
                self.members[i].after_step(terms[i], lambda e, i=i: cb(i, e), end)
            except TrainingDiverged as e:
                self._retire(i, e, cb)
        if self.live and on_checkpoint is not None and lead.at_checkpoint:
            on_checkpoint(lead.step)

    def _retire(self, i: int, error: BaseException, cb) -> None:
        """Member i leaves the group; the others' state is untouched (the stack is rebuilt without it)."""
        self._write_back()
        self._stack = None
        self.failed[i] = error
        m = self.members[i]
        cb(i, Event("failed", m.step, m.stage, {}))

    def _batched_step(self, live: list[int]) -> dict[int, dict]:
        """One step of every live member at once. What scales with K is kept to each member's own batch
        order and noise stream: the batches are one gather over the stacked rows, the finite check one
        flag for the group (``Trainer.watch_finite``)."""
        members = [self.members[i] for i in live]
        lead = members[0]
        if self._stack is None or self._stack.positions != live or self._stack.stage != lead.stage:
            self._write_back()
            self._stack = _Stack(members, live)
        t = lead.steps_into_stage
        rows = torch.stack([m.next_indices() for m in members])  # each member's own batch order
        x = batches_to_float(lead.images, rows.reshape(-1), lead.data.pixel_scale, lead.device, lead.dtype)
        x = x.reshape(len(members), -1, *x.shape[1:])  # one gather, one cast for the group
        noises = [m.family.draw_noise(m.model, m.stage, x.shape[1], m.noise_gen) for m in members]
        coefs = [m.family.coefficients(m.stage) for m in members]
        with lead.autocast():
            loss, terms = self._stack.loss(x, noises, coefs, lead.family.alpha(lead.stage, t))
        self._stack.backward_and_step(loss)
        self._stack.finite &= torch.isfinite(loss.detach())
        out = {}
        for k, (i, m) in enumerate(zip(live, members)):
            out[i] = m.stepped(loss[k], {name: v[k] for name, v in terms.items()}, t, finite_noted=True)
        return out

    def _write_back(self) -> None:
        """Copy the stacked state (if the group trains batched) into the member trainers."""
        if self._stack is not None:
            self._stack.write_back()

    def _check_aligned(self) -> None:
        steps = {self.members[i].step for i in self.live}
        if len(steps) > 1:
            names = ", ".join(f"{self.members[i].cfg.run_name} at {self.members[i].step}" for i in self.live)
            raise ConfigError(f"the members of a fused group must be at the same step: {names}")

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, folder: str | Path) -> Path:
        """One solo-format checkpoint per live member (``<member_key>.pt``) and ``group.json``, which names
        them and the failed members with their errors. Any member file resumes alone in a ``Trainer``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._write_back()
        members = []
        for i, m in enumerate(self.members):
            entry = {"key": member_key(m.cfg), "run_name": m.cfg.run_name, "config": m.cfg.to_dict()}
            if i in self.failed:
                entry["error"] = f"{type(self.failed[i]).__name__}: {self.failed[i]}"
            else:
                entry["file"] = f"{entry['key']}.pt"
                m.save_checkpoint(folder / entry["file"])
            members.append(entry)
        group = {"version": GROUP_VERSION, "step": self.step, "kernels": self.kernels, "members": members}
        write_atomic(folder / GROUP_FILE, json.dumps(group, indent=1, sort_keys=True))
        return folder

    def load_checkpoint(self, folder: str | Path) -> None:
        """Resume from ``save_checkpoint``'s folder: each member from its own file, failed members stay
        failed. Members the folder does not name start from scratch only if the others do too."""
        folder = Path(folder)
        try:
            group = json.loads((folder / GROUP_FILE).read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"fused checkpoint {folder}: cannot read {GROUP_FILE} ({e})") from None
        if group.get("version") != GROUP_VERSION:
            raise ConfigError(f"fused checkpoint {folder}: version {group.get('version')}, "
                              f"expected {GROUP_VERSION}")
        saved = {e["key"]: e for e in group["members"]}
        for i, m in enumerate(self.members):
            entry = saved.get(member_key(m.cfg))
            if entry is None:
                continue
            if "error" in entry:
                self.failed[i] = TrainingDiverged(entry["error"].split(": ", 1)[-1])
            else:
                m.load_checkpoint(folder / entry["file"])
        self._stack = None
        self._check_aligned()


# ------------------------------------------------------------------------------- the stacked state


class _Modules(nn.Module):
    """The template member's model and frozen networks under one root, so ``functional_call`` can swap in
    any member's parameters; forward is the family's loss."""

    def __init__(self, member: Trainer):
        super().__init__()
        self.family = member.family
        self.model = member.model
        self.frozen = nn.ModuleDict(member.family.frozen_modules())

    def forward(self, x, stage: int, alpha: torch.Tensor, noise: dict, coef: dict):
        out = self.family.loss(self.model, x, stage, 0, noise=noise, coef=coef, alpha=alpha)
        return out.loss, out.terms


class _Stack:
    """The members' parameters and Adam state on a leading K axis (K = live members), and one vmap of the
    loss over them. ``write_back`` copies them into the members' own model and optimizer."""

    def __init__(self, members: list[Trainer], positions: list[int]):
        self.members, self.positions = members, list(positions)
        lead = members[0]
        self.stage = lead.stage
        self.modules = _Modules(lead)
        own = [dict(m.model.named_parameters()) for m in members]
        self.names = list(own[0])
        self.params = {n: torch.stack([p[n].detach() for p in own]).requires_grad_() for n in self.names}
        frozen = [{f"frozen.{k}.{n}": p.detach() for k, net in m.family.frozen_modules().items()
                   for n, p in net.named_parameters()} for m in members]
        self.frozen = {n: torch.stack([f[n] for f in frozen]) for n in frozen[0]}
        self.opt = adam(list(self.params.values()), lead.cfg.lr, lead.device)
        self._load_optimizer_state()
        p = next(iter(self.params.values()))
        self.alpha = torch.zeros((), dtype=p.dtype, device=p.device)  # the fade-in, updated in place
        self.compile = lead.cfg.compile != "none"
        self._fn = None  # the vmapped (and maybe compiled) loss: built at the first step, the same after
        # whether each member's losses were all finite, updated for all at once; each member reads its own
        self.finite = torch.stack([m.finite_so_far for m in members])
        for k, m in enumerate(members):
            m.watch_finite(self.finite[k])

    def _load_optimizer_state(self) -> None:
        states = [m.opt.state_dict() for m in self.members]
        if not states[0]["state"]:
            return  # no step taken yet
        stacked = {}
        for j in range(len(self.names)):
            if j not in states[0]["state"]:  # never had a gradient (alike in every member: same steps)
                continue
            per = [s["state"][j] for s in states]
            stacked[j] = {"step": per[0]["step"].clone(),
                          **{k: torch.stack([p[k] for p in per]) for k in per[0] if k != "step"}}
        self.opt.load_state_dict({"state": stacked, "param_groups": self.opt.state_dict()["param_groups"]})

    def loss(self, x: torch.Tensor, noises: list[dict], coefs: list[dict], alpha: float):
        """(K,) member losses and their named terms, each (K,). A stack lives for one stage: the noise has
        the same structure at every step and the coefficients the same values, so both the function and
        the stacked coefficients are made at the first step."""
        noise_tensors, rebuild_noise = _stacked(noises)
        if self._fn is None:
            p = next(iter(self.params.values()))  # the coefficients are the stage's: stacked once
            self._coef, rebuild_coef = _stacked(coefs, dtype=p.dtype, device=p.device)
            stage, modules = self.stage, self.modules  # not the stack itself: no cycle stack -> fn -> stack

            def one(params, frozen, x, noise_tensors, coef_tensors, alpha):
                return torch.func.functional_call(
                    modules, {**{f"model.{n}": v for n, v in params.items()}, **frozen},
                    (x, stage, alpha, rebuild_noise(noise_tensors), rebuild_coef(coef_tensors)))

            vmapped = torch.func.vmap(one, in_dims=(0, 0, 0, 0, 0, None))
            if self.compile:  # through a function of the stack's own (vmap's wrapper is one code for all)
                def stacked_loss(*args):
                    return vmapped(*args)

                self._fn = compiled(stacked_loss)
            else:
                self._fn = vmapped
        self.alpha.fill_(alpha)
        return self._fn(self.params, self.frozen, x, noise_tensors, self._coef, self.alpha)

    def backward_and_step(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.sum().backward()  # members are independent: each stacked slice gets its member's gradient
        self.opt.step()

    @torch.no_grad()
    def write_back(self) -> None:
        state = self.opt.state_dict()["state"]
        for k, m in enumerate(self.members):
            for n, p in m.model.named_parameters():
                p.copy_(self.params[n][k])
            if state:
                own = {j: {"step": s["step"].clone(), **{key: v[k].clone() for key, v in s.items() if key != "step"}}
                       for j, s in state.items()}
                m.opt.load_state_dict({"state": own, "param_groups": m.opt.state_dict()["param_groups"]})


def _stacked(trees: list, dtype=None, device=None):
    """Stack the leaves of per-member pytrees (tensors or floats; None leaves kept out, as vmap takes
    tensors only). Returns the stacked leaves and a function that rebuilds one member's tree from them."""
    flat = [tree_flatten(t) for t in trees]
    leaves0, spec = flat[0]
    present = [leaf is not None for leaf in leaves0]
    stacked = []
    for j, keep in enumerate(present):
        if not keep:
            continue
        column = [leaves[j] for leaves, _ in flat]
        if isinstance(column[0], torch.Tensor):
            stacked.append(torch.stack(column))
        else:
            stacked.append(torch.tensor(column, dtype=dtype, device=device))

    def rebuild(tensors):
        it = iter(tensors)
        return tree_unflatten([next(it) if keep else None for keep in present], spec)

    return stacked, rebuild


