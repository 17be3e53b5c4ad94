"""Absorbing-state (masked) discrete diffusion: the forward process over a sample's tokens."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from rex.config.registry import register


@register("denoiser/absorbing")
class AbsorbingCorruption(nn.Module):
    """Masked discrete diffusion in continuous time (Austin et al., 2021; Sahoo et al., 2024):
    each token is replaced by its absorbing mask token with probability ``rate(t)``, on its own.

    ``t`` ~ U(``min_t``, 1], one per row. ``schedule: linear`` masks with probability t;
    ``cosine`` with 1 - cos(pi t / 2) (fewer masked tokens early on). ``forward(x0, mask_token,
    t=None) -> (x_t, masked, t)``: ``x0`` (B, L, ...) holds the clean tokens (ids (B, L) or their
    embeddings (B, L, d)), ``mask_token`` each position's absorbing state, broadcastable to one
    row (L, ...); ``masked`` (B, L) bool marks the replaced tokens. ``elbo_weight(t)`` (B,) is the
    weight the continuous-time ELBO puts on a row's masked cross-entropy, -alpha'(t) / (1 -
    alpha(t)) with alpha = 1 - rate: 1/t for the linear schedule. No parameters; draws from
    torch's global generator, so a resumed run that restores it draws the same masks.
    """

    def __init__(self, schedule: Literal["linear", "cosine"] = "linear", min_t: float = 0.0) -> None:
        super().__init__()
        if schedule not in ("linear", "cosine"):
            raise ValueError(f"unknown schedule {schedule!r}; choose linear or cosine")
        if not 0.0 <= min_t < 1.0:
            raise ValueError(f"min_t must be in [0, 1), got {min_t}")
        self.schedule = schedule
        self.min_t = min_t

    def rate(self, t: Tensor) -> Tensor:
        """The probability that a token is masked at time t (the same shape as ``t``)."""
        return t if self.schedule == "linear" else 1 - torch.cos(t * math.pi / 2)

    def elbo_weight(self, t: Tensor) -> Tensor:
        if self.schedule == "linear":
            return 1 / t
        half_pi = math.pi / 2
        return half_pi * torch.sin(t * half_pi) / (1 - torch.cos(t * half_pi))

    def sample_t(self, rows: int, device: torch.device | None = None) -> Tensor:
        # 1 - U[0, 1) lies in (0, 1]: t = 0 (nothing masked, weight infinite) is never drawn.
        return 1 - torch.rand(rows, device=device) * (1 - self.min_t)

    def forward(
        self, x0: Tensor, mask_token: Tensor, t: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        if x0.dim() < 2:
            raise ValueError(f"x0 must be (B, L, ...) tokens, got shape {tuple(x0.shape)}")
        rows, length = x0.shape[:2]
        t = self.sample_t(rows, x0.device) if t is None else t
        masked = torch.rand(rows, length, device=x0.device) < self.rate(t)[:, None]
        where = masked.reshape(rows, length, *([1] * (x0.dim() - 2)))
        return torch.where(where, mask_token.to(x0.dtype), x0), masked, t
