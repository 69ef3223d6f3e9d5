"""A sweep's compute plan: how many images it trains, how many evaluations it runs, and from the nearest
measured throughput (``provlae.throughput``), its wall time and device-hours on the cluster it would run on.

The arithmetic, per Tune trial (a solo trial or a fused group of K members):
- training seconds = the members' training images (steps x batch, all members) / the group's measured
  img/s (a fused group's rate counts all its members' images);
- evaluation seconds = per member, its evaluations (one per stage end) x the measured seconds of one
  evaluation, scaled by the images it evaluates (its ``eval_subset``, else its training set) and by its
  estimator points (``mi_samples``);
- the cluster runs ``slots`` Tune trials at once: the devices (or CPU cores) over what one trial asks,
  trials that share a device (a fraction of a GPU) taken as splitting it, not as running faster together;
- wall time = the trials' seconds over the slots, or the longest trial where that is longer (packing is
  taken as perfect); device-hours = the devices held for that long.

Where nothing was measured on the device, the plan says so and how to measure it, rather than guessing.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from provlae.config import TrialConfig
from provlae.data.registry import get_spec
from provlae.errors import ConfigError
from provlae.throughput import Measurement, ThroughputError, nearest, read_table

CALIBRATE_HINT = "python -m provlae calibrate"
_PLAN_FOR = re.compile(r"^\s*([A-Za-z][\w .-]*?)\s*[x×*]\s*(\d+)\s*$")


@dataclass(frozen=True)
class Target:
    """Where a sweep would run: ``count`` devices (GPUs, or CPU cores for ``device='cpu'``) of one kind,
    ``per_trial`` of them asked by each Tune trial."""

    device: str  # "cpu" or "cuda"
    count: int
    per_trial: float
    device_name: str | None = None  # e.g. "H100": only measurements of that device count

    @property
    def slots(self) -> int:
        """Tune trials at once; trials sharing a device share its throughput."""
        return max(1, int(self.count / max(self.per_trial, 1.0)))

    def label(self) -> str:
        unit = ("CPU core" if self.device == "cpu" else "GPU") + ("s" if self.count != 1 else "")
        name = f" ({self.device_name})" if self.device_name else ""
        return f"{self.count} {unit}{name}, {self.per_trial:g} per Tune trial: {self.slots} at once"


def parse_plan_for(text: str) -> tuple[str, str | None, int]:
    """``DEVICE×N`` (``x`` or ``*`` also): ``cpu×16``, ``cuda×8``, ``H100×8`` (a GPU by name) -> (kind,
    name or None, N); ConfigError otherwise."""
    m = _PLAN_FOR.match(text or "")
    if not m or int(m.group(2)) <= 0:
        raise ConfigError(f"--plan-for must be DEVICE×N with N >= 1 (cpu×16, cuda×8, H100×8), got {text!r}")
    name, count = m.group(1).strip(), int(m.group(2))
    if name.lower() == "cpu":
        return "cpu", None, count
    if name.lower() in ("cuda", "gpu"):
        return "cuda", None, count
    return "cuda", name, count


@dataclass
class GroupCost:
    members: int
    train_images: int
    evaluations: int
    train_s: float
    eval_s: float
    measurement: Measurement

    @property
    def seconds(self) -> float:
        return self.train_s + self.eval_s


@dataclass
class Plan:
    trials: int
    tune_trials: int
    train_images: int
    evaluations: int
    target: Target
    costs: list[GroupCost] = field(default_factory=list)  # empty: nothing measured to plan from
    notes: list[str] = field(default_factory=list)

    @property
    def measured(self) -> bool:
        return bool(self.costs)

    @property
    def compute_s(self) -> float:
        return sum(c.seconds for c in self.costs)

    @property
    def wall_s(self) -> float:
        if not self.costs:
            return math.nan
        return max(self.compute_s / self.target.slots, max(c.seconds for c in self.costs))

    @property
    def device_hours(self) -> float:
        return self.wall_s * self.target.count / 3600 if self.target.device != "cpu" else math.nan

    def measurements(self) -> list[Measurement]:
        seen: dict[int, Measurement] = {}
        for c in self.costs:
            seen.setdefault(id(c.measurement), c.measurement)
        return list(seen.values())

    def lines(self) -> list[str]:
        out = [f"plan: {self.trials} trials in {self.tune_trials} Tune trials, {count(self.train_images)} "
               f"training images, {self.evaluations} evaluations",
               f"  on {self.target.label()}"]
        if not self.measured:
            return out + [f"  {n}" for n in self.notes]
        hours = (f"; {self.device_hours:.1f} device-hours" if self.target.device != "cpu"
                 else f"; {self.compute_s / 3600:.2f} core-hours of trials")
        out.append(f"  estimated wall time {duration(self.wall_s)}{hours} (training "
                   f"{duration(sum(c.train_s for c in self.costs))}, evaluations "
                   f"{duration(sum(c.eval_s for c in self.costs))} of trial time)")
        out += [f"  from: {m.label()}" for m in self.measurements()]
        return out + [f"  note: {n}" for n in self.notes]

    def params(self) -> dict[str, str]:
        """What a sweep's parent run records of its plan."""
        out = {"plan_trials": str(self.trials), "plan_tune_trials": str(self.tune_trials),
               "plan_train_images": str(self.train_images), "plan_evaluations": str(self.evaluations),
               "plan_target": self.target.label()}
        if self.measured:
            out.update(plan_wall_s=f"{self.wall_s:.0f}",
                       plan_measured=" | ".join(m.label() for m in self.measurements())[:480])
            if self.target.device != "cpu":  # a CPU plan counts core-hours, not device-hours
                out["plan_device_hours"] = f"{self.device_hours:.2f}"
        else:
            out["plan_measured"] = "none"
        return out


def make_plan(groups: list[list[TrialConfig]], target: Target, table: list[Measurement] | None = None) -> Plan:
    """The plan of Tune trials ``groups`` (each a list of its members' configs; solo trials are groups of
    one) on ``target``, from ``table`` (default: the local throughput table)."""
    configs = [c for g in groups for c in g]
    plan = Plan(trials=len(configs), tune_trials=len(groups),
                train_images=sum(c.total_steps * c.batch_size for c in configs),
                evaluations=sum(c.num_stages for c in configs), target=target)
    if table is None:
        try:
            table = read_table()
        except ThroughputError as e:
            plan.notes.append(str(e))
            table = []
    costs = []
    for group in groups:
        lead = group[0]
        m = nearest(table, target.device, target.device_name, lead.dataset, lead.family, lead.batch_size,
                    len(group), lead.dtype)
        if m is None:
            what = f"{target.device_name or target.device}"
            plan.notes.append(f"nothing measured on {what} yet: no estimate. Measure it there with "
                              f"`{CALIBRATE_HINT}` (under a minute; --fuse K to measure fused groups)")
            return plan
        costs.append(group_cost(group, m))
    plan.costs = costs
    unlike = {f for group, c in zip(groups, costs) for f, mine, theirs in (
        ("dataset", group[0].dataset, c.measurement.dataset), ("family", group[0].family, c.measurement.family),
        ("batch size", group[0].batch_size, c.measurement.batch_size)) if mine != theirs}
    if unlike:
        fields = [f for f in ("dataset", "family", "batch size") if f in unlike]
        plan.notes.append(f"for some trials the nearest measurement differs in {', '.join(fields)}: a rougher "
                          f"estimate")
    if any(m.eval_s is None for m in plan.measurements()):
        plan.notes.append("no evaluation was measured: evaluations are not counted")
    sizes = sorted({len(g) for g in groups})
    if any(c.measurement.fuse != c.members for c in costs):
        plan.notes.append(f"groups of {', '.join(map(str, sizes))} planned from the rate measured at another "
                          f"K (a smaller K where there is one: the estimate errs long; `{CALIBRATE_HINT} "
                          f"--fuse K` measures it)")
    return plan


def group_cost(group: list[TrialConfig], m: Measurement) -> GroupCost:
    images = sum(c.total_steps * c.batch_size for c in group)
    evals = sum(c.num_stages for c in group)
    eval_s = 0.0
    if m.eval_s is not None and m.eval_images:
        eval_s = sum(c.num_stages * m.eval_s * eval_images(c) / m.eval_images * estimator_share(c, m) for c in group)
    return GroupCost(members=len(group), train_images=images, evaluations=evals,
                     train_s=images / m.train_img_s, eval_s=eval_s, measurement=m)


def estimator_share(cfg: TrialConfig, m: Measurement) -> float:
    """How much dearer ``cfg``'s evaluation is than the measured one by its estimator points: the MI
    estimator's work grows with them (taken as the whole evaluation's: an upper bound for fewer points)."""
    return cfg.mi_samples / m.mi_samples if m.mi_samples else 1.0


def eval_images(cfg: TrialConfig) -> int:
    """The images one stage-end evaluation of ``cfg`` encodes."""
    n = cfg.subset or get_spec(cfg.dataset).size
    if n is None:
        raise ConfigError(f"dataset {cfg.dataset!r} has no fixed size: set subset to plan its evaluations")
    return min(int(n), cfg.eval_subset) if cfg.eval_subset else int(n)


def count(n: int) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return str(n)


def duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "unknown"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


# ------------------------------------------------------------------------------------- --fuse auto

FUSE_CAP = 32  # members per group at most: past it a group's step gains little (benchmarks/gpu_suite.py)
HEADROOM = 0.8  # of the device's free memory a group may take


def largest_group(configs: list[TrialConfig]) -> int:
    """The most members the grid lets one group have: trials alike in all but seed, β and the family's
    member fields (``provlae.fused.make_groups``)."""
    from provlae.fused import make_groups

    return max((len(g) for g in make_groups(configs, max(1, len(configs)))), default=1)


def choose_fuse(device: str, allowed: int, member_bytes: int | None = None, free_bytes: int | None = None,
                cap: int = FUSE_CAP) -> tuple[int, str]:
    """``--fuse auto``: (K, why). On a CPU 1 (a fused group does not train faster there than its trials in
    turn: benchmarks/fused_throughput.py); on a GPU as many members as the grid allows (``allowed``), the
    cap and the device's memory hold — ``free_bytes`` x HEADROOM over one member's peak ``member_bytes``."""
    if device != "cuda":
        return 1, "on a CPU a fused group trains no faster than its trials one after another"
    if not member_bytes or free_bytes is None:
        raise ConfigError("--fuse auto on a GPU needs one member's memory, probed on the device")
    fits = int(free_bytes * HEADROOM // member_bytes)
    k = max(1, min(allowed, cap, fits))
    limit = min((allowed, "the grid's trials that may share a group"), (cap, f"the cap of {cap}"),
                (fits, f"{free_bytes / 2**30:.1f} GiB free x {HEADROOM:g} over {member_bytes / 2**20:.0f} MiB "
                       f"per member"), key=lambda x: x[0])
    return k, f"K = {k}: limited by {limit[1]}"
