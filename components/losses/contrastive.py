"""InfoNCE with in-batch negatives."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rex.config.registry import register


@register("loss/infonce")
class InfoNCE(nn.Module):
    """InfoNCE between two named (B, d) model outputs, with in-batch negatives; scalar.

    ``outputs[anchor]`` (B, d) against ``outputs[positive]`` (B, d).
    Row i's positive is positive row i; the other rows are its negatives. Cosine similarities
    are divided by ``temperature``. With ``group`` (a batch key such as ``user``), other rows of
    the same group are not used as negatives: they are the same user's, so not negatives.
    """

    def __init__(
        self,
        anchor: str = "anchor",
        positive: str = "positive",
        temperature: float = 0.2,
        group: str | None = "user",
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.anchor, self.positive, self.group = anchor, positive, group
        self.reads = (anchor, positive)
        self.temperature = temperature

    def forward(self, outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
        a = F.normalize(outputs[self.anchor], dim=-1)
        p = F.normalize(outputs[self.positive], dim=-1)
        logits = a @ p.T / self.temperature
        if self.group is not None and self.group in batch:
            ids = batch[self.group]
            same = (ids[:, None] == ids[None, :]) & ~torch.eye(len(ids), dtype=torch.bool, device=ids.device)
            logits = logits.masked_fill(same, torch.finfo(logits.dtype).min)
        return F.cross_entropy(logits, torch.arange(len(a), device=a.device))
