"""The fast full-ranking evaluator against a slow, independent reference on real Beauty.

The evaluator serves users in order of history length, scores them in row chunks, runs the
transformer's last block for the last position alone and counts ranks in int32. The reference
does none of that: users in file order, every position of a max_len-padded history encoded,
history masked item by item, ranks from a full sort, metrics from the textbook formulas.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from rex.config.recipe import load_recipe
from rex.engine.build import build_run

REPO = Path(__file__).resolve().parents[1]
K = 10


def _reference_ranks(model: torch.nn.Module, history: torch.Tensor, target: torch.Tensor) -> list[int]:
    """0-based pessimistic rank of each row's target among the items not in its history."""
    ranks: list[int] = []
    with torch.no_grad():
        for start in range(0, len(target), 1024):
            rows = history[start : start + 1024]
            scores = model.encode(rows)[:, -1] @ model.item_embedding.weight.T
            scores[:, 0] = -math.inf
            for row, items in enumerate(rows.tolist()):
                scores[row, [i for i in items if i > 0]] = -math.inf
            own = scores.gather(1, target[start : start + 1024, None])
            below = torch.searchsorted(scores.sort(dim=1).values, own)  # items scoring less
            ranks += (scores.shape[1] - below - 1).squeeze(1).tolist()
    return ranks


def test_fast_ranking_evaluator_equals_reference_on_beauty(data_home: Path) -> None:
    loaded = load_recipe(
        REPO / "recipes" / "sasrec.yaml",
        [f"eval.metrics=[ndcg@{K},recall@{K},mrr@{K}]", "eval.batch_size=700"],
    )
    built = build_run(loaded.recipe, 7, "sasrec.yaml")
    model = built.module.model
    # A few training steps, so scores are spread out rather than a fresh initialisation's.
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _, batch in zip(range(5), built.datamodule.loader("train"), strict=False):
        out = model(batch)
        optimizer.zero_grad()
        F.cross_entropy(out["logits"], out["labels"]).backward()
        optimizer.step()
    model.eval()

    loader = built.datamodule.loader("test")
    assert not torch.equal(loader.sampler.order(), torch.arange(loader.num_rows))  # by length
    evaluator = built.module.evaluator
    evaluator.reset()
    for batch in loader:
        evaluator.update(model, batch)
    fast = evaluator.compute()

    every_user = torch.arange(loader.num_rows)
    history = loader.columns["history"].gather(every_user)  # file order
    padded = F.pad(history, (loaded.recipe.data.max_len - history.shape[1], 0))
    ranks = _reference_ranks(model, padded, loader.columns["target"].long())
    hits = [rank for rank in ranks if rank < K]
    reference = {
        f"ndcg@{K}": sum(1 / math.log2(rank + 2) for rank in hits) / len(ranks),
        f"recall@{K}": len(hits) / len(ranks),
        f"mrr@{K}": sum(1 / (rank + 1) for rank in hits) / len(ranks),
    }
    assert reference[f"ndcg@{K}"] > 0.001  # the check compares real rankings, not all misses
    for name, value in reference.items():
        assert math.isclose(fast[name], value, abs_tol=1e-6), (name, fast[name], value)
