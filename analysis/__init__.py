"""The paper's questions answered from a sweep's MLflow experiment (DESIGN §3.4).

    df = load_runs("provlae")            # one typed row per FINISHED trial run
    top = top_k(df, k=3)                 # mean ± std of the 3 best seeds per (dataset, family, β)
    print(verdict(compare(top)))         # which family leads each metric, and by how much
    write_figures(top, "figures/")       # Fig. 2 and Fig. 3 per dataset

The same from the shell: ``python -m analysis top3|figures|export|compare|trials --experiment NAME``.
"""
from analysis.errors import AnalysisError
from analysis.figures import write_figures, write_stage_figure
from analysis.runs import export_parquet, load_runs, stage_information
from analysis.topk import METRICS, compare, rank_trials, top_k, verdict, wide

__all__ = [
    "AnalysisError", "METRICS", "compare", "export_parquet", "load_runs", "rank_trials",
    "stage_information", "top_k", "verdict", "wide", "write_figures", "write_stage_figure",
]
