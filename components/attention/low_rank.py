"""LREA: target attention over a long history compressed along its length (arXiv:2503.02542)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rex.components.checks import at_least
from rex.config.registry import register


@register("attention/low_rank")
class LowRankTargetAttention(nn.Module):
    """Low-Rank Efficient Attention: a target attends to ``rank`` learnt mixtures of the history.

    ``forward(target: (B, d), history: (B, L, d), mask: (B, L) bool, True = valid)`` returns
    ``(pooled (B, d), {"attention_negativity": ()})``. A learnt (rank, max_len) matrix ``E``
    compresses the history along its length, ``C = E[:, -L:] H`` (B, rank, d), with positions
    counted from the most recent item (histories are left-padded); the target then attends to
    the rank rows: ``softmax(W_q t · W_k C / sqrt(k)) W_v C``. A candidate costs O(rank · d),
    not O(L · d), and ``C`` depends on the user alone.

    The attention a candidate pays each real item is ``a E`` (a: the rank weights), which,
    unlike a softmax over items, can be negative. ``attention_negativity``, the mean over the
    batch of the total negative weight, is the loss term (``loss/output``) that keeps it a
    non-negative weighting, as softmax attention is.

    Serving: :meth:`user_state` pre-stores each user's absorbed keys ``(W_k C)ᵀ W_q / sqrt(k)``
    and values ``W_v C`` once, and :meth:`serve` scores any number of candidates against them
    with two (rank × d) products each. It is a separate path that must give ``forward``'s
    output (tested to 1e-5).
    """

    extra_outputs = ("attention_negativity",)

    def __init__(self, dim: int, max_len: int, rank: int = 16, key_dim: int | None = None) -> None:
        super().__init__()
        at_least(1, dim=dim, max_len=max_len, rank=rank)
        self.key_dim = key_dim or dim
        self.max_len = max_len
        # Starts as a non-negative mixing (each row a random convex-like mix of positions).
        self.compress = nn.Parameter(torch.rand(rank, max_len) / max_len)
        self.query = nn.Linear(dim, self.key_dim, bias=False)
        self.key = nn.Linear(dim, self.key_dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)

    def _mixing(self, history: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """(B, rank, L) weights of the history's positions, and the mixtures C (B, rank, d)."""
        length = history.shape[1]
        if length > self.max_len:
            raise ValueError(f"history length {length} exceeds max_len {self.max_len}")
        mixing = self.compress[:, self.max_len - length :].expand(history.shape[0], -1, -1)
        if mask is not None:
            mixing = mixing * mask[:, None, :].to(mixing.dtype)  # padding contributes nothing
        return mixing, mixing @ history

    def forward(
        self, target: Tensor, history: Tensor, mask: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        mixing, mixtures = self._mixing(history, mask)
        scores = torch.einsum("bk,brk->br", self.query(target), self.key(mixtures)) / math.sqrt(self.key_dim)
        weights = scores.softmax(dim=-1)
        pooled = torch.einsum("br,brd->bd", weights, self.value(mixtures))
        per_item = torch.einsum("br,brl->bl", weights, mixing)
        negativity = F.relu(-per_item).sum(dim=-1).mean()
        return pooled, {"attention_negativity": negativity}

    @torch.no_grad()
    def user_state(self, history: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Per user, once: absorbed keys (B, rank, d) and values (B, rank, d)."""
        _, mixtures = self._mixing(history, mask)
        keys = self.key(mixtures) @ self.query.weight / math.sqrt(self.key_dim)
        return keys, self.value(mixtures)

    @torch.no_grad()
    def serve(self, state: tuple[Tensor, Tensor], candidates: Tensor) -> Tensor:
        """Candidates (B, N, d) of each user → pooled interests (B, N, d) from the stored state."""
        keys, values = state
        return (candidates @ keys.transpose(1, 2)).softmax(dim=-1) @ values
