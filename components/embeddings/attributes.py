"""Item attribute embeddings: each item's attribute ids (brand, categories...) looked up by item id."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rex.config.registry import register


@register("embedding/item_attributes")
class ItemAttributeEmbedding(nn.Module):
    """Embeds the attributes of item ids: items (*) -> (*, A, dim), or their mean (*, dim).

    ``item_attributes`` (num_items, A) long holds each item's attribute ids, right-padded with
    0 (the datamodule's context value of that name); ids lie in [0, num_attributes) and 0 is
    padding, whose embedding row is zero. ``ids(items) -> (*, A)`` are the ids themselves,
    ``forward(items) -> (*, A, dim)`` their embeddings and ``mean(items) -> (*, dim)`` the
    average over an item's attributes (zeros for an item with none, the padding item included).
    The id table is a buffer, not a parameter: it comes from the data, not from a checkpoint.
    """

    item_attributes: Tensor  # the buffer below

    def __init__(self, item_attributes: Tensor, num_attributes: int, dim: int) -> None:
        super().__init__()
        if item_attributes.dim() != 2:
            raise ValueError(f"item_attributes must be (num_items, A), got {tuple(item_attributes.shape)}")
        if num_attributes < 1 or dim <= 0:
            raise ValueError(f"num_attributes and dim must be positive, got {num_attributes}, {dim}")
        if (
            item_attributes.numel()
            and not 0 <= int(item_attributes.min()) <= int(item_attributes.max()) < num_attributes
        ):
            raise ValueError(f"item_attributes must lie in [0, {num_attributes})")
        self.register_buffer("item_attributes", item_attributes.long(), persistent=False)
        self.embedding = nn.Embedding(num_attributes, dim, padding_idx=0)
        # The scale of the item-id embeddings they sit beside (model/sequential, model/heterrec).
        nn.init.normal_(self.embedding.weight, std=dim**-0.5)
        with torch.no_grad():
            self.embedding.weight[0].zero_()

    @property
    def width(self) -> int:
        """A, the most attributes an item has."""
        return self.item_attributes.shape[1]

    def ids(self, items: Tensor) -> Tensor:
        return self.item_attributes[items]

    def forward(self, items: Tensor) -> Tensor:
        return self.embedding(self.ids(items))

    def mean(self, items: Tensor) -> Tensor:
        # A bag per item never builds the (*, A, dim) embeddings: on Sports, A is 37 and an item
        # has 6 on average. Padding ids are left out of each bag's mean; an empty bag gives zeros.
        ids = self.ids(items)
        bags = F.embedding_bag(ids.reshape(-1, self.width), self.embedding.weight, mode="mean", padding_idx=0)
        return bags.view(*items.shape, -1)


@register("embedding/item_codes")
class ItemCodeEmbedding(ItemAttributeEmbedding):
    """An earlier stage's semantic IDs as sparse item features: items (*) -> (*, columns * dim).

    ``item_codes`` (num_items, C) long is a tokenizer's export (``model/rqvae``, ``model/mmq``:
    row 0 padding, -1); ``columns`` keeps its first columns (default all; a tokenizer's last
    column only separates items that share the others). Each kept column is a field of its own
    ids, embedded ``dim`` wide, and an item's embeddings are concatenated in column order; the
    padding item's are zero. ``out_dim`` is the output width. The ids are read from the export,
    so the table is not part of a checkpoint.
    """

    def __init__(self, item_codes: Tensor, dim: int, columns: int | None = None) -> None:
        if item_codes.dim() != 2 or len(item_codes) < 2 or item_codes.is_floating_point():
            raise ValueError(
                f"item_codes must be an integer (num_items, C) table, got {tuple(item_codes.shape)}"
            )
        if columns is not None and not 1 <= columns <= item_codes.shape[1]:
            raise ValueError(f"columns must lie in [1, {item_codes.shape[1]}], got {columns}")
        codes = item_codes.long()[:, :columns]
        if bool((codes[1:] < 0).any()):
            raise ValueError("item_codes rows 1.. must be non-negative codes (row 0 alone is padding)")
        # Column c's code k is attribute id 1 + offset_c + k: one id space, 0 left for padding.
        sizes = codes[1:].max(dim=0).values + 1
        offsets = 1 + torch.cumsum(sizes, 0) - sizes
        ids = codes + offsets
        ids[0] = 0
        super().__init__(ids, int(offsets[-1] + sizes[-1]), dim)
        self.out_dim = ids.shape[1] * dim

    def forward(self, items: Tensor) -> Tensor:
        return super().forward(items).flatten(-2)
