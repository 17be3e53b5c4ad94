"""Diffusion training objective: mean squared error of the predicted noise."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from rex.config.registry import register


@register("loss/eps_mse")
class EpsilonMSE(nn.Module):
    """Mean squared error of the predicted noise against the drawn noise (DDPM simple loss).

    ``mean((outputs[key + "_pred"] - outputs[key])^2)``, a scalar.
    The model returns the noise it drew (``key``, e.g. ``eps`` or ``synergy_eps``) and the
    denoiser's prediction of it, of the same shape.
    """

    def __init__(self, key: str = "eps") -> None:
        super().__init__()
        self.key = key
        self.reads = (key, f"{key}_pred")

    def forward(self, outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
        return F.mse_loss(outputs[f"{self.key}_pred"], outputs[self.key])
