"""Gaussian diffusion noise schedules (DDPM): beta_t, alpha_t, alpha-bar_t, q_sample, posterior step."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from rex.config.registry import register


def _expand(values: Tensor, like: Tensor) -> Tensor:
    """(B,) per-row coefficients -> (B, 1, ..., 1) to broadcast over ``like``."""
    return values.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


@register("denoiser/schedule")
class NoiseSchedule(nn.Module):
    """A T-step noise schedule; index t runs 1..T and index 0 means "clean" (alpha-bar_0 = 1).

    ``kind: linear`` spaces beta linearly from ``beta_start`` to ``beta_end`` (Ho et al., 2020);
    ``kind: cosine`` sets alpha-bar_t = f(t) / f(0), f(t) = cos^2(((t / T + s) / (1 + s)) * pi / 2)
    with s = 0.008, betas clipped at ``max_beta`` (Nichol & Dhariwal, 2021).
    ``q_sample(x0: (B, ...), t: (B,) long, noise) -> x_t``;
    ``predict_x0(x_t, t, eps) -> x0``; ``step(x_t, t, eps) -> x_{t-1}``, the posterior mean
    (no noise added, so inference is deterministic). No parameters: buffers only.
    """

    def __init__(
        self,
        steps: int,
        kind: Literal["linear", "cosine"] = "cosine",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        max_beta: float = 0.999,
    ) -> None:
        super().__init__()
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if not 0 < beta_start <= beta_end < 1 or not 0 < max_beta < 1:
            raise ValueError("need 0 < beta_start <= beta_end < 1 and 0 < max_beta < 1")
        self.steps = steps
        self.kind = kind
        if kind == "linear":
            betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
        elif kind == "cosine":
            s = 0.008
            grid = torch.arange(steps + 1, dtype=torch.float64) / steps
            f = torch.cos((grid + s) / (1 + s) * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
        else:
            raise ValueError(f"unknown schedule kind {kind!r}; choose linear or cosine")
        alpha_bars = torch.cumprod(1 - betas, dim=0)
        # Index 0 is the clean state, so buffers are indexed by t directly.
        self.register_buffer("betas", torch.cat([torch.zeros(1), betas.float()]), persistent=False)
        self.register_buffer("alphas", 1 - self.betas, persistent=False)
        self.register_buffer("alpha_bars", torch.cat([torch.ones(1), alpha_bars.float()]), persistent=False)

    def sample_t(self, batch: int, device: torch.device) -> Tensor:
        """Uniform steps in 1..T, one per row."""
        return torch.randint(1, self.steps + 1, (batch,), device=device)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(alpha-bar_t) x0 + sqrt(1 - alpha-bar_t) noise."""
        a = _expand(self.alpha_bars[t], x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def predict_x0(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        a = _expand(self.alpha_bars[t], x_t)
        return (x_t - (1 - a).sqrt() * eps) / a.sqrt()

    def step(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Posterior mean of x_{t-1} given x_t and the predicted noise (DDPM eq. 11)."""
        beta = _expand(self.betas[t], x_t)
        a_bar = _expand(self.alpha_bars[t], x_t)
        return (x_t - beta / (1 - a_bar).sqrt() * eps) / (1 - beta).sqrt()
