"""An adaptive search's definition (``SearchSpec``): the preset's config for (family, dataset) is the base;
Optuna distributions over a few of its fields (``build_space``) propose the rest; every proposed
configuration trains on each of the search's seeds, and scores the mean over them of one of the trainer's
stage-end metrics. ASHA may stop a configuration at its rungs, which fall on stage ends (``asha_milestones``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from analysis.record import LOWER_IS_BETTER, NEED_FACTORS, default_mode
from analysis.record import STAGE_END_METRICS as OBJECTIVES  # what a search may optimise
from provlae.config import TrialConfig
from provlae.errors import ConfigError
from sweeps import grid

BETA_RANGE = (0.5, 32.0)  # log-uniform
LR_RANGE = (1e-4, 2e-3)  # log-uniform
REDUCTION_FACTOR = 2  # ASHA: rungs at S, 2S, 4S, ... steps, so every rung is a stage end (see make_scheduler)
SEARCH_TAG = ("search", "optuna")


@dataclass(frozen=True)
class SearchSpec:
    preset: str
    base: TrialConfig  # every field that is not searched; seed = seeds[0]
    seeds: tuple[int, ...]
    objective: str
    mode: str  # "max" | "min"
    trials: int
    space: dict[str, Any] = field(compare=False)  # TrialConfig field -> optuna distribution
    sampler_seed: int = 0
    early_stopping: bool = True

    @property
    def rungs(self) -> list[int]:
        """Steps at which ASHA may stop a configuration (none for single-stage families)."""
        if not self.early_stopping or self.base.num_stages < 2:
            return []
        return asha_milestones(self.base.stage_steps, self.base.total_steps)

    def config_for(self, sampled: dict[str, Any], seed: int) -> TrialConfig:
        return self.base.with_overrides({**sampled, "seed": seed})

    def describe(self) -> dict[str, Any]:
        """The parent run's params: what was searched, how, and over what."""
        return {"search": "optuna", "preset": self.preset, "family": self.base.family,
                "dataset": self.base.dataset, "objective": self.objective, "mode": self.mode,
                "trials": self.trials, "seeds": ",".join(map(str, self.seeds)),
                "sampler": f"TPE(seed={self.sampler_seed})",
                "early_stopping": f"ASHA at steps {','.join(map(str, self.rungs))}" if self.rungs else "off",
                **{f"space.{k}": describe_distribution(d) for k, d in self.space.items()}}

    def manifest(self) -> dict[str, Any]:
        return {"base": self.base.identity(), "seeds": list(self.seeds), "objective": self.objective,
                "mode": self.mode, "trials": self.trials, "sampler_seed": self.sampler_seed,
                "early_stopping": self.early_stopping,
                "space": {k: describe_distribution(d) for k, d in self.space.items()}}


def build_space(base: TrialConfig, fixed: set[str] = frozenset()) -> dict[str, Any]:
    """β and lr log-uniform, and the family's own ranges (``Family.search_ranges``: for pro_vlae γ uniform
    in [0, 1] and fade_in_steps an integer in [0, steps_per_stage]). Fields in ``fixed`` (set with --set)
    stay out of the search."""
    from optuna.distributions import FloatDistribution, IntDistribution

    from provlae.models.families import family_class

    family = family_class(base.family)
    space = {"beta": FloatDistribution(*BETA_RANGE, log=True)}
    for name, (kind, low, high) in family.search_ranges(base).items():
        if name not in TrialConfig.__dataclass_fields__:
            raise ConfigError(f"family {base.family!r}: search range for {name!r}, which is no config field")
        if kind == "int":
            space[name] = IntDistribution(int(low), int(high))
        elif kind in ("uniform", "loguniform"):
            space[name] = FloatDistribution(float(low), float(high), log=kind == "loguniform")
        else:
            raise ConfigError(f"family {base.family!r}: search range {name!r} has kind {kind!r}, expected "
                              f"uniform, loguniform or int")
    space["lr"] = FloatDistribution(*LR_RANGE, log=True)
    return {k: d for k, d in space.items() if k not in fixed}


def describe_distribution(d) -> str:
    from optuna.distributions import FloatDistribution

    kind = "loguniform" if d.log else ("uniform" if isinstance(d, FloatDistribution) else "int")
    return f"{kind}({d.low:g}, {d.high:g})"


def check_inputs(family: str, dataset: str, trials: int, objective: str, mode: str | None) -> None:
    """The search's names and counts; a ConfigError naming the first bad one."""
    from provlae.data.registry import get_spec
    from provlae.models.families import family_class

    family_class(family)  # ConfigError naming the registered families
    spec = get_spec(dataset)
    if trials < 1:
        raise ConfigError(f"--trials must be >= 1, got {trials}")
    if objective not in OBJECTIVES:
        raise ConfigError(f"unknown objective {objective!r}: choose one of the trainer's stage-end metrics "
                          f"({', '.join(OBJECTIVES)})")
    if objective in NEED_FACTORS and not spec.has_factors:
        raise ConfigError(f"objective {objective} needs ground-truth factors, which {dataset} has not")
    if mode not in (None, "max", "min"):
        raise ConfigError(f"--mode must be max or min, got {mode!r}")


def build_spec(preset: str, family: str, dataset: str, trials: int, objective: str, mode: str | None,
               seeds: list[int], overrides: dict[str, Any], sampler_seed: int = 0,
               early_stopping: bool = True, data=None) -> SearchSpec:
    """A validated search; every bad input is a ConfigError naming it."""
    if preset not in grid.PRESETS:
        raise ConfigError(f"unknown preset {preset!r} (choose from {', '.join(grid.PRESETS)})")
    check_inputs(family, dataset, trials, objective, mode)
    if not seeds:
        raise ConfigError("--seeds needs at least one seed")
    fixed = sorted(set(overrides) & {"family", "dataset", "seed"})
    if fixed:
        raise ConfigError(f"--set cannot change {', '.join(fixed)}: use --family, --dataset, --seeds")
    point = {"dataset": dataset, "family": family, "beta": 1.0, "seed": seeds[0]}
    base = grid.resolve(grid.PRESETS[preset], point, overrides, data)
    space = build_space(base, set(overrides))
    if not space:
        raise ConfigError("--set fixes every searched field: nothing left to search")
    for corner in ({k: d.low for k, d in space.items()}, {k: d.high for k, d in space.items()}):
        base.with_overrides(corner)  # the whole box is valid (raises ConfigError otherwise)
    return SearchSpec(preset, base, tuple(seeds), objective, mode or default_mode(objective), trials, space,
                      sampler_seed, early_stopping)


def parse_seed_list(text: str) -> list[int]:
    """'0' -> [0]; '0,1,2' -> [0, 1, 2] (seed values, not a count)."""
    seeds = []
    for item in grid.parse_list(text):
        try:
            value = float(item)
        except ValueError:
            value = math.nan
        if not value.is_integer() or value < 0:
            raise ConfigError(f"seeds must be non-negative integers, got {item!r}")
        seeds.append(int(value))
    return list(dict.fromkeys(seeds))


def asha_milestones(stage_steps: int, total_steps: int) -> list[int]:
    """The rungs AsyncHyperBandScheduler(time_attr="step", grace_period=stage_steps, max_t=total_steps,
    reduction_factor=2, brackets=1) builds: stage_steps * 2**k below total_steps (the result at
    total_steps ends the trial anyway). Each is a whole number of stages, i.e. a stage end."""
    out, t = [], stage_steps
    while t < total_steps:
        out.append(t)
        t *= REDUCTION_FACTOR
    return out



def search_document(spec: SearchSpec) -> dict[str, Any]:
    """search_space.json on the parent run: the space, the seeds, the objective, the base config."""
    return {"space": {k: describe_distribution(d) for k, d in spec.space.items()}, "seeds": list(spec.seeds),
            "objective": spec.objective, "mode": spec.mode, "trials": spec.trials,
            "sampler": {"name": "TPE", "seed": spec.sampler_seed},
            "early_stopping": {"scheduler": "ASHA", "time_attr": "step", "rungs": spec.rungs,
                               "reduction_factor": REDUCTION_FACTOR} if spec.rungs else None,
            "base": spec.base.to_dict()}


def search_plan(spec: SearchSpec, target):
    """The search's compute plan (``provlae.plan``): each of its configurations one Tune trial, its seeds a
    fused group; an upper bound where ASHA stops configurations early."""
    from provlae.plan import make_plan

    members = [spec.base.with_overrides({"seed": s}) for s in spec.seeds]
    return make_plan([members] * spec.trials, target)
