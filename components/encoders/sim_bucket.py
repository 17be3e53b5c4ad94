"""DMAE's multimodal interest encoding: target-history similarity as bucketised embeddings."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rex.components.checks import at_least
from rex.config.registry import register


@register("encoder/sim_bucket")
class SimBucket(nn.Module):
    """Similarity scores → interest vectors (DMAE's Multimodal Interest Encoding Unit, one modality).

    ``forward(similarity: (B, L) in [0, 1], mask: (B, L) bool, True = valid) -> (B, L, dim)``.
    Each score ``r`` is mapped affinely, ``r' = w r + b`` (learnt scalars), bucketised into
    ``num_buckets`` equal bins of ``[0, 1]`` (``floor(clamp(r') (N - 1))``) and multiplied by that
    bucket's embedding: ``r' * Bucket[idx]``, so the vector keeps both the bin and the exact value
    (with one bucket, only the value).
    The click time is added as a recency embedding. Histories here carry no timestamps, so the
    time signal is the position counted from the most recent item (sequences are left-padded,
    right-aligned), capped at ``max_len - 1``. Masked positions are zero.
    :meth:`similarity` gives ``(cos(target, history) + 1) / 2`` for (B, D) and (B, L, D) vectors.
    """

    def __init__(self, dim: int, max_len: int, num_buckets: int = 20) -> None:
        super().__init__()
        # One bucket is the ablation without bucketisation: the score scales a single vector.
        at_least(1, dim=dim, max_len=max_len, num_buckets=num_buckets)
        self.dim = dim
        self.max_len = max_len
        self.num_buckets = num_buckets
        self.scale = nn.Parameter(torch.ones(1))
        self.shift = nn.Parameter(torch.zeros(1))
        self.buckets = nn.Embedding(num_buckets, dim)
        self.recency = nn.Embedding(max_len, dim)

    @staticmethod
    def similarity(target: Tensor, history: Tensor) -> Tensor:
        cosine = torch.einsum(
            "bd,bld->bl", nn.functional.normalize(target, dim=-1), nn.functional.normalize(history, dim=-1)
        )
        return (cosine + 1) / 2

    def bucket(self, mapped: Tensor) -> Tensor:
        """Bucket index (B, L) long of affinely mapped scores (B, L)."""
        return (mapped.detach().clamp(0, 1) * (self.num_buckets - 1)).floor().long()

    def forward(self, similarity: Tensor, mask: Tensor) -> Tensor:
        mapped = self.scale * similarity + self.shift
        length = similarity.shape[1]
        # Position from the most recent item: the last column of a left-padded row is 0.
        recency = (length - 1 - torch.arange(length, device=similarity.device)).clamp(max=self.max_len - 1)
        out = mapped.unsqueeze(-1) * self.buckets(self.bucket(mapped)) + self.recency(recency)
        return out * mask.unsqueeze(-1).to(out.dtype)
