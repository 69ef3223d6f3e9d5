"""python -m analysis: the paper's questions answered from a sweep's MLflow experiment.

  top3     mean ± std of the top-k seeds per (dataset, family, β) and metric (the numbers of Fig. 2/3)
  figures  Fig. 2 and Fig. 3 per dataset into --out; Fig. 5 for each --run RUN_ID
  export   every trial run, failed ones too, to a parquet file
  compare  per dataset, the family that leads each metric at its best β, and by how much
  trials   trials ranked by an objective (e.g. an Optuna search: --search optuna)
  report   one self-contained HTML page of the study (--out DIR: DIR/index.html)
  evaluate the metric suite and UDR from the runs' stored representations, as Ray tasks, into the runs

Without ``--sweep``, top3, compare and report pool every sweep of the experiment and, when there is more
than one, say so on stderr: ``pooled 2 sweeps: demo (6 runs), paper (250 runs); pass --sweep NAME for one``.
Bad input (unknown experiment or metric, no runs) prints one ``error: ...`` line and exits with 2;
``evaluate`` exits with 1 when a run could not be scored (each named on its own line).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import pandas as pd

from analysis.errors import AnalysisError
from analysis.figures import write_figures, write_stage_figure
from analysis.report import write_report
from analysis.runs import export_parquet, load_runs, stage_information, sweep_counts
from analysis.topk import METRICS, SUITE_METRICS, compare, rank_trials, top_k, verdict, wide
from provlae.errors import ProvlaeError
from provlae.metrics.names import METRIC_NAMES


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("mlflow", "alembic"):  # store set-up chatter would bury the answer
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return args.command(args) or 0
    except ProvlaeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head`: stop quietly
        sys.stdout = open(os.devnull, "w")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    def command(name: str, handler, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(command=handler)
        sub.add_argument("--experiment", default="provlae", help="MLflow experiment (the sweep name)")
        sub.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else the sqlite store "
                                                "under the provlae data home")
        return sub

    def ranking(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--k", type=int, default=3, help="seeds averaged per cell (default 3)")
        sub.add_argument("--rank-by", metavar="METRIC",
                         help="pick the seeds of every metric by this one (default: each by itself)")

    def one_sweep(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--sweep", help="only this sweep's runs (default: every sweep of the experiment, "
                                         "pooled)")

    def output_format(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--format", choices=("table", "csv", "json"), default="table")

    sub = command("top3", cmd_top3, "mean ± std of the top-k seeds per (dataset, family, beta) and metric")
    ranking(sub)
    one_sweep(sub)
    output_format(sub)
    sub = command("figures", cmd_figures, "Fig. 2 and Fig. 3 per dataset; Fig. 5 for --run")
    ranking(sub)
    sub.add_argument("--out", required=True, type=Path, help="directory for the PNG files")
    sub.add_argument("--run", action="append", default=[], metavar="RUN_ID",
                     help="also draw I(x; z_l) per progressive stage of this run (repeatable)")
    sub = command("export", cmd_export, "every trial run, failed ones too, to parquet")
    sub.add_argument("--out", required=True, type=Path, help="the .parquet file to write")
    sub = command("compare", cmd_compare, "which family leads each metric on each dataset")
    ranking(sub)
    one_sweep(sub)
    sub = command("trials", cmd_trials, "trials ranked by an objective metric")
    sub.add_argument("--objective", metavar="METRIC",
                     help="default: the metric 'objective' if logged, else mig_sup")
    sub.add_argument("--search", metavar="NAME", help="only runs tagged search=NAME (e.g. optuna)")
    sub.add_argument("--mode", choices=("max", "min"), help="default: min for losses and recon_error")
    sub.add_argument("--limit", type=int, help="show the best N only")
    output_format(sub)
    sub = command("report", cmd_report, "one self-contained HTML page of the study: DIR/index.html")
    ranking(sub)
    sub.add_argument("--out", required=True, type=Path, help="the report's folder (an earlier report there "
                                                             "is replaced)")
    one_sweep(sub)
    sub.add_argument("--best-by", metavar="METRIC",
                     help="picks each family's best run (default: --rank-by, else mig_sup)")
    sub.add_argument("--ui-url", help="the MLflow UI the links point to (default: a tracking server's URL, "
                                      "else http://127.0.0.1:5000 as `mlflow ui` serves)")
    sub = command("evaluate", cmd_evaluate, "the metric suite and UDR from stored representations, into the runs")
    one_sweep(sub)
    sub.add_argument("--metrics", default="all", metavar="LIST",
                     help=f"comma list of {', '.join(METRIC_NAMES)} (default: all)")
    sub.add_argument("--stage", default="last", help="last (default), all, or a stage's number")
    sub.add_argument("--force", action="store_true", help="compute again what the runs already hold")
    sub.add_argument("--address", help="Ray cluster to run the tasks on (default: $RAY_ADDRESS, else a local Ray)")
    return parser


def cmd_top3(args: argparse.Namespace) -> None:
    runs = load_runs(args.experiment, args.tracking_uri, sweep=args.sweep)
    top = top_k(runs, k=args.k, rank_by=args.rank_by)
    say_pooled(runs, args.sweep)
    if args.format == "csv":
        top.assign(seeds=top["seeds"].map(lambda s: ";".join(map(str, s)))).to_csv(sys.stdout, index=False)
    elif args.format == "json":
        print(top.to_json(orient="records", indent=2))
    else:
        ranked = f"ranked by {args.rank_by}" if args.rank_by else "each metric ranked by itself"
        print(f"{args.experiment}: mean ± std of the top {args.k} seeds per cell ({ranked})")
        print(_table(top).to_string(index=False))


def say_pooled(runs: pd.DataFrame, sweep: str | None) -> None:
    """One stderr line naming the sweeps pooled, when no --sweep picked one and there are several."""
    counts = sweep_counts(runs)
    if sweep is None and len(counts) > 1:
        parts = [f"{name or '(no sweep tag)'} ({n} run{'s' * (n != 1)})" for name, n in counts.items()]
        print(f"pooled {len(counts)} sweeps: {', '.join(parts)}; pass --sweep NAME for one", file=sys.stderr)


def _table(top: pd.DataFrame) -> pd.DataFrame:
    runs = top.groupby(["dataset", "family", "beta"])["n_runs"].max().rename("runs")
    cells = wide(top).join(runs, on=["dataset", "family", "beta"])
    table = cells[["dataset", "family"]].assign(beta=cells["beta"].map("{:g}".format))
    for metric in (m for m in (*METRICS, *SUITE_METRICS) if m in cells):
        table[metric] = [_mean_std(m, s) for m, s in zip(cells[metric], cells[f"{metric}_std"])]
    return table.assign(runs=cells["runs"], note=cells["incomplete"].map({True: "incomplete", False: ""}))


def _mean_std(mean: float, std: float) -> str:
    if pd.isna(mean):
        return "-"
    return f"{mean:.4g} ± {std:.2g}" if pd.notna(std) else f"{mean:.4g}"


def cmd_figures(args: argparse.Namespace) -> None:
    runs = load_runs(args.experiment, args.tracking_uri)
    top = top_k(runs, k=args.k, rank_by=args.rank_by)
    stages = {run_id: stage_information(run_id, runs.attrs["tracking_uri"]) for run_id in args.run}
    paths = write_figures(top, args.out)  # only once every input is known to be good
    names = dict(zip(runs["run_id"], runs["run_name"]))
    for run_id, info in stages.items():
        name = names.get(run_id) or run_id
        paths.append(write_stage_figure(info, name, args.out / f"fig5_{name}.png"))
    if not paths:
        raise AnalysisError("no figure to draw: no dataset reports recon_error with a disentanglement metric")
    print("\n".join(str(p) for p in paths))


def cmd_export(args: argparse.Namespace) -> None:
    runs = load_runs(args.experiment, args.tracking_uri, include_failed=True)
    path = export_parquet(runs, args.out)
    counts = ", ".join(f"{n} {s}" for s, n in sorted(runs["status"].value_counts().items()))
    print(f"wrote {len(runs)} trial runs ({counts}) to {path}")


def cmd_compare(args: argparse.Namespace) -> None:
    runs = load_runs(args.experiment, args.tracking_uri, sweep=args.sweep)
    text = verdict(compare(top_k(runs, k=args.k, rank_by=args.rank_by)), k=args.k)
    say_pooled(runs, args.sweep)
    print(text)


def cmd_report(args: argparse.Namespace) -> None:
    path = write_report(args.experiment, args.out, tracking_uri=args.tracking_uri, sweep=args.sweep, k=args.k,
                        rank_by=args.rank_by, best_by=args.best_by, ui_url=args.ui_url)
    if args.sweep is None:  # the runs the report pooled: every trial run, any status
        say_pooled(load_runs(args.experiment, args.tracking_uri, include_failed=True), None)
    print(f"Report: {path}")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from analysis.evaluate import evaluate

    outcome = evaluate(args.experiment, args.tracking_uri, sweep=args.sweep, metrics=args.metrics,
                       stage=args.stage, force=args.force, address=args.address,
                       say=lambda line: print(line, flush=True))
    return outcome.report()


def cmd_trials(args: argparse.Namespace) -> None:
    runs = load_runs(args.experiment, args.tracking_uri)
    objective = args.objective or ("objective" if "objective" in runs.columns else "mig_sup")
    ranked = rank_trials(runs, objective, search=args.search, mode=args.mode)
    if args.limit is not None:
        ranked = ranked.head(args.limit)
    if args.format == "csv":
        ranked.to_csv(sys.stdout, index=False)
    elif args.format == "json":
        print(ranked.to_json(orient="records", indent=2))
    else:
        print(ranked.to_string(index=False))


if __name__ == "__main__":
    sys.exit(main())
