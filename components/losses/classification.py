"""Classification losses: pointwise BCE for CTR and softmax cross-entropy for next-item."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from rex.config.registry import register


@register("loss/bce")
class BCEWithLogits(nn.Module):
    """Binary cross-entropy on ``outputs["logit"]`` (B,) against ``batch["label"]`` (B,); scalar.

    Mean over the batch; labels are cast to the logit's dtype.
    """

    reads = ("logit",)

    def forward(self, outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
        logit = outputs["logit"]
        return F.binary_cross_entropy_with_logits(logit, batch["label"].to(logit.dtype))


@register("loss/softmax_ce")
class SoftmaxCrossEntropy(nn.Module):
    """Softmax cross-entropy on ``outputs["logits"]`` (P, N) against ``outputs["labels"]`` (P,); scalar.

    The model gathers the P supervised positions itself; labels are class indices (long) in
    [0, N). Mean over positions, with optional label smoothing.
    """

    reads = ("logits", "labels")

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def forward(self, outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(
            outputs["logits"], outputs["labels"].long(), label_smoothing=self.label_smoothing
        )
