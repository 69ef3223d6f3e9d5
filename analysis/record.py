"""The MLflow record of a sweep, named once: what sweeps/ writes and analysis/ reads
(docs/architecture.md §4).

- tags: the names below. A sweep's parent run is tagged ``ROLE_TAG=sweep`` and ``SWEEP_TAG=<name>``; each
  trial's run ``ROLE_TAG=trial``, ``KEY_TAG=<trial_key>``, ``PARENT_TAG``, ``SWEEP_TAG`` and the others.
- the trial key (``trial_key``): the sweep's name and the resolved config name one trial, whichever Tune
  trial or attempt runs it, so every attempt lands in the same run.
- the record of a trial (``run_preference``, ``unique_trials``): of the runs a store holds for one trial,
  the one the sweep keeps and resumes into is the one the analysis counts.
- params: every TrialConfig field as ``str(value)``, read back by ``cast_param`` with the config's own
  rule (``provlae.config.coerce_field``).
- metrics: the stage-end metrics the trainer reports (``STAGE_END_METRICS``), the ones the evaluation stage
  computes later from stored representations (``EVALUATED_METRICS``, ``provlae.metrics.names``), which need
  ground-truth factors, and which are better lower. A run's evaluated stages carry ``evaluated_tag(s)``.
- artifacts: a trial's stage-end figures under ``figures/stage<s>/`` and its stage-end representation,
  ``representation_path(s)`` (``provlae.representation``), from which metrics are computed later; on a
  sweep's parent run, each cell's UDR comparison (``udr_path``).

Pure Python: runs are read by attribute (``run.info``, ``run.data``), MLflow is never imported here.
"""
from __future__ import annotations

import hashlib
import json

from analysis.errors import AnalysisError
from provlae.config import FIELD_TYPES, TrialConfig, coerce_field
from provlae.errors import ConfigError
from provlae.metrics.names import SUITE_VALUES, UDR

# ------------------------------------------------------------------------------------------- tags

ROLE_TAG = "provlae.role"  # SWEEP_ROLE on a sweep's parent run, TRIAL_ROLE on a trial's run
SWEEP_ROLE, TRIAL_ROLE = "sweep", "trial"
KEY_TAG = "provlae.trial_key"  # names one trial of one sweep (trial_key)
SWEEP_TAG = "sweep"  # the sweep's name, on its parent run and on each of its trials' runs
PARENT_TAG = "mlflow.parentRunId"
RESUMED_TAG = "provlae.resumed_from_step"  # set when a trial continues from a Tune checkpoint
ERROR_TAG = "error"  # why a FAILED run failed ("<Type>: <message>")
DUPLICATE_TAG = "provlae.duplicate_of"  # on a deleted duplicate run: the run kept in its place
DATA_TAGS = ("data_source", "data_sha256")  # the file a trial trained on ("procedural": none) and its sha256
HARDWARE_TAG = "hardware"  # what the trial's last attempt ran on: "cuda: <GPU> (<host>)" or "cpu: ..."
KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"  # MLflow 3's kind for model training ("Machine learning")

# ---------------------------------------------------------------------------------------- metrics

# The trainer's stage-end metrics (provlae.evaluate) that every family reports at every stage end, the
# objectives a search may optimise (mi_z<l> and kl_z<l> are left out: a progressive family does not have
# every level at its first stages).
STAGE_END_METRICS = ("mig", "mig_sup", "factor_score", "recon_error", "mi_total", "mi_over", "active_units")
# What the evaluation stage (analysis/evaluate.py) logs from stored representations, at each stage's step.
EVALUATED_METRICS = (*SUITE_VALUES, UDR)
NEED_FACTORS = frozenset({"mig", "mig_sup", "factor_score", "active_units", *SUITE_VALUES})  # need ground truth
# What a finished trial measured, logged at its last step: its group's training img/s (all members' images)
# and the mean seconds of one stage-end evaluation (also in the node's throughput table, provlae.throughput).
TRAIN_IMG_S, EVAL_SECONDS = "train_img_s", "eval_seconds"
TIMINGS = frozenset({"img_s", TRAIN_IMG_S, EVAL_SECONDS})  # rates and durations, not numbers of the model
LOWER_IS_BETTER = frozenset({"recon_error", "loss", "recon"})  # the rest: higher is better


# ------------------------------------------------------------------------------------- artifacts

REPRESENTATION_DIR = "representation"


def representation_path(stage: int) -> str:
    """The artifact path of a trial's representation at the end of ``stage``."""
    return f"{REPRESENTATION_DIR}/stage{stage}.npz"


def representation_stage(path: str) -> int | None:
    """The stage of a representation artifact's path; None for any other path."""
    name = path.rsplit("/", 1)[-1]
    digits = name[len("stage"):-len(".npz")]
    if name.startswith("stage") and name.endswith(".npz") and digits.isdigit():
        return int(digits)
    return None


UDR_DIR = "udr"


def udr_path(cell: str, stage: int) -> str:
    """The parent run's artifact holding one cell's UDR comparison at ``stage`` (its runs, pairwise matrix)."""
    return f"{UDR_DIR}/{cell}_stage{stage}.json"


def evaluated_tag(stage: int) -> str:
    """The tag on a trial's run naming the metrics (``provlae.metrics.names``) the evaluation stage has
    logged for ``stage``, comma-separated: set in the same batch as the values."""
    return f"provlae.evaluated.stage{stage}"


def default_mode(metric: str) -> str:
    """"min" for a metric whose lower values are better, else "max"."""
    return "min" if metric in LOWER_IS_BETTER else "max"


# -------------------------------------------------------------------------------------- trial key


def trial_key(sweep: str, cfg: TrialConfig) -> str:
    """The ``KEY_TAG`` of ``cfg``'s run in ``sweep``: its name and its config's identity, hashed."""
    what = json.dumps(cfg.identity(), sort_keys=True)
    return hashlib.sha256(f"{sweep}\n{what}".encode()).hexdigest()[:24]


# ------------------------------------------------------------------------------- the trial's record


def run_preference(run) -> tuple:
    """Sort key of the runs of one trial (or of one sweep's parents), the record first: FINISHED, then one
    holding metrics, then one described (params), then the earliest start, then the smaller run id. The
    sweep keeps (``sweeps.tracking.keep_one``) and the analysis counts the same run. A retried create's
    ghost starts at the same time as the run the client got (the client sends the start time, and the
    retry resends it): among fresh runs the run id decides, for every creator alike."""
    info, data = run.info, run.data
    return info.status != "FINISHED", not data.metrics, not data.params, info.start_time or 0, info.run_id


def trial_identity(run) -> tuple:
    """Which trial a run records: its ``KEY_TAG``; a run without one (logged before the tag existed) its
    (sweep, run name), the sweep being its ``SWEEP_TAG`` or else its parent run; else the run alone."""
    tags, name = run.data.tags, run.info.run_name or run.data.tags.get("mlflow.runName")
    if tags.get(KEY_TAG):
        return ("key", tags[KEY_TAG])
    group = tags.get(SWEEP_TAG) or tags.get(PARENT_TAG)
    return ("name", group, name) if group and name else ("run", run.info.run_id)


def unique_trials(runs: list) -> list:
    """One run per trial (``trial_identity``), the record (``run_preference``), in the order given. So a
    FAILED or never-ended copy never hides a FINISHED one, and of two FINISHED copies the first one logged
    counts, the one the sweep's own links and summaries name."""
    best: dict[tuple, object] = {}
    for run in runs:
        key = trial_identity(run)
        if key not in best or run_preference(run) < run_preference(best[key]):
            best[key] = run
    chosen = {id(run) for run in best.values()}
    return [run for run in runs if id(run) in chosen]


# ----------------------------------------------------------------------------------------- params

NONE_WORDS = {"None", "none", "null", ""}  # the param text of a value that is None


def cast_param(run_name: str, key: str, text: str):
    """A param string as the value TrialConfig holds for ``key`` (``coerce_field``, the config's own
    rule); a key that is no TrialConfig field (a sweep's own params) is guessed."""
    if key not in FIELD_TYPES:
        return None if text in NONE_WORDS else guess(text)
    try:
        return coerce_field(key, text)
    except ConfigError:
        kind = FIELD_TYPES[key].replace("| None", "").strip()
        raise AnalysisError(f"run {run_name}: param {key}={text!r} is not a valid {kind}") from None


def guess(text: str):
    """A param of no declared type: a bool, an int or a float where it reads as one, else the text."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
