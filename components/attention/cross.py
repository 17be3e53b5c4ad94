"""Cross-attention from a sequence to a condition, with an optional zero-initialised gated residual."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rex.config.registry import register


@register("attention/cross")
class CrossAttention(nn.Module):
    """Multi-head attention of queries ``x`` over a condition ``cond``.

    ``forward(x: (B, Lq, dim) or (B, dim), cond: (B, Lc, dim) or (B, dim), mask: (B, Lc) bool,
    True = valid) -> same shape as x``. With ``gated: true`` the output is ``x + gamma * attn``
    with a learned scalar ``gamma`` initialised at 0, so the block starts as the identity and
    learns how much of the condition to let in (Diff-MSIN's CrossModalAttention); otherwise it
    is the attended value alone. A row whose condition is all padding attends to nothing and
    gets a zero attended value (never NaN).
    """

    def __init__(self, dim: int, num_heads: int = 1, gated: bool = True) -> None:
        super().__init__()
        if dim <= 0 or num_heads <= 0:
            raise ValueError(f"dim and num_heads must be positive, got {dim}, {num_heads}")
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim = dim
        self.num_heads = num_heads
        self.query = nn.Linear(dim, dim)
        self.key_value = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.gamma = nn.Parameter(torch.zeros(1)) if gated else None

    def attend(self, x: Tensor, cond: Tensor, mask: Tensor | None = None) -> Tensor:
        """The attended value alone: (B, Lq, dim) queries over (B, Lc, dim) keys -> (B, Lq, dim)."""
        b, lq, d = x.shape
        h = self.num_heads
        q = self.query(x).reshape(b, lq, h, d // h).transpose(1, 2)
        k, v = self.key_value(cond).reshape(b, cond.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        bias = None
        if mask is not None:
            # Additive and finite, so an all-padding condition row gives uniform, not NaN, weights;
            # its output is zeroed below.
            bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device)
            bias = bias.masked_fill(~mask, torch.finfo(q.dtype).min / 2)[:, None, None, :]
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        attended = self.out(attended.transpose(1, 2).reshape(b, lq, d))
        if mask is not None:
            attended = attended * mask.any(dim=1).to(attended.dtype)[:, None, None]
        return attended

    def forward(self, x: Tensor, cond: Tensor, mask: Tensor | None = None) -> Tensor:
        single = x.dim() == 2
        queries = x.unsqueeze(1) if single else x
        keys = cond.unsqueeze(1) if cond.dim() == 2 else cond
        attended = self.attend(queries, keys, mask)
        if single:
            attended = attended.squeeze(1)
        return x + self.gamma * attended if self.gamma is not None else attended
