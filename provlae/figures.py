"""Qualitative figures of one trained model (DESIGN §2.5): traversals and prior samples per level
(paper Fig. 4-6), and I(x; z_l) per progressive stage (Fig. 5). Saved as PNG files."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from provlae.evaluate import batches_to_float, columns_in_use
from provlae.models import Family, LadderVAE

TRAVERSAL = np.linspace(-2.5, 2.5, 9)


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
