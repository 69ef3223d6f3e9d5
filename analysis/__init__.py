"""The paper's questions answered from a sweep's MLflow experiment (DESIGN §3.4).

    df = load_runs("provlae")            # one typed row per FINISHED trial, every sweep pooled
    sweep_counts(df)                     # {sweep: rows}: which sweeps the frame pools (column "sweep")
    df = load_runs("provlae", sweep="demo")  # only the sweep named demo
    top = top_k(df, k=3)                 # mean ± std of the 3 best seeds per (dataset, family, β)
    print(verdict(compare(top)))         # which family leads each metric, and by how much
    write_figures(top, "figures/")       # Fig. 2 and Fig. 3 per dataset
    write_report("provlae", "report/")   # all of it on one HTML page: report/index.html

The same from the shell: ``python -m analysis top3|figures|export|compare|trials|report --experiment NAME``.
"""
from analysis.errors import AnalysisError
from analysis.figures import write_figures, write_stage_figure
from analysis.report import write_report
from analysis.runs import export_parquet, load_runs, load_sweeps, stage_information, sweep_counts
from analysis.topk import METRICS, best_per_family, compare, paper_ordering, rank_trials, top_k, verdict, wide

__all__ = [
    "METRICS", "AnalysisError", "best_per_family", "compare", "export_parquet", "load_runs", "load_sweeps",
    "paper_ordering", "rank_trials", "stage_information", "sweep_counts", "top_k", "verdict", "wide",
    "write_figures", "write_report", "write_stage_figure",
]
