"""A bank of stream-specific and shared experts (MMoE/PLE-style), returning every expert's output."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from rex.components.encoders.transformer import TransformerEncoder
from rex.config.registry import register


class _ResidualMLP(nn.Module):
    """x + MLP(x) over the last axis: (..., dim) -> (..., dim)."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, dim)
        )

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        return x + self.net(x)


class _Transformer(nn.Module):
    """Bidirectional transformer over (B, L, dim) with a (B, L) True = valid mask."""

    def __init__(self, dim: int, num_layers: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.encoder = TransformerEncoder(dim, num_layers, num_heads, dropout=dropout, causal=False)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        return self.encoder(x, None if mask is None else ~mask)


@register("experts/bank")
class ExpertBank(nn.Module):
    """One specific expert per named stream plus ``num_shared`` experts over the streams' mean.

    ``forward(x: (B, K, L, dim) or (B, K, dim), mask: (B, L) or per stream (B, K, L) bool,
    True = valid) ->
    (B, K + num_shared, L, dim)`` (or (B, K + num_shared, dim)): expert k sees stream k only;
    shared experts see the mean of all K streams. Each expert is a residual MLP (Diff-MSIN's
    interest extractors) or a bidirectional transformer. ``streams`` names the K inputs in order;
    a parent model normally supplies it.

    With ``shared_stream: true`` the input holds K + 1 streams and the shared experts see the
    last one instead of the mean (PLE's upper layers, where they read the shared gate's output).
    """

    def __init__(
        self,
        dim: int,
        streams: list[str],
        num_shared: int = 1,
        kind: Literal["mlp", "transformer"] = "mlp",
        hidden: int | None = None,
        num_layers: int = 1,
        num_heads: int = 1,
        dropout: float = 0.0,
        shared_stream: bool = False,
    ) -> None:
        super().__init__()
        if not streams:
            raise ValueError("streams must name at least one input stream")
        if num_shared < 0:
            raise ValueError(f"num_shared must be >= 0, got {num_shared}")
        self.streams = list(streams)
        self.num_shared = num_shared
        self.shared_stream = shared_stream
        self.num_experts = len(streams) + num_shared

        def make() -> nn.Module:
            if kind == "mlp":
                return _ResidualMLP(dim, hidden or 2 * dim, dropout)
            return _Transformer(dim, num_layers, num_heads, dropout)

        self.specific = nn.ModuleDict({name: make() for name in self.streams})
        self.shared = nn.ModuleList(make() for _ in range(num_shared))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        single = x.dim() == 3
        if single:
            x = x.unsqueeze(2)
        streams = len(self.streams)
        if x.shape[1] != streams + self.shared_stream:
            names = [*self.streams, *(["shared"] if self.shared_stream else [])]
            raise ValueError(f"expected {len(names)} streams ({', '.join(names)}), got {x.shape[1]}")
        per_stream = mask is not None and mask.dim() == 3
        masks = [mask[:, k] if per_stream else mask for k in range(x.shape[1])]  # type: ignore[index]
        outputs = [expert(x[:, k], masks[k]) for k, expert in enumerate(self.specific.values())]
        if self.shared_stream:
            shared, union = x[:, streams], masks[streams]
        else:
            # Shared experts see a position that any stream has.
            union = mask.any(dim=1) if per_stream else mask  # type: ignore[union-attr]
            shared = x.mean(dim=1)
        outputs += [expert(shared, union) for expert in self.shared]
        out = torch.stack(outputs, dim=1)
        return out.squeeze(2) if single else out
