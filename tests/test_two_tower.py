"""Multi-objective two-tower retrieval on real taobao_mb: the retrieval view is leak-free, training
batches join each user's lists without the row's own pair, the model's shapes, gradients and
retrieval protocol, and per-objective and fused metrics checked by hand on a tiny case."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from rex.config.recipe import load_recipe
from rex.data.lance_io import RaggedColumn, read_columns
from rex.data.loader import Ragged
from rex.data.mirror import mirror_dir
from rex.data.objectives import ObjectiveJoin
from rex.data.prepare import prepare_dataset
from rex.engine.build import Built, build_run
from rex.eval.retrieval import RetrievalEvaluator
from tests.conftest import REPO

pytestmark = pytest.mark.skipif(
    mirror_dir() is None, reason="no data mirror (../shared/data or REX_DATA_MIRROR)"
)

BEHAVIORS = ("view", "cart", "buy")
RECIPES = ("two_tower_shared_bottom.yaml", "two_tower_mmoe.yaml", "two_tower_separate.yaml")


@pytest.fixture(scope="module")
def home(data_home: Path) -> Path:
    """The session's data home, with taobao_mb prepared from the mirror."""
    prepare_dataset("taobao_mb", root=data_home)
    return data_home


def _built(recipe: str, *overrides: str) -> Built:
    loaded = load_recipe(
        REPO / "recipes" / recipe, ["train.batch_size=512", "eval.batch_size=256", *overrides]
    )
    return build_run(loaded.recipe, 0, recipe)


def _keys(users: np.ndarray, items: np.ndarray) -> np.ndarray:
    return users.astype(np.int64) * 100_000 + items


def _list_keys(lists: RaggedColumn, users: np.ndarray) -> np.ndarray:
    return _keys(np.repeat(users, lists.lengths()), lists.values)


def test_retrieval_view_is_leak_free(home: Path) -> None:
    directory = home / "taobao_mb"
    train = read_columns(directory / "ret_train.lance", ["user", "item", "objective"])
    users_table = read_columns(directory / "ret_users.lance", ["user", *(f"history_{b}" for b in BEHAVIORS)])
    valid = read_columns(
        directory / "ret_valid.lance",
        ["user", *(f"{p}_{b}" for p in ("history", "target") for b in BEHAVIORS)],
    )
    test = read_columns(
        directory / "ret_test.lance",
        ["user", *(f"{p}_{b}" for p in ("history", "target") for b in BEHAVIORS)],
    )
    np.testing.assert_array_equal(users_table["user"], np.arange(len(users_table["user"])))
    for k, behavior in enumerate(BEHAVIORS, start=1):
        rows = train["objective"] == k
        train_keys = _keys(train["user"][rows], train["item"][rows])
        per_behavior = read_columns(directory / f"ret_train_{behavior}.lance", ["user", "item", "objective"])
        np.testing.assert_array_equal(_keys(per_behavior["user"], per_behavior["item"]), train_keys)
        assert (per_behavior["objective"] == k).all()
        # The users table holds exactly the training pairs; valid rows read them as they are.
        lists = users_table[f"history_{behavior}"]
        assert np.array_equal(np.sort(_list_keys(lists, users_table["user"])), np.sort(train_keys))
        valid_lists = valid[f"history_{behavior}"]
        assert np.array_equal(
            _list_keys(valid_lists, valid["user"]), _list_keys(lists.take(valid["user"]), valid["user"])
        )
        held = {}
        for name, split in (("valid", valid), ("test", test)):
            has = split[f"target_{behavior}"] > 0
            held[name] = _keys(split["user"][has], split[f"target_{behavior}"][has])
            # No held-out pair is trained on, nor in its split's own lists of that behaviour.
            assert not np.isin(held[name], train_keys).any()
            assert not np.isin(held[name], _list_keys(split[f"history_{behavior}"], split["user"])).any()
        assert not np.isin(held["test"], held["valid"]).any()
        # Test rows also see the validation items; one test item per user and behaviour (given).
        test_lists = np.sort(_list_keys(test[f"history_{behavior}"], test["user"]))
        assert np.array_equal(test_lists, np.sort(np.concatenate([train_keys, held["valid"]])))
        assert len(held["test"]) == 15449 == len(np.unique(test["user"]))


def test_the_training_join_drops_only_the_rows_own_pair() -> None:
    values = torch.tensor([5, 6, 7, 6, 8])  # user 1: view [5, 6, 7]; user 2: view [6, 8]
    views = Ragged(values, torch.tensor([0, 0, 3, 5]), max_len=10)
    carts = Ragged(torch.tensor([6, 9]), torch.tensor([0, 0, 1, 2]), max_len=10)  # user 1: [6], 2: [9]
    join = ObjectiveJoin({"history_view": views, "history_cart": carts})
    batch = {
        "user": torch.tensor([1, 1, 2]),
        "item": torch.tensor([6, 6, 9]),
        "objective": torch.tensor([1, 2, 2]),
    }
    out = join(batch)
    # Row 0 learns view 6: it leaves the view list, not the cart list; row 1 learns cart 6.
    assert out["history_view"].tolist() == [[5, 0, 7], [5, 6, 7], [0, 6, 8]]
    assert out["history_cart"].tolist() == [[6], [0], [0]]  # row 2 learns cart 9


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("negatives", ["2048", "null"])
def test_shapes_gradients_and_the_retrieval_protocol(home: Path, recipe: str, negatives: str) -> None:
    built = _built(recipe, f"model.negatives={negatives}")
    model = built.module.model
    batch = next(iter(built.datamodule.loader("train")))
    assert set(batch["objective"].tolist()) == {1, 2, 3}
    outputs = model(batch)
    width = 1 + 2048 if negatives == "2048" else model.num_items
    assert outputs["logits"].shape == (len(batch["item"]), width)
    built.module.losses[0].module(outputs, batch).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing

    model.eval()
    rows = next(iter(built.datamodule.loader("valid")))
    with torch.no_grad():
        queries, items = model.objective_vectors(rows), model.item_vectors()
        depth = 3 * 64 if recipe == "two_tower_separate.yaml" else 64
        assert queries.shape == (len(rows["user"]), 3, depth) and items.shape == (model.num_items, depth)
        torch.testing.assert_close(model(rows)["scores"], queries @ items.T)
        fusion = {"view": 0.2, "buy": 0.8}
        torch.testing.assert_close(
            model.user_vectors(rows, fusion), 0.2 * queries[:, 0] + 0.8 * queries[:, 2]
        )
        # A training row's query is its own objective's.
        own = model.own_queries(batch)
        torch.testing.assert_close(
            own, model.objective_vectors(batch)[torch.arange(len(own)), batch["objective"] - 1]
        )
    if recipe == "two_tower_separate.yaml":
        # Separate towers: objective k's query lives in tower k's block only.
        blocks = queries.reshape(len(queries), 3, 3, 64).abs().sum(-1)
        assert (blocks[:, ~torch.eye(3, dtype=torch.bool)] == 0).all()


class _Fixed(nn.Module):
    """A two-objective retrieval model with given vectors (the protocol eval/retrieval reads)."""

    objectives = ["view", "buy"]

    def __init__(self, queries: Tensor, items: Tensor) -> None:
        super().__init__()
        self.queries, self.items = queries, items

    def item_vectors(self) -> Tensor:
        return self.items

    def objective_vectors(self, batch: dict[str, Tensor]) -> Tensor:
        return self.queries[batch["user"]]


def test_per_objective_and_fused_metrics_by_hand() -> None:
    # Items 1..4 on one axis each (item 0 is padding). User 0 prefers 1 > 2 > 3 > 4 for view and
    # 4 > 3 > 2 > 1 for buy; user 1 the reverse for view and has no held-out buy.
    items = torch.tensor([[9.0, 9, 9, 9], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    queries = torch.tensor([[[4.0, 3, 2, 1], [1, 2, 3, 4.5]], [[1, 2, 3, 4], [1, 1, 1, 1]]])
    batch = {
        "user": torch.tensor([0, 1]),
        "target_view": torch.tensor([3, 2]),
        "target_buy": torch.tensor([2, 0]),
        "seen_view": torch.tensor([[0, 1], [4, 3]]),  # excluded from view's ranking
        "seen_buy": torch.tensor([[0, 0], [0, 0]]),
    }
    roles = {"target:view": "target_view", "target:buy": "target_buy"}
    evaluator = RetrievalEvaluator(
        ["recall@1", "recall@2", "ndcg@2"], roles, fusion={"view": 1.0, "buy": 1.0}
    )
    evaluator.update(_Fixed(queries, items), batch)
    got = evaluator.compute()
    # view, user 0: item 1 excluded, so 2 > 3 > 4: the target 3 is 2nd. User 1: 4, 3 excluded,
    # 2 > 1: the target 2 is 1st.
    assert got["recall@1:view"] == 0.5 and got["recall@2:view"] == 1.0
    assert got["ndcg@2:view"] == pytest.approx((1 / math.log2(3) + 1) / 2)
    # buy, user 0 only: 4 > 3 > 2 > 1, the target 2 is 3rd.
    assert got["recall@2:buy"] == 0.0 and got["ndcg@2:buy"] == 0.0
    # fused = view + buy query: user 0 scores (5, 5, 5, 5.5) -> buy's 4 first, then ties at 5.
    # Ties count against the target, so buy's 2 is 4th; for view (1 excluded) 3 is 3rd. User 1:
    # (2, 3, 4, 5) with 4, 3 excluded for view, so 2 is 1st.
    assert got["recall@2:fused_buy"] == 0.0 and got["recall@1:fused_view"] == 0.5
    assert got["recall@2:fused_view"] == 0.5
    assert got["recall@2"] == pytest.approx((0.5 + 0.0) / 2)  # the fused metrics' mean
    # A weight of 0 leaves that objective out of the fused metrics.
    view_only = RetrievalEvaluator(["recall@2"], roles, fusion={"view": 1.0})
    view_only.update(_Fixed(queries, items), batch)
    assert set(view_only.compute()) == {"recall@2", "recall@2:view", "recall@2:fused_view", "recall@2:buy"}
    with pytest.raises(ValueError, match="not an objective"):
        RetrievalEvaluator(["recall@2"], roles, fusion={"click": 1.0})
