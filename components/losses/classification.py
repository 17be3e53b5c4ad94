"""Classification losses: pointwise BCE for CTR and softmax cross-entropy (over one next item or
several) for next-item."""

from __future__ import annotations

import torch
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


@register("loss/multi_step_ce")
class MultiStepCrossEntropy(nn.Module):
    """Listwise multi-step softmax cross-entropy (HeterRec's LMP): each position's next S items
    are all targets of its one softmax over every item, nearer ones weighted more; scalar.

    Reads ``outputs["logits"]`` (P, N) and ``outputs["labels"]`` (P, S), the next S item ids
    at each position, 0 where the sequence has ended. Step s (1-based) weighs ``decay**(s-1)``,
    normalised over the steps present at that position; 0 labels count for nothing. Mean over
    positions. With S = 1 it is ``loss/softmax_ce``.
    """

    reads = ("logits", "labels")

    def __init__(self, decay: float = 0.5) -> None:
        super().__init__()
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self.decay = decay

    def forward(self, outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
        logits, labels = outputs["logits"], outputs["labels"].long()
        steps = torch.arange(labels.shape[1], device=logits.device)
        weights = (labels > 0) * self.decay**steps
        # Clamped so that a row without labels weighs nothing instead of dividing by zero.
        weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=torch.finfo(weights.dtype).tiny)
        log_probs = logits.log_softmax(dim=1).gather(1, labels)
        return -(weights * log_probs).sum(dim=1).mean()
