"""Analytic ε-models: exact at every σ and give the ground truth for every accuracy claim.

All follow the protocol of `probflow.field`: `model(x, sigma) -> eps`, x = x̄/sqrt(1+σ²) in the model's
variable, a batch (B, *S) flattened to (B, D) inside. With the σ-marginal p_σ(x̄) = ∫ p_0(y) N(x̄; y, σ²I) dy,

    ε*(x, σ) = −σ ∇_x̄ log p_σ(x̄) = (x̄ − D(x̄; σ))/σ,        x̄ = x·sqrt(1+σ²)

which equals −sqrt(1−ᾱ) ∇_x log p_t(x) (docs/MATH.md §2). Densities are of x̄ at noise level σ.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["GaussianMixture", "IdealDenoiser", "default_mixture"]


def _xbar(x: Tensor, sigma: Tensor) -> Tensor:
    return (x * torch.sqrt(1.0 + sigma * sigma)).reshape(x.shape[0], -1)


class GaussianMixture:
    """p_0 = Σ_k w_k N(μ_k, Σ_k) in R^D; its σ-marginal is Σ_k w_k N(μ_k, Σ_k + σ²I), so ε is exact.

    weights (K,), means (K, D), covs (K, D, D) symmetric positive definite. Stored in float64; evaluated
    in the dtype of the input. Each Σ_k is diagonalised once (Σ_k = U_k diag(λ_k) U_kᵀ), so Σ_k + σ²I is
    inverted at any σ in O(D²) per component.
    """

    def __init__(self, weights: Tensor, means: Tensor, covs: Tensor) -> None:
        w = torch.as_tensor(weights, dtype=torch.float64)
        mu = torch.as_tensor(means, dtype=torch.float64)
        cov = torch.as_tensor(covs, dtype=torch.float64)
        if w.ndim != 1 or mu.ndim != 2 or mu.shape[0] != w.shape[0]:
            raise ValueError(f"means: expected shape (K, D), K = len(weights) = {w.shape[0]}, got {tuple(mu.shape)}")
        K, D = mu.shape  # noqa: N806
        if cov.shape != (K, D, D):
            raise ValueError(f"covs: expected shape {(K, D, D)}, got {tuple(cov.shape)}")
        if (w <= 0).any() or not torch.isfinite(w).all():
            raise ValueError("weights: expected positive finite weights")
        if not torch.allclose(cov, cov.transpose(1, 2), atol=1e-12):
            raise ValueError("covs: expected symmetric matrices")
        lam, U = torch.linalg.eigh(cov)  # noqa: N806
        if (lam <= 0).any():
            raise ValueError("covs: expected positive definite matrices")
        self.weights, self.means, self.covs = w / w.sum(), mu, cov
        self._lam, self._U = lam, U
        self._cache: dict = {}

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _params(self, like: Tensor):
        key = (like.dtype, like.device)
        if key not in self._cache:
            self._cache[key] = tuple(
                t.to(dtype=like.dtype, device=like.device)
                for t in (self.weights.log(), self.means, self._lam, self._U, self.means.unsqueeze(1) @ self._U)
            )
        return self._cache[key]

    def _components(self, xbar: Tensor, sigma: Tensor):
        """z_k = U_kᵀ(x̄ − μ_k), c_k = λ_k + σ², and the log joint log w_k + log N_k(x̄)."""
        logw, _, lam, U, muU = self._params(xbar)  # noqa: N806
        z = torch.matmul(xbar, U).transpose(0, 1) - muU.squeeze(1)  # (B, K, D)
        c = lam + sigma * sigma
        lognorm = -0.5 * ((z * z) / c).sum(-1) - 0.5 * c.log().sum(-1) - 0.5 * self.dim * math.log(2 * math.pi)
        return z, c, U, logw + lognorm

    def score(self, xbar: Tensor, sigma: Tensor | float) -> Tensor:
        """∇_x̄ log p_σ(x̄) for x̄ of shape (B, D)."""
        sigma = torch.as_tensor(sigma, dtype=xbar.dtype, device=xbar.device)
        z, c, U, logj = self._components(xbar, sigma)  # noqa: N806
        v = torch.softmax(logj, dim=-1).unsqueeze(-1) * z / c  # (B, K, D) in each component's eigenbasis
        return -torch.bmm(v.transpose(0, 1), U.transpose(1, 2)).sum(0)  # a 3-operand einsum is ~60× slower

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        """ε*(x, σ) = −σ ∇_x̄ log p_σ(x̄)."""
        return (-sigma * self.score(_xbar(x, sigma), sigma)).reshape(x.shape)

    def log_prob(self, xbar: Tensor, sigma: Tensor | float = 0.0) -> Tensor:
        """log p_σ(x̄), exact, for x̄ of shape (B, D)."""
        sigma = torch.as_tensor(sigma, dtype=xbar.dtype, device=xbar.device)
        return torch.logsumexp(self._components(xbar, sigma)[3], dim=-1)

    def posterior(self, xbar: Tensor, sigma: Tensor | float = 0.0) -> Tensor:
        """p(k | x̄, σ) = w_k N(x̄; μ_k, Σ_k + σ²I) / p_σ(x̄), shape (B, K): which component a state belongs to."""
        sigma = torch.as_tensor(sigma, dtype=xbar.dtype, device=xbar.device)
        return torch.softmax(self._components(xbar, sigma)[3], dim=-1)

    def denoise(self, xbar: Tensor, sigma: Tensor | float) -> Tensor:
        """E[x_0 | x̄] = x̄ + σ² ∇ log p_σ(x̄) (Tweedie)."""
        sigma = torch.as_tensor(sigma, dtype=xbar.dtype, device=xbar.device)
        return xbar + sigma * sigma * self.score(xbar, sigma)

    def sample(self, n: int, sigma: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
        """n float64 draws of x̄ ~ p_σ (σ = 0: the data distribution)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        L = torch.linalg.cholesky(self.covs)  # noqa: N806
        x = self.means[k] + torch.einsum("nde,ne->nd", L[k], z)
        if sigma > 0:
            x = x + sigma * torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return x

    @classmethod
    def random(
        cls,
        dim: int,
        components: int,
        seed: int = 0,
        std_range: tuple[float, float] = (0.05, 0.5),
        mean_scale: float = 0.6,
    ) -> GaussianMixture:
        """A reproducible random mixture: means ~ N(0, mean_scale²I) clipped to [−1, 1], random rotations,
        per-direction standard deviations log-uniform in `std_range` (small ones make sharp components,
        like data near a manifold)."""
        g = torch.Generator().manual_seed(seed)
        w = torch.rand(components, generator=g, dtype=torch.float64) + 0.5
        mu = (mean_scale * torch.randn(components, dim, generator=g, dtype=torch.float64)).clamp(-1, 1)
        lo, hi = math.log(std_range[0]), math.log(std_range[1])
        std = torch.exp(lo + (hi - lo) * torch.rand(components, dim, generator=g, dtype=torch.float64))
        Q, R = torch.linalg.qr(torch.randn(components, dim, dim, generator=g, dtype=torch.float64))  # noqa: N806
        Q = Q * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1)).unsqueeze(-2)  # noqa: N806
        cov = Q @ torch.diag_embed(std**2) @ Q.transpose(1, 2)
        return cls(w, mu, 0.5 * (cov + cov.transpose(1, 2)))


def default_mixture() -> GaussianMixture:
    """The built-in default: a 2-D mixture of 6 anisotropic Gaussians on a ring of radius 0.8."""
    k = torch.arange(6, dtype=torch.float64)
    ang = 2 * math.pi * k / 6
    means = 0.8 * torch.stack([ang.cos(), ang.sin()], dim=1)
    rot = torch.stack([torch.stack([ang.cos(), -ang.sin()], -1), torch.stack([ang.sin(), ang.cos()], -1)], -2)
    stds = torch.tensor([0.12, 0.04], dtype=torch.float64)
    covs = rot @ torch.diag(stds**2) @ rot.transpose(1, 2)
    weights = torch.tensor([1.0, 2.0, 1.0, 2.0, 1.0, 2.0], dtype=torch.float64)
    return GaussianMixture(weights, means, 0.5 * (covs + covs.transpose(1, 2)))


class IdealDenoiser:
    """The ideal denoiser of a finite data set {y_i}: p_0 = (1/N) Σ_i δ(y_i), p_σ = (1/N) Σ_i N(y_i, σ²I).

    D(x̄; σ) = Σ_i softmax_i(−|x̄ − y_i|²/(2σ²)) y_i and ε = (x̄ − D)/σ, exact. The posterior weights
    collapse onto one point as σ → 0, where ε has a finite limit only along the flow; σ below `sigma_floor`
    is evaluated at `sigma_floor` so that a solver asking for ε at σ = 0 gets that limit, not 0/0.
    """

    def __init__(self, data: Tensor, sigma_floor: float = 1e-6) -> None:
        y = torch.as_tensor(data, dtype=torch.float64)
        if y.ndim < 2 or y.shape[0] < 1:
            raise ValueError(f"data: expected a batch (N, ...) of N >= 1 points, got shape {tuple(y.shape)}")
        if not torch.isfinite(y).all():
            raise ValueError("data: contains NaN or Inf")
        self.data = y.reshape(y.shape[0], -1)
        self.sigma_floor = sigma_floor
        self._cache: dict = {}

    @property
    def dim(self) -> int:
        return self.data.shape[1]

    def _y(self, like: Tensor) -> tuple[Tensor, Tensor]:
        key = (like.dtype, like.device)
        if key not in self._cache:
            y = self.data.to(dtype=like.dtype, device=like.device)
            self._cache[key] = (y, (y * y).sum(-1))
        return self._cache[key]

    def _logits(self, xbar: Tensor, sigma: Tensor) -> Tensor:
        y, y2 = self._y(xbar)
        d2 = (xbar * xbar).sum(-1, keepdim=True) - 2 * xbar @ y.T + y2
        return -d2.clamp(min=0) / (2 * sigma * sigma)

    def denoise(self, xbar: Tensor, sigma: Tensor | float) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=xbar.dtype, device=xbar.device).clamp(min=self.sigma_floor)
        return torch.softmax(self._logits(xbar, sigma), dim=-1) @ self._y(xbar)[0]

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        s = sigma.clamp(min=self.sigma_floor)
        xbar = _xbar(x, sigma)
        return ((xbar - self.denoise(xbar, s)) / s).reshape(x.shape)

    def score(self, xbar: Tensor, sigma: Tensor | float) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=xbar.dtype, device=xbar.device)
        return (self.denoise(xbar, sigma) - xbar) / (sigma * sigma)

    def log_prob(self, xbar: Tensor, sigma: Tensor | float) -> Tensor:
        """log p_σ(x̄) = logsumexp_i log N(x̄; y_i, σ²I) − log N (σ > 0)."""
        sigma = torch.as_tensor(sigma, dtype=xbar.dtype, device=xbar.device)
        n = self.data.shape[0]
        return (torch.logsumexp(self._logits(xbar, sigma), dim=-1) - math.log(n)
                - 0.5 * self.dim * torch.log(2 * math.pi * sigma * sigma))
