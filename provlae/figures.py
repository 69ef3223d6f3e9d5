"""Qualitative figures of one trained model (docs/architecture.md §2.5), saved as PNG files:

- at every stage end (``stage_figures``): the paper's Fig. 5 panel (per level, images sampled from that
  level's prior with the other levels fixed, I(x; z_l) beside each row, I(x; z) on top) and its Fig. 4
  traversal (every latent in use, levels deepest first, the hierarchy marked);
- at the end (``model_figures``, ``information_per_stage``): traversals and prior samples per level, and
  I(x; z_l) per progressive stage.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from provlae.evaluate import batches_to_float, columns_in_use, levels_at
from provlae.models import Family, LadderVAE

TRAVERSAL = np.linspace(-2.5, 2.5, 9)
PRIOR_SAMPLES = 8  # images per level in the Fig. 5 panel
STAGE_FIGURES = ("information.png", "traversal.png")  # in figures/stage<s>/, and the last stage's in figures/


def _to_rgb(probs: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [0,1] -> (B, H, W, 3)."""
    img = probs.permute(0, 2, 3, 1).float().cpu().numpy()
    return np.repeat(img, 3, axis=3) if img.shape[3] == 1 else img


def _grid(rows: list[np.ndarray]) -> np.ndarray:
    """rows of (n, H, W, 3) images -> one (R*H, n*W, 3) mosaic."""
    return np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)


def _save(mosaic: np.ndarray, title: str, path: Path, ylabels: list[str] | None = None) -> Path:
    h, w = mosaic.shape[:2]
    fig, ax = plt.subplots(figsize=(max(3.0, w / 48), max(2.0, h / 48 + 0.4)))
    ax.imshow(np.clip(mosaic, 0, 1), interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    if ylabels:
        step = h / len(ylabels)
        ax.set_yticks([step * (i + 0.5) for i in range(len(ylabels))], ylabels, fontsize=7)
    else:
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@torch.no_grad()
def model_figures(model: LadderVAE, family: Family, stage: int, t: int, images: torch.Tensor, scale: float,
                  device, out_dir: Path, seed: int = 0) -> list[Path]:
    """Latent traversals (-2.5..2.5, 9 steps) and prior samples for every level in use."""
    out_dir.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    gates = family.gates(stage, t, device)  # alpha as trained, t steps into the stage
    dtype = next(model.parameters()).dtype
    gen = torch.Generator(device="cpu").manual_seed(seed)
    idx = torch.randperm(images.shape[0], generator=gen)[:6]
    x = batches_to_float(images, idx.to(images.device), scale, device, dtype)
    mu, _ = model.encode(x, gates)
    base = gates.masked(mu)
    paths = []
    for l, dims in columns_in_use(family, stage):
        rows = []
        for d in dims:  # one row per latent: vary it around the first image's code
            codes = [None if c is None else c[:1].repeat(len(TRAVERSAL), 1) for c in base]
            codes[l][:, d] = torch.tensor(TRAVERSAL, dtype=codes[l].dtype, device=device)
            rows.append(_to_rgb(torch.sigmoid(model.decode(codes, gates))))
        paths.append(_save(_grid(rows), f"traversal of z{l + 1} (-2.5 .. 2.5)",
                           out_dir / f"traversal_z{l + 1}.png", [f"z{l + 1}[{d}]" for d in dims]))
        rows = []
        for i in range(len(idx)):  # one row per image: resample z_l from the prior, keep the others
            codes = [None if c is None else c[i:i + 1].repeat(8, 1) for c in base]
            noise = torch.randn(8, codes[l].shape[1], generator=gen).to(device, dtype)
            codes[l] = noise if gates.dim_mask[l] is None else noise * gates.dim_mask[l]
            rows.append(_to_rgb(torch.sigmoid(model.decode(codes, gates))))
        paths.append(_save(_grid(rows), f"z{l + 1} sampled from the prior, other levels fixed",
                           out_dir / f"prior_z{l + 1}.png"))
    model.train(was_training)
    return paths


def _codes(model: LadderVAE, family: Family, stage: int, t: int, images: torch.Tensor, scale: float, device,
           seed: int):
    """The gates as trained (t steps into the stage) and the masked posterior means of one seeded image."""
    gates = family.gates(stage, t, device)
    dtype = next(model.parameters()).dtype
    gen = torch.Generator(device="cpu").manual_seed(seed)
    idx = torch.randperm(images.shape[0], generator=gen)[:1]
    x = batches_to_float(images, idx.to(images.device), scale, device, dtype)
    mu, _ = model.encode(x, gates)
    return gates, gates.masked(mu), gen, dtype


@torch.no_grad()
def stage_figures(model: LadderVAE, family: Family, stage: int, t: int, images: torch.Tensor, scale: float,
                  device, result: dict[str, float], out_dir: Path, seed: int = 0) -> list[Path]:
    """The Fig. 5 panel and the Fig. 4 traversal of the model at a stage end into ``out_dir``
    (``STAGE_FIGURES``). ``result``: that stage's evaluation (its ``mi_z<l>`` and ``mi_total``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        gates, base, gen, dtype = _codes(model, family, stage, t, images, scale, device, seed)
        levels = levels_at(family, stage)[::-1]  # deepest first, as the paper draws them
        rows = []
        for _, l, dims, _ in levels:  # resample one level from its prior, keep the others
            codes = [None if c is None else c.repeat(PRIOR_SAMPLES, 1) for c in base]
            noise = torch.randn(PRIOR_SAMPLES, len(dims), generator=gen).to(device, dtype)
            codes[l][:, dims] = noise
            rows.append(_to_rgb(torch.sigmoid(model.decode(gates.masked(codes), gates))))
        info = [result.get(f"mi_z{lid}", float("nan")) for lid, *_ in levels]
        names = [f"z{lid}" + ("" if used else " (not grown)") for lid, _, _, used in levels]
        panel = _information_panel(rows, names, info, result.get("mi_total", float("nan")), stage,
                                   out_dir / STAGE_FIGURES[0])
        rows, labels, spans = [], [], []
        for lid, l, _, used in levels:  # one row per latent in use: vary it around the image's code
            first = len(rows)
            for d in used:
                codes = [None if c is None else c.repeat(len(TRAVERSAL), 1) for c in base]
                codes[l][:, d] = torch.tensor(TRAVERSAL, dtype=codes[l].dtype, device=device)
                rows.append(_to_rgb(torch.sigmoid(model.decode(codes, gates))))
                labels.append(f"z{lid}[{d}]")
            if used:
                spans.append((f"z{lid}", first, len(rows)))
        traversal = _traversal(rows, labels, spans, stage, out_dir / STAGE_FIGURES[1])
    finally:
        model.train(was_training)
    return [panel, traversal]


def _information_panel(rows: list[np.ndarray], names: list[str], info: list[float], total: float, stage: int,
                       path: Path) -> Path:
    h, w = rows[0].shape[1], rows[0].shape[2] * rows[0].shape[0]
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(2.0 + w / 40, 0.8 + len(rows) * h / 40),
                                   gridspec_kw={"width_ratios": [w, 2.2 * h]})
    ax.imshow(np.clip(_grid(rows), 0, 1), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([h * (i + 0.5) for i in range(len(rows))], names, fontsize=8)
    y = np.arange(len(rows))
    bars.barh(y, [0 if np.isnan(v) else v for v in info], color="tab:green", height=0.6)
    for i, v in enumerate(info):
        bars.text(0, i, f" {v:.2f}", va="center", fontsize=7)
    bars.set_ylim(len(rows) - 0.5, -0.5)
    bars.set_yticks([])
    bars.set_xlabel("I(x; z_l), nats", fontsize=7)
    bars.tick_params(labelsize=6)
    fig.suptitle(f"stage {stage}: I(x; z) = {total:.2f} nats", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _traversal(rows: list[np.ndarray], labels: list[str], spans: list[tuple[str, int, int]], stage: int,
               path: Path) -> Path:
    h = rows[0].shape[1]
    mosaic = _grid(rows)
    fig, ax = plt.subplots(figsize=(1.2 + mosaic.shape[1] / 48, 0.6 + mosaic.shape[0] / 48))
    ax.imshow(np.clip(mosaic, 0, 1), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([h * (i + 0.5) for i in range(len(rows))], labels, fontsize=7)
    for name, first, last in spans:  # the hierarchy: a bracket and the level's name right of its rows
        x = mosaic.shape[1] + 4
        ax.plot([x, x + 6, x + 6, x], [first * h + 2, first * h + 2, last * h - 2, last * h - 2],
                color="black", lw=1, clip_on=False)
        ax.text(x + 10, (first + last) * h / 2, name, va="center", fontsize=9, clip_on=False)
        if first:
            ax.axhline(first * h - 0.5, color="white", lw=2)
    ax.set_xlim(-0.5, mosaic.shape[1] - 0.5)  # the brackets stay outside the image
    ax.set_ylim(mosaic.shape[0] - 0.5, -0.5)
    ax.set_title(f"stage {stage}: traversals -2.5 .. 2.5, deepest level first", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def information_per_stage(history: list[dict], levels: int, path: Path) -> Path | None:
    """Bars of I(x; z_l) at the end of each stage (paper Fig. 5); None if nothing was measured."""
    if not history:
        return None
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(history), 3))
    width = 0.8 / levels
    for l in range(1, levels + 1):
        vals = [h.get(f"mi_z{l}", 0.0) for h in history]
        ax.bar(np.arange(len(history)) + (l - 1) * width, vals, width, label=f"I(x; z{l})")
    ax.set_xticks(np.arange(len(history)) + width * (levels - 1) / 2,
                  [f"stage {h['stage']}" for h in history])
    ax.set_ylabel("nats")
    ax.legend(fontsize=7)
    ax.set_title("information per level at each stage end", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
