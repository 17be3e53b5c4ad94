"""Activation functions shared by the encoders and attention units (not registered).

``make_activation(name, dim)`` turns a recipe string into a module; ``Dice`` is DIN's
data-adaptive activation.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

ACTIVATIONS = ("relu", "prelu", "dice", "gelu", "sigmoid", "tanh")


class Dice(nn.Module):
    """DIN's data-adaptive activation: ``p(x) * x + (1 - p(x)) * alpha * x``.

    ``p(x) = sigmoid((x - E[x]) / sqrt(Var[x] + eps))`` with per-feature statistics taken from
    the batch in training and from running averages in eval (an affine-free batch norm).
    Input ``(B, dim)`` or ``(B, L, dim)`` (any leading shape, features last); output has the
    same shape. ``alpha`` is a learned per-feature slope, initialised to 0.
    """

    def __init__(self, dim: int, eps: float = 1e-8) -> None:
        super().__init__()
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim = dim
        self.norm = nn.BatchNorm1d(dim, eps=eps, affine=False)
        self.alpha = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.dim)
        p = torch.sigmoid(self.norm(flat)).reshape(x.shape)
        return p * x + (1.0 - p) * self.alpha * x


def make_activation(name: str, dim: int) -> nn.Module:
    """Build the activation called ``name`` for features of width ``dim`` (last axis)."""
    if name == "relu":
        return nn.ReLU()
    if name == "prelu":
        # One shared slope: nn.PReLU(dim) would act on axis 1, wrong for (B, L, d) inputs.
        return nn.PReLU()
    if name == "dice":
        return Dice(dim)
    if name == "gelu":
        return nn.GELU()
    if name == "sigmoid":
        return nn.Sigmoid()
    if name == "tanh":
        return nn.Tanh()
    raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
