"""The progressive trainer: plain PyTorch, one loop for every family.

The trainer knows nothing of Ray or MLflow. It reports through ``callback(Event)``:
  "step"        every cfg.log_every steps: loss terms, alpha, stage, img/s
  "checkpoint"  every cfg.checkpoint_every steps (mid-stage): the state may be saved now
  "stage_end"   at the end of each stage: evaluation metrics (the state may be saved now)
  "end"         once, with the final metrics
Checkpoints hold model, optimizer, family state (teacher), stage, step, the batch order and every RNG
state, so a resumed run ends bitwise identical to an uninterrupted one on the same device type (CPU: always;
CUDA: with tf32 off, up to cuDNN's nondeterministic kernels). A checkpoint also resumes on another device
type: the batch order carries over, but a generator's state is device-specific, so the posterior noise then
continues on a fresh stream seeded from (seed, step), and the numbers differ from an uninterrupted run.

One ``Trainer`` is one trial; ``provlae.fused.FusedTrainer`` trains several as one batched network and
drives the same per-trial bookkeeping (``enter_stage``, ``after_step``), so a fused member is a trainer too.
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from provlae import data as datasets
from provlae import representation
from provlae.atomic import atomic_path
from provlae.checkpoint import (
    CHECKPOINT_VERSION,
    READABLE_VERSIONS,
    numpy_state_from_plain,
    numpy_state_to_plain,
    read_checkpoint,
)
from provlae.config import TrialConfig, config_identity
from provlae.device import adam, check_precision, compiled, images_tensor, resolve_device, set_tf32
from provlae.errors import ConfigError, TrainingDiverged
from provlae.evaluate import batches_to_float, disentanglement, encode
from provlae.figures import information_per_stage, model_figures, stage_figures
from provlae.models import LadderVAE, build_family
from provlae.models.ladder import check_image_shape

PARAM_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.float32}
_STAGE_LOSSES: dict[tuple, Callable] = {}  # compile=torch: each (family, stage, shape) compiled once per process


@dataclass
class Event:
    kind: str  # "step" | "checkpoint" | "stage_end" | "end"
    step: int  # global steps completed
    stage: int
    metrics: dict[str, float] = field(default_factory=dict)


def check_data(cfg: TrialConfig) -> None:
    """Refuse data a trial could not train on, before anything starts: a user's file is opened (which
    validates it); a procedural dataset is checked from its spec, without rendering it. A CPU trial's dtype
    is checked too (a GPU trial's device is not the one the check runs on)."""
    if cfg.device == "cpu":
        check_precision(cfg, torch.device("cpu"))
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
        check_precision(cfg, self.device)
        if self.device.type == "cuda":
            set_tf32(cfg.tf32)
        self.data = dataset if dataset is not None else datasets.load(
            cfg.dataset, path=cfg.data_path, subset=cfg.subset, seed=cfg.data_seed)
        if len(self.data) < cfg.batch_size:
            raise ConfigError(f"batch_size {cfg.batch_size} is larger than the dataset ({len(self.data)} images)")
        self.images = images_tensor(self.data.images, self.device)
        self.dtype = PARAM_DTYPES[cfg.dtype]
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        random.seed(cfg.seed)
        self.family = build_family(cfg)
        self.model = LadderVAE(self.data.image_shape, self.family.level_dims(), cfg.channels,
                               cfg.hidden).to(self.device, self.dtype)
        self.opt = adam(self.model.parameters(), cfg.lr, self.device)
        # The trainer owns its randomness, so trainers sharing a process never perturb each other.
        self.batch_gen = torch.Generator().manual_seed(cfg.seed)  # the order of training images (CPU)
        self.noise_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)  # z samples
        self.perm: torch.Tensor | None = None  # this epoch's order, on the CPU (checkpointed)
        self._perm_on_device: torch.Tensor | None = None  # the same, moved once per epoch
        self.pos = 0
        self.step = 0
        self.stage = -1  # entered at the first step
        self.history: list[dict] = []  # evaluation at each stage end
        self.last_terms: dict[str, float] = {}
        self.train_seconds = 0.0
        self.eval_seconds, self.evaluations = 0.0, 0  # the stage-end evaluations' time, and how many
        self.resumed_across_devices = False
        self._finite = torch.ones((), dtype=torch.bool, device=self.device)  # every loss so far finite
        self._clock = (time.perf_counter(), 0)  # (time, step) the img/s and train_seconds count from
        # compile: the step's loss as one captured graph; the fade-in enters as a device tensor updated in
        # place, so the graph is the same at every step (one compilation per stage)
        self._alpha = torch.zeros((), dtype=self.dtype, device=self.device)
        self._coef: dict = {}
        self._coef_stage: int | None = None  # the stage _coef was made for

    # ------------------------------------------------------------------ the loop
    def run(self, callback: Callable[[Event], None] | None = None, until: int | None = None) -> dict[str, float]:
        """Train to the end and return the final metrics. With ``until``, pause once that many global
        steps are done (e.g. a stage end) and return {}: a later call continues as if never paused."""
        cb = callback or (lambda event: None)
        end = self.end_step(until)
        self.model.train()
        self.start_clock()
        while self.step < end:
            self.enter_stage()
            self.after_step(self.train_step(), cb, end)
        return self.finish(cb)

    def end_step(self, until: int | None) -> int:
        return self.cfg.total_steps if until is None else min(until, self.cfg.total_steps)

    def start_clock(self) -> None:
        self._clock = (time.perf_counter(), self.step)

    def enter_stage(self) -> None:
        """Enter the stage the next step belongs to (the family's stage hook runs once per stage)."""
        stage = self.step // self.cfg.stage_steps
        if stage != self.stage:
            self.stage = stage
            self.family.begin_stage(self.model, stage)

    @property
    def at_checkpoint(self) -> bool:
        """Whether the step just taken is a stage end or a ``checkpoint_every`` step (the state is saved)."""
        cfg, step = self.cfg, self.step
        return step % cfg.stage_steps == 0 or bool(cfg.checkpoint_every and step % cfg.checkpoint_every == 0)

    def needs_state(self, end: int) -> bool:
        """Whether the step just taken ends in an event that reads the model or saves the state."""
        return self.at_checkpoint or self.step == end

    def after_step(self, terms: dict, cb: Callable[[Event], None], end: int) -> None:
        """The events of the step just taken: progress, stage-end evaluation, checkpoint."""
        cfg, per_stage, total = self.cfg, self.cfg.stage_steps, self.cfg.total_steps
        if self.step % cfg.log_every == 0 or self.needs_state(end):  # never report, evaluate or checkpoint
            self._check_finite(terms["loss"])  # a diverged state
        if self.step % cfg.log_every == 0 or self.step == total:
            terms = {k: float(v) for k, v in terms.items()}  # a host sync only when logging
            self.last_terms = terms
            t0, n0 = self._clock
            img_s = (self.step - n0) * cfg.batch_size / max(time.perf_counter() - t0, 1e-9)
            cb(Event("step", self.step, self.stage, {**terms, "img_s": img_s}))
        if self.step % per_stage == 0:
            now = time.perf_counter()
            self.train_seconds += now - self._clock[0]
            result = self.evaluate()
            self.eval_seconds, self.evaluations = self.eval_seconds + time.perf_counter() - now, self.evaluations + 1
            self.history.append({"stage": self.stage, "step": self.step, **result})
            cb(Event("stage_end", self.step, self.stage, {**result, "stage": float(self.stage)}))
            self.start_clock()
        elif cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
            cb(Event("checkpoint", self.step, self.stage))

    def finish(self, cb: Callable[[Event], None]) -> dict[str, float]:
        if self.step < self.cfg.total_steps:  # paused at `until`
            return {}
        final = self.final_metrics()
        cb(Event("end", self.step, self.stage, final))
        return final

    def next_indices(self) -> torch.Tensor:
        """The next batch's rows, on the images' device. The order is drawn on the CPU once per epoch (the
        same order on every device) and moved once, so a step never waits for the host."""
        n, b = self.images.shape[0], self.cfg.batch_size
        if self.perm is None or self.pos + b > n:  # a new epoch (the incomplete tail is dropped)
            self.perm = torch.randperm(n, generator=self.batch_gen)
            self._perm_on_device = None
            self.pos = 0
        if self._perm_on_device is None:
            self._perm_on_device = self.perm.to(self.images.device)
        idx = self._perm_on_device[self.pos:self.pos + b]
        self.pos += b
        return idx

    def next_batch(self) -> torch.Tensor:
        """(B, C, H, W) in [0, 1], in the parameters' dtype."""
        return batches_to_float(self.images, self.next_indices(), self.data.pixel_scale, self.device, self.dtype)

    def autocast(self):
        """bfloat16 autocast for the forward pass (the loss terms are widened to float32); else nothing."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.dtype == "bfloat16")

    def train_step(self) -> dict[str, torch.Tensor | float]:
        x = self.next_batch()
        t = self.steps_into_stage
        noise = self.family.draw_noise(self.model, self.stage, x.shape[0], self.noise_gen)
        with self.autocast():
            if self.cfg.compile == "none":
                out = self.family.loss(self.model, x, self.stage, t, noise=noise)
            else:
                self._alpha.fill_(self.family.alpha(self.stage, t))
                out = self._compiled_loss(x)(self, x, self.stage, noise, self._alpha, self._coefficient_tensors())
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        self.opt.step()
        return self.stepped(out.loss, out.terms, t)

    def stepped(self, loss: torch.Tensor, terms: dict, t: int, finite_noted: bool = False
                ) -> dict[str, torch.Tensor | float]:
        """Count one optimiser step on this trial's ``loss``, taken here or by a fused group that steps its
        members at once: note whether the loss was finite (unless the group's flag, ``watch_finite``, has),
        advance the step; the step's terms."""
        if not finite_noted:
            self._finite &= torch.isfinite(loss.detach())  # checked at the next event: no per-step sync
        self.step += 1
        return self.step_terms(terms, t)

    @property
    def finite_so_far(self) -> torch.Tensor:
        """A 0-dim bool tensor: whether every loss so far was finite (read at events, never per step)."""
        return self._finite

    def watch_finite(self, flag: torch.Tensor) -> None:
        """From now on ``flag`` — a 0-dim bool view into a fused group's flags, which it updates for all its
        members at once — says whether this trial's losses were all finite."""
        self._finite = flag

    def _compiled_loss(self, x: torch.Tensor):
        """The stage's compiled loss, one per family, stage and shape of the step in a process
        (``provlae.device.compiled``: a code object of its own, so no stage's graph pushes another's past
        the recompile limit), shared by trainers of any beta and seed: the weights enter as tensors. Of the
        function, not the bound method: a bound method would hold the trainer (a reference cycle, its device
        memory freed only by the cycle collector). Called with the trainer as its first argument."""
        cfg = self.cfg
        key = (cfg.family, self.stage, tuple(x.shape), cfg.dtype, str(self.device), cfg.levels, cfg.z_dim,
               cfg.hidden, cfg.channels)
        if key not in _STAGE_LOSSES:
            _STAGE_LOSSES[key] = compiled(Trainer._loss_at)
        return _STAGE_LOSSES[key]

    def _loss_at(self, x: torch.Tensor, stage: int, noise: dict, alpha: torch.Tensor, coef: dict):
        return self.family.loss(self.model, x, stage, 0, noise=noise, alpha=alpha, coef=coef)

    def _coefficient_tensors(self) -> dict:
        """The trial's loss weights as device tensors, made once per stage: a compiled graph then holds
        no trial's beta as a constant, and trainers of other betas in this process reuse it."""
        if self._coef_stage != self.stage:
            as_tensor = lambda v: torch.as_tensor(v, dtype=self.dtype, device=self.device)  # noqa: E731
            self._coef = {k: as_tensor(v) for k, v in self.family.coefficients(self.stage).items()}
            self._coef_stage = self.stage
        return self._coef

    def step_terms(self, terms: dict, t: int) -> dict[str, torch.Tensor | float]:
        terms = {k: v.detach() for k, v in terms.items()}
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
        self._encoding = (enc, index.numpy(), factors)  # for write_representation at this stage end
        exclude = () if cfg.include_shape else datasets.DATASETS[cfg.dataset].optional_factors
        return disentanglement(enc, factors, tuple(self.data.factor_sizes), exclude_factors=exclude,
                               mi_samples=cfg.mi_samples, train_votes=cfg.factor_train_votes,
                               eval_votes=cfg.factor_eval_votes, seed=cfg.seed, device=self.device)

    def measured(self, fuse: int = 1, kernels: str = "solo"):
        """What this trial measured (``provlae.throughput.Measurement``): its training img/s (a fused
        member's: its group's, all ``fuse`` members' images) and seconds per evaluation; None before a stage
        ended."""
        from provlae.device import device_name
        from provlae.throughput import Measurement

        if self.train_seconds <= 0 or not self.evaluations:
            return None
        cfg = self.cfg
        return Measurement(device=self.device.type, device_name=device_name(self.device), dataset=cfg.dataset,
                           family=cfg.family, batch_size=cfg.batch_size, fuse=fuse, kernels=kernels,
                           dtype=cfg.dtype, compile=cfg.compile,
                           train_img_s=fuse * self.step * cfg.batch_size / self.train_seconds,
                           eval_s=self.eval_seconds / self.evaluations, eval_images=len(self.eval_index()),
                           source="trial", measured_at=time.time(), mi_samples=cfg.mi_samples)

    def final_metrics(self) -> dict[str, float]:
        """The last stage's evaluation plus the final training loss (model-derived numbers only)."""
        final = {k: v for k, v in self.history[-1].items() if k not in ("stage", "step")}
        final["loss"] = self.last_terms.get("loss", float("nan"))
        return final

    def write_stage_figures(self, out_dir: str | Path) -> list[Path]:
        """The paper's Fig. 5 panel and Fig. 4 traversal of the stage just ended, into
        ``out_dir/stage<s>/``: call it on a ``stage_end`` event."""
        return self._stage_figures(Path(out_dir) / f"stage{self.history[-1]['stage']}")

    def write_representation(self, out_dir: str | Path) -> Path:
        """The stage just ended, as ``out_dir/stage<s>.npz`` (``provlae.representation``): call it on a
        ``stage_end`` event."""
        enc, index, factors = self._encoding
        rows = representation.stored_rows(len(index), self.cfg.data_seed)
        in_use, level = np.zeros(enc.mu.shape[1], dtype=bool), np.zeros(enc.mu.shape[1], dtype=np.int64)
        in_use[enc.in_use] = True
        for columns, lid in zip(enc.levels, enc.level_ids):
            level[columns] = lid
        last = self.history[-1]
        rep = representation.Representation(
            stage=last["stage"], step=last["step"], mu=enc.mu[rows], logvar=enc.logvar[rows], index=index[rows],
            factors=np.asarray(factors)[rows], in_use=in_use, level=level,
            kl=representation.kl_per_latent(enc.mu[rows], enc.logvar[rows]))
        return representation.write(Path(out_dir) / f"stage{last['stage']}.npz", rep)

    def write_figures(self, out_dir: str | Path) -> list[Path]:
        """The trained model's figures into ``out_dir``: the last stage's Fig. 5 panel and Fig. 4 traversal,
        the traversals and prior samples per level, and I(x; z_l) per stage."""
        out_dir = Path(out_dir)
        stage = max(self.stage, 0)
        paths = self._stage_figures(out_dir) if self.history else []
        paths += model_figures(self.model, self.family, stage, self.steps_into_stage, self.images,
                               self.data.pixel_scale, self.device, out_dir, seed=self.cfg.seed)
        mi = information_per_stage(self.history, self.cfg.levels, out_dir / "information_per_stage.png")
        return paths + ([mi] if mi else [])

    def _stage_figures(self, out_dir: Path) -> list[Path]:
        last = self.history[-1]
        return stage_figures(self.model, self.family, last["stage"], self.steps_into_stage, self.images,
                             self.data.pixel_scale, self.device, last, out_dir, seed=self.cfg.seed)

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
            "device_type": self.device.type,  # the noise generator's state is only valid on this type
            "perm": self.perm,
            "pos": self.pos,
            "history": self.history,
            "last_terms": self.last_terms,
            "train_seconds": self.train_seconds,
            "eval_seconds": self.eval_seconds,
            "evaluations": self.evaluations,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "numpy": numpy_state_to_plain(np.random.get_state()),
                "python": random.getstate(),
                "batches": self.batch_gen.get_state(),
                "noise": self.noise_gen.get_state(),
            },
        }

    def save_checkpoint(self, path: str | Path) -> Path:
        """Write the full training state to one file, atomically (never a half-written checkpoint)."""
        path = Path(path)
        with atomic_path(path) as tmp:
            torch.save(self.state_dict(), tmp)
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        """Read to the CPU; ``load_state_dict`` places each tensor. So Adam's ``step`` counters stay on the
        CPU, as a fresh optimizer keeps them: read onto a GPU, every step would read them back to the host
        (``.item()`` per parameter tensor)."""
        self.load_state_dict(read_checkpoint(path, "cpu"), path)

    def load_state_dict(self, state: dict, path: str | Path = "<state>") -> None:
        if not isinstance(state, dict) or state.get("version") not in READABLE_VERSIONS:
            version = state.get("version") if isinstance(state, dict) else None
            raise ConfigError(f"checkpoint {path} has version {version}, expected one of "
                              f"{', '.join(map(str, READABLE_VERSIONS))}")
        mine, theirs = self.cfg.identity(), config_identity(state["config"])
        differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if differ:
            raise ConfigError(f"checkpoint {path} was written for a different config "
                              f"(differs in: {', '.join(differ)})")
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.family.load_state_dict(state["family"], self.model)
        self.step, self.stage, self.pos = state["step"], state["stage"], state["pos"]
        self.perm = None if state["perm"] is None else state["perm"].cpu()
        self._perm_on_device = None
        self.history, self.last_terms = state["history"], state["last_terms"]
        self.train_seconds = state["train_seconds"]
        self.eval_seconds = state.get("eval_seconds", 0.0)  # (checkpoints written before they were counted)
        self.evaluations = state.get("evaluations", 0)
        rng = state["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        if rng["cuda"] is not None and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
        np.random.set_state(numpy_state_from_plain(rng["numpy"]))
        random.setstate(rng["python"])
        self.batch_gen.set_state(rng["batches"].cpu())
        if state.get("device_type", "cpu") == self.device.type:
            self.noise_gen.set_state(rng["noise"].cpu())
        else:  # written on another device type: its generator state means nothing here
            self.noise_gen.manual_seed(self.cfg.seed + 1 + 1_000_003 * self.step)
            self.resumed_across_devices = True
