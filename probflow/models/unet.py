"""A compact ε-UNet in plain torch for small images (8×8 digits, generally H, W divisible by 2^levels).

    ε_θ(x_t, t):  x_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε  (the model's variable x, docs/MATH.md §1)

t is a *continuous* timestep (float, shape (B,)) on the DDPM table's scale 0 … T−1, embedded with
sinusoids, so the network can be asked for ε between table entries: `probflow.models.adapters.DiscreteTimeModel`
maps σ → t(σ) (docs/MATH.md §5) and turns it into an ε-model over σ.

Architecture: conv in; per resolution `blocks` residual blocks (GroupNorm, SiLU, 3×3 conv, additive
time embedding); stride-2 conv down; a middle pair of residual blocks; nearest-neighbour up + conv, with
skip connections concatenated; GroupNorm, SiLU, conv out (zero-initialised, so ε_θ starts at 0).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["UNet", "timestep_embedding"]


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of a float timestep: [cos(t·ω_k), sin(t·ω_k)], ω_k = max_period^(−k/(dim/2)).

    t: shape (B,), any real value (the continuous t of docs/MATH.md §5); returns (B, dim) in t's dtype.
    """
    half = dim // 2
    k = torch.arange(half, dtype=t.dtype, device=t.device)
    freqs = torch.exp(-math.log(max_period) * k / half)
    ang = t.reshape(-1, 1) * freqs
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=1)


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, ch), ch)


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb: int) -> None:
        super().__init__()
        self.n1, self.c1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, cout)
        self.n2, self.c2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.c2.weight)
        nn.init.zeros_(self.c2.bias)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        h = self.c1(torch.nn.functional.silu(self.n1(x)))
        h = h + self.emb(e)[:, :, None, None]
        h = self.c2(torch.nn.functional.silu(self.n2(h)))
        return self.skip(x) + h


MAX_LEVELS, MAX_BLOCKS, MAX_WIDTH = 16, 64, 1 << 16  # bounds on a config, checked before anything is built


def _size(v: object, name: str, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi:
        raise ValueError(f"{name}: expected an integer in [1, {hi}], got {v!r}")
    return v


def _check_config(in_channels: object, channels: object, blocks: object, emb_dim: object) -> None:
    """Every size a positive integer within MAX_LEVELS resolutions, MAX_BLOCKS blocks and MAX_WIDTH channels, so
    that a config's size is bounded before the (meta-device) build that counts its parameters."""
    _size(in_channels, "in_channels", MAX_WIDTH)
    if not isinstance(channels, (list, tuple)) or not 1 <= len(channels) <= MAX_LEVELS:
        n = len(channels) if isinstance(channels, (list, tuple)) else type(channels).__name__
        raise ValueError(f"channels: expected a list of 1 to {MAX_LEVELS} widths, got {n}")
    for i, c in enumerate(channels):
        _size(c, f"channels[{i}]", MAX_WIDTH)
    _size(blocks, "blocks", MAX_BLOCKS)
    if emb_dim is not None:
        _size(emb_dim, "emb_dim", MAX_WIDTH)


class UNet(nn.Module):
    """ε_θ(x, t) for images (B, C, H, W); `channels[i]` feature maps at resolution H/2^i.

    The constructor's arguments are the whole configuration (`config()` returns them), so a checkpoint
    is the config plus a state_dict.
    """

    def __init__(self, in_channels: int = 1, channels: tuple[int, ...] = (64, 128), blocks: int = 2,
                 emb_dim: int | None = None) -> None:
        super().__init__()
        _check_config(in_channels, channels, blocks, emb_dim)
        channels = tuple(int(c) for c in channels)
        self.in_channels, self.channels, self.blocks = in_channels, channels, blocks
        self.emb_dim = emb_dim or 4 * channels[0]
        self.t_dim = channels[0]
        self.t_mlp = nn.Sequential(nn.Linear(self.t_dim, self.emb_dim), nn.SiLU(),
                                   nn.Linear(self.emb_dim, self.emb_dim))
        self.inp = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.down = nn.ModuleList()
        skips = [channels[0]]
        ch = channels[0]
        for i, c in enumerate(channels):
            for _ in range(blocks):
                self.down.append(_ResBlock(ch, c, self.emb_dim))
                ch = c
                skips.append(ch)
            if i < len(channels) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
        self.mid = nn.ModuleList([_ResBlock(ch, ch, self.emb_dim), _ResBlock(ch, ch, self.emb_dim)])
        self.up = nn.ModuleList()
        for i, c in reversed(list(enumerate(channels))):
            for _ in range(blocks + 1):
                self.up.append(_ResBlock(ch + skips.pop(), c, self.emb_dim))
                ch = c
            if i > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(ch, ch, 3, padding=1)))
        self.out = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(ch, in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def config(self) -> dict:
        return {"in_channels": self.in_channels, "channels": list(self.channels), "blocks": self.blocks,
                "emb_dim": self.emb_dim}

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """ε_θ(x_t, t): x (B, C, H, W), t float of shape (B,) (or a scalar, broadcast)."""
        tdt = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32  # t ≤ 999 needs ≥ 24 bits
        t = torch.as_tensor(t, dtype=tdt, device=x.device).reshape(-1).expand(x.shape[0])
        e = self.t_mlp(timestep_embedding(t, self.t_dim).to(x.dtype))
        h = self.inp(x)
        hs = [h]
        for m in self.down:
            h = m(h, e) if isinstance(m, _ResBlock) else m(h)
            hs.append(h)
        for m in self.mid:
            h = m(h, e)
        for m in self.up:
            h = m(torch.cat([h, hs.pop()], dim=1), e) if isinstance(m, _ResBlock) else m(h)
        return self.out(h)
