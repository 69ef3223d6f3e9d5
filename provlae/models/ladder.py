"""The ladder network of pro-VLAE (paper §3.1-3.3, Fig. 1; authors' 64x64 reference architecture).

One module serves every family: ``level_dims[l]`` says how many latents level l+1 has (0: no head and no
m_l at that level, as in a beta-VAE whose single code sits at the deepest level). Which levels take part
in a forward pass, and with what fade-in, is decided by the family through ``Gates``; the network only
applies them.

Shapes for a 64x64 image and L = 3 levels (C channels of 32, "s2" = stride 2):
  encoder trunk  x (B,C,64,64) -> h1 (B,32,32,32) -> h2 (B,32,16,16) -> h3 (B,32,8,8)     eq. (4)
  ladder head l  conv s2 on h_l -> flatten -> dense 256 -> mu_l, logvar_l (B, z_l)        eq. (6), (9)
  decoder        g3 = deconv(dense(dense(z3)) as (B,32,4,4)) -> (B,32,8,8)                 eq. (5)
                 g_l = deconv([alpha * m_l(z_l); g_{l+1}]) for l < L                       eq. (7), (9)
                 logits = deconv(g1) -> (B,C,64,64)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from provlae.errors import ConfigError


@dataclass
class Gates:
    """How the family drives the ladder in one step.

    enc[l]: multiplies the head input h_l (fade-in alpha, eq. 9); dec[l]: multiplies m_l(z_l) in the
    decoder (alpha for the newest level, 0 for levels not grown yet); dim_mask[l]: optional (z_l,) 0/1
    mask of the latents in use (teacher-student grows the code dimension by dimension block). A gate is a
    float, or a 0-dim tensor (the fade-in of a captured or compiled step, which must not be a constant).
    """

    enc: list[float | torch.Tensor]
    dec: list[float | torch.Tensor]
    dim_mask: list[torch.Tensor | None]

    def masked(self, codes: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """Per-level codes with the latents not in use zeroed."""
        return [c if c is None or m is None else c * m for c, m in zip(codes, self.dim_mask)]


@dataclass
class LadderOutput:
    logits: torch.Tensor  # (B, C, H, W) Bernoulli logits
    mu: list[torch.Tensor | None]  # per level, lowest first; None where the level has no latents
    logvar: list[torch.Tensor | None]
    z: list[torch.Tensor | None]  # the codes fed to the decoder (masked, before the dec gate)


def _gated(t: torch.Tensor, gate: float | torch.Tensor) -> torch.Tensor:
    """t * gate, skipped for a float gate of exactly 1 (a tensor gate is always applied: no host sync)."""
    return t if isinstance(gate, float) and gate == 1.0 else t * gate


def check_image_shape(image_shape: tuple[int, int, int], levels: int) -> None:
    """The ladder halves the side L+1 times down to the decoder's first feature map."""
    _, size, width = image_shape
    if size != width or size % 2 ** (levels + 1) or size < 2 ** (levels + 1):
        raise ConfigError(f"images must be square with a side divisible by 2^(levels+1) = {2 ** (levels + 1)} "
                          f"for levels={levels}, got {size}x{width}")


def _conv(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 4, stride=2, padding=1)


def _deconv(cin: int, cout: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1)


class LadderVAE(nn.Module):
    def __init__(self, image_shape: tuple[int, int, int], level_dims: list[int], channels: int = 32,
                 hidden: int = 256):
        super().__init__()
        c_in, size, _ = image_shape
        levels = len(level_dims)
        check_image_shape(image_shape, levels)
        self.image_shape = image_shape
        self.level_dims = list(level_dims)
        self.levels = levels
        ch = channels
        # Side of h_l is size / 2^l; side of a head's conv output and of g_{l+1} is size / 2^(l+1).
        self.trunk = nn.ModuleList(_conv(c_in if l == 0 else ch, ch) for l in range(levels))
        self.heads = nn.ModuleList()
        self.m = nn.ModuleList()
        for l, d in enumerate(level_dims):
            side = size // 2 ** (l + 2)  # head conv output side of level l+1
            if d == 0:
                self.heads.append(None)
                self.m.append(None)
                continue
            self.heads.append(nn.Sequential(_conv(ch, ch), nn.ELU(), nn.Flatten(),
                                            nn.Linear(ch * side * side, hidden), nn.ELU(),
                                            nn.Linear(hidden, 2 * d)))
            if l < levels - 1:  # m_l: dense -> dense -> (B, ch, side, side), the shape of g_{l+1}
                self.m.append(nn.Sequential(nn.Linear(d, hidden), nn.ELU(),
                                            nn.Linear(hidden, ch * side * side), nn.ELU(),
                                            nn.Unflatten(1, (ch, side, side))))
            else:  # the deepest level's m is f_L^d: dense -> dense -> (B, ch, s0, s0)
                s0 = size // 2 ** (levels + 1)
                self.m.append(nn.Sequential(nn.Linear(d, hidden), nn.ELU(),
                                            nn.Linear(hidden, ch * s0 * s0), nn.ELU(),
                                            nn.Unflatten(1, (ch, s0, s0))))
        if level_dims[-1] == 0:
            raise ValueError("the deepest level must have latents")
        # deconv[l] produces g_{l+1}... indexing: dec_convs[l] maps level l+1's input to side size/2^(l+1)
        self.dec_convs = nn.ModuleList(
            _deconv(ch if (l == levels - 1 or level_dims[l] == 0) else 2 * ch, ch) for l in range(levels))
        self.out_conv = _deconv(ch, c_in)

    # ------------------------------------------------------------------ encoder
    def encode(self, x: torch.Tensor, gates: Gates) -> tuple[list, list]:
        """Posterior parameters per level (None for levels without latents)."""
        mus, logvars = [], []
        h = x
        for l in range(self.levels):
            h = F.elu(self.trunk[l](h))  # h_l, eq. (4)
            head = self.heads[l]
            if head is None:
                mus.append(None)
                logvars.append(None)
                continue
            inp = _gated(h, gates.enc[l])  # mu_l(alpha h_l), eq. (9)
            mu, logvar = head(inp).chunk(2, dim=1)
            mus.append(mu)
            logvars.append(logvar)
        return mus, logvars

    # ------------------------------------------------------------------ decoder
    def decode(self, zs: list[torch.Tensor | None], gates: Gates) -> torch.Tensor:
        """Bernoulli logits from per-level codes (lowest first); gates.dec weighs each m_l(z_l)."""
        g = None
        for l in reversed(range(self.levels)):
            if self.m[l] is None:
                inp = g
            elif l == self.levels - 1:
                inp = self.m[l](zs[l])  # f_L^d(z_L)
            else:
                ml = self.m[l](zs[l])
                inp = torch.cat([_gated(ml, gates.dec[l]), g], dim=1)  # eq. (7)
            g = F.elu(self.dec_convs[l](inp))
        return self.out_conv(g)

    def draw_noise(self, batch: int, generator: torch.Generator | None = None, dtype=None,
                   device=None) -> list[torch.Tensor | None]:
        """The posterior noise of one forward pass, per level (lowest first; None without latents):
        what ``forward`` would draw from ``generator``, drawn ahead so a fused group can stack it."""
        p = next(self.parameters())
        dtype, device = dtype or p.dtype, device or p.device
        return [None if d == 0 else torch.randn((batch, d), device=device, dtype=dtype, generator=generator)
                for d in self.level_dims]

    def forward(self, x: torch.Tensor, gates: Gates, sample: bool = True,
                generator: torch.Generator | None = None,
                eps: list[torch.Tensor | None] | None = None) -> LadderOutput:
        """``eps``: the noise per level (``draw_noise``); without it, drawn here from ``generator``."""
        mus, logvars = self.encode(x, gates)
        if sample and eps is None:
            eps = self.draw_noise(x.shape[0], generator, device=x.device)
        zs = []
        for l, (mu, logvar) in enumerate(zip(mus, logvars)):
            if mu is not None and sample:
                mu = mu + eps[l].to(mu.dtype) * torch.exp(0.5 * logvar)  # reparametrisation, (B, z_l)
            zs.append(mu)
        zs = gates.masked(zs)
        return LadderOutput(self.decode(zs, gates), mus, logvars, zs)
