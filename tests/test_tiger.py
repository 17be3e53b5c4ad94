"""model/tiger and eval/generative on real Beauty data: the constrained beam search against brute-force
enumeration of every valid code tuple, the model's shapes, gradients and learning, and the
evaluator's argument errors.

The code table is real rather than random: the 200 items most often in Beauty's test histories,
coded by their own attributes (first and last attribute id, bucketed) plus a disambiguation
column, so the trie is as uneven as a tokenizer's (prefixes with one item and with many)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

import rex.builtins  # noqa: F401
from rex.config.errors import RecipeError
from rex.config.registry import build
from rex.data.lance_io import RaggedColumn, read_columns
from rex.eval.generative import CodeTrie, GenerativeEvaluator, beam_search

ITEMS = 200  # items of the real code table, ids 1..200
MAX_LEN = 12


def _disambiguate(codes: Tensor) -> Tensor:
    """(N, L) → (N,) how many earlier rows hold the same tuple (TIGER's extra code)."""
    _, group = torch.unique(codes, dim=0, return_inverse=True)
    order = torch.argsort(group, stable=True)
    ranks = torch.empty_like(group)
    ranks[order] = torch.arange(len(codes)) - torch.searchsorted(group[order], group[order])
    return ranks


def _dense(values: np.ndarray) -> Tensor:
    return torch.from_numpy(np.unique(values, return_inverse=True)[1].reshape(-1))


def _rows(column: RaggedColumn, mapping: Tensor, min_len: int) -> list[Tensor]:
    """Each row mapped to the subset's ids with the other items dropped, if ``min_len`` remain."""
    out = []
    for r in range(len(column)):
        row = mapping[torch.from_numpy(column.row(r).copy())]
        row = row[row > 0]
        if len(row) >= min_len:
            out.append(row[-MAX_LEN:])
    return out


def _left_pad(rows: list[Tensor], width: int) -> Tensor:
    out = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, width - len(row) :] = row
    return out


@pytest.fixture(scope="module")
def beauty(data_home: Path) -> dict[str, Tensor]:
    """``codes`` (201, 3) from real attributes, test ``histories`` (16, MAX_LEN) and ``train`` (64, MAX_LEN + 1)
    sequences of real users, restricted to the 200 items."""
    root = data_home / "beauty"
    test = read_columns(root / "seq_test.lance", ["history"])["history"]
    train = read_columns(root / "seq_train.lance", ["items"])["items"]
    attributes = read_columns(root / "items.lance", ["item", "attributes"])
    assert isinstance(test, RaggedColumn) and isinstance(train, RaggedColumn)
    counts = np.bincount(test.values)
    counts[0] = 0
    chosen = np.argsort(-counts, kind="stable")[:ITEMS]  # original ids, most popular first
    mapping = torch.zeros(len(counts) + 1, dtype=torch.long)
    mapping[torch.from_numpy(chosen)] = torch.arange(1, ITEMS + 1)
    lists = attributes["attributes"]
    assert isinstance(lists, RaggedColumn)
    row_of = {int(item): r for r, item in enumerate(attributes["item"])}
    first = np.array([(lists.row(row_of[i])[:1].tolist() or [-1])[0] for i in chosen])
    last = np.array([(lists.row(row_of[i])[-1:].tolist() or [-1])[0] for i in chosen])
    raw = torch.stack([_dense(first) % 6, _dense(last) % 5], dim=1)
    codes = torch.cat([torch.full((1, 3), -1), torch.cat([raw, _disambiguate(raw)[:, None]], dim=1)])
    histories = _rows(test, mapping, 3)[:16]
    sequences = _rows(train, mapping, 3)[:64]
    return {
        "codes": codes,
        "histories": _left_pad(histories, MAX_LEN),
        "train": _left_pad(sequences, MAX_LEN + 1),
    }


def _tiger(codes: Tensor, seed: int = 0, **overrides: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    node = {
        "_component_": "model/tiger",
        "encoder": {"_component_": "encoder/transformer"},
        "decoder": {"_component_": "encoder/transformer"},
        "cross_attention": {"_component_": "attention/cross"},
        "dim": 32,
        **overrides,
    }
    return build(node, "model", {"item_codes": codes, "max_len": MAX_LEN, "num_items": len(codes)})


def _pairs(sequences: Tensor) -> dict[str, Tensor]:
    inputs = sequences[:, :-1]
    return {"items": inputs, "targets": torch.where(inputs > 0, sequences[:, 1:], 0)}


@torch.no_grad()
def _brute_force(model: torch.nn.Module, codes: Tensor, history: Tensor, seen: Tensor | None) -> Tensor:
    """(B, N) summed code log-probs of every item given ``history`` (column 0 = padding, -inf), the
    items of ``seen`` -inf."""
    state = model.start(history)
    b, items = len(history), codes[1:]
    total = torch.zeros(b, len(items))
    for t in range(codes.shape[1]):
        prefixes = items[None, :, :t].expand(b, -1, -1)
        log_probs = model.next_code_log_probs(state, prefixes)  # (B, N, K_t)
        total += log_probs.gather(2, items[None, :, t, None].expand(b, -1, 1)).squeeze(2)
    scores = torch.cat([torch.full((b, 1), -torch.inf), total], dim=1)
    if seen is not None:
        scores.scatter_(1, seen, -torch.inf)
    return scores


# --------------------------------------------------------------------------- beam search = brute force


@pytest.mark.parametrize("exclude", [True, False])
def test_exact_beam_search_equals_brute_force_enumeration(beauty: dict[str, Tensor], exclude: bool) -> None:
    # With beam >= the number of items no allowed prefix is ever dropped, so the search is exact:
    # it must return every allowed item, in the order of the brute-force scores.
    codes, history = beauty["codes"], beauty["histories"]
    model = _tiger(codes, seed=1).eval()
    trie = CodeTrie(codes)
    items, scores, generated = beam_search(
        model, trie, history, beam=ITEMS, seen=history if exclude else None
    )
    expected = _brute_force(model, codes, history, history if exclude else None)
    for row in range(len(history)):
        allowed = int(torch.isfinite(expected[row]).sum())
        order = torch.argsort(expected[row], descending=True, stable=True)[:allowed]
        assert items[row, :allowed].tolist() == order.tolist()
        assert (items[row, allowed:] == 0).all()
        torch.testing.assert_close(scores[row, :allowed], expected[row, order], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(generated[row, :allowed], codes[order])
    if exclude:
        assert (torch.isfinite(expected[:, 1:]).sum(1) < ITEMS).all()


def test_narrow_beam_is_valid_unique_history_free_and_sorted(beauty: dict[str, Tensor]) -> None:
    codes, history = beauty["codes"], beauty["histories"]
    model = _tiger(codes, seed=2).eval()
    items, scores, generated = beam_search(model, CodeTrie(codes), history, beam=5, seen=history)
    expected = _brute_force(model, codes, history, history)
    assert items.shape == (len(history), 5) and bool((items > 0).all())
    torch.testing.assert_close(generated, codes[items])  # each beam's tuple is its item's
    assert all(len(set(row.tolist())) == 5 for row in items)
    assert not bool((items[:, :, None] == history[:, None, :]).any())
    assert bool((scores[:, :-1] >= scores[:, 1:]).all())
    # Each beam's score is its item's true score, and none beats the exact best.
    torch.testing.assert_close(scores, expected.gather(1, items), rtol=1e-4, atol=1e-4)
    assert bool((scores[:, 0] <= expected.max(dim=1).values + 1e-5).all())


class _Fixed(torch.nn.Module):
    """The generation protocol with fixed preferences: level-c code k scores ``-k``, except that
    level 0 prefers code 0 by far."""

    def __init__(self, codes: Tensor) -> None:
        super().__init__()
        self.item_codes = codes

    def start(self, history: Tensor) -> dict[str, Tensor]:
        return {"rows": torch.zeros(len(history))}

    def next_code_log_probs(self, state: dict[str, Tensor], prefixes: Tensor) -> Tensor:
        b, m, t = prefixes.shape
        logits = -torch.arange(int(self.item_codes[:, t].max()) + 1, dtype=torch.float)
        if t == 0:
            logits[0] = 10.0
        return logits.log_softmax(0).expand(b, m, -1)


def test_prefix_whose_items_are_all_in_the_history_is_pruned() -> None:
    # Items 1-3 share the prefix (0, *). With all three in the history, the single beam must not
    # be spent on that prefix although the model prefers it: it goes to (1, 0), item 4.
    # A repeated history item counts once: item 3 keeps the prefix alive in the third row.
    codes = torch.tensor([[-1, -1], [0, 0], [0, 1], [0, 2], [1, 0], [2, 0]])
    history = torch.tensor([[0, 1, 2, 3], [0, 0, 2, 3], [0, 1, 1, 2]])
    model, trie = _Fixed(codes), CodeTrie(codes)
    items, scores, _ = beam_search(model, trie, history, beam=1, seen=history)
    assert items.tolist() == [[4], [1], [3]] and bool(torch.isfinite(scores).all())
    items, _, _ = beam_search(model, trie, history, beam=1, seen=None)
    assert items.tolist() == [[1], [1], [1]]
    # Fewer allowed items than beams: the other slots are empty (item 0, score -inf).
    items, scores, _ = beam_search(model, trie, history, beam=4, seen=history)
    assert items.tolist() == [[4, 5, 0, 0], [1, 4, 5, 0], [3, 4, 5, 0]]
    assert torch.isinf(scores[0, 2:]).all() and torch.isfinite(scores[1, :3]).all()


def test_trie_rejects_duplicate_tuples() -> None:
    with pytest.raises(ValueError, match="unique"):
        CodeTrie(torch.tensor([[-1, -1], [0, 1], [0, 1]]))


# --------------------------------------------------------------------------- model/tiger


def test_model_shapes_gradients_and_outputs(beauty: dict[str, Tensor]) -> None:
    codes = beauty["codes"]
    model = _tiger(codes)
    assert model.outputs == frozenset({"logits", "labels"})
    assert model.code_sizes == tuple(int(k) + 1 for k in codes[1:].max(0).values)
    batch = _pairs(beauty["train"][:8])
    out = model(batch)
    positions = int((batch["targets"] > 0).sum())
    assert out["logits"].shape == (positions * 3, max(model.code_sizes))
    assert out["labels"].shape == (positions * 3,)
    torch.testing.assert_close(out["labels"].reshape(-1, 3), codes[batch["targets"][batch["targets"] > 0]])
    loss = build({"_component_": "loss/softmax_ce"}, "loss")(out, batch)
    loss.backward()
    unused = {
        name for name, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)
    }
    assert not unused, unused


def test_every_prefix_trained_in_one_pass_matches_generation_from_that_prefix(
    beauty: dict[str, Tensor],
) -> None:
    # The causal encoder must not let position i see item i + 1: the training logits at position
    # i equal what generation computes from the history cut after item i. Rows are encoded in
    # length-sorted chunks (3 rows here), and the outputs come back in row-major order.
    codes = beauty["codes"]
    model = _tiger(codes, chunk_rows=3).eval()
    batch = _pairs(beauty["train"][:4])
    with torch.no_grad():
        logits = model(batch)["logits"].reshape(-1, 3, model.width)
        model.chunk_rows = 64
        torch.testing.assert_close(model(batch)["logits"].reshape(-1, 3, model.width), logits)
    valid = batch["targets"] > 0
    slot = torch.cumsum(valid.flatten(), 0).reshape(valid.shape) - 1  # row of each position in logits
    for row, col in [(0, MAX_LEN - 1), (1, MAX_LEN - 2), (2, int(valid[2].nonzero()[0]))]:
        assert valid[row, col]
        history = batch["items"][row : row + 1, : col + 1]
        target = codes[batch["targets"][row, col]]
        with torch.no_grad():
            state = model.start(history)
            for t in range(3):
                generated = model.next_code_log_probs(state, target[None, None, :t])[0, 0]
                trained = logits[slot[row, col], t, : model.code_sizes[t]].log_softmax(-1)
                torch.testing.assert_close(generated, trained, rtol=1e-4, atol=1e-5)


def test_training_loss_decreases_on_real_sequences(beauty: dict[str, Tensor]) -> None:
    model = _tiger(beauty["codes"], dropout=0.0)
    loss_fn = build({"_component_": "loss/softmax_ce"}, "loss")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = _pairs(beauty["train"])
    losses = []
    for _ in range(40):
        loss = loss_fn(model(batch), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses[::8]


def test_model_rejects_bad_codes_and_non_causal_or_gated_parts(beauty: dict[str, Tensor]) -> None:
    codes = beauty["codes"]
    with pytest.raises(RecipeError, match="unique"):
        _tiger(torch.tensor([[-1, -1], [0, 1], [0, 1]]))
    with pytest.raises(RecipeError, match="causal"):
        _tiger(codes, encoder={"_component_": "encoder/transformer", "causal": False})
    with pytest.raises(RecipeError, match="gated"):
        _tiger(codes, cross_attention={"_component_": "attention/cross", "gated": True})
    with pytest.raises(ValueError, match="eval/generative"):
        _tiger(codes)({"history": beauty["histories"], "target": beauty["histories"][:, -1]})


# --------------------------------------------------------------------------- eval/generative


def test_evaluator_ranks_by_beams_and_reports_clean_beams(beauty: dict[str, Tensor]) -> None:
    codes, histories = beauty["codes"], beauty["histories"]
    batch = {"history": histories[:, :-1], "target": histories[:, -1], "user": torch.arange(len(histories))}
    model = _tiger(codes, seed=3).eval()
    evaluator = build(
        {"_component_": "eval/generative", "beam": ITEMS},
        "eval.evaluator",
        {"metrics": ["recall@5", "ndcg@10", "mrr@200", "hit@1"], "exclude_history": False},
    )
    evaluator.update(model, batch)
    out = evaluator.compute()
    # Exact search (beam >= items): the metrics are those of the brute-force ranks.
    scores = _brute_force(model, codes, _trim(batch["history"]), None)
    target_score = scores.gather(1, batch["target"][:, None])
    ranks = (scores > target_score).sum(1)
    assert out["recall@5"] == pytest.approx(float((ranks < 5).float().mean()))
    assert out["mrr@200"] == pytest.approx(float((1.0 / (ranks + 1)).mean()), rel=1e-5)
    assert out["invalid_beams"] == 0.0 and out["duplicate_beams"] == 0.0
    # A second pass after reset gives the same numbers (the trie is cached, not stale).
    evaluator.reset()
    evaluator.update(model, batch)
    assert evaluator.compute() == out


def test_evaluator_excludes_the_whole_history_not_only_the_window(beauty: dict[str, Tensor]) -> None:
    # The model reads its last 3 items; the items before that window must still never be ranked.
    codes, histories = beauty["codes"], beauty["histories"]
    seen, target = histories[:, :-1], histories[:, -1]
    keep = ~(seen == target[:, None]).any(dim=1)  # no repeated target: it would be a certain miss
    seen, target = seen[keep], target[keep]
    window = seen[:, -3:]
    assert bool(((seen[:, :-3] > 0) & ~(seen[:, :-3, None] == window[:, None, :]).any(-1)).any())
    model = _tiger(codes, seed=4).eval()
    evaluator = build(
        {"_component_": "eval/generative", "beam": ITEMS},
        "eval.evaluator",
        {"metrics": ["mrr@200"], "exclude_history": True},
    )
    evaluator.update(model, {"history": window, "seen": seen, "target": target})
    scores = _brute_force(model, codes, window, seen)
    ranks = (scores > scores.gather(1, target[:, None])).sum(1)
    assert evaluator.compute()["mrr@200"] == pytest.approx(float((1.0 / (ranks + 1)).mean()), rel=1e-5)
    items, _, _ = beam_search(model, CodeTrie(codes), window, beam=ITEMS, seen=seen)
    assert not bool(((items[:, :, None] == seen[:, None, :]) & (items[:, :, None] > 0)).any())


def test_evaluator_counts_invalid_and_duplicate_beams() -> None:
    evaluator = GenerativeEvaluator(["recall@2"], exclude_history=True, beam=3)
    codes = torch.tensor([[-1, -1], [0, 0], [0, 1], [1, 0]])
    generated = torch.tensor([[[0, 0], [1, 1], [0, 0]]])  # item 1, no item, item 1 again
    evaluator._ranks.append(torch.tensor([0]))
    evaluator._check_beams(codes, generated, torch.tensor([[True, True, True]]))
    out = evaluator.compute()
    assert out["invalid_beams"] == pytest.approx(1 / 3) and out["duplicate_beams"] == pytest.approx(1 / 3)


def _trim(history: Tensor) -> Tensor:
    used = (history != 0).any(dim=0).nonzero()
    return history[:, int(used[0]) :]


@pytest.mark.parametrize(
    ("metrics", "beam", "message"),
    [
        (["recall@5", "ndcg@50"], 20, "ndcg@50.*raise beam"),
        (["auc"], 20, "cannot compute 'auc'"),
        (["recall@5"], 0, "beam must be a positive integer"),
    ],
)
def test_evaluator_argument_errors(metrics: list[str], beam: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GenerativeEvaluator(metrics, exclude_history=True, beam=beam)
    with pytest.raises(RecipeError, match=message):
        build(
            {"_component_": "eval/generative", "beam": beam},
            "eval.evaluator",
            {"metrics": metrics, "exclude_history": True},
        )
