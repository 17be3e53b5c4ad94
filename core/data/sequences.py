"""Next-item data: the leave-one-out training sequences and evaluation rows a task's loaders serve,
and the transform that turns a training sequence into inputs and next-item targets."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from rex.data.datamodule import column, compact_tensor
from rex.data.lance_io import RaggedColumn, read_columns
from rex.data.loader import Column, Ragged

if TYPE_CHECKING:
    from rex.data.datamodule import RexDataModule


def next_item_columns(data: RexDataModule, split: str) -> dict[str, Column]:
    """Training: each user's sequence (at least an input and its next item), served as up to
    ``max_len + 1`` items. Evaluation: ``user``, ``history`` (the model's window), ``target``
    and ``seen``, the whole history."""
    if split != "train":
        columns = data.read(split, ["user", "history", "target"])
        columns["seen"] = whole_lists(columns["history"])
        return columns
    raw = read_columns(data.table(split), ["user", "items"])
    items = raw.pop("items")
    assert isinstance(items, RaggedColumn)
    keep = np.flatnonzero(items.lengths() >= 2)  # an input and a next item at least
    # Compacted before the rows are taken, so the copy that take makes is the small one.
    items = RaggedColumn(compact_tensor(items.values).numpy(), items.offsets).take(keep)
    return {
        "user": compact_tensor(np.asarray(raw.pop("user"))[keep]),
        # max_len inputs and their next items: batches split this in next_item_pairs
        "items": column(items, data.recipe.data.max_len + 1),
    }


def whole_lists(lists: Column) -> Ragged:
    """The same lists served whole: ``gather`` returns every id, not the last ``max_len``."""
    assert isinstance(lists, Ragged)
    longest = int((lists.offsets[1:] - lists.offsets[:-1]).max()) if len(lists) else 0
    return Ragged(lists.values[lists.max_len :], lists.offsets, max(longest, 1))


def next_item_pairs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Sequences (B, W + 1) → ``items`` (B, W) inputs and ``targets`` (B, W), the next item at
    each position (0 where the input is padding), so the loss covers every position."""
    sequences = batch["items"]
    inputs = sequences[:, :-1]
    targets = torch.where(inputs > 0, sequences[:, 1:], 0)
    return {**batch, "items": inputs, "targets": targets}
