"""``rex export-index``: a trained retrieval model's item vectors as a Lance vector index."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from rex.config.errors import RexError
from rex.engine.train import restore
from rex.eval.evaluators import RetrievalModel
from rex.eval.vector_index import DEFAULT_KIND, KINDS, IndexSettings, default_settings, write_index

INDEX_NAME = "item_index.lance"


def export_index(
    target: Path, output: Path | None = None, kind: str = DEFAULT_KIND, **overrides: Any
) -> tuple[Path, IndexSettings, int]:
    """Writes the item vectors of ``target``'s best checkpoint (a run folder, a staged run's
    last stage or a .ckpt file) with an index of ``kind``, at ``output`` (default: beside the
    checkpoint's run folder as ``item_index.lance``). ``overrides`` (``num_partitions``,
    ``nprobes``, ...; None keeps the default) replace the measured defaults. Returns the path,
    the settings and the number of items."""
    if kind not in KINDS:
        raise RexError(f"--index {kind!r}: choose {' or '.join(KINDS)}", file="command line")
    restored = restore(target)
    model = restored.built.module.model
    if not isinstance(model, RetrievalModel):
        component = (restored.recipe.model or {}).get("_component_", type(model).__name__)
        raise RexError(
            f"{component} has no item vectors to index: export-index takes a model that scores items by "
            "dot products, with item_vectors() and user_vectors(batch) (SASRec, BERT4Rec, two-tower)",
            file=str(target),
        )
    model.eval()
    with torch.no_grad():
        vectors = model.item_vectors().detach().float().cpu().numpy()
    items = vectors[1:]  # row 0 is the padding item, which is never retrieved
    settings = default_settings(len(items), items.shape[1], kind)
    settings = replace(settings, **{name: value for name, value in overrides.items() if value is not None})
    path = output or restored.checkpoint.parent.parent / INDEX_NAME
    write_index(path, torch.arange(1, len(vectors)).numpy(), items, settings)
    return path, settings, len(items)
