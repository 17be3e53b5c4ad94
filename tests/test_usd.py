"""decoding/usd (Uncertainty-aware Semantic Decoding, arXiv:2508.07210) and the evaluators' ``decoding``
seam: shapes, a hand-computed case, behavioural properties on models scoring real Beauty histories,
determinism, the key switching it on and off (eval/ranking and eval/generative), @3 metrics, and
the command line's error for a bad decoding node.

Only the shape and hand-computed tests use made-up numbers; the rest score real users' histories
(SASRec over all 12,101 Beauty items, TIGER over the real 200-item code table of test_tiger)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor

import rex.builtins  # noqa: F401
from rex.config.errors import RecipeError
from rex.config.registry import build
from rex.data.lance_io import RaggedColumn, read_columns
from rex.eval.evaluators import ranking_metrics
from tests.conftest import REPO, run_rex
from tests.test_cli_errors import SASREC, assert_clean_error, recipe_in
from tests.test_tiger import ITEMS, _left_pad, _tiger, beauty  # noqa: F401  (beauty: a fixture)


def _usd(k: int, **kwargs: object):
    node = {"_component_": "decoding/usd", "cluster": {"_component_": "cluster/kmeans", "k": k}, **kwargs}
    return build(node, "eval.evaluator.decoding")


# --------------------------------------------------------------------------- the transform alone


def test_shapes_and_masked_entries() -> None:
    usd = _usd(3, mix=0.5, entropy_weight=1.0)
    torch.manual_seed(0)
    usd.fit([torch.randn(8, 4), torch.randn(5, 4)])
    assert [g.shape for g in usd.groups] == [(8,), (5,)]
    scores = torch.randn(2, 3, 8)
    scores[0, 1, [2, 5]] = -torch.inf
    out = usd(scores, 0)
    assert out.shape == scores.shape and out.dtype == torch.float64
    assert torch.equal(torch.isinf(out), torch.isinf(scores))  # masked stays masked, nothing else
    assert torch.allclose(out.exp().sum(-1), torch.ones(2, 3, dtype=torch.float64))  # a distribution per row
    assert usd(torch.randn(4, 5), 1).shape == (4, 5)
    with pytest.raises(ValueError, match="step 1 scores 8 entries"):
        usd(scores, 1)
    # A step with no more vectors than k (TIGER's 4-code disambiguation level): one per group.
    usd.fit([torch.randn(8, 4), torch.randn(3, 4)])
    assert torch.equal(usd.groups[1], torch.arange(3))


def test_hand_computed_redistribution_and_entropy() -> None:
    usd = _usd(2, mix=0.5, entropy_weight=math.log(2.0))
    usd.groups = [torch.tensor([0, 0, 1, 1])]
    p = torch.tensor([[0.4, 0.1, 0.3, 0.2]], dtype=torch.float64)
    # Group masses 0.5 / 0.5: entropy log 2 over 2 groups, normalised to u = 1.
    assert float(usd.uncertainty(p.log(), usd.groups[0], 2)) == pytest.approx(1.0)
    # u = 1 and entropy_weight = log 2: temperature 2, q = sqrt(p) / sum sqrt(p).
    root = p.sqrt()
    q = root / root.sum()
    mass = torch.stack([q[0, :2].sum(), q[0, 2:].sum()])
    expected = 0.5 * q + 0.5 * torch.tensor([[mass[0] / 2, mass[0] / 2, mass[1] / 2, mass[1] / 2]])
    out = usd(p.log(), 0)
    assert torch.allclose(out.exp(), expected, atol=1e-12)
    # Numbers: q = (.32540, .16270, .28180, .23009), group masses .48810 and .51189;
    # each item keeps half its own mass and takes half its group's mean (.12203 or .12797).
    assert out.exp()[0].tolist() == pytest.approx([0.28473, 0.20338, 0.26887, 0.24302], abs=1e-5)
    # Without the entropy weight the temperature is 1: 0.5 p + 0.5 * group mean.
    plain = _usd(2, mix=0.5, entropy_weight=0.0)
    plain.groups = usd.groups
    assert plain(p.log(), 0).exp()[0].tolist() == pytest.approx([0.325, 0.175, 0.275, 0.225])
    # One group holding everything: no uncertainty across groups.
    assert float(usd.uncertainty(p.log(), torch.zeros(4, dtype=torch.long), 1)) == 0.0


# --------------------------------------------------------------------------- on real histories


@pytest.fixture(scope="module")
def sasrec_beauty(data_home: Path) -> dict[str, object]:
    """An untrained SASRec over every Beauty item and 256 real test rows (history window 20,
    target, whole history as ``seen``)."""
    root = data_home / "beauty"
    num_items = int(read_columns(root / "items.lance", ["item"])["item"].max()) + 1
    column = read_columns(root / "seq_test.lance", ["history"])["history"]
    assert isinstance(column, RaggedColumn)
    rows = [torch.from_numpy(column.row(i).astype("int64")) for i in range(len(column))]
    rows = [row for row in rows if len(row) >= 3][:256]
    seen = _left_pad([row[:-1] for row in rows], max(len(row) for row in rows))
    batch = {
        "history": _left_pad([row[:-1][-20:] for row in rows], 20),
        "seen": seen,
        "target": torch.stack([row[-1] for row in rows]),
    }
    torch.manual_seed(0)
    model = build(
        {"_component_": "model/sequential", "dim": 32, "encoder": {"_component_": "encoder/transformer"}},
        "model",
        {"num_items": num_items, "max_len": 20},
    ).eval()
    return {"model": model, "batch": batch}


def _scores(sasrec_beauty: dict[str, object]) -> Tensor:
    model, batch = sasrec_beauty["model"], sasrec_beauty["batch"]
    with torch.no_grad():
        scores = model({"history": batch["history"]})["scores"]  # type: ignore[index,operator]
    scores[:, 0] = -torch.inf
    return scores


def test_one_item_per_group_keeps_every_ranking(sasrec_beauty: dict[str, object]) -> None:
    scores = _scores(sasrec_beauty)
    for weight in (0.0, 2.0, -1.0):
        usd = _usd(1, mix=0.7, entropy_weight=weight)
        usd.groups = [torch.arange(scores.shape[1])]  # every item its own group
        out = usd(scores, 0)
        assert torch.equal(
            out.argsort(dim=1, stable=True)[:, -50:], scores.argsort(dim=1, stable=True)[:, -50:]
        )


def test_members_of_a_group_move_toward_each_other_and_groups_keep_their_mass(
    sasrec_beauty: dict[str, object],
) -> None:
    model = sasrec_beauty["model"]
    scores = _scores(sasrec_beauty)
    usd = _usd(64, mix=0.5, entropy_weight=0.0)
    usd.fit(model.output_tables())  # type: ignore[attr-defined]
    groups = usd.groups[0]
    out = usd(scores, 0)
    before, after = torch.log_softmax(scores.double(), dim=1), out
    moved = 0
    for g in range(64):
        cols = (groups == g).nonzero().squeeze(1)
        cols = cols[torch.isfinite(scores[0, cols])]
        spread_before = before[:, cols].amax(1) - before[:, cols].amin(1)
        spread_after = after[:, cols].amax(1) - after[:, cols].amin(1)
        assert bool((spread_after <= spread_before + 1e-5).all())
        moved += int((spread_after < 0.9 * spread_before).sum())
        mass_before = before[:, cols].exp().sum(1)
        assert torch.allclose(after[:, cols].exp().sum(1), mass_before, atol=1e-5)
    assert moved == 64 * len(scores)  # every group of every row drew together


# --------------------------------------------------------------------------- through the evaluators


def _ranking(decoding: dict | None):
    node = {"_component_": "eval/ranking", **({"decoding": decoding} if decoding else {})}
    return build(
        node, "eval.evaluator", {"metrics": ["hit@3", "ndcg@3", "mrr@3", "hit@10"], "exclude_history": True}
    )


def _usd_node(k: int, **kwargs: object) -> dict:
    return {"_component_": "decoding/usd", "cluster": {"_component_": "cluster/kmeans", "k": k}, **kwargs}


def _evaluate(evaluator, model, batch) -> tuple[dict[str, float], Tensor]:
    evaluator.reset()
    evaluator.update(model, batch)
    return evaluator.compute(), torch.cat(evaluator._ranks)


def test_ranking_key_switches_usd_on_and_off_deterministically(sasrec_beauty: dict[str, object]) -> None:
    model, batch = sasrec_beauty["model"], sasrec_beauty["batch"]
    plain, plain_ranks = _evaluate(_ranking(None), model, batch)
    # Off in effect (no mixing, no entropy weight): the same ranks as without the key.
    neutral, neutral_ranks = _evaluate(_ranking(_usd_node(32, mix=0.0, entropy_weight=0.0)), model, batch)
    assert torch.equal(neutral_ranks, plain_ranks) and neutral == plain
    # On: the ranks change, and a second pass (refitted after reset) repeats them exactly.
    evaluator = _ranking(_usd_node(32, mix=0.5, entropy_weight=1.0))
    first, first_ranks = _evaluate(evaluator, model, batch)
    again, again_ranks = _evaluate(evaluator, model, batch)
    assert not torch.equal(first_ranks, plain_ranks)
    assert torch.equal(first_ranks, again_ranks) and first == again
    assert set(first) == {"hit@3", "ndcg@3", "mrr@3", "hit@10"}


def test_generative_key_switches_usd_on_and_off(beauty: dict[str, Tensor]) -> None:  # noqa: F811
    codes, histories = beauty["codes"], beauty["histories"]
    batch = {"history": histories[:, :-1], "seen": histories[:, :-1], "target": histories[:, -1]}
    model = _tiger(codes, seed=3).eval()
    sizes = [len(table) for table in model.output_tables()]
    assert sizes == [int(codes[1:, c].max()) + 1 for c in range(codes.shape[1])]

    def run(decoding: dict | None) -> tuple[dict[str, float], Tensor]:
        node = {
            "_component_": "eval/generative",
            "beam": ITEMS,
            **({"decoding": decoding} if decoding else {}),
        }
        evaluator = build(node, "eval.evaluator", {"metrics": ["hit@3", "mrr@10"], "exclude_history": True})
        return _evaluate(evaluator, model, batch)

    plain, plain_ranks = run(None)
    # No mixing and no entropy weight: each level's log-probs pass through a log-softmax that
    # changes nothing, so the search and its ranks are the plain ones.
    neutral, neutral_ranks = run(_usd_node(2, mix=0.0, entropy_weight=0.0))
    assert torch.equal(neutral_ranks, plain_ranks)
    assert neutral["hit@3"] == plain["hit@3"] and neutral["mrr@10"] == pytest.approx(plain["mrr@10"])
    # The entropy weight alone changes the beams' temperatures, so the search's order.
    tempered, tempered_ranks = run(_usd_node(2, mix=0.0, entropy_weight=3.0))
    assert not torch.equal(tempered_ranks, plain_ranks)
    again, again_ranks = run(_usd_node(2, mix=0.0, entropy_weight=3.0))
    assert torch.equal(tempered_ranks, again_ranks)
    assert tempered["invalid_beams"] == 0.0 and tempered["duplicate_beams"] == 0.0


def test_a_model_without_output_tables_is_refused_at_the_key() -> None:
    evaluator = _ranking(_usd_node(2))
    model = torch.nn.Identity()
    with pytest.raises(RecipeError, match="output_tables") as caught:
        evaluator.update(model, {"history": torch.ones(1, 1, dtype=torch.long), "target": torch.ones(1)})
    assert caught.value.key == "eval.evaluator.decoding"


def test_at_3_metrics_by_hand() -> None:
    ranks = torch.tensor([0, 2, 3, 9])  # 0-based ranks of four targets
    out = ranking_metrics(ranks, ["hit@3", "ndcg@3", "mrr@3", "hit@10", "mrr@10"], 100)
    assert out["hit@3"] == pytest.approx(0.5)
    assert out["ndcg@3"] == pytest.approx((1 + 1 / math.log2(4)) / 4)
    assert out["mrr@3"] == pytest.approx((1 + 1 / 3) / 4)
    assert out["hit@10"] == pytest.approx(1.0)
    assert out["mrr@10"] == pytest.approx((1 + 1 / 3 + 1 / 4 + 1 / 10) / 4)


# --------------------------------------------------------------------------- the command line


@pytest.mark.parametrize(
    ("decoding", "fragments"),
    [
        (
            "{_component_: decoding/usd, mix: 2, cluster: {_component_: cluster/kmeans, k: 8}}",
            ["bad.yaml", "eval.evaluator.decoding.mix", "mix must be in [0, 1]"],
        ),
        (
            "{_component_: decoding/usd, mixx: 0.5, cluster: {_component_: cluster/kmeans, k: 8}}",
            ["bad.yaml", "eval.evaluator.decoding.mixx", "did you mean mix"],
        ),
        (
            "{_component_: decoding/usd, mix: 0.5}",
            ["bad.yaml", "eval.evaluator.decoding", "missing required argument cluster"],
        ),
    ],
    ids=["mix-out-of-range", "unknown-argument", "no-cluster"],
)
def test_bad_decoding_node_is_a_clean_error(tmp_path, data_home, decoding: str, fragments: list[str]) -> None:
    text = SASREC + f"eval: {{evaluator: {{_component_: eval/ranking, decoding: {decoding}}}}}\n"
    path = recipe_in(tmp_path, text)
    result = run_rex("train", str(path), f"logging.run_root={tmp_path / 'runs'}", cwd=REPO)
    assert_clean_error(result, *fragments)
