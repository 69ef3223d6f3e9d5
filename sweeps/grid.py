"""The study as a declarative product of axes: datasets x families x betas x seeds.

Seeds are an explicit axis (not Tune's ``num_samples``), so every trial is an addressable point with a
stable name (``TrialConfig.run_name``). A family with no beta to sweep (``Family.fixed_beta``, e.g.
``teacher_student``) is not crossed with the beta axis and runs once per dataset x seed at that beta.
Families and datasets come from their registries (built-ins and plug-ins alike); a preset names none.

A trial's config is resolved in layers, later ones winning:
    preset.base  <  the dataset's paper_config (paper preset)  <  preset.per_dataset[dataset]
    <  the grid point  <  --set overrides
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any, Callable, Sequence

from provlae.config import TrialConfig, parse_assignments
from provlae.data.files import DataFiles
from provlae.data.registry import DATASETS, dataset_names, get_spec
from provlae.errors import ConfigError
from provlae.models.families import FAMILIES, family_class, family_names

AXES = ("dataset", "family", "beta", "seed")  # set by the grid, never by --set
PAPER_BETAS = (1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 16.0, 20.0)


def every(_) -> bool:
    return True


def headline(family) -> bool:
    """The families of the paper's headline comparison (those with a ``paper_rank``)."""
    return family.paper_rank is not None


def in_paper(spec) -> bool:
    return spec.paper


def default_dataset(spec) -> bool:
    return spec.name == TrialConfig.dataset  # the config's default dataset


@dataclass(frozen=True)
class Preset:
    """Axes as filters over the registries (evaluated when the grid is built, so plug-ins count)."""

    datasets: Callable[[Any], bool]  # DatasetSpec -> in the grid
    families: Callable[[type], bool]  # Family class -> in the grid
    betas: tuple[float, ...]
    seeds: tuple[int, ...]
    base: dict[str, Any] = field(default_factory=dict)  # TrialConfig fields for every trial
    paper_config: bool = False  # apply each dataset's reference hyper-parameters (DatasetSpec.paper_config)
    # per dataset: TrialConfig fields, plus "epochs_per_stage" which sets steps_per_stage from the data size
    per_dataset: dict[str, dict[str, Any]] = field(default_factory=dict)

    def dataset_axis(self) -> list[str]:
        return [n for n in dataset_names() if self.datasets(DATASETS[n])]

    def family_axis(self) -> list[str]:
        return [n for n in family_names() if self.families(FAMILIES[n])]

    def dataset_layer(self, dataset: str) -> dict[str, Any]:
        paper = dict(get_spec(dataset).paper_config) if self.paper_config else {}
        return {**paper, **self.per_dataset.get(dataset, {})}


# The paper's comparison at reduced scale on a CPU: beta = 4, the full procedural dSprites, 500 steps per
# stage at batch 64 (0.13 epochs in all), evaluated on a seeded 20,000-image subset with 5,000 estimator
# points (with 32 position values, a few thousand images leave each point's own term dominating the MI
# estimate). One trial takes about 4 minutes on one CPU core.
CPU_STUDY = {"steps_per_stage": 500, "batch_size": 64, "fade_in_steps": 250, "log_every": 50,
             "eval_subset": 20_000, "mi_samples": 5000, "factor_train_votes": 500, "factor_eval_votes": 300}

PRESETS = {
    # The paper's study at full scale (docs/architecture.md §2.2): a GPU cluster's worth of work. Each of the
    # paper's datasets brings its reference hyper-parameters (DatasetSpec.paper_config).
    "paper": Preset(datasets=in_paper, families=every, betas=PAPER_BETAS, seeds=tuple(range(5)),
                    base={"checkpoint_every": 5000}, paper_config=True),
    # The top-3 table as the paper reports it, at CPU_STUDY scale: every family, 3 seeds (12 trials with
    # the four built-in families, about half an hour on 2 CPU cores).
    "study": Preset(datasets=default_dataset, families=every, betas=(4.0,), seeds=(0, 1, 2), base=CPU_STUDY),
    # The paper's headline in about 15 minutes on 2 CPU cores: pro-VLAE against VLAE and beta-VAE at
    # CPU_STUDY scale, 2 seeds each (6 trials).
    "demo": Preset(datasets=default_dataset, families=headline, betas=(4.0,), seeds=(0, 1), base=CPU_STUDY),
    # Seconds per trial, for tests.
    "smoke": Preset(
        datasets=default_dataset, families=every, betas=(1.0,), seeds=(0,),
        base={"subset": 1000, "steps_per_stage": 10, "batch_size": 32, "fade_in_steps": 5, "log_every": 5,
              "mi_samples": 200, "factor_train_votes": 100, "factor_eval_votes": 50}),
}


def trial_points(datasets: Sequence[str], families: Sequence[str], betas: Sequence[float],
                 seeds: Sequence[int]) -> list[dict[str, Any]]:
    """The grid points, seeds innermost; a family with a ``fixed_beta`` gets that one beta."""
    points = []
    for dataset, family in product(datasets, families):
        fixed = family_class(family).fixed_beta
        family_betas = betas if fixed is None else (fixed,)
        for beta, seed in product(family_betas, seeds):
            points.append({"dataset": dataset, "family": family, "beta": beta, "seed": seed})
    return points


def dataset_size(dataset: str) -> int:
    """Images in the full dataset (its spec's ``size``); ConfigError where it has none."""
    n = get_spec(dataset).size
    if n is None:
        raise ConfigError(f"dataset {dataset!r} has no fixed size: set subset, or steps_per_stage instead of "
                          f"epochs_per_stage")
    return int(n)


def steps_per_epoch(dataset: str, subset: int | None, batch_size: int) -> int:
    n = subset or dataset_size(dataset)
    return max(1, n // batch_size)  # the trainer drops the incomplete tail of each epoch


def resolve(preset: Preset, point: dict[str, Any], overrides: dict[str, Any],
            data: DataFiles | None = None) -> TrialConfig:
    """One validated trial config: preset layers, then the point, then the overrides; ``data`` (a data
    directory, per-dataset files) gives each dataset its own data_path, unless --set data_path names one."""
    get_spec(point["dataset"])  # an unknown name is a ConfigError naming the registered ones
    files = data.layer(point["dataset"]) if data and "data_path" not in overrides else {}
    raw = {**preset.base, **preset.dataset_layer(point["dataset"]), **point, **files, **overrides}
    epochs = raw.pop("epochs_per_stage", None)
    if epochs is not None and "steps_per_stage" not in overrides:
        probe = TrialConfig.from_dict(raw)  # validated and coerced (subset, batch_size may be strings)
        raw["steps_per_stage"] = epochs * steps_per_epoch(probe.dataset, probe.subset, probe.batch_size)
    if raw.get("data_path"):  # trials run in their own directories: make the path absolute
        raw["data_path"] = str(Path(raw["data_path"]).expanduser().resolve())
    return TrialConfig.from_dict(raw)


def build_trials(preset: str | Preset, datasets: Sequence[str] | None = None,
                 families: Sequence[str] | None = None, betas: Sequence[float] | None = None,
                 seeds: Sequence[int] | None = None,
                 overrides: dict[str, Any] | Sequence[str] = (),
                 data: DataFiles | None = None) -> list[TrialConfig]:
    """Every trial of the sweep, validated; axes left as None come from the preset; ``data`` the files."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
        preset = PRESETS[preset]
    if not isinstance(overrides, dict):
        overrides = parse_assignments(list(overrides))
    fixed = sorted(set(overrides) & set(AXES))
    if fixed:
        raise ConfigError(f"--set cannot change grid axes ({', '.join(fixed)}): "
                          f"use --datasets, --families, --betas, --seeds")
    for name in families or ():
        family_class(name)  # an unknown family: one error naming the registered ones
    axes = dict(datasets=datasets or preset.dataset_axis(), families=families or preset.family_axis(),
                betas=betas or preset.betas, seeds=seeds if seeds is not None else preset.seeds)
    configs = [resolve(preset, point, overrides, data) for point in trial_points(**axes)]
    names = [c.run_name for c in configs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"the grid names two trials alike: {', '.join(twice)} (repeated axis values?)")
    return configs


# ------------------------------------------------------------------------------------ axis parsing


def parse_list(text: str) -> list[str]:
    items = [s.strip() for s in str(text).split(",")]
    items = [s for s in items if s]
    if not items:
        raise ConfigError(f"expected a comma-separated list, got {text!r}")
    return list(dict.fromkeys(items))  # drop repeats, keep order


def parse_seeds(text: str) -> list[int]:
    """'5' -> 0..4 (a count); '0,1,2' or '7,' -> those seeds."""
    text = str(text).strip()
    items = parse_list(text)
    seeds = [_integer(s, "seed") for s in items]
    if "," not in text:
        if seeds[0] < 1:
            raise ConfigError(f"--seeds N needs N >= 1 (a count), got {text!r}; list seeds as '0,1,2'")
        return list(range(seeds[0]))
    if any(s < 0 for s in seeds):
        raise ConfigError(f"seeds must be non-negative integers, got {text!r}")
    return list(dict.fromkeys(seeds))


def parse_betas(text: str) -> list[float]:
    betas = []
    for item in parse_list(text):
        try:
            beta = float(item)
        except ValueError:
            raise ConfigError(f"beta must be a number, got {item!r}") from None
        if not (math.isfinite(beta) and beta > 0):
            raise ConfigError(f"beta must be a finite number > 0, got {item!r}")
        betas.append(beta)
    return list(dict.fromkeys(betas))


def _integer(text: str, what: str) -> int:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value.is_integer():
        raise ConfigError(f"{what} must be an integer, got {text!r}")
    return int(value)
