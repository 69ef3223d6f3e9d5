"""The four model families (paper §4): how each one drives the same ladder network.

A family says which levels (or latent dimensions) are active at a stage, the fade-in gates, the weight
of each level's KL term, and any extra loss; the trainer loop is shared. Every family has the same total
number of latents (levels * z_dim) and trains for the same total number of steps. New families register
by name with ``@register("name")``, override the hooks they need, and declare on the class what the rest
of the system needs to know (``progressive``, ``fixed_beta``, ``member_fields``, ``search_ranges``,
``display_order``): the grid, the search, fused groups and the analysis read it from here. A family in
the user's own module is loaded by name (``provlae.plugins``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch.nn import functional as F

from provlae.errors import ConfigError
from provlae.models.ladder import Gates, LadderOutput, LadderVAE

if TYPE_CHECKING:  # annotations only: the config imports the registries, never the other way round
    from provlae.config import TrialConfig

FAMILIES: dict[str, type[Family]] = {}
# Hooks a family must define itself or inherit from Family: a class that is not a Family subclass (or
# shadows one with something not callable) is refused at registration.
REQUIRED_HOOKS = ("level_dims", "active_levels", "alpha", "gates_at", "kl_weights", "coefficients",
                  "draw_noise", "loss", "extra_loss", "frozen_modules", "begin_stage", "state_dict",
                  "load_state_dict", "information_levels")


def register(name: str):
    """Class decorator: register a Family subclass under ``name``. A clash with a registered name, a class
    that is not a Family, or a hook replaced by something not callable is a ConfigError."""

    def wrap(cls):
        missing = [h for h in REQUIRED_HOOKS if not callable(getattr(cls, h, None))]
        if not (isinstance(cls, type) and issubclass(cls, Family)):
            lacks = f" (it lacks {', '.join(missing)})" if missing else ""
            raise ConfigError(f"family {name!r}: {cls!r} is not a subclass of provlae.models.Family{lacks}")
        if missing:
            raise ConfigError(f"family {name!r} ({cls.__module__}.{cls.__qualname__}) is missing the "
                              f"hook(s) {', '.join(missing)}")
        old = FAMILIES.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ConfigError(f"family {name!r} of {cls.__module__} clashes with the family of that name "
                              f"in {old.__module__}: choose another name")
        cls.name = name
        FAMILIES[name] = cls
        return cls
    return wrap


def family_class(name: str) -> type[Family]:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(f"unknown family {name!r} (choose from {', '.join(family_names())}; a family "
                          f"of your own module loads with --plugin MODULE)") from None


def family_names() -> list[str]:
    """Every registered family, in display order (built-ins first, then by name)."""
    return sorted(FAMILIES, key=lambda n: (FAMILIES[n].display_order, n))


def build_family(cfg: TrialConfig) -> Family:
    return family_class(cfg.family)(cfg)


@dataclass
class LossOutput:
    """The loss to minimise plus its named terms (floats or 0-dim tensors) for logging."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


def bernoulli_nll(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-image negative log-likelihood, summed over pixels: (B,)."""
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)


def wide(t: torch.Tensor) -> torch.Tensor:
    """Half-precision activations (bfloat16 autocast) widened to float32 for the loss; others as they are."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over (masked) dims, mean over the batch."""
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)  # (B, z)
    if mask is not None:
        kl = kl * mask
    return kl.sum(1).mean()


class Family:
    name = "base"
    # What the rest of the system knows about a family, declared here and nowhere else:
    progressive: ClassVar[bool] = False  # True: levels stages of steps_per_stage; False: one stage
    fixed_beta: ClassVar[float | None] = None  # a family without a beta to sweep runs once, at this beta
    member_fields: ClassVar[tuple[str, ...]] = ()  # config fields in ``coefficients`` besides beta
    display_order: ClassVar[int] = 100  # position in tables and figures (built-ins 0-3; plug-ins after)
    paper_rank: ClassVar[int | None] = None  # the paper's finding on MIG / MIG-sup: 1 = best (Fig. 2/3)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # The paper ranked the classes that declare a rank: a subclass (a variation of pro-VLAE, say) is
        # not the family the paper measured, so it is not in the paper's ordering or headline grid.
        cls.paper_rank = cls.__dict__.get("paper_rank")

    @classmethod
    def search_ranges(cls, base: TrialConfig) -> dict[str, tuple[str, float, float]]:
        """Config fields an adaptive search varies besides beta and lr, as field -> (kind, low, high),
        kind one of "uniform", "loguniform", "int"; ``base`` is the search's base config."""
        return {}

    @classmethod
    def stages(cls, cfg: TrialConfig) -> int:
        return cfg.levels if cls.progressive else 1

    def __init__(self, cfg: TrialConfig):
        self.cfg = cfg
        self.L = cfg.levels

    # ---------------------------------------------------------------- structure
    def level_dims(self) -> list[int]:
        """Latents per level, lowest first."""
        return [self.cfg.z_dim] * self.L

    def information_levels(self) -> list[tuple[int, int, list[int]]]:
        """The levels of the information terms I(x; z_l) (paper Fig. 5), lowest first, as (level number,
        ladder level index, latent indices within that ladder level). Every level counts at every stage,
        grown or not: by default the ladder's levels that have latents."""
        return [(l + 1, l, list(range(d))) for l, d in enumerate(self.level_dims()) if d > 0]

    @property
    def num_stages(self) -> int:
        return self.cfg.num_stages

    def active_levels(self, stage: int) -> list[int]:
        """0-based indices of the levels used in generation at this stage."""
        return [l for l, d in enumerate(self.level_dims()) if d > 0]

    def alpha(self, stage: int, t: int) -> float:
        """Fade-in coefficient of the newest level, t steps after its stage began."""
        return 1.0

    def gates(self, stage: int, t: int, device) -> Gates:
        return self.gates_at(stage, self.alpha(stage, t), device)

    def gates_at(self, stage: int, alpha, device) -> Gates:
        """The gates at a given fade-in ``alpha`` (a float, or a 0-dim tensor in a compiled step)."""
        active = set(self.active_levels(stage))
        return Gates(enc=[1.0] * self.L, dec=[1.0 if l in active else 0.0 for l in range(self.L)],
                     dim_mask=[None] * self.L)

    def kl_weights(self, stage: int) -> list[float]:
        """Weight of KL_l in the loss: beta for levels in use, 0 for the rest."""
        active = set(self.active_levels(stage))
        return [self.cfg.beta if l in active else 0.0 for l in range(self.L)]

    # ---------------------------------------------------------------- what differs between trials
    def coefficients(self, stage: int) -> dict[str, Any]:
        """The trial's own weights in the loss at this stage. A fused group (provlae/fused.py) stacks
        them per member, so everything else in ``loss`` must depend only on fields the members share."""
        return {"kl": self.kl_weights(stage)}

    def draw_noise(self, model: LadderVAE, stage: int, batch: int, generator: torch.Generator | None = None,
                   device=None) -> dict[str, Any]:
        """Every random number of one training step, in the order the step uses them."""
        device = device if device is not None else next(model.parameters()).device
        return {"eps": model.draw_noise(batch, generator, device=device)}

    # ---------------------------------------------------------------- objective
    def loss(self, model: LadderVAE, x: torch.Tensor, stage: int, t: int,
             generator: torch.Generator | None = None, noise: dict | None = None,
             coef: dict | None = None, alpha=None) -> LossOutput:
        """``noise`` (``draw_noise``) holds the step's randomness; without it, it is drawn from
        ``generator``. ``coef`` (``coefficients``) the trial's weights; without it, this family's own.
        ``alpha`` (a 0-dim tensor) replaces the fade-in that ``t`` gives, for a compiled step."""
        if noise is None:
            noise = self.draw_noise(model, stage, x.shape[0], generator, device=x.device)
        coef = self.coefficients(stage) if coef is None else coef
        gates = self.gates(stage, t, x.device) if alpha is None else self.gates_at(stage, alpha, x.device)
        out = model(x, gates, eps=noise["eps"])
        recon = bernoulli_nll(wide(out.logits), x).mean()
        terms = {"recon": recon}
        total = recon
        for l in range(self.L):
            if out.mu[l] is None:
                continue
            kl = gaussian_kl(wide(out.mu[l]), wide(out.logvar[l]), gates.dim_mask[l])
            terms[f"kl_z{l + 1}"] = kl
            total = total + coef["kl"][l] * kl  # a weight of 0 adds exactly 0
        extra = self.extra_loss(model, x, out, stage, noise, coef)
        for k, v in extra.items():
            terms[k] = v
            total = total + v
        terms["loss"] = total
        return LossOutput(total, terms)

    def extra_loss(self, model: LadderVAE, x: torch.Tensor, out: LadderOutput, stage: int,
                   noise: dict, coef: dict) -> dict:
        return {}

    def frozen_modules(self) -> dict[str, LadderVAE]:
        """Networks the loss reads but does not train (a teacher): a fused group stacks them too."""
        return {}

    # ---------------------------------------------------------------- stage boundaries and state
    def begin_stage(self, model: LadderVAE, stage: int) -> None:
        """Called when training enters a stage (also after a resume landed on a stage boundary)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict, model: LadderVAE) -> None:
        pass


@register("vlae")
class VLAE(Family):
    """All levels active from step 0; loss = recon + beta * sum_l KL_l."""

    display_order, paper_rank = 1, 2


@register("beta_vae")
class BetaVAE(Family):
    """One code of levels*z_dim latents at the deepest level; loss = recon + beta * KL."""

    display_order, paper_rank = 0, 3

    def level_dims(self) -> list[int]:
        return [0] * (self.L - 1) + [self.L * self.cfg.z_dim]


@register("pro_vlae")
class ProVLAE(Family):
    """Levels grown from the deepest (l = L) down, one per stage, with fade-in and the gamma pre-KL."""

    progressive, display_order, paper_rank = True, 2, 1
    member_fields = ("gamma",)

    @classmethod
    def search_ranges(cls, base: TrialConfig) -> dict[str, tuple[str, float, float]]:
        return {"gamma": ("uniform", 0.0, 1.0), "fade_in_steps": ("int", 0, base.steps_per_stage)}

    def active_levels(self, stage: int) -> list[int]:
        return list(range(self.L - 1 - stage, self.L))

    def alpha(self, stage: int, t: int) -> float:
        if stage == 0 or self.cfg.fade_in_steps == 0:
            return 1.0
        return min(1.0, t / self.cfg.fade_in_steps)

    def gates_at(self, stage: int, alpha, device) -> Gates:
        new = self.L - 1 - stage  # the level added at this stage
        a = alpha
        enc = [a if l == new else 1.0 for l in range(self.L)]
        dec = [0.0 if l < new else (a if l == new else 1.0) for l in range(self.L)]  # inactive: 0
        return Gates(enc=enc, dec=dec, dim_mask=[None] * self.L)

    def kl_weights(self, stage: int) -> list[float]:
        # eq. (8) beta on levels in use; eq. (10) gamma on levels not grown yet
        new = self.L - 1 - stage
        return [self.cfg.gamma if l < new else self.cfg.beta for l in range(self.L)]


@register("teacher_student")
class TeacherStudent(Family):
    """Lezama (2019): the code at the deepest level grows by z_dim dims per stage.

    Stage 0 is a plain VAE (the teacher). Each later stage is a student that inherits the teacher's
    weights for its first dims and adds z_dim new ones; a frozen copy of the model at the stage start
    is the teacher. Constraints C = lambda_y * mean((y_T - y_S)^2) + lambda_xcov * ||Z^T Y||_F / B
    + lambda_jac * mean((Delta_T - Delta_S)^2), with Z, Y the batch-centred new and inherited codes and
    Delta = D(y) - D(y with the inherited code permuted within the batch). Lezama's training sums the
    ELBO over the batch and adds C; the loss here is that sum divided by B (the ELBO's batch mean + C / B),
    so the lambdas weigh as they do there.

    For the information terms each growth block of z_dim latents is a level: the block grown at stage s
    is level L - s, as the level pro-VLAE grows at stage s (the teacher's block is z_L). A block not grown
    yet is not part of the code (the decoder never sees it): it is encoded as its prior.
    """

    progressive, fixed_beta, display_order = True, 1.0, 3  # no beta to sweep: it runs at beta = 1
    member_fields = ("lambda_y", "lambda_xcov", "lambda_jac")

    def __init__(self, cfg: TrialConfig):
        super().__init__(cfg)
        self.teacher: LadderVAE | None = None
        self.teacher_stage = -1

    def level_dims(self) -> list[int]:
        return [0] * (self.L - 1) + [self.L * self.cfg.z_dim]

    def information_levels(self) -> list[tuple[int, int, list[int]]]:
        z, top = self.cfg.z_dim, self.L - 1
        blocks = [(self.L - b, top, list(range(b * z, (b + 1) * z))) for b in range(self.L)]
        return sorted(blocks)

    def _mask(self, stage: int, device) -> torch.Tensor:
        m = torch.zeros(self.L * self.cfg.z_dim, device=device)
        m[: (stage + 1) * self.cfg.z_dim] = 1.0
        return m

    def gates_at(self, stage: int, alpha, device) -> Gates:
        return Gates(enc=[1.0] * self.L, dec=[1.0] * self.L,
                     dim_mask=[None] * (self.L - 1) + [self._mask(stage, device)])

    def begin_stage(self, model: LadderVAE, stage: int) -> None:
        if stage == 0 or self.teacher_stage == stage:
            return
        self.teacher = copy.deepcopy(model).eval().requires_grad_(False)
        self.teacher_stage = stage

    def frozen_modules(self) -> dict[str, LadderVAE]:
        return {} if self.teacher is None else {"teacher": self.teacher}

    def coefficients(self, stage: int) -> dict[str, Any]:
        cfg = self.cfg
        return {**super().coefficients(stage), "lambda_y": cfg.lambda_y, "lambda_xcov": cfg.lambda_xcov,
                "lambda_jac": cfg.lambda_jac}

    def draw_noise(self, model: LadderVAE, stage: int, batch: int, generator: torch.Generator | None = None,
                   device=None) -> dict[str, Any]:
        noise = super().draw_noise(model, stage, batch, generator, device)
        if stage > 0:  # the permutation of the Jacobian term, drawn after the posterior samples
            noise["perm"] = torch.randperm(batch, device=noise["eps"][-1].device, generator=generator)
        return noise

    def extra_loss(self, model: LadderVAE, x: torch.Tensor, out: LadderOutput, stage: int,
                   noise: dict, coef: dict) -> dict:
        if stage == 0:
            return {}
        cfg, top = self.cfg, self.L - 1
        k = stage * cfg.z_dim  # inherited dims
        perm = noise["perm"]
        with torch.no_grad():
            t_mu, _ = self.teacher.encode(x, _all_on(self.L))
            y_t = wide(t_mu[top][:, :k])  # (B, k)
            d_t = self._delta(self.teacher, _pad(y_t, cfg), perm, k, stage - 1)
        mu = wide(out.mu[top])
        y_s = mu[:, :k]
        z_new = mu[:, k: k + cfg.z_dim]
        d_s = self._delta(model, mu * self._mask(stage, x.device), perm, k, stage)
        per_image = 1.0 / x.shape[0]  # the constraints against the ELBO's batch mean (class docstring)
        return {"ts_y": coef["lambda_y"] * (y_t - y_s).pow(2).mean() * per_image,
                "ts_xcov": coef["lambda_xcov"] * cross_covariance(z_new, y_s) * per_image,
                "ts_jac": coef["lambda_jac"] * (d_t - d_s).pow(2).mean() * per_image}

    def _delta(self, net: LadderVAE, code: torch.Tensor, perm: torch.Tensor, k: int, stage: int):
        """D(code) - D(code with its first k dims permuted within the batch), as probabilities."""
        swapped = code.clone()
        swapped[:, :k] = code[perm, :k]
        gates = self.gates(stage, 0, code.device)
        zs = [None] * (self.L - 1)
        both = torch.cat([code, swapped])
        probs = torch.sigmoid(wide(net.decode(zs + [both], gates)))
        a, b = probs.chunk(2)
        return a - b

    def state_dict(self) -> dict:
        return {"teacher": None if self.teacher is None else self.teacher.state_dict(),
                "teacher_stage": self.teacher_stage}

    def load_state_dict(self, state: dict, model: LadderVAE) -> None:
        self.teacher_stage = state["teacher_stage"]
        if state["teacher"] is not None:
            self.teacher = copy.deepcopy(model).eval().requires_grad_(False)
            self.teacher.load_state_dict(state["teacher"])


def cross_covariance(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """||Z^T Y||_F / B for (B, m) and (B, k) codes, each centred over the batch (Lezama 2019, eq. 5)."""
    zc, yc = z - z.mean(0), y - y.mean(0)
    return (zc.T @ yc).norm() / z.shape[0]


def _all_on(levels: int) -> Gates:
    return Gates(enc=[1.0] * levels, dec=[1.0] * levels, dim_mask=[None] * levels)


def _pad(y: torch.Tensor, cfg: TrialConfig) -> torch.Tensor:
    """Teacher code (B, k) padded with zeros to the full code width."""
    return F.pad(y, (0, cfg.levels * cfg.z_dim - y.shape[1]))
