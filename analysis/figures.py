"""The paper's comparison figures, drawn from top_k() and stage_information() (PNG, Agg canvas).

Fig. 2: per dataset, reconstruction error against factor score, MIG and MIG-sup; Fig. 3: MIG against
MIG-sup; each point a (family, β) cell's top-k mean with its std as error bars, labelled by β.
Hollow points are cells with fewer than k seeds. Fig. 5: I(x; z_l) per level at each progressive
stage of one run. Figures are built without pyplot, so no global backend state is touched.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from analysis.topk import wide

LABELS = {"factor_score": "factor score", "mig": "MIG", "mig_sup": "MIG-sup",
          "recon_error": "reconstruction error", "mig_hist": "MIG (histogram)",
          "dci_disentanglement": "DCI disentanglement", "dci_completeness": "DCI completeness",
          "dci_informativeness_test": "DCI informativeness", "sap": "SAP", "modularity": "modularity",
          "explicitness_test": "explicitness", "beta_vae_score": "BetaVAE score", "udr": "UDR"}
FIG2_PANELS = ("factor_score", "mig", "mig_sup")


def write_figures(top: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Fig. 2 and Fig. 3 for every dataset whose runs report their metrics; the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    k = top.attrs.get("k", 3)
    written = []
    for dataset, cells in wide(top).groupby("dataset", sort=True):
        title = f"{dataset}: top-{k} mean per β"
        if cells["incomplete"].any():
            title += f"; hollow: fewer than {k} seeds"
        panels = [m for m in FIG2_PANELS if m in cells and cells[m].notna().any()]
        if "recon_error" in cells and cells["recon_error"].notna().any() and panels:
            written.append(_save(fig2(cells, panels, title), out_dir / f"fig2_{dataset}.png"))
        if {"mig", "mig_sup"} <= set(cells) and cells[["mig", "mig_sup"]].notna().all(axis=1).any():
            written.append(_save(fig3(cells, title), out_dir / f"fig3_{dataset}.png"))
    return written


def fig2(cells: pd.DataFrame, panels: list[str], title: str) -> Figure:
    """Reconstruction error (x) against each disentanglement metric (y), one panel per metric."""
    fig = Figure(figsize=(5 * len(panels), 4.2), layout="constrained")
    for ax, metric in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        _scatter(ax, cells, "recon_error", metric)
    fig.suptitle(f"Fig. 2 - reconstruction error vs. disentanglement ({title})")
    return fig


def fig3(cells: pd.DataFrame, title: str) -> Figure:
    """MIG (x) against MIG-sup (y): better disentanglement sits top right."""
    fig = Figure(figsize=(5.5, 4.5), layout="constrained")
    _scatter(fig.subplots(), cells, "mig", "mig_sup")
    fig.suptitle(f"Fig. 3 - MIG vs. MIG-sup\n({title})", fontsize="medium")
    return fig


def _scatter(ax, cells: pd.DataFrame, x: str, y: str) -> None:
    cells = cells[cells[x].notna() & cells[y].notna()]
    for family, group in sorted(cells.groupby("family"), key=lambda item: _family_order(item[0])):
        color = _color(family)
        ax.errorbar(group[x], group[y], xerr=_std(group, x), yerr=_std(group, y), fmt="none",
                    ecolor=color, alpha=0.35, linewidth=1)
        done = group[~group["incomplete"].astype(bool)]
        if not done.empty:  # an empty scatter would still add a legend entry
            ax.scatter(done[x], done[y], color=color, label=family, zorder=3)
        partial = group[group["incomplete"].astype(bool)]
        if not partial.empty:
            ax.scatter(partial[x], partial[y], facecolors="none", edgecolors=color, zorder=3,
                       label=None if not done.empty else family)
        for row in group.itertuples():
            ax.annotate(f"{row.beta:g}", (getattr(row, x), getattr(row, y)), xytext=(4, 3),
                        textcoords="offset points", fontsize=8, color=color)
    ax.set_xlabel(LABELS.get(x, x))
    ax.set_ylabel(LABELS.get(y, y))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="family (label: β)", title_fontsize=8)


def stage_figure(info: pd.DataFrame, title: str) -> Figure:
    """Fig. 5's bars: I(x; z_l) of every level, grouped by progressive stage; I(x; z) on top of each group."""
    levels = sorted((c for c in info.columns if c.startswith("mi_z")), key=lambda c: int(c[4:]), reverse=True)
    fig = Figure(figsize=(max(5.0, 1.5 + 1.5 * len(info)), 4.2), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(levels)
    for i, column in enumerate(levels):  # deepest level first, as the paper's rows
        xs = [s + (i - (len(levels) - 1) / 2) * width for s in range(len(info))]
        ax.bar(xs, info[column].fillna(0.0), width, label=f"I(x; z{column[4:]})", color=f"C{i}")
    for s, (_, row) in enumerate(info.iterrows()):
        note = [f"I(x; z)={row['mi_total']:.2f}"] if pd.notna(row.get("mi_total")) else []
        if pd.notna(row.get("mi_over")):
            note.append(f"I_over={row['mi_over']:.2f}")
        if note:
            top = max(row[c] for c in levels if pd.notna(row[c])) if row[levels].notna().any() else 0.0
            ax.annotate("\n".join(note), (s, top), xytext=(0, 4), textcoords="offset points",
                        ha="center", fontsize=8)
    ax.set_xticks(range(len(info)), [f"stage {s}\n(step {int(t)})" for s, t in zip(info.index, info["step"])])
    ax.set_ylabel("mutual information (nats)")
    ax.margins(y=0.2)
    ax.legend(fontsize=8)
    fig.suptitle(f"Fig. 5 - I(x; z_l) per progressive stage ({title})")
    return fig


def write_stage_figure(info: pd.DataFrame, title: str, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _save(stage_figure(info, title), path)


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig).print_png(str(path))
    return path


def _std(group: pd.DataFrame, metric: str):
    column = f"{metric}_std"
    return group[column].fillna(0.0) if column in group else None


def _family_order(family: str) -> tuple[int, str]:
    """Registered families in their display order (Family.display_order), then unknown ones by name."""
    from provlae.models.families import family_names  # when drawn: the registry loads torch

    known = family_names()
    return (known.index(family) if family in known else len(known), family)


def _color(family: str) -> str:
    from provlae.models.families import family_names

    known = family_names()
    order = _family_order(family)[0]
    return f"C{order % 10}" if family in known else f"C{(order + sum(map(ord, family))) % 10}"
