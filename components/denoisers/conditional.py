"""Conditional diffusion denoiser: predicts the noise of x_t from (x_t, t, condition)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from rex.components.attention.cross import CrossAttention
from rex.components.denoisers.schedule import NoiseSchedule
from rex.config.registry import register


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of integer steps: (B,) -> (B, dim) (Vaswani et al.; DDPM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device) / max(half, 1))
    angles = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1)
    return nn.functional.pad(emb, (0, dim - 2 * half))


def _broadcast(rows: Tensor, like: Tensor) -> Tensor:
    """(B, d) -> (B, 1, ..., d) to add to a (B, ..., d) tensor."""
    return rows.reshape(rows.shape[0], *([1] * (like.dim() - 2)), rows.shape[-1])


@register("denoiser/conditional")
class ConditionalDenoiser(nn.Module):
    """DDPM-style denoiser of representations, guided by a condition through cross-attention.

    ``forward(x: (B, dim) or (B, L, dim), cond: (B, Lc, dim) or (B, dim), mask: (B, Lc) bool
    True = valid condition, x_mask: (B, L) bool True = real position) -> (out, eps, eps_pred)``:

    * ``out`` (shape of x): x taken as the state at step ``reverse_steps`` and denoised by that
      many posterior steps (``reverse_steps: 0`` returns x unchanged: the ablation);
    * ``eps`` / ``eps_pred`` (N, dim): the noise drawn to train the network and its prediction,
      over ``train_samples`` uniform steps t per row (the multi-step epsilon-MSE objective);
      only the real positions when ``x_mask`` is given. The clean target x is detached here, so
      the objective trains the denoiser and cannot pull the representation towards zero.

    The noise network is an MLP over [x_t, time embedding, cross-attention of (x_t + time)
    over the condition].
    """

    def __init__(
        self,
        dim: int,
        steps: int = 50,
        schedule: Literal["linear", "cosine"] = "cosine",
        reverse_steps: int = 2,
        train_samples: int = 1,
        num_heads: int = 1,
        hidden: int | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= reverse_steps <= steps:
            raise ValueError(f"reverse_steps must be in 0..steps ({steps}), got {reverse_steps}")
        if train_samples < 1:
            raise ValueError(f"train_samples must be >= 1, got {train_samples}")
        hidden = hidden or 2 * dim
        self.dim = dim
        self.reverse_steps = reverse_steps
        self.train_samples = train_samples
        self.schedule = NoiseSchedule(steps, schedule)
        self.time = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, dim))
        self.cross = CrossAttention(dim, num_heads, gated=False)
        self.eps_net = nn.Sequential(nn.Linear(3 * dim, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def predict_eps(self, x_t: Tensor, t: Tensor, cond: Tensor, mask: Tensor | None = None) -> Tensor:
        """Noise prediction for x_t (B, ..., dim) at steps t (B,)."""
        temb = _broadcast(self.time(timestep_embedding(t, self.dim)), x_t).expand_as(x_t)
        attended = self.cross(x_t + temb, cond, mask)
        return self.eps_net(torch.cat([x_t, temb, attended], dim=-1))

    def denoise(
        self, x: Tensor, cond: Tensor, mask: Tensor | None = None, start: int | None = None
    ) -> Tensor:
        """Treat x as the state at step ``start`` (default ``reverse_steps``) and step back to 0."""
        start = self.reverse_steps if start is None else start
        for step in range(start, 0, -1):
            t = torch.full((x.shape[0],), step, dtype=torch.long, device=x.device)
            x = self.schedule.step(x, t, self.predict_eps(x, t, cond, mask))
        return x

    def forward(
        self, x: Tensor, cond: Tensor, mask: Tensor | None = None, x_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        k = self.train_samples
        x0 = x.detach().repeat(k, *([1] * (x.dim() - 1)))
        cond_k = cond.repeat(k, *([1] * (cond.dim() - 1)))
        mask_k = mask.repeat(k, 1) if mask is not None else None
        t = self.schedule.sample_t(x0.shape[0], x.device)
        noise = torch.randn_like(x0)
        eps_pred = self.predict_eps(self.schedule.q_sample(x0, t, noise), t, cond_k, mask_k)
        if x_mask is not None:
            keep = x_mask.repeat(k, 1)
            noise, eps_pred = noise[keep], eps_pred[keep]
        return self.denoise(x, cond, mask), noise.reshape(-1, self.dim), eps_pred.reshape(-1, self.dim)
