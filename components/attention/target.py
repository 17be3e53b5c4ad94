"""DIN target attention over a behaviour history."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from rex.components.encoders.mlp import MLP
from rex.config.registry import register


@register("attention/target")
class TargetAttention(nn.Module):
    """DIN local activation unit: pools a (B, L, d) history into (B, d) weighted by the target.

    ``forward(target: (B, d), history: (B, L, d), mask: (B, L) bool, True = valid) -> (B, d)``.
    For each position an MLP over ``[h, t, h - t, h * t]`` gives a scalar weight; the output is
    ``sum_l w_l * h_l``. Weights are unnormalised as in DIN (``softmax: false``) or softmax-
    normalised over valid positions. Masked positions get weight 0, and a row with no valid
    position gives a zero vector (no NaN). ``hidden`` defaults to ``[80, 40]``.
    """

    def __init__(
        self,
        dim: int,
        hidden: list[int] | None = None,
        activation: Literal["relu", "prelu", "dice", "gelu", "sigmoid", "tanh"] = "dice",
        softmax: bool = False,
    ) -> None:
        super().__init__()
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        hidden = [80, 40] if hidden is None else hidden
        self.dim = dim
        self.softmax = softmax
        self.mlp = MLP(4 * dim, hidden, activation=activation)
        # A softmax is shift-invariant, so a bias on its scores would never learn.
        self.score = nn.Linear(self.mlp.out_dim, 1, bias=not softmax)
        if softmax:
            self._register_load_state_dict_pre_hook(_drop_unused_score_bias)

    def forward(self, target: Tensor, history: Tensor, mask: Tensor | None = None) -> Tensor:
        t = target.unsqueeze(1).expand_as(history)
        features = torch.cat([history, t, history - t, history * t], dim=-1)  # (B, L, 4d)
        scores = self.score(self.mlp(features)).squeeze(-1)  # (B, L)
        if self.softmax:
            if mask is not None:
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            weights = torch.softmax(scores, dim=-1)
        else:
            weights = scores
        if mask is not None:
            # Zeroes masked positions, and the uniform weights of an all-masked softmax row.
            weights = weights * mask.to(weights.dtype)
        return torch.einsum("bl,bld->bd", weights, history)


def _drop_unused_score_bias(state_dict: dict[str, Tensor], prefix: str, *args: object) -> None:
    """Checkpoints written before the softmax scores lost their bias still load: that bias never
    changed the output."""
    state_dict.pop(f"{prefix}score.bias", None)
