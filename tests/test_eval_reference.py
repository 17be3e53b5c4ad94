"""The fast full-ranking evaluator against a slow, independent reference on real Beauty.

The evaluator serves users in order of history length, scores them in row chunks, runs the
transformer's last block for the last position alone and counts ranks in int32. The reference
does none of that: users in file order, read from the Lance table rather than the loader, every
position of a max_len-padded window encoded, the whole history (not only the window) masked item
by item, ranks from a full sort, metrics from the textbook formulas.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from rex.config.recipe import load_recipe
from rex.data.lance_io import RaggedColumn, read_columns
from rex.data.prepare import prepare_dataset
from rex.engine.build import HistoryMasking, build_run
from rex.eval.evaluators import RankingEvaluator

REPO = Path(__file__).resolve().parents[1]
K = 10
WHOLE = 100_000  # a cut-off beyond every item: mrr over each target's whole rank, so a rank moved
# anywhere (by an item before the window left unmasked, say) changes it


def _reference_ranks(
    model: torch.nn.Module, window: torch.Tensor, histories: list[list[int]], target: torch.Tensor
) -> list[int]:
    """0-based pessimistic rank of each row's target among the items not in its whole history,
    scored from the (B, max_len) ``window``."""
    ranks: list[int] = []
    with torch.no_grad():
        for start in range(0, len(target), 1024):
            rows = window[start : start + 1024]
            scores = model.encode(rows)[:, -1] @ model.item_embedding.weight.T
            scores[:, 0] = -math.inf
            for row, items in enumerate(histories[start : start + 1024]):
                scores[row, items] = -math.inf
            own = scores.gather(1, target[start : start + 1024, None])
            below = torch.searchsorted(scores.sort(dim=1).values, own)  # items scoring less
            ranks += (scores.shape[1] - below - 1).squeeze(1).tolist()
    return ranks


def test_fast_ranking_evaluator_equals_reference_on_beauty(data_home: Path) -> None:
    loaded = load_recipe(
        REPO / "recipes" / "sasrec.yaml",
        [f"eval.metrics=[ndcg@{K},recall@{K},mrr@{K},mrr@{WHOLE}]", "eval.batch_size=700"],
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

    table = read_columns(data_home / "beauty" / "seq_test.lance", ["history", "target"])
    assert isinstance(table["history"], RaggedColumn)
    histories = [table["history"].row(r).tolist() for r in range(len(table["history"]))]
    max_len = loaded.recipe.data.max_len
    assert sum(len(h) > max_len for h in histories) > 100  # items before the window exist
    window = torch.tensor([[0] * (max_len - len(h[-max_len:])) + h[-max_len:] for h in histories])
    ranks = _reference_ranks(model, window, histories, torch.tensor(table["target"]).long())
    hits = [rank for rank in ranks if rank < K]
    reference = {
        f"ndcg@{K}": sum(1 / math.log2(rank + 2) for rank in hits) / len(ranks),
        f"recall@{K}": len(hits) / len(ranks),
        f"mrr@{K}": sum(1 / (rank + 1) for rank in hits) / len(ranks),
        f"mrr@{WHOLE}": sum(1 / (rank + 1) for rank in ranks) / len(ranks),
    }
    assert reference[f"ndcg@{K}"] > 0.001  # the check compares real rankings, not all misses
    for name, value in reference.items():
        assert math.isclose(fast[name], value, abs_tol=1e-6), (name, fast[name], value)


def test_on_data_with_repeats_the_default_masks_nothing(data_home: Path) -> None:
    # Scientific has test targets already in the user's history. Masking makes each a certain
    # miss, so the default there is not to mask; a recipe that wants masking says so.
    prepare_dataset("scientific", root=data_home)
    overrides = ["data.name=scientific", "data.max_len=20"]
    default = build_run(load_recipe(REPO / "recipes" / "sasrec.yaml", overrides).recipe, 7, "sasrec.yaml")
    masking = default.history_masking
    assert isinstance(masking, HistoryMasking) and not masking.exclude and not masking.chosen
    assert masking.repeats >= 50 and "set eval.exclude_history" in str(masking.notice())
    assert default.module.evaluator.exclude_history is False
    chosen = load_recipe(REPO / "recipes" / "sasrec.yaml", [*overrides, "eval.exclude_history=true"]).recipe
    masked = build_run(chosen, 7, "sasrec.yaml").history_masking
    assert masked == HistoryMasking(True, True, masking.repeats, masking.rows) and masked.notice() is None

    # The real repeated targets of the test split, under both settings, with one model.
    loader = default.datamodule.loader("test")
    every_row = torch.arange(loader.num_rows)
    seen, target = loader.columns["seen"].gather(every_row), loader.columns["target"].long()
    rows = every_row[(seen == target[:, None]).any(dim=1)]
    assert len(rows) >= 25
    columns = loader.columns
    batch = {
        "user": columns["user"][rows],
        "history": columns["history"].gather(rows),
        "seen": columns["seen"].gather(rows),
        "target": target[rows],
    }
    model = default.module.model.eval()
    ranks = {}
    for exclude in (False, True):
        evaluator = RankingEvaluator(["recall@10"], exclude_history=exclude)
        evaluator.update(model, batch)
        ranks[exclude] = torch.cat(evaluator._ranks)
    num_items = default.datamodule.schema.num_items
    assert bool((ranks[True] == num_items).all())  # masked: every repeated target a certain miss
    assert bool((ranks[False] < num_items - 1).all())  # unmasked: each is ranked among the items


class _FixedScores(torch.nn.Module):
    """One seeded score per item, the same for every user: a rank then depends on the mask only."""

    def __init__(self, num_items: int) -> None:
        super().__init__()
        self.scores = torch.randn(num_items, generator=torch.Generator().manual_seed(0))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"scores": self.scores.expand(len(batch["target"]), -1).clone()}


def test_items_before_the_window_are_masked_too(data_home: Path) -> None:
    # Beauty users with more than max_len items: the model reads the last max_len, but the
    # protocol excludes the whole history, so no earlier item may be ranked above the target.
    loaded = load_recipe(REPO / "recipes" / "sasrec.yaml", ["eval.metrics=[ndcg@10]"])
    built = build_run(loaded.recipe, 7, "sasrec.yaml")
    max_len, num_items = loaded.recipe.data.max_len, built.datamodule.schema.num_items
    table = read_columns(data_home / "beauty" / "seq_test.lance", ["history", "target"])
    assert isinstance(table["history"], RaggedColumn)
    rows = [r for r in range(len(table["history"])) if len(table["history"].row(r)) > max_len]
    assert len(rows) > 100

    model = _FixedScores(num_items)
    expected = []
    for r in rows:
        masked = set(table["history"].row(r).tolist()) | {0}
        target = int(table["target"][r])
        target_score = model.scores[target]
        expected.append(
            sum(
                1
                for j in range(num_items)
                if j not in masked and j != target and model.scores[j] >= target_score
            )
        )

    columns, index = built.datamodule.loader("test").columns, torch.tensor(rows)
    batch = {
        "history": columns["history"].gather(index),
        "seen": columns["seen"].gather(index),
        "target": columns["target"][index].long(),
    }
    assert batch["history"].shape[1] == max_len and batch["seen"].shape[1] > max_len
    evaluator = built.module.evaluator
    evaluator.reset()
    evaluator.update(model, batch)
    assert torch.cat(evaluator._ranks).tolist() == expected
