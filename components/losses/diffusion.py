"""Diffusion training objectives: the predicted noise's mean squared error (Gaussian) and the
masked tokens' cross-entropy (absorbing-state discrete diffusion)."""

from __future__ import annotations

from typing import Literal

import torch
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


@register("loss/masked_diffusion")
class MaskedDiffusionLoss(nn.Module):
    """Cross-entropy of restoring masked tokens, as masked (absorbing-state) diffusion trains; scalar.

    Reads ``restore_nll`` (B, L), each token's negative log-likelihood of its original value,
    ``restore_mask`` (B, L) bool, the tokens the forward process masked, and ``restore_weight``
    (B,), the ELBO weight of each row's time. Only masked tokens count: the rest are inputs.
    ``weighting: uniform`` is the mean cross-entropy over the batch's masked tokens;
    ``elbo`` is the continuous-time bound, sum over rows of weight x (row's masked
    cross-entropy), divided by B x L, which for the linear schedule (weight 1/t) has the same
    expected scale as ``uniform``.
    """

    reads = ("restore_nll", "restore_mask", "restore_weight")

    def __init__(self, weighting: Literal["uniform", "elbo"] = "uniform") -> None:
        super().__init__()
        if weighting not in ("uniform", "elbo"):
            raise ValueError(f"unknown weighting {weighting!r}; choose uniform or elbo")
        self.weighting = weighting

    def forward(self, outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
        nll, masked = outputs["restore_nll"], outputs["restore_mask"]
        # where(), not a product: whatever an unmasked position holds (even inf) adds nothing.
        per_token = torch.where(masked, nll, torch.zeros((), dtype=nll.dtype, device=nll.device))
        if self.weighting == "uniform":
            return per_token.sum() / masked.sum().clamp(min=1)
        weight = outputs["restore_weight"].to(nll.dtype)
        return (weight * per_token.sum(dim=1)).sum() / masked.numel()
