"""Dropout drawn with ``torch.rand`` rather than ``bernoulli_``.

On CPU, ``nn.Dropout`` (``bernoulli_``) was about 4x slower than a uniform draw and a compare
(8.4 ms against 2.1 ms for a 256x44x64 tensor), and in SASRec it was a fifth of the step time.
The result is the same distribution: each element kept with probability 1 - p, scaled by 1/(1 - p).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout: (any shape) → same shape."""
    if not training or p == 0.0:
        return x
    # One multiply by a scaled mask (built without autograd) rather than two: the same output
    # bits, and on a 4096x400 CPU tensor 5.6 ms forward + backward against 7.8 ms.
    with torch.no_grad():
        mask = torch.rand_like(x).ge_(p).to(x.dtype).mul_(1.0 / (1.0 - p))
    return x * mask


class Dropout(nn.Module):
    """Drop-in replacement for ``nn.Dropout``: (any shape) → same shape."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
