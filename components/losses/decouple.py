"""Keep expert representations apart: Diff-MSIN's knowledge decoupling, MMQ's orthogonality."""

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


@register("loss/orthogonal")
class SubspaceOrthogonality(nn.Module):
    """Soft orthogonality between two groups of expert outputs (MMQ's shared and specific
    experts, arXiv:2508.15281); scalar.

    ``outputs[shared]`` (B, S, d) and ``outputs[specific]`` (B, K, d), or (B, d) for one expert.
    Each row is L2-normalised; for every pair of a shared expert s and a specific expert k the
    loss is the squared Frobenius norm of their normalised cross-correlation over the batch,
    ``|A_s C_k^T|_F^2 / B^2`` (A_s, C_k the (B, d) normalised outputs): the mean squared cosine
    between any item's shared output and any item's specific output, averaged over pairs. 0 when
    the shared outputs lie in a subspace orthogonal to the specific ones (so each item's too),
    1 when all are collinear.
    """

    def __init__(self, shared: str = "shared", specific: str = "specific") -> None:
        super().__init__()
        self.shared, self.specific = shared, specific
        self.reads = (shared, specific)

    def forward(self, outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
        a, c = (outputs[key] for key in self.reads)
        a, c = (x.unsqueeze(1) if x.dim() == 2 else x for x in (a, c))
        if a.dim() != 3 or c.dim() != 3 or a.shape[0] != c.shape[0] or a.shape[2] != c.shape[2]:
            raise ValueError(
                f"loss/orthogonal needs (B, S, d) and (B, K, d) outputs, got {tuple(a.shape)} and {tuple(c.shape)}"
            )
        a, c = F.normalize(a.float(), dim=-1), F.normalize(c.float(), dim=-1)
        # (S, K, B, B): the cosine of every item's shared output with every item's specific one.
        cosines = torch.einsum("bsd,ckd->skbc", a, c)
        return cosines.square().mean(dim=(2, 3)).mean()
