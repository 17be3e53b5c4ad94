"""Preference losses: DPO over a model's preference pairs (REG4Rec's PARS, arXiv:2508.15308)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from rex.config.registry import register


@register("loss/dpo")
class DirectPreference(nn.Module):
    """DPO (Rafailov et al., 2023): ``-log sigmoid(beta * (chosen - rejected))``, mean over pairs.

    Reads ``outputs["chosen_log_ratio"]`` and ``outputs["rejected_log_ratio"]`` (pairs,), each
    log pi(y) - log pi_ref(y) of a pair's preferred and dispreferred output. At policy =
    reference it is log 2 with gradient -beta / 2 on the chosen ratio; a batch with no pair
    gives 0 (with a gradient path, so every rank of a distributed run steps alike).
    """

    reads = ("chosen_log_ratio", "rejected_log_ratio")

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"beta must be positive, got {beta}")
        self.beta = beta

    def forward(self, outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
        margin = outputs["chosen_log_ratio"] - outputs["rejected_log_ratio"]
        if margin.numel() == 0:
            return margin.sum()
        return -F.logsigmoid(self.beta * margin).mean()
