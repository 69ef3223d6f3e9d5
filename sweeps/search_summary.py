"""The end of a search: one row per configuration (its runs' outcome recorded in MLflow), the table, the
best configuration (printed, and recorded on the parent run) and the Optuna study rebuilt from the rows."""
from __future__ import annotations

import json
from pathlib import Path

from sweeps import tracking
from provlae.text import last_line
from sweeps.search_space import SearchSpec
from sweeps.trainable import trial_config


def summarize(results, spec: SearchSpec, ctx: tracking.TrackingContext, mlflow) -> list[dict]:
    """One row per Tune trial: its sampled values, objective, status and MLflow runs. The runs of a
    configuration that ASHA stopped end KILLED (tag early_stopped); those of a failed one FAILED."""
    rows = []
    for result in results:
        metrics, cfg = result.metrics or {}, trial_config(result.config)
        trial_id = metrics.get("trial_id") or trial_id_of(Path(result.path).name)
        runs = [tracking.find_trial_run(mlflow, ctx.experiment_id, ctx.trial_key(cfg.with_overrides({"seed": s}),
                                                                                 trial_id))
                for s in spec.seeds]
        row = {"trial_id": trial_id, "params": {k: getattr(cfg, k) for k in spec.space},
               "objective": metrics.get(spec.objective), "step": metrics.get("step", 0),
               "run_ids": [r.info.run_id for r in runs if r is not None]}
        if result.error is not None:
            row.update(status="FAILED", error=last_line(str(result.error)))
            for run in runs:
                if run is not None and run.info.status != "FAILED":
                    tracking.mark_failed(mlflow, run.info.run_id, row["error"])
        elif metrics.get("done") and row["step"] >= spec.base.total_steps:
            row["status"] = "FINISHED"
        elif metrics.get("done"):  # ASHA's STOP marks the last result done
            row["status"] = "STOPPED"
            stage = int(metrics.get("stage", 0))
            for run in runs:
                if run is not None and run.info.status == "RUNNING":
                    mlflow.set_tag(run.info.run_id, "early_stopped", f"after stage {stage}")
                    mlflow.set_terminated(run.info.run_id, "KILLED")
        else:
            row["status"] = "UNFINISHED"
        rows.append(row)
    return rows


def trial_dirname(trial) -> str:
    cfg = trial_config(trial.config)
    return f"{cfg.family}-{cfg.dataset}-b{cfg.beta:.3g}_{trial.trial_id}"


def trial_id_of(dirname: str) -> str:
    """The Tune trial id at the end of a trial_dirname (family names hold '_', beta does not)."""
    return dirname[dirname.rindex("-b"):].split("_", 1)[1]


def export_study(rows: list[dict], spec: SearchSpec, folder: str, name: str) -> str | None:
    """The search's trials as an Optuna study in <folder>/optuna.db, rebuilt from Tune's results at the
    end of every run (the study the search runs on lives in Tune's experiment state). Local folders only."""
    if "://" in folder:
        return None
    import optuna
    from optuna.trial import TrialState, create_trial

    uri = f"sqlite:///{Path(folder) / 'optuna.db'}"
    states = {"FINISHED": TrialState.COMPLETE, "STOPPED": TrialState.PRUNED, "FAILED": TrialState.FAIL}
    try:
        optuna.delete_study(study_name=name, storage=uri)
    except KeyError:  # not exported yet
        pass
    study = optuna.create_study(study_name=name, storage=uri,
                                direction="minimize" if spec.mode == "min" else "maximize")
    for r in (r for r in rows if r["status"] in states):
        state, value = states[r["status"]], r["objective"]
        study.add_trial(create_trial(
            state=state, params=r["params"], distributions=spec.space,
            value=value if state == TrialState.COMPLETE else None,
            intermediate_values={int(r["step"]): value} if value is not None else None,
            user_attrs={"ray_trial_id": r["trial_id"], "mlflow_run_ids": r["run_ids"]}))
    return uri


def best_row(rows: list[dict], spec: SearchSpec) -> dict | None:
    done = [r for r in rows if r["status"] == "FINISHED" and r["objective"] is not None]
    if not done:
        return None
    sign = -1.0 if spec.mode == "max" else 1.0
    return min(done, key=lambda r: sign * r["objective"])


def record_best(mlflow, parent: str, best: dict, spec: SearchSpec) -> None:
    """best.<field> params, best_<objective> metric, best.trial_id / best.run_ids tags, best_config.json."""
    from mlflow.entities import Param

    have = mlflow.get_run(parent).data.params
    params = [Param(f"best.{k}", str(v)) for k, v in best["params"].items() if f"best.{k}" not in have]
    if params:
        mlflow.log_batch(parent, params=params)
    mlflow.log_metric(parent, f"best_{spec.objective}", best["objective"])
    mlflow.set_tag(parent, "best.trial_id", best["trial_id"])
    mlflow.set_tag(parent, "best.run_ids", ",".join(best["run_ids"]))
    config = {**spec.base.to_dict(), **best["params"]}
    config.pop("seed")
    mlflow.log_dict(parent, {"config": config, "seeds": list(spec.seeds), spec.objective: best["objective"]},
                    "best_config.json")


def format_table(rows: list[dict], spec: SearchSpec) -> str:
    sign = -1.0 if spec.mode == "max" else 1.0
    order = sorted(rows, key=lambda r: (r["status"] != "FINISHED", r["objective"] is None,
                                        sign * (r["objective"] or 0.0)))
    names = list(spec.space)
    header = f"{'trial':<12}" + "".join(f"  {n:>13}" for n in names) + f"  {spec.objective:>12}  status"
    lines = [header, "-" * len(header)]
    for r in order:
        cells = "".join(f"  {_value(r['params'][n]):>13}" for n in names)
        status = r["status"].lower() if r["status"] != "STOPPED" else f"stopped at step {r['step']}"
        lines.append(f"{r['trial_id']:<12}{cells}  {_value(r['objective']):>12}  {status}")
    return "\n".join(lines)


def format_best(best: dict | None, rows: list[dict], spec: SearchSpec, final: bool) -> str:
    counts = {s: sum(r["status"] == s for r in rows) for s in ("FINISHED", "STOPPED", "FAILED")}
    done = (f"{counts['FINISHED']} of {spec.trials} trials finished, {counts['STOPPED']} stopped early, "
            f"{counts['FAILED']} failed")
    if best is None:
        return f"no configuration finished yet ({done})"
    seeds = ",".join(map(str, spec.seeds))
    title = "best configuration" if final else "best configuration so far"
    lines = [f"{title}: {spec.objective} = {best['objective']:.6g} ({spec.mode}, mean over seeds {seeds}; {done})"]
    lines += [f"  {k} = {_value(v)}" for k, v in best["params"].items()]
    summary = {**best["params"], spec.objective: best["objective"], "trial_id": best["trial_id"],
               "run_ids": best["run_ids"]}
    lines.append("best: " + json.dumps(summary))
    return "\n".join(lines)


def _value(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
