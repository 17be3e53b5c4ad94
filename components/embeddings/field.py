"""Fused embedding table for categorical fields."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rex.config.registry import register


@register("embedding/field")
class FieldEmbedding(nn.Module):
    """One fused embedding table for all categorical fields: F id columns -> (B, F, dim).

    ``fields`` maps field name to vocabulary size; ids lie in ``[0, size)`` and id 0 is the
    padding/unknown id of each field (a trainable row; consumers mask padding themselves).
    ``forward(batch: {name: (B,) ids}, names=None) -> (B, F, dim)`` for the named fields
    (default: all, in ``fields`` order), as one gather. ``lookup(field, ids)`` embeds ids of
    any shape with one field's rows: ``(*ids.shape) -> (*ids.shape, dim)``. Ids are not
    range-checked per batch.
    """

    def __init__(self, fields: dict[str, int], dim: int, init_std: float = 0.01) -> None:
        super().__init__()
        if not fields:
            raise ValueError("fields must name at least one categorical field")
        bad = {n: s for n, s in fields.items() if s < 1}
        if bad:
            raise ValueError(f"vocabulary sizes must be >= 1, got {bad}")
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        if init_std <= 0:
            raise ValueError(f"init_std must be positive, got {init_std}")
        self.names: list[str] = list(fields)
        self.dim = dim
        self.vocab_sizes: dict[str, int] = dict(fields)
        starts = [0]
        for size in fields.values():
            starts.append(starts[-1] + size)
        self._offset: dict[str, int] = dict(zip(self.names, starts[:-1], strict=True))
        self._position: dict[str, int] = {n: i for i, n in enumerate(self.names)}
        self.register_buffer("offsets", torch.tensor(starts[:-1], dtype=torch.long), persistent=False)
        self.embedding = nn.Embedding(starts[-1], dim)
        nn.init.normal_(self.embedding.weight, std=init_std)

    def _offsets_for(self, names: list[str]) -> Tensor:
        if names == self.names:
            return self.offsets
        try:
            index = [self._position[n] for n in names]
        except KeyError as exc:
            raise KeyError(f"unknown field {exc.args[0]!r}; fields are {', '.join(self.names)}") from None
        return self.offsets[torch.tensor(index, device=self.offsets.device)]

    def forward(self, batch: dict[str, Tensor], names: list[str] | None = None) -> Tensor:
        return self._rows(self.global_ids(batch, names))

    def global_ids(self, batch: dict[str, Tensor], names: list[str] | None = None) -> Tensor:
        """(B, F) the fields' ids as rows of the fused table: unique across fields."""
        names = self.names if names is None else names
        return torch.stack([batch[n] for n in names], dim=-1) + self._offsets_for(names)

    def lookup(self, field: str, ids: Tensor) -> Tensor:
        if field not in self._offset:
            raise KeyError(f"unknown field {field!r}; fields are {', '.join(self.names)}")
        return self._rows(ids + self._offset[field])

    def _rows(self, rows: Tensor) -> Tensor:
        """Table rows for row indices of any shape: (*rows.shape) -> (*rows.shape, dim)."""
        if rows.device.type != "cpu":
            # embedding's sort-based backward is deterministic on CUDA; index_add_ uses atomics.
            return self.embedding(rows)
        # index_select's backward is index_add_: on CPU the same gradient bits as embedding's
        # dense backward, about 3x faster (0.55 against 1.7 ms for a 4096 x 10 batch).
        return self.embedding.weight.index_select(0, rows.reshape(-1)).view(*rows.shape, self.dim)
