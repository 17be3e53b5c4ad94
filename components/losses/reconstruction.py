"""DMAE's distribution-guided auto-encoder constraint."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rex.config.registry import register


@register("loss/interest_reconstruction")
class InterestReconstruction(nn.Module):
    """KL divergence between the real and the decoded interest distribution over the history.

    Reads ``outputs["recon_logits"]`` (B, L, M) from the model's decoder, ``outputs["recon_target"]``
    (B, L, M) similarity scores per modality and ``outputs["recon_mask"]`` (B, L) bool (True =
    valid). Per row and modality, the real distribution is ``softmax(target / temperature)`` over
    the valid positions, the decoded one ``softmax(logits)``; the loss is ``KL(real || decoded)``
    averaged over rows with a valid position and over modalities; scalar.
    """

    reads = ("recon_logits", "recon_target", "recon_mask")

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature

    def forward(self, outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
        logits, target, mask = outputs["recon_logits"], outputs["recon_target"], outputs["recon_mask"]
        valid = mask.unsqueeze(-1)
        neg = torch.finfo(logits.dtype).min
        log_decoded = torch.log_softmax(logits.masked_fill(~valid, neg), dim=1)
        log_real = torch.log_softmax((target / self.temperature).masked_fill(~valid, neg), dim=1)
        terms = torch.where(valid, log_real.exp() * (log_real - log_decoded), 0.0).sum(1)  # (B, M)
        rows = mask.any(1)
        return terms[rows].mean() if rows.any() else logits.sum() * 0.0
