"""The hot loop of every information metric: the aggregate posterior at sample points.

For sample points s (rows) and points n (columns) of a set of C points, over a group of G latent dims:

    log q(z_s) = log (1/C) sum_n prod_j N(z_sj; mu_nj, exp(logvar_nj))            (Chen et al. 2018)

Each element's log density, expanded and written in base 2 so the kernel can use exp2 (on x86 torch's
exp2 is 2-3x faster than exp, and exp falls into a very slow path for arguments below about -87):

    e[s, n] = a_n - sum_j ((z_sj - mu_nj) * r_nj)^2            (bits)
    a_n = -1/2 log2(e) sum_j (log 2pi + logvar_nj) - c,        r_nj = sqrt(1/2 log2(e) exp(-logvar_nj))

with the shift c = max_n a_n, so that every e <= 0 and exp2 never overflows. The sum needs no max pass:
every row's own point is one of the columns (sample points are drawn among the points), and its term
``own_s = e[s, s]`` is a lower bound on the row's sum. Rows with own_s >= OWN_FLOOR (all rows of any
real encoder: it takes a spread of ~100 in logvar, or a 10-sigma sample, to fall below) are summed
in float32 with no risk of underflow; the others take an exact float64 path.

Each block is four in-place ops over a cache-sized buffer — sub, mul, addcmul, exp2 (after a clamp
that keeps exp2 out of denormals) — and a row sum accumulated in float64. Memory is bounded by
`chunk` elements per buffer.

Pruning, exact to float precision: columns are split into STRATA by posterior width (a_n), each
stratum sorted by mu along one dim, and rows are sorted by z. For a block of rows and a sub-block of
columns, interval arithmetic bounds e from above; if the bound is more than PRUNE_BITS below the rows'
smallest own term, every skipped term is < 2^-48 of the row's sum, so all the skipping together changes
log q by less than C * 2^-48 (< 4e-9 for C = 10^6). The strata keep the bound tight: a sub-block mixing
wide and narrow posteriors would be bounded by its widest one. The same arithmetic bounds e from
below, and the clamp is skipped where no exponent can reach EXP2_FLOOR.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise

import numpy as np
import torch

LOG2E = 1.0 / math.log(2.0)
LOG_2PI = math.log(2.0 * math.pi)
OWN_FLOOR = -72.0  # bits below the shift c under which a row takes the exact float64 path
PRUNE_BITS = 48.0  # skip column blocks bounded this far below every row's own term
EXP2_FLOOR = -125.0  # clamp before exp2: 2^-125 is still a normal float32
SUB_BLOCK = 256  # columns per pruning decision
ROW_BLOCK = 32  # rows per pruning decision
MAX_ROWS = 256  # rows per block (columns per block: chunk // rows)
WASTE = 1.25  # merge row blocks while the merged block does at most 25% more work
STRATA = 4  # posterior-width strata of the points, for column sets of at least STRATA * MIN_STRATUM
MIN_STRATUM = 16 * SUB_BLOCK


def run_calls(calls: dict, workers: int) -> dict:
    """Evaluate {key: (cost, fn)} on `workers` threads, largest cost first; returns {key: fn()}.
    Each call is single-threaded and deterministic, so the results do not depend on scheduling; torch
    and numpy release the GIL in their kernels."""
    order = sorted(calls, key=lambda key: -calls[key][0])
    if workers <= 1:
        return {key: calls[key][1]() for key in order}
    with ThreadPoolExecutor(workers) as pool:
        futures = {key: pool.submit(calls[key][1]) for key in order}
        return {key: f.result() for key, f in futures.items()}


def default_chunk(device: torch.device) -> int:
    """Elements per block: about the L2 cache on CPU, large enough to fill a GPU."""
    return 1 << 24 if device.type == "cuda" else 1 << 19


class Mixture:
    """The posteriors of N points over a group of G latent dims, prepared once for many estimates.

    z, mu, logvar: (N, G) float64. The points get a canonical order — by posterior-width stratum,
    then by mu along the sort dim — and every column set passed to log_mean is a subsequence of it.
    """

    def __init__(self, z: np.ndarray, mu: np.ndarray, logvar: np.ndarray):
        self.z, self.mu, self.logvar = z, mu, logvar
        self.a = -0.5 * LOG2E * (LOG_2PI + logvar).sum(1)  # (N,) bits, before the shift
        self.r = np.sqrt(0.5 * LOG2E * np.exp(-logvar))  # (N, G)
        self.sd = _sort_dim(mu, logvar)
        self.stratum = _strata(self.a)
        by_mu = np.argsort(mu[:, self.sd], kind="stable")
        self.order = by_mu[np.argsort(self.stratum[by_mu], kind="stable")]  # (N,) canonical order

    def grouped(self, values: np.ndarray) -> dict[int, np.ndarray]:
        """{value: its points in canonical order} for an (N,) integer array."""
        keys = values[self.order]
        if 0 <= keys.min() and keys.max() < 1 << 15:
            keys = keys.astype(np.int16)  # radix sort
        order = self.order[np.argsort(keys, kind="stable")]
        uniq, starts = np.unique(values[order], return_index=True)
        return {int(v): order[i:j] for v, i, j in zip(uniq, starts, [*starts[1:], len(order)])}

    def log_mean(self, rows: np.ndarray, cols: np.ndarray | None = None, *, device: torch.device,
                 chunk: int | None = None) -> np.ndarray:
        """ln (1/|cols|) sum_{n in cols} prod_j N(z[s, j]; mu[n, j], exp(logvar[n, j])) for s in rows.

        rows: point indices, each of them among the columns. cols: point indices in canonical order
        (self.order, or one of self.grouped's values); None: all points. chunk: elements per block.
        Returns (len(rows),) float64 in the order of `rows`.
        """
        cols = self.order if cols is None else cols
        chunk = chunk or default_chunk(device)
        if len(cols) < STRATA * MIN_STRATUM:  # too few to stratify: one run sorted by mu
            cols = cols[np.argsort(self.mu[cols, self.sd], kind="stable")]
            edges = np.array([0, len(cols)])
        else:
            edges = np.searchsorted(self.stratum[cols], np.arange(self.stratum.max() + 2))  # strata runs
        a = self.a[cols]
        shift = a.max()
        a -= shift
        mu, r = self.mu[cols], self.r[cols]

        zr = self.z[rows]  # (R, G)
        own = self.a[rows] - shift - (((zr - self.mu[rows]) * self.r[rows]) ** 2).sum(1)  # (R,) e[s, s]
        bits = np.empty(len(rows))
        fast = np.flatnonzero(own >= OWN_FLOOR)
        fast = fast[np.argsort(zr[fast, self.sd], kind="stable")]
        if len(fast):
            tasks = []
            for c0, c1 in pairwise(edges):
                if c1 > c0:
                    ranges = _column_ranges(zr[fast], own[fast], mu[c0:c1], r[c0:c1], a[c0:c1])
                    ranges[:, :2] += c0
                    tasks += _tasks(ranges, len(fast), chunk)
            bits[fast] = _sum_fast(zr[fast], mu, r, a, tasks, device)
        slow = np.flatnonzero(own < OWN_FLOOR)
        if len(slow):
            bits[slow] = _sum_exact(zr[slow], mu, r, a)
        return (bits + shift) / LOG2E - math.log(len(cols))


def _sort_dim(mu: np.ndarray, logvar: np.ndarray) -> int:
    """The dim whose sort prunes most: largest spread of mu in units of a typical posterior std."""
    if mu.shape[1] == 1:
        return 0
    return int(np.argmax(mu.std(0) / np.exp(0.5 * np.median(logvar, 0))))


def _strata(a: np.ndarray) -> np.ndarray:
    """(N,) int8 stratum 0..STRATA-1 of each point by quantile of a (its log peak density)."""
    n = STRATA if len(a) >= STRATA * MIN_STRATUM else 1
    if n <= 1:
        return np.zeros(len(a), dtype=np.int8)
    cuts = np.quantile(a, np.arange(1, n) / n)
    return np.searchsorted(cuts, a, side="right").astype(np.int8)


def _sum_exact(zr: np.ndarray, mu: np.ndarray, r: np.ndarray, a: np.ndarray) -> np.ndarray:
    """log2 sum_n 2^e[s, n] in float64 with a max pass, for the rare rows the fast path can't take."""
    out = np.empty(len(zr))
    step = max(1, (1 << 22) // len(a))
    for i in range(0, len(zr), step):
        e = a[None] - (((zr[i:i + step, None, :] - mu[None]) * r[None]) ** 2).sum(-1)  # (rows, C)
        m = e.max(1)
        out[i:i + step] = m + np.log2(np.exp2(e - m[:, None]).sum(1))
    return out


def _sum_fast(zr, mu, r, a, tasks, device) -> np.ndarray:
    """log2 sum_n 2^e[s, n] over the columns of `tasks`: (row0, row1, col0, col1, clamp) blocks.
    Per block: four in-place ops over a buffer, exp2, and a row sum accumulated in float64."""
    f32 = {"device": device, "dtype": torch.float32}
    z_t = torch.as_tensor(zr.T.copy(), **f32)  # (G, R): z_t[j, r0:r1, None] is a column
    mu_t, r_t = torch.as_tensor(mu.T.copy(), **f32), torch.as_tensor(r.T.copy(), **f32)  # (G, C)
    a_t = torch.as_tensor(a, **f32)
    size = max((t[1] - t[0]) * (t[3] - t[2]) for t in tasks)  # <= chunk unless chunk < rows * SUB_BLOCK
    buf_d, buf_w = torch.empty(size, **f32), torch.empty(size, **f32)
    acc = torch.zeros(len(zr), device=device, dtype=torch.float64)
    for r0, r1, c0, c1, clamp in tasks:
        m, n = r1 - r0, c1 - c0
        d = buf_d[:m * n].view(m, n)
        w = buf_w[:m * n].view(m, n)
        for j in range(len(z_t)):
            torch.sub(z_t[j, r0:r1, None], mu_t[j, c0:c1], out=d)
            d.mul_(r_t[j, c0:c1])
            if j == 0:
                torch.addcmul(a_t[c0:c1], d, d, value=-1.0, out=w)  # a_n - ((z - mu) r)^2
            else:
                w.addcmul_(d, d, value=-1.0)
        if clamp:
            w.clamp_min_(EXP2_FLOOR)
        acc[r0:r1] += w.exp2_().sum(1)
    return np.log2(acc.cpu().numpy())


def _tasks(ranges: np.ndarray, n_rows: int, chunk: int) -> list[tuple[int, int, int, int, bool]]:
    """Blocks (row0, row1, col0, col1, clamp) of at most `chunk` elements covering the column range of
    every block of ROW_BLOCK rows; neighbouring row blocks merge while that wastes little work."""
    tasks, i = [], 0
    while i < len(ranges):
        lo, hi, clamp = ranges[i]
        area, j = hi - lo, i + 1  # work of the row blocks taken so far, in units of ROW_BLOCK rows
        if area == 0:  # no columns for this row block
            i += 1
            continue
        while j < len(ranges):
            empty = ranges[j, 1] == ranges[j, 0]
            nlo = lo if empty else min(lo, ranges[j, 0])
            nhi = hi if empty else max(hi, ranges[j, 1])
            nearea = area + ranges[j, 1] - ranges[j, 0]
            if (j + 1 - i) * ROW_BLOCK > MAX_ROWS or (j + 1 - i) * (nhi - nlo) > WASTE * nearea:
                break
            lo, hi, area, clamp, j = nlo, nhi, nearea, clamp | ranges[j, 2], j + 1
        r0, r1 = i * ROW_BLOCK, min(n_rows, j * ROW_BLOCK)
        step = max(SUB_BLOCK, chunk // (r1 - r0))
        tasks.extend((r0, r1, c, min(hi, c + step), bool(clamp)) for c in range(lo, hi, step))
        i = j
    return tasks


def _column_ranges(zr, own, mu, r, a) -> np.ndarray:
    """(row blocks, 3): for each block of ROW_BLOCK rows, the [lo, hi) columns from the first to the
    last column sub-block whose upper bound on e is within PRUNE_BITS of the block's smallest own term,
    and whether any e in that range may fall below EXP2_FLOOR."""
    n_cols, g = mu.shape
    n_sb = -(-n_cols // SUB_BLOCK)

    def blocks(x, size):  # pad with copies of the last entry (bounds unchanged), then split
        x = np.concatenate([x, np.repeat(x[-1:], -(-len(x) // size) * size - len(x), 0)])
        return x.reshape(-1, size, *x.shape[1:])

    mu_b, r_b, a_b = blocks(mu, SUB_BLOCK), blocks(r, SUB_BLOCK), blocks(a, SUB_BLOCK)
    mu_lo, mu_hi, r_lo, r_hi = mu_b.min(1), mu_b.max(1), r_b.min(1), r_b.max(1)  # (n_sb, G)
    a_lo, a_hi = a_b.min(1), a_b.max(1)  # (n_sb,)
    z_b = blocks(zr, ROW_BLOCK)
    z_lo, z_hi, own_lo = z_b.min(1), z_b.max(1), blocks(own, ROW_BLOCK).min(1)  # (n_rb, G), (n_rb,)
    out = np.empty((len(z_lo), 3), dtype=np.int64)
    step = max(1, (1 << 21) // (n_sb * g))
    for i in range(0, len(z_lo), step):
        sl = slice(i, i + step)
        near = np.maximum(0.0, np.maximum(mu_lo[None] - z_hi[sl, None], z_lo[sl, None] - mu_hi[None]))
        far = np.maximum(mu_hi[None] - z_lo[sl, None], z_hi[sl, None] - mu_lo[None])  # (rb, n_sb, G)
        upper = a_hi[None] - (r_lo[None] ** 2 * near ** 2).sum(-1)  # (rb, n_sb) >= every e in the block
        lower = a_lo[None] - (r_hi[None] ** 2 * far ** 2).sum(-1)  # <= every e in the block
        keep = upper >= own_lo[sl, None] - PRUNE_BITS  # always true for the rows' own columns, if here
        first = keep.argmax(1)
        last = n_sb - 1 - keep[:, ::-1].argmax(1)
        inside = (np.arange(n_sb)[None] >= first[:, None]) & (np.arange(n_sb)[None] <= last[:, None])
        out[sl, 0] = first * SUB_BLOCK
        out[sl, 1] = np.minimum(n_cols, (last + 1) * SUB_BLOCK)
        out[sl, 2] = (inside & (lower < EXP2_FLOOR + 1.0)).any(1)
        out[sl][~keep.any(1)] = 0  # nothing to add from these columns: an empty range
    return out
