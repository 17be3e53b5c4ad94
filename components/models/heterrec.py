"""HeterRec (Deng et al., arXiv:2503.01469): items flattened into heterogeneous tokens, a
hierarchical causal transformer over them, and a listwise multi-step prediction target."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rex.components.embeddings.attributes import ItemAttributeEmbedding
from rex.components.models.sequential import SequentialRecommender
from rex.config.registry import Factory, register


class PackedTokens(NamedTuple):
    """The tokens present in a (B, L) batch, row by row, item by item, slot by slot."""

    x: Tensor  # (P, dim) their vectors
    row: Tensor  # (P,) the batch row of each
    position: Tensor  # (P,) the item position of each
    per_item: Tensor  # (B, L) how many each item has


@register("model/heterrec")
class HeterRec(SequentialRecommender):
    """HeterRec: each item as K = 1 + A tokens (its id and its attributes), token- then item-level attention.

    Heterogeneous token flattening: item ``i`` of a (B, L) history becomes its id token and its
    A attribute tokens (``item_attributes`` (num_items, A), right-padded with 0), each embedding
    plus a slot embedding (slot 0 the id, slot j the j-th attribute) plus the item's position,
    flattened into one sequence per row of the tokens present. Hierarchical causal transformer:
    ``token_encoder`` attends over the tokens under :meth:`hierarchical_mask` (a token sees every
    token of its own item and of earlier items, never a later item's; absent attributes and
    padding never), each item's tokens are averaged into one (B, L, dim) vector, and the causal
    ``item_encoder`` runs over those. Both are ``encoder/transformer`` s; the token one should be
    non-causal (``causal: false``), since the item-level mask is the model's. Without a
    ``token_encoder`` (null: the ablation with no token-level attention) the token embeddings are
    averaged as they are. Items are scored against the tied item-id embeddings, as in
    ``model/sequential``.

    Training batch: ``items`` (B, L) and ``targets`` (B, L), left-padded with 0. Returns
    ``logits`` (P, num_items) at the P positions with a next item and ``labels`` (P, steps),
    the next ``steps`` items after each (0 past the end of the sequence), for
    ``loss/multi_step_ce``. Scoring batch: ``history`` (B, L) → ``scores`` (B, num_items) from
    the last position.
    """

    def __init__(
        self,
        num_items: int,
        max_len: int,
        item_attributes: Tensor,
        num_attributes: int,
        token_encoder: Factory[nn.Module] | None,
        item_encoder: Factory[nn.Module],
        dim: int = 64,
        dropout: float = 0.2,
        steps: int = 3,
    ) -> None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if len(item_attributes) != num_items:
            raise ValueError(
                f"item_attributes must have num_items = {num_items} rows, got {len(item_attributes)}"
            )
        super().__init__(num_items, max_len, item_encoder, dim, dropout)
        self.steps = steps
        self.attribute_tokens = ItemAttributeEmbedding(item_attributes, num_attributes, dim)
        self.slot_embedding = nn.Embedding(1 + self.attribute_tokens.width, dim)
        self.token_encoder = token_encoder(dim=dim) if token_encoder is not None else None

    @staticmethod
    def hierarchical_mask(item_of: Tensor) -> Tensor:
        """The item index of each token (..., T) → (..., T, T) bool, True where a token (row) may
        attend to a token (column): any token of its own item or of an earlier one."""
        return item_of[..., None, :] <= item_of[..., :, None]

    def tokens(self, items: Tensor) -> PackedTokens:
        """(B, L) item ids → the present tokens, embedded: (P, dim) in :class:`PackedTokens`.

        Only present tokens are embedded: a batch is mostly padding (Beauty's training windows
        hold 5.7 items on average but are padded to the longest, about 48) and an item has far
        fewer attributes than the widest (3.7 of 6 on Beauty, 6 of 37 on Sports), so the dense
        (B, L, K, dim) tensor is over twenty times the work and memory on Sports.
        """
        assert self.position_embedding is not None  # always built: positional is left at True
        ids = torch.cat([items[:, :, None], self.attribute_tokens.ids(items)], dim=2)
        present = ids > 0
        row, position, slot = present.nonzero(as_tuple=True)
        token_ids, is_id = ids[present], slot == 0
        # Row 0 of either table is zero padding: each token reads its own table, 0 in the other.
        embedded = torch.where(
            is_id[:, None],
            self.item_embedding(token_ids * is_id),
            self.attribute_tokens.embedding(token_ids * ~is_id),
        )
        positions = self.positions(self.position_embedding, items.shape[1], items.device)
        x = embedded * math.sqrt(self.dim) + self.slot_embedding(slot) + positions[position]
        return PackedTokens(x, row, position, present.sum(dim=2))

    def encode(self, items: Tensor, last_only: bool = False) -> Tensor:
        """(B, L) item ids, left-padded → (B, L, dim) item states ((B, 1, dim) if ``last_only``)."""
        tokens = self.tokens(items)
        x = self.dropout(tokens.x)
        if self.token_encoder is not None:
            x = self.token_level(x, tokens)
        # Each item's vector: the mean over its present tokens.
        b, length = items.shape
        sums = x.new_zeros(b * length, self.dim).index_add(0, tokens.row * length + tokens.position, x)
        pooled = sums.view(b, length, self.dim) / tokens.per_item[..., None].clamp(min=1)
        return self.encoder(pooled, items == 0, last_only=last_only)

    def token_level(self, x: Tensor, tokens: PackedTokens) -> Tensor:
        """The (P, dim) vectors of ``tokens`` (:meth:`tokens`) → their states (P, dim): the
        token encoder over each row's tokens under :meth:`hierarchical_mask`.

        Rows run in groups by their count of tokens rounded up to a power of two, each row's
        tokens right-aligned in its group's width and left-padded. Padding changes no token's
        state, so this is the one-pass result over the whole L·K width for a small part of the
        work (under a twentieth of the attention on Beauty).
        """
        assert self.token_encoder is not None
        length, k = tokens.per_item.shape[1], 1 + self.attribute_tokens.width
        counts = tokens.per_item.sum(dim=1)
        ends = counts.cumsum(0)
        edges = torch.tensor([2**i for i in range((length * k).bit_length() + 1)], device=x.device)
        widths = edges[torch.bucketize(counts, edges)].clamp(max=length * k)
        states = torch.empty_like(x)
        for width in widths[counts > 0].unique().tolist():
            rows = ((widths == width) & (counts > 0)).nonzero()[:, 0]
            offsets = torch.arange(-width, 0, device=x.device)
            padding = offsets < -counts[rows, None]  # (n, width)
            index = (ends[rows, None] + offsets).clamp(min=0)  # into the P tokens
            # A padding query may see every token (its state is dropped), so no row is empty.
            item_of = torch.where(padding, length, tokens.position[index])
            out = self.token_encoder(x[index], padding, allowed=self.hierarchical_mask(item_of)[:, None])
            states[index[~padding]] = out[~padding]
        return states

    def future(self, items: Tensor, targets: Tensor) -> Tensor:
        """(B, L) inputs and next items → (B, L, steps): the ``steps`` items after each position
        (0 past the end of the sequence), read off the sequence the two make together."""
        sequences = F.pad(torch.cat([items, targets[:, -1:]], dim=1), (0, self.steps - 1))
        return sequences.unfold(1, self.steps, 1)[:, 1:]

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        outputs = super().forward(batch)
        if "targets" in batch:
            outputs["labels"] = self.future(batch["items"], batch["targets"])[batch["targets"] > 0]
        return outputs
