"""Click-through-rate models assembled from an embedding, interactions and an MLP tower."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rex.components.embeddings.field import FieldEmbedding
from rex.registry import Factory, register


@register("model/ctr")
class CTRModel(nn.Module):
    """CTR tower: field embeddings → [target attention over the history] → MLP → click logit.

    With ``interaction: interaction/fm`` and ``linear: true`` it is DeepFM; with
    ``interest: attention/target`` it is DIN. Batch: one (B,) id tensor per categorical field,
    plus ``history`` (B, L) item ids (left-padded with 0) when ``interest`` is set.
    Returns ``logit`` (B,).
    """

    def __init__(
        self,
        fields: dict[str, int],
        embed: Factory[nn.Module],
        tower: Factory[nn.Module],
        interaction: Factory[nn.Module] | None = None,
        interest: Factory[nn.Module] | None = None,
        linear: bool = False,
        use_fields: list[str] | None = None,
    ) -> None:
        super().__init__()
        if use_fields is not None:
            unknown = sorted(set(use_fields) - set(fields))
            if unknown:
                raise ValueError(f"use_fields {unknown} are not in the dataset's fields {sorted(fields)}")
            fields = {name: fields[name] for name in use_fields}
        if interest is not None and "item" not in fields:
            raise ValueError("interest (target attention) needs the 'item' field")
        self.embed = embed(fields=fields)
        dim = self.embed.dim
        self.item_slot = list(fields).index("item") if "item" in fields else -1
        self.interest = interest(dim=dim) if interest is not None else None
        width = len(fields) * dim + (dim if self.interest is not None else 0)
        self.tower = tower(in_dim=width)
        self.head = nn.Linear(self.tower.out_dim, 1)
        self.interaction = interaction() if interaction is not None else None
        self.first_order = FieldEmbedding(fields, dim=1) if linear else None
        self.bias = nn.Parameter(torch.zeros(1)) if linear else None

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        embedded = self.embed(batch)
        parts = [embedded.flatten(1)]
        if self.interest is not None:
            history = batch["history"]
            interest = self.interest(
                embedded[:, self.item_slot], self.embed.lookup("item", history), history > 0
            )
            parts.append(interest)
        logit = self.head(self.tower(torch.cat(parts, dim=1))).squeeze(-1)
        if self.interaction is not None:
            logit = logit + self.interaction(embedded)
        if self.first_order is not None and self.bias is not None:
            logit = logit + self.first_order(batch).sum(dim=(1, 2)) + self.bias
        return {"logit": logit}
