"""DMGIN: Deep Multimodal Group Interest Network for lifelong histories (arXiv:2508.21801)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rex.components.models.shared import item_fields
from rex.config.registry import Factory, register


@register("model/dmgin")
class DMGIN(nn.Module):
    """Grouped long-history CTR model; returns ``logit`` (B,).

    Batch: one (B,) id tensor per field of ``use_fields`` (``item`` among them) and ``history``
    (B, L) item ids, left-padded with 0. ``item_groups`` (num_items,) long maps each item id to
    its offline K-means group (datamodule context). The history's id embeddings and groups go
    through ``encoder`` (``encoder/hierarchical``: intra-group transformer, group statistics,
    inter-group transformer) to (B, K, dim) group vectors; candidate-aware attention
    (``interest``, DIN's target attention) pools them against the target item, whose own group
    embedding is added to its id embedding. The tower sees the field embeddings and that pool.
    """

    def __init__(
        self,
        fields: dict[str, int],
        item_groups: Tensor,
        embed: Factory[nn.Module],
        encoder: Factory[nn.Module],
        interest: Factory[nn.Module],
        tower: Factory[nn.Module],
        use_fields: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.outputs = frozenset({"logit"})
        used = item_fields(fields, use_fields)
        if item_groups.dim() != 1 or len(item_groups) != fields["item"]:
            raise ValueError(
                f"item_groups must be (num_items,) = ({fields['item']},), got {tuple(item_groups.shape)}"
            )
        self.register_buffer("item_groups", item_groups.long(), persistent=False)
        num_groups = int(item_groups.max()) + 1
        self.embed = embed(fields=used)
        dim = self.embed.dim
        self.item_slot = list(used).index("item")
        self.group_embedding = nn.Embedding(num_groups, dim)
        self.encoder = encoder(dim=dim, num_groups=num_groups)
        self.interest = interest(dim=dim)
        self.tower = tower(in_dim=(len(used) + 1) * dim)
        self.head = nn.Linear(self.tower.out_dim, 1)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        embedded = self.embed(batch)
        history = batch["history"]
        groups = self.item_groups[history]
        group_vectors, group_mask = self.encoder(
            self.embed.lookup("item", history) + self.group_embedding(groups), groups, history > 0
        )
        target = embedded[:, self.item_slot] + self.group_embedding(self.item_groups[batch["item"]])
        pooled = self.interest(target, group_vectors, group_mask)
        logit = self.head(self.tower(torch.cat([embedded.flatten(1), pooled], dim=1))).squeeze(-1)
        return {"logit": logit}
