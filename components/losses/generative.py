"""Losses of generative models and item tokenizers (RQ-VAE): reconstruction error and model-computed terms."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from rex.config.registry import register


@register("loss/mse")
class MeanSquaredError(nn.Module):
    """``mean((outputs[prediction] - outputs[target])^2)`` over every element; scalar.

    Both outputs have the same shape, (B, d) for an RQ-VAE's ``reconstruction`` and ``target``.
    """

    def __init__(self, prediction: str = "reconstruction", target: str = "target") -> None:
        super().__init__()
        if prediction == target:
            raise ValueError(f"prediction and target must be different outputs, both are {prediction!r}")
        self.prediction = prediction
        self.target = target
        self.reads = (prediction, target)

    def forward(self, outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
        prediction = outputs[self.prediction]
        return F.mse_loss(prediction, outputs[self.target].to(prediction.dtype))


@register("loss/output")
class ModelOutputLoss(nn.Module):
    """A scalar loss term the model computed itself, ``outputs[key]`` (shape ()), such as an
    RQ-VAE's ``quantization_loss``; returned as is (the recipe's ``weight`` scales it)."""

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key
        self.reads = (key,)

    def forward(self, outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
        value = outputs[self.key]
        if value.dim() != 0:
            raise ValueError(f"loss/output needs a scalar {self.key!r}, got shape {tuple(value.shape)}")
        return value
