"""Knowledge Decoupling (Diff-MSIN): keep expert representations apart."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rex.config.registry import register


@register("loss/cos_decouple")
class CosineDecoupling(nn.Module):
    """Mean pairwise cosine similarity between the experts of one named output; scalar.

    ``outputs[key]`` is (B, E, ..., d).
    Middle axes (positions) are averaged first, as in the official code; then the cosine of every
    pair i < j of the E experts is averaged over pairs and rows. 0 for orthogonal experts, 1 for
    identical ones; minimising it pushes experts to encode different information.
    """

    def __init__(self, key: str = "experts") -> None:
        super().__init__()
        self.key = key
        self.reads = (key,)

    def forward(self, outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
        x = outputs[self.key]
        if x.dim() > 3:
            x = x.flatten(2, -2).mean(dim=2)
        if x.shape[1] < 2:
            raise ValueError(
                f"cos_decouple needs at least 2 experts in outputs[{self.key!r}], got {x.shape[1]}"
            )
        x = F.normalize(x, dim=-1)
        sim = x @ x.transpose(1, 2)  # (B, E, E)
        i, j = torch.triu_indices(x.shape[1], x.shape[1], offset=1, device=x.device)
        return sim[:, i, j].mean()
