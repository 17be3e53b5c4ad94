"""Factorization-machine second-order interaction."""

from __future__ import annotations

from torch import Tensor, nn

from rex.config.registry import register


@register("interaction/fm")
class FactorizationMachine(nn.Module):
    """FM pairwise term sum_{i<j} <e_i, e_j> over field embeddings: (B, F, d) -> (B,).

    Computed in O(F d) as ``0.5 * sum_d[(sum_f e)^2 - sum_f e^2]``; no parameters.
    """

    def forward(self, emb: Tensor) -> Tensor:
        square_of_sum = emb.sum(dim=1).pow(2)
        sum_of_square = emb.pow(2).sum(dim=1)
        return 0.5 * (square_of_sum - sum_of_square).sum(dim=-1)
