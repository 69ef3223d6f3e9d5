"""The progressive trainer: plain PyTorch, one loop for every family.

The trainer knows nothing of Ray or MLflow. It reports through ``callback(Event)``:
  "step"        every cfg.log_every steps: loss terms, alpha, stage, img/s
  "checkpoint"  every cfg.checkpoint_every steps (mid-stage): the state may be saved now
  "stage_end"   at the end of each stage: evaluation metrics (the state may be saved now)
  "end"         once, with the final metrics
Checkpoints hold model, optimizer, family state (teacher), stage, step, the batch order and every RNG
state, so a resumed run ends bitwise identical to an uninterrupted one on CPU.
"""
from __future__ import annotations

import os
import random
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from provlae import data as datasets
from provlae.config import TrialConfig
from provlae.errors import ConfigError, TrainingDiverged
from provlae.evaluate import batches_to_float, disentanglement, encode
from provlae.figures import information_per_stage, model_figures
from provlae.models import LadderVAE, build_family
from provlae.models.ladder import check_image_shape

CHECKPOINT_VERSION = 1


@dataclass
class Event:
    kind: str  # "step" | "checkpoint" | "stage_end" | "end"
    step: int  # global steps completed
    stage: int
    metrics: dict[str, float] = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but no CUDA device is available")
    return torch.device(name)


def images_tensor(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """The uint8 (N,H,W,C) images as a tensor: zero-copy over the (memory-mapped) array on CPU, the
    whole set resident on the GPU otherwise (batches are then indexed there)."""
    with warnings.catch_warnings():  # read-only memory map: the trainer never writes to it
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(images)
    return t if device.type == "cpu" else t.to(device)


def check_data(cfg: TrialConfig) -> None:
    """Refuse data a trial could not train on, before anything starts: a user's file is opened (which
    validates it); a procedural dataset is checked from its spec, without rendering it."""
    spec = datasets.DATASETS[cfg.dataset]
    if cfg.data_path is not None:
        full = datasets.load(cfg.dataset, path=cfg.data_path)
        n, shape = len(full), full.image_shape
    else:
        h, w, c = spec.image_hwc
        n, shape = int(np.prod(spec.factor_sizes)), (c, h, w)
    if cfg.subset is not None and cfg.subset > n:
        raise ConfigError(f"subset {cfg.subset} is larger than {cfg.dataset} ({n} images)")
    if min(n, cfg.subset or n) < cfg.batch_size:
        raise ConfigError(f"batch_size {cfg.batch_size} is larger than the dataset ({min(n, cfg.subset or n)} "
                          f"images)")
    check_image_shape(shape, cfg.levels)


class Trainer:
    def __init__(self, cfg: TrialConfig, dataset=None):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.data = dataset if dataset is not None else datasets.load(
            cfg.dataset, path=cfg.data_path, subset=cfg.subset, seed=cfg.data_seed)
        if len(self.data) < cfg.batch_size:
            raise ConfigError(f"batch_size {cfg.batch_size} is larger than the dataset ({len(self.data)} images)")
        self.images = images_tensor(self.data.images, self.device)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        random.seed(cfg.seed)
        self.family = build_family(cfg)
        self.model = LadderVAE(self.data.image_shape, self.family.level_dims(), cfg.channels,
                               cfg.hidden).to(self.device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        # The trainer owns its randomness, so trainers sharing a process never perturb each other.
        self.batch_gen = torch.Generator().manual_seed(cfg.seed)  # the order of training images
        self.noise_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)  # z samples
        self.perm: torch.Tensor | None = None
        self.pos = 0
        self.step = 0
        self.stage = -1  # entered at the first step
        self.history: list[dict] = []  # evaluation at each stage end
        self.last_terms: dict[str, float] = {}
        self.train_seconds = 0.0
        self._finite = torch.ones((), dtype=torch.bool, device=self.device)  # every loss so far finite

    # ------------------------------------------------------------------ the loop
    def run(self, callback: Callable[[Event], None] | None = None, until: int | None = None) -> dict[str, float]:
        """Train to the end and return the final metrics. With ``until``, pause once that many global
        steps are done (e.g. a stage end) and return {}: a later call continues as if never paused."""
        cb = callback or (lambda event: None)
        cfg, total, per_stage = self.cfg, self.cfg.total_steps, self.cfg.stage_steps
        self.model.train()
        end = total if until is None else min(until, total)
        t0, n0 = time.perf_counter(), self.step
        while self.step < end:
            stage = self.step // per_stage
            if stage != self.stage:
                self.stage = stage
                self.family.begin_stage(self.model, stage)
            terms = self._train_step()
            at_event = (self.step % cfg.log_every == 0 or self.step % per_stage == 0 or self.step == end
                        or (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0))
            if at_event:  # never report, evaluate or checkpoint a diverged state
                self._check_finite(terms["loss"])
            if self.step % cfg.log_every == 0 or self.step == total:
                terms = {k: float(v) for k, v in terms.items()}  # a host sync only when logging
                self.last_terms = terms
                elapsed = time.perf_counter() - t0
                img_s = (self.step - n0) * cfg.batch_size / max(elapsed, 1e-9)
                cb(Event("step", self.step, self.stage, {**terms, "img_s": img_s}))
            if self.step % per_stage == 0:
                self.train_seconds += time.perf_counter() - t0
                result = self.evaluate()
                self.history.append({"stage": self.stage, "step": self.step, **result})
                cb(Event("stage_end", self.step, self.stage, {**result, "stage": float(self.stage)}))
                t0, n0 = time.perf_counter(), self.step
            elif cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                cb(Event("checkpoint", self.step, self.stage))
        if self.step < total:  # paused at `until`
            return {}
        final = self.final_metrics()
        cb(Event("end", self.step, self.stage, final))
        return final

    def _next_indices(self) -> torch.Tensor:
        n, b = self.images.shape[0], self.cfg.batch_size
        if self.perm is None or self.pos + b > n:  # a new epoch (the incomplete tail is dropped)
            self.perm = torch.randperm(n, generator=self.batch_gen)
            self.pos = 0
        idx = self.perm[self.pos:self.pos + b]
        self.pos += b
        return idx.to(self.images.device)

    def _train_step(self) -> dict[str, torch.Tensor | float]:
        x = batches_to_float(self.images, self._next_indices(), self.data.pixel_scale, self.device)
        t = self.steps_into_stage
        out = self.family.loss(self.model, x, self.stage, t, generator=self.noise_gen)
        self._finite &= torch.isfinite(out.loss.detach())  # checked at the next event: no per-step sync
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        self.opt.step()
        self.step += 1
        terms = {k: v.detach() for k, v in out.terms.items()}
        terms["alpha"] = self.family.alpha(self.stage, t)
        terms["stage"] = float(self.stage)
        return terms

    def _check_finite(self, loss: torch.Tensor) -> None:
        if not bool(self._finite):
            raise TrainingDiverged(f"loss became {float(loss)} by step {self.step} (stage {self.stage}) "
                                   f"of {self.cfg.run_name}; lower lr or beta")

    @property
    def steps_into_stage(self) -> int:
        return self.step - max(self.stage, 0) * self.cfg.stage_steps

    # ------------------------------------------------------------------ evaluation
    def eval_index(self) -> torch.Tensor:
        n = self.images.shape[0]
        if self.cfg.eval_subset is None or self.cfg.eval_subset >= n:
            return torch.arange(n)
        gen = torch.Generator().manual_seed(self.cfg.data_seed + 1)  # the same images for every seed
        return torch.randperm(n, generator=gen)[: self.cfg.eval_subset].sort().values

    def evaluate(self) -> dict[str, float]:
        cfg, index = self.cfg, self.eval_index()
        enc = encode(self.model, self.family, self.stage, self.steps_into_stage, self.images,
                     self.data.pixel_scale, index.to(self.images.device), self.device,
                     seed=cfg.seed + 1000 * self.stage)
        factors = np.asarray(self.data.factors)[index.numpy()]
        exclude = () if cfg.include_shape or cfg.dataset != "dsprites" else (0,)
        return disentanglement(enc, factors, tuple(self.data.factor_sizes), exclude_factors=exclude,
                               mi_samples=cfg.mi_samples, train_votes=cfg.factor_train_votes,
                               eval_votes=cfg.factor_eval_votes, seed=cfg.seed, device=self.device)

    def final_metrics(self) -> dict[str, float]:
        """The last stage's evaluation plus the final training loss (model-derived numbers only)."""
        final = {k: v for k, v in self.history[-1].items() if k not in ("stage", "step")}
        final["loss"] = self.last_terms.get("loss", float("nan"))
        return final

    def write_figures(self, out_dir: str | Path) -> list[Path]:
        out_dir = Path(out_dir)
        stage = max(self.stage, 0)
        paths = model_figures(self.model, self.family, stage, self.steps_into_stage, self.images,
                              self.data.pixel_scale, self.device, out_dir, seed=self.cfg.seed)
        mi = information_per_stage(self.history, self.cfg.levels, out_dir / "information_per_stage.png")
        return paths + ([mi] if mi else [])

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "version": CHECKPOINT_VERSION,
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "family": self.family.state_dict(),
            "step": self.step,
            "stage": self.stage,
            "perm": self.perm,
            "pos": self.pos,
            "history": self.history,
            "last_terms": self.last_terms,
            "train_seconds": self.train_seconds,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "numpy": np.random.get_state(),
                "python": random.getstate(),
                "batches": self.batch_gen.get_state(),
                "noise": self.noise_gen.get_state(),
            },
        }

    def save_checkpoint(self, path: str | Path) -> Path:
        """Write the full training state to one file, atomically (never a half-written checkpoint)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".ckpt-")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(self.state_dict(), f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        state = torch.load(path, map_location=self.device, weights_only=False)
        if state.get("version") != CHECKPOINT_VERSION:
            raise ConfigError(f"checkpoint {path} has version {state.get('version')}, "
                              f"expected {CHECKPOINT_VERSION}")
        mine = self.cfg.to_dict()
        differ = sorted(k for k in set(mine) | set(state["config"]) if mine.get(k) != state["config"].get(k))
        if differ:
            raise ConfigError(f"checkpoint {path} was written for a different config "
                              f"(differs in: {', '.join(differ)})")
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.family.load_state_dict(state["family"], self.model)
        self.step, self.stage, self.pos = state["step"], state["stage"], state["pos"]
        self.perm = state["perm"]
        self.history, self.last_terms = state["history"], state["last_terms"]
        self.train_seconds = state["train_seconds"]
        rng = state["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        self.batch_gen.set_state(rng["batches"].cpu())
        self.noise_gen.set_state(rng["noise"].cpu())
