"""One trial's configuration: every hyper-parameter declared once, with its default.

``TrialConfig.from_dict`` is the only way in: unknown keys and invalid values raise ``ConfigError``
before anything runs. The resolved config (``to_dict``) is saved with every result.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from provlae import plugins
from provlae.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "float64", "bfloat16")  # bfloat16: autocast for training; loss and evaluation in float32
COMPILE_MODES = ("none", "torch")  # torch: the training step's loss through torch.compile
# Fields added after sweeps were first recorded, at the values that behave as before they existed. A config
# at these values is identified (trial keys, sweep manifests, checkpoints) as it was before, so sweeps,
# runs and checkpoints made by an earlier version are found and resumed.
LATER_FIELDS = {"dtype": "float32", "tf32": False, "compile": "none", "plugins": None}


@dataclass(frozen=True)
class TrialConfig:
    family: str = "pro_vlae"
    dataset: str = "dsprites"
    beta: float = 1.0
    seed: int = 0
    levels: int = 3
    z_dim: int = 2  # latents per level (beta_vae: levels * z_dim in one vector)
    gamma: float = 0.5  # eq. (10): KL weight on levels not yet in the decoder
    fade_in_steps: int = 5000  # eq. (9): alpha goes 0 -> 1 over this many steps of a stage
    steps_per_stage: int = 10000  # every family trains levels * steps_per_stage steps in total
    batch_size: int = 128
    lr: float = 5e-4
    subset: int | None = None  # train on a seeded subset of this many images (None: the full set)
    data_path: str | None = None  # a real dataset file; None: the procedural generator
    data_seed: int = 0  # picks the subset; fixed across trial seeds so every seed sees the same images
    device: str = "auto"
    dtype: str = "float32"
    tf32: bool = False  # TF32 matmuls and convolutions on CUDA (set for the whole process)
    compile: str = "none"
    checkpoint_every: int = 0  # steps between mid-stage checkpoints (0: stage ends only)
    log_every: int = 50  # steps between progress events
    mi_samples: int = 10000  # sample points of the MI estimator (MIG, MIG-sup, I(x; z_l))
    factor_train_votes: int = 10000
    factor_eval_votes: int = 5000
    eval_subset: int | None = None  # evaluate metrics on a seeded subset (None: the training images)
    include_shape: bool = False  # dSprites: count the shape factor in MIG / MIG-sup
    lambda_y: float = 1.0  # teacher-student: output (y) supervision
    lambda_xcov: float = 1e-4  # teacher-student: cross-covariance penalty
    lambda_jac: float = 1.0  # teacher-student: Jacobian supervision
    hidden: int = 256  # dense width of ladder heads and decoder inputs
    channels: int = 32  # conv channels of the trunk and decoder
    plugins: str | None = None  # comma-separated modules that register families / datasets (provlae.plugins)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrialConfig:
        """Validated config from a dict whose values may be strings (CLI, MLflow params)."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(unknown)} (known: {', '.join(known)})")
        values = {k: coerce_field(k, v) for k, v in raw.items()}
        cfg = cls(**values)
        cfg.validate()
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> TrialConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text()) if path.suffix == ".json" else _load_yaml(path)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except ValueError as e:
            raise ConfigError(f"config file {path} is not valid: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of key: value")
        return cls.from_dict(raw)

    def with_overrides(self, overrides: dict[str, Any] | list[str]) -> TrialConfig:
        """A new validated config; overrides is a dict or a list of 'key=value' strings."""
        if not isinstance(overrides, dict):
            overrides = parse_assignments(overrides)
        return TrialConfig.from_dict({**self.to_dict(), **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """What names this trial: ``to_dict`` less the LATER_FIELDS left at their earlier behaviour."""
        return config_identity(self.to_dict())

    # ------------------------------------------------------------------ derived
    @property
    def run_name(self) -> str:
        return f"{self.family}-{self.dataset}-b{self.beta:g}-s{self.seed}"

    @property
    def num_stages(self) -> int:
        from provlae.models.families import family_class  # torch: loaded only where a model is built

        return family_class(self.family).stages(self)

    @property
    def total_steps(self) -> int:
        return self.levels * self.steps_per_stage

    @property
    def stage_steps(self) -> int:
        return self.total_steps // self.num_stages

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        # The registries are the only lists of names (imported here: the families load torch and the
        # datasets numpy, which a sweep's driver never needs); the trial's plug-ins register theirs first,
        # wherever the config is read (a Ray worker too)
        from provlae.data.registry import ProceduralSpec, get_spec
        from provlae.models.families import family_class

        plugins.load(self.plugins)
        family_class(self.family)  # ConfigError naming the registered families
        spec = get_spec(self.dataset)
        need(self.device in DEVICES or self.device.startswith("cuda:"),
             f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        need(self.dtype in DTYPES, f"unknown dtype {self.dtype!r} (choose from {', '.join(DTYPES)})")
        need(self.compile in COMPILE_MODES,
             f"unknown compile mode {self.compile!r} (choose from {', '.join(COMPILE_MODES)})")
        for name in ("beta", "lr"):
            v = getattr(self, name)
            need(math.isfinite(v) and v > 0, f"{name} must be a finite number > 0, got {v}")
        for name in ("gamma", "lambda_y", "lambda_xcov", "lambda_jac"):
            v = getattr(self, name)
            need(math.isfinite(v) and v >= 0, f"{name} must be a finite number >= 0, got {v}")
        need(1 <= self.levels <= 4, f"levels must be between 1 and 4, got {self.levels}")
        for name in ("z_dim", "steps_per_stage", "batch_size", "log_every", "mi_samples",
                     "factor_train_votes", "factor_eval_votes", "hidden", "channels"):
            v = getattr(self, name)
            need(v >= 1, f"{name} must be >= 1, got {v}")
        need(self.seed >= 0, f"seed must be a non-negative integer, got {self.seed}")
        need(self.data_seed >= 0, f"data_seed must be a non-negative integer, got {self.data_seed}")
        need(self.fade_in_steps >= 0, f"fade_in_steps must be >= 0, got {self.fade_in_steps}")
        need(self.checkpoint_every >= 0, f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        for name in ("subset", "eval_subset"):
            v = getattr(self, name)
            need(v is None or v >= 2, f"{name} must be >= 2 or None, got {v}")
        if self.data_path is not None:
            need(Path(self.data_path).exists(), f"data_path does not exist: {self.data_path}")
        need(self.data_path is not None or isinstance(spec, ProceduralSpec),
             f"dataset {self.dataset!r} has no procedural generator: set data_path to its files")


FIELD_TYPES = {f.name: str(f.type) for f in fields(TrialConfig)}  # name -> declared type, e.g. "int | None"


def config_identity(raw: dict[str, Any]) -> dict[str, Any]:
    """A config dict (e.g. a checkpoint's) less the LATER_FIELDS at their earlier behaviour."""
    return {k: v for k, v in raw.items() if not (k in LATER_FIELDS and v == LATER_FIELDS[k])}


def parse_assignments(items: list[str]) -> dict[str, str]:
    """['beta=4', 'seed=1'] -> {'beta': '4', 'seed': '1'}; values are coerced by from_dict."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"expected key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


_NONE_WORDS = {"none", "null", ""}
_BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def coerce_field(key: str, value: Any) -> Any:
    """Cast a raw value (possibly a string: the CLI's, a file's, an MLflow param's) to the type TrialConfig
    declares for field ``key``, or raise ConfigError. The one rule: ``from_dict`` and the analysis's
    reading of params (``analysis.record.cast_param``) both use it."""
    annotation = FIELD_TYPES[key]
    optional = "None" in annotation
    base = annotation.replace("| None", "").strip()
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in _NONE_WORDS):
        if optional:
            return None
        raise ConfigError(f"{key} must not be empty")
    try:
        if base == "bool":
            if isinstance(value, bool):
                return value
            return _BOOL_WORDS[str(value).strip().lower()]
        if base == "int":
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            if isinstance(value, str):
                value = value.strip()
                f = float(value)  # accepts "1e3"; rejects "abc"
                if not f.is_integer():
                    raise ValueError
                return int(f)
            return int(value)
        if base == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base == "str":
            if not isinstance(value, str):
                raise ValueError
            return value
    except (ValueError, KeyError, TypeError, OverflowError):
        raise ConfigError(f"{key} must be {'an integer' if base == 'int' else 'a ' + base}, "
                          f"got {value!r}") from None
    raise AssertionError(f"unhandled field type {annotation}")


def _load_yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(str(e)) from None
