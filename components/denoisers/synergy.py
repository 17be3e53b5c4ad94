"""Diff-MSIN's Synergistic Relationship Capture (SRC): K streams denoised jointly."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rex.components.attention.cross import CrossAttention
from rex.components.denoisers.schedule import NoiseSchedule
from rex.config.registry import register


@register("denoiser/synergy")
class SynergyDenoiser(nn.Module):
    """T noise-and-denoise rounds over K streams, each conditioned on the others, then fused.

    ``forward(streams: (B, K, L, dim), mask: (B, L) bool True = valid) -> (h_syn (B, L, dim),
    eps (T * B * K * L', dim), eps_pred (same))``, where L' counts the valid positions.
    Round t (1..T, cosine schedule): each stream takes one forward step
    ``x = sqrt(alpha_t) h + sqrt(beta_t) noise``; its noise is predicted from the other streams,
    ``eps_m = sum_n sigmoid(g_mn) * CA_mn(x_m, x_n)`` with gated cross-attention
    ``CA(x_m, x_n) = x_m + gamma * attn`` (gamma = 0 at start, as in the official code) and a
    learnable gate g_mn per ordered pair; the step is then inverted,
    ``h_m = (x_m - sqrt(beta_t) eps_m) / sqrt(alpha_t)``. An MLP fuses the K final streams.
    The epsilon-MSE between noise and prediction is the synergy objective. In eval no noise is
    drawn, so scores are deterministic.
    """

    def __init__(self, dim: int, num_streams: int = 3, steps: int = 4, num_heads: int = 1) -> None:
        super().__init__()
        if num_streams < 2:
            raise ValueError(
                f"num_streams must be >= 2 (the streams condition each other), got {num_streams}"
            )
        self.num_streams = num_streams
        self.schedule = NoiseSchedule(steps, "cosine")
        self.pairs = [(m, n) for m in range(num_streams) for n in range(num_streams) if m != n]
        # One attention per ordered pair (the official code reuses one module for every pair).
        self.attention = nn.ModuleList(CrossAttention(dim, num_heads, gated=True) for _ in self.pairs)
        self.gates = nn.Parameter(torch.full((len(self.pairs),), 0.5))  # official initial value
        self.fuse = nn.Sequential(nn.Linear(num_streams * dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, streams: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        single = streams.dim() == 3
        if single:
            streams = streams.unsqueeze(2)  # (B, K, dim): one position per stream
        _, k, _, dim = streams.shape
        if k != self.num_streams:
            raise ValueError(f"expected {self.num_streams} streams, got {k}")
        gates = torch.sigmoid(self.gates)
        h = list(streams.unbind(1))
        noises, predictions = [], []
        for step in range(1, self.schedule.steps + 1):
            alpha, beta = self.schedule.alphas[step], self.schedule.betas[step]
            noise = torch.randn_like(streams) if self.training else torch.zeros_like(streams)
            x = [alpha.sqrt() * h[m] + beta.sqrt() * noise[:, m] for m in range(k)]
            eps = [torch.zeros_like(x[m]) for m in range(k)]
            for (m, n), attention, gate in zip(self.pairs, self.attention, gates, strict=True):
                eps[m] = eps[m] + gate * attention(x[m], x[n], mask)
            predicted = torch.stack(eps, dim=1)
            h = [(x[m] - beta.sqrt() * predicted[:, m]) / alpha.sqrt() for m in range(k)]
            noises.append(noise)
            predictions.append(predicted)
        h_syn = self.fuse(torch.cat(h, dim=-1))
        noise_all, pred_all = torch.stack(noises), torch.stack(predictions)  # (T, B, K, L, dim)
        if mask is not None:
            keep = mask[None, :, None, :].expand(noise_all.shape[:-1])
            noise_all, pred_all = noise_all[keep], pred_all[keep]
        return h_syn.squeeze(1) if single else h_syn, noise_all.reshape(-1, dim), pred_all.reshape(-1, dim)
