"""Multi-layer perceptron encoder."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from rex.components.encoders.activation import make_activation
from rex.registry import register

Activation = Literal["relu", "prelu", "dice", "gelu", "sigmoid", "tanh"]


class _FeatureBatchNorm(nn.Module):
    """BatchNorm1d over the last axis for inputs of any leading shape."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.reshape(-1, x.shape[-1])).reshape(x.shape)


class _MaskDropout(nn.Module):
    """Inverted dropout with the draws of ``rex.components.encoders.dropout`` (one
    ``torch.rand_like``, an element kept where its draw is ``>= p``, kept ones scaled by
    ``1 / (1 - p)``), applied as one multiply by a scaled mask: the same output bits.

    ``nn.Dropout`` (``bernoulli_``) took 12.1 ms forward + backward on a 4096x400 CPU tensor,
    ``encoders/dropout.py`` 7.8 ms (two multiplies each way) and this 5.6 ms; in DeepFM on Frappe
    (MLP 400-400-400, batch 4096) ``bernoulli_`` was a fifth of the training step.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        with torch.no_grad():
            mask = torch.rand_like(x).ge_(self.p).to(x.dtype).mul_(1.0 / (1.0 - self.p))
        return x * mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


@register("encoder/mlp")
class MLP(nn.Module):
    """Feed-forward tower of Linear → [BatchNorm] → activation → [Dropout] blocks.

    Input ``(B, in_dim)`` (any leading shape, features last); output ``(B, hidden[-1])``,
    exposed as ``out_dim``. Every layer, the last included, is followed by the activation
    (DeepCTR convention: a parent adds its own output head); set ``output_activation: false``
    to make the last layer a plain Linear. ``in_dim`` is normally supplied by the parent.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: list[int],
        activation: Activation = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
        output_activation: bool = True,
    ) -> None:
        super().__init__()
        if in_dim <= 0:
            raise ValueError(f"in_dim must be positive, got {in_dim}")
        if not hidden or any(h <= 0 for h in hidden):
            raise ValueError(f"hidden must be a non-empty list of positive widths, got {hidden}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        layers: list[nn.Module] = []
        width = in_dim
        for i, h in enumerate(hidden):
            layers.append(nn.Linear(width, h))
            last = i == len(hidden) - 1
            if not last or output_activation:
                if batch_norm:
                    layers.append(_FeatureBatchNorm(h))
                layers.append(make_activation(activation, h))
                if dropout > 0:
                    layers.append(_MaskDropout(dropout))
            width = h
        self.net = nn.Sequential(*layers)
        self.in_dim = in_dim
        self.out_dim = width

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
