"""The paper's questions answered from a sweep's MLflow experiment (docs/architecture.md §8).

    df = load_runs("provlae")            # one typed row per FINISHED trial, every sweep pooled
    sweep_counts(df)                     # {sweep: rows}: which sweeps the frame pools (column "sweep")
    df = load_runs("provlae", sweep="demo")  # only the sweep named demo
    top = top_k(df, k=3)                 # mean ± std of the 3 best seeds per (dataset, family, β)
    print(verdict(compare(top)))         # which family leads each metric, and by how much
    write_figures(top, "figures/")       # Fig. 2 and Fig. 3 per dataset
    write_report("provlae", "report/")   # all of it on one HTML page: report/index.html
    from analysis.evaluate import evaluate
    evaluate("provlae", metrics="mig_hist,udr")  # metrics from stored representations, into the runs

The same from the shell: ``python -m analysis top3|figures|export|compare|trials|report|evaluate --experiment
NAME``.
"""
import importlib

# Each public name and the module it lives in, imported on first use: ``analysis.record`` (the MLflow
# record's names, which the sweep's trials import) loads no pandas, matplotlib or MLflow.
_HOMES = {
    "AnalysisError": "analysis.errors",
    "write_figures": "analysis.figures", "write_stage_figure": "analysis.figures",
    "write_report": "analysis.report",
    "export_parquet": "analysis.runs", "load_runs": "analysis.runs", "load_sweeps": "analysis.runs",
    "stage_information": "analysis.runs", "sweep_counts": "analysis.runs",
    "METRICS": "analysis.topk", "best_per_family": "analysis.topk", "compare": "analysis.topk",
    "paper_ordering": "analysis.topk", "rank_trials": "analysis.topk", "top_k": "analysis.topk",
    "udr_agreement": "analysis.topk", "verdict": "analysis.topk", "wide": "analysis.topk",
}
__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'analysis' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})
