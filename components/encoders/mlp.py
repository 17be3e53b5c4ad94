"""Multi-layer perceptron encoder."""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from rex.components.encoders.activation import make_activation
from rex.components.encoders.dropout import Dropout
from rex.config.registry import register

Activation = Literal["relu", "prelu", "dice", "gelu", "sigmoid", "tanh"]


class _FeatureBatchNorm(nn.Module):
    """BatchNorm1d over the last axis for inputs of any leading shape."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.reshape(-1, x.shape[-1])).reshape(x.shape)


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
                    layers.append(Dropout(dropout))
            width = h
        self.net = nn.Sequential(*layers)
        self.in_dim = in_dim
        self.out_dim = width

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
