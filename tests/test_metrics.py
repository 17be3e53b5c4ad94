"""Metric tests. Expected values are worked out by hand in the comments next to them."""

from __future__ import annotations

import math

import pytest
import torch

from rex.eval.metrics import (
    RANKING_METRICS,
    auc,
    gauc,
    hit_at_k,
    logloss,
    mrr_at_k,
    ndcg_at_k,
    parse_metric_name,
    recall_at_k,
    target_rank,
)

INF = float("inf")


def t(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


# --------------------------------------------------------------------------- AUC


def test_auc_small_case():
    # positives: 0.35, 0.8; negatives: 0.1, 0.4.
    # pairs (pos, neg): (0.35, 0.1) win, (0.35, 0.4) loss, (0.8, 0.1) win, (0.8, 0.4) win -> 3/4.
    # Rank form: ranks 0.1->1, 0.35->2, 0.4->3, 0.8->4; positive rank sum 6; U = 6 - 2*3/2 = 3; 3/(2*2).
    assert auc(t([0.1, 0.4, 0.35, 0.8]), t([0, 0, 1, 1])) == pytest.approx(0.75)


def test_auc_tie_between_positive_and_negative_counts_half():
    # positives: 0.5, 0.9; negatives: 0.2, 0.5.
    # (0.5, 0.2) = 1, (0.5, 0.5) tie = 1/2, (0.9, 0.2) = 1, (0.9, 0.5) = 1 -> 3.5 / 4 = 0.875.
    assert auc(t([0.2, 0.5, 0.5, 0.9]), t([0, 1, 0, 1])) == pytest.approx(0.875)


def test_auc_three_way_tie():
    # scores [1, 1, 1, 0], labels [1, 0, 0, 1]. positives: 1, 0; negatives: 1, 1.
    # (1, 1) tie twice = 1/2 + 1/2; (0, 1) loss twice = 0 -> 1 / 4 = 0.25.
    # Rank form: 0 -> rank 1; the three 1s share ranks 2,3,4 -> average 3. Positive sum = 3 + 1 = 4;
    # U = 4 - 2*3/2 = 1; 1/(2*2) = 0.25.
    assert auc(t([1.0, 1.0, 1.0, 0.0]), t([1, 0, 0, 1])) == pytest.approx(0.25)


def test_auc_constant_scores_is_half():
    # Every (pos, neg) pair is a tie worth 1/2 -> 0.5.
    assert auc(t([0.3] * 6), t([1, 0, 1, 0, 0, 1])) == pytest.approx(0.5)


def test_auc_perfect_and_reversed():
    # All positives above all negatives -> 1; reversed -> 0.
    assert auc(t([0.9, 0.8, 0.2, 0.1]), t([1, 1, 0, 0])) == pytest.approx(1.0)
    assert auc(t([0.1, 0.2, 0.8, 0.9]), t([1, 1, 0, 0])) == pytest.approx(0.0)


def test_auc_single_class_or_empty_is_nan():
    assert math.isnan(auc(t([0.1, 0.5, 0.9]), t([1, 1, 1])))
    assert math.isnan(auc(t([0.1, 0.5, 0.9]), t([0, 0, 0])))
    assert math.isnan(auc(t([]), t([])))


def test_auc_accepts_low_precision_and_column_shapes():
    # Same as test_auc_small_case (0.75); scores in bfloat16 as (n, 1), labels as long.
    # bfloat16 rounds 0.35 and 0.4 to 0.3496 and 0.4004: the order is unchanged.
    scores = t([[0.1], [0.4], [0.35], [0.8]], dtype=torch.bfloat16)
    assert auc(scores, torch.tensor([0, 0, 1, 1])) == pytest.approx(0.75)


def test_auc_length_mismatch_raises():
    with pytest.raises(ValueError, match="same number"):
        auc(t([0.1, 0.2]), t([1, 0, 1]))


# --------------------------------------------------------------------------- gAUC


def test_gauc_weights_by_impressions_and_skips_single_class_users():
    # user 7: scores 0.9(+), 0.3(-), 0.5(-): the positive beats both -> AUC 1.0, 3 impressions.
    # user 2: scores 0.2(+), 0.6(+), 0.6(-), 0.1(-), 0.8(-):
    #   pos 0.2 vs negs 0.6, 0.1, 0.8 -> 0 + 1 + 0 = 1
    #   pos 0.6 vs negs 0.6, 0.1, 0.8 -> 1/2 + 1 + 0 = 1.5
    #   AUC = 2.5 / (2*3) = 5/12, 5 impressions.
    # user 5: scores 0.4(+), 0.7(+): single class -> skipped (its 2 impressions do not count).
    # gAUC = (3 * 1 + 5 * 5/12) / (3 + 5) = (36/12 + 25/12) / 8 = 61/96 = 0.6354166...
    # Rows are interleaved across users so the function has to group them itself.
    rows = [
        (2, 0.2, 1),
        (7, 0.9, 1),
        (5, 0.4, 1),
        (2, 0.6, 1),
        (7, 0.3, 0),
        (2, 0.6, 0),
        (5, 0.7, 1),
        (2, 0.1, 0),
        (7, 0.5, 0),
        (2, 0.8, 0),
    ]
    groups = torch.tensor([r[0] for r in rows])
    scores = t([r[1] for r in rows])
    labels = t([r[2] for r in rows])
    assert gauc(scores, labels, groups) == pytest.approx(61 / 96)


def test_gauc_single_group_equals_auc():
    # One group -> gAUC is that group's AUC: 0.875 from test_auc_tie_between_positive_and_negative...
    groups = torch.tensor([4, 4, 4, 4])
    assert gauc(t([0.2, 0.5, 0.5, 0.9]), t([0, 1, 0, 1]), groups) == pytest.approx(0.875)


def test_gauc_ties_do_not_cross_group_boundaries():
    # user 0: 0.2(-), 0.5(+) -> AUC 1; user 1: 0.5(-), 0.9(+) -> AUC 1; gAUC = 1.0.
    # After sorting by (user, score) user 0's 0.5 and user 1's 0.5 are neighbours; if they were one
    # tie run, user 0's positive would get rank (2 + 3)/2 = 2.5 and AUC (2.5 - 1)/1 = 1.5.
    groups = torch.tensor([1, 0, 1, 0])
    assert gauc(t([0.5, 0.5, 0.9, 0.2]), t([0, 1, 1, 0]), groups) == pytest.approx(1.0)
    # Constant scores: user 0 (2 rows) and user 1 (3 rows) each have AUC 0.5 -> gAUC 0.5.
    groups = torch.tensor([0, 1, 0, 1, 1])
    assert gauc(t([0.5] * 5), t([1, 0, 0, 1, 0]), groups) == pytest.approx(0.5)


def test_gauc_no_valid_group_is_nan():
    # Each user has a single class.
    groups = torch.tensor([0, 0, 1, 1])
    assert math.isnan(gauc(t([0.1, 0.2, 0.3, 0.4]), t([1, 1, 0, 0]), groups))


def test_gauc_rejects_float_groups():
    with pytest.raises(TypeError, match="integer"):
        gauc(t([0.1, 0.2]), t([1, 0]), t([0.0, 0.0]))


# --------------------------------------------------------------------------- logloss


def test_logloss_half_is_log2():
    # -log(0.5) = ln 2 for either label.
    assert logloss(t([0.5, 0.5]), t([1, 0])) == pytest.approx(math.log(2))


def test_logloss_with_clipping():
    # probs [0.8, 0.25, 0.0, 1.0, 1.0], labels [1, 0, 0, 0, 1], eps = 1e-7:
    #   row 0: -ln 0.8                      = 0.2231435513
    #   row 1: -ln(1 - 0.25) = -ln 0.75     = 0.2876820725
    #   row 2: p clipped to 1e-7: -ln(1 - 1e-7)  ~= 1.0000000500e-7
    #   row 3: p clipped to 1 - 1e-7: -ln(1e-7) = 7 ln 10 = 16.1180956510
    #   row 4: p clipped to 1 - 1e-7: -ln(1 - 1e-7) ~= 1.0000000500e-7
    #   sum = 16.6289214750 (rounded), mean over 5 = 3.3257842950
    probs = t([0.8, 0.25, 0.0, 1.0, 1.0])
    labels = t([1, 0, 0, 0, 1])
    assert logloss(probs, labels) == pytest.approx(3.3257842950, rel=1e-9)


def test_logloss_clips_in_double_precision():
    # A float32 1.0 with label 0 costs exactly -ln(eps) = ln(1e4) = 9.2103403720 for eps = 1e-4
    # (clipping in float32 would give a slightly different 1 - eps).
    assert logloss(t([1.0]), t([0]), eps=1e-4) == pytest.approx(9.2103403720, rel=1e-9)


def test_logloss_rejects_bad_eps():
    with pytest.raises(ValueError, match="eps"):
        logloss(t([0.5]), t([1]), eps=0.0)


# --------------------------------------------------------------------------- target rank


def test_target_rank_ties_and_masks():
    scores = t(
        [
            [0.5, 0.9, 0.5, 0.1],  # target 0: 0.9 is greater (1) + col 2 ties (1) -> 2
            [0.3, 0.3, 0.3, 0.3],  # target 2: constant scorer, 3 ties -> 3 (pessimistic, last)
            [-INF, 0.2, -INF, 0.7],  # target 1: only 0.7 is ahead, -inf items never count -> 1
            [0.4, -INF, 0.6, 0.1],  # target 1: target itself is -inf -> N = 4
            [0.9, 0.1, 0.2, 0.3],  # target 0: best score -> 0
            [-INF, -INF, 0.0, -INF],  # target 2: the only finite item -> 0
            [0.2, 0.2, 0.7, 0.1],  # target 3: 0.2, 0.2, 0.7 all greater -> 3
        ]
    )
    target = torch.tensor([0, 2, 1, 1, 0, 2, 3])
    ranks = target_rank(scores, target)
    assert ranks.dtype == torch.long
    assert ranks.tolist() == [2, 3, 1, 4, 0, 0, 3]


def test_target_rank_float16_and_int32_target():
    # Row [0.1, 0.6, 0.3] target 2: only 0.6 is ahead -> 1.
    ranks = target_rank(t([[0.1, 0.6, 0.3]], dtype=torch.float16), torch.tensor([2], dtype=torch.int32))
    assert ranks.tolist() == [1]


def test_target_rank_validates_shapes_and_indices():
    with pytest.raises(ValueError, match="2-D"):
        target_rank(t([0.1, 0.2]), torch.tensor([0]))
    with pytest.raises(ValueError, match="target"):
        target_rank(t([[0.1, 0.2]]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        target_rank(t([[0.1, 0.2]]), torch.tensor([2]))


# --------------------------------------------------------------------------- @k metrics

RANKS = torch.tensor([0, 1, 4, 10])
# ndcg gains 1/log2(rank + 2):
#   rank 0: 1/log2(2) = 1
#   rank 1: 1/log2(3) = 1/1.5849625007 = 0.6309297536
#   rank 4: 1/log2(6) = 1/2.5849625007 = 0.3868528072
#   rank 10: 1/log2(12) = 1/3.5849625007 = 0.2789429457
# reciprocal ranks 1/(rank + 1): 1, 0.5, 0.2, 1/11 = 0.0909090909


@pytest.mark.parametrize("k", [5, 10])
def test_at_k_for_k_5_and_10(k):
    # Both k = 5 and k = 10 keep ranks 0, 1, 4 (< k) and drop rank 10 (not < 10).
    assert hit_at_k(RANKS, k).tolist() == [1.0, 1.0, 1.0, 0.0]
    assert recall_at_k(RANKS, k).tolist() == [1.0, 1.0, 1.0, 0.0]
    assert ndcg_at_k(RANKS, k).tolist() == pytest.approx([1.0, 0.6309297536, 0.3868528072, 0.0])
    assert mrr_at_k(RANKS, k).tolist() == pytest.approx([1.0, 0.5, 0.2, 0.0])


def test_at_k_boundaries():
    # k = 4 drops rank 4 (not < 4); k = 11 keeps rank 10.
    assert hit_at_k(RANKS, 4).tolist() == [1.0, 1.0, 0.0, 0.0]
    assert ndcg_at_k(RANKS, 4).tolist() == pytest.approx([1.0, 0.6309297536, 0.0, 0.0])
    assert mrr_at_k(RANKS, 11).tolist() == pytest.approx([1.0, 0.5, 0.2, 0.0909090909])
    assert ndcg_at_k(RANKS, 11).tolist() == pytest.approx([1.0, 0.6309297536, 0.3868528072, 0.2789429457])
    # k = 1: only rank 0.
    assert hit_at_k(RANKS, 1).tolist() == [1.0, 0.0, 0.0, 0.0]


def test_at_k_returns_float_per_row():
    out = ndcg_at_k(RANKS, 5)
    assert out.shape == (4,)
    assert out.dtype == torch.get_default_dtype()
    # Mean NDCG@5 = (1 + 0.6309297536 + 0.3868528072 + 0) / 4 = 0.5044456402
    assert float(out.mean()) == pytest.approx(0.5044456402)


def test_k_larger_than_item_count():
    # 3 items, k = 50: every finite-ranked target is a hit.
    scores = t([[0.1, 0.2, 0.3], [0.9, 0.5, 0.5], [0.3, 0.3, 0.3]])
    target = torch.tensor([0, 1, 2])
    ranks = target_rank(scores, target)
    # row 0: 0.2, 0.3 ahead -> 2; row 1: 0.9 ahead + one tie -> 2; row 2: two ties -> 2
    assert ranks.tolist() == [2, 2, 2]
    assert hit_at_k(ranks, 50).tolist() == [1.0, 1.0, 1.0]
    # ndcg of rank 2 = 1/log2(4) = 0.5; mrr = 1/3
    assert ndcg_at_k(ranks, 50).tolist() == pytest.approx([0.5, 0.5, 0.5])
    assert mrr_at_k(ranks, 50).tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3])


def test_masked_target_is_never_a_hit():
    # Target score -inf -> rank N = 3: not a hit for any k <= 3, and not for k > 3 when the
    # item count is passed (k is capped at N).
    scores = t([[0.1, -INF, 0.3], [0.4, 0.2, 0.3]])
    ranks = target_rank(scores, torch.tensor([1, 0]))
    assert ranks.tolist() == [3, 0]
    assert hit_at_k(ranks, 3).tolist() == [0.0, 1.0]
    for fn in RANKING_METRICS.values():
        assert fn(ranks, 50, num_items=3).tolist() == [0.0, 1.0]


@pytest.mark.parametrize("k", [0, -1, 2.5, True])
def test_at_k_rejects_bad_k(k):
    with pytest.raises(ValueError, match="k must be"):
        hit_at_k(RANKS, k)


def test_ranking_metrics_table():
    assert {"hit": hit_at_k, "recall": recall_at_k, "ndcg": ndcg_at_k, "mrr": mrr_at_k} == RANKING_METRICS


# --------------------------------------------------------------------------- names


def test_parse_metric_name_valid():
    assert parse_metric_name("ndcg@10") == ("ndcg", 10)
    assert parse_metric_name("hit@1") == ("hit", 1)
    assert parse_metric_name(" mrr@20 ") == ("mrr", 20)
    assert parse_metric_name("recall@50") == ("recall", 50)
    assert parse_metric_name("auc") == ("auc", None)
    assert parse_metric_name("gauc") == ("gauc", None)
    assert parse_metric_name("logloss") == ("logloss", None)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("ndgc@10", "unknown metric.*did you mean ndcg"),
        ("precision@10", "unknown metric"),
        ("", "unknown metric"),
        ("ndcg", "needs a cut-off"),
        ("ndcg@", "positive integer"),
        ("ndcg@ten", "positive integer"),
        ("ndcg@-1", "positive integer"),
        ("ndcg@2.5", "positive integer"),
        ("ndcg@10@5", "positive integer"),
        ("ndcg@0", "k must be >= 1"),
        ("auc@10", "takes no @k"),
    ],
)
def test_parse_metric_name_errors(name, message):
    with pytest.raises(ValueError, match=message):
        parse_metric_name(name)


def test_metrics_are_registered():
    from rex.config.registry import _REGISTRY

    expected = {
        "metric/auc": auc,
        "metric/gauc": gauc,
        "metric/logloss": logloss,
        "metric/hit": hit_at_k,
        "metric/recall": recall_at_k,
        "metric/ndcg": ndcg_at_k,
        "metric/mrr": mrr_at_k,
    }
    for key, fn in expected.items():
        assert _REGISTRY[key].target is fn


# --------------------------------------------------------------------------- cross-checks
# Slow references, allowed in tests only.


def _pairwise_auc(scores: list[float], labels: list[int]) -> float:
    pos = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    neg = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    if not pos or not neg:
        return math.nan
    total = 0.0
    for p in pos:
        for n in neg:
            total += 1.0 if p > n else 0.5 if p == n else 0.0
    return total / (len(pos) * len(neg))


def _slow_gauc(scores: list[float], labels: list[int], groups: list[int]) -> float:
    num = den = 0.0
    for g in sorted(set(groups)):
        idx = [i for i, gi in enumerate(groups) if gi == g]
        a = _pairwise_auc([scores[i] for i in idx], [labels[i] for i in idx])
        if not math.isnan(a):
            num += len(idx) * a
            den += len(idx)
    return num / den if den else math.nan


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_pairwise_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    n = 300
    scores = torch.randint(0, 6, (n,), generator=gen).to(torch.float32)  # many ties
    labels = torch.randint(0, 2, (n,), generator=gen)
    expected = _pairwise_auc(scores.tolist(), labels.tolist())
    assert auc(scores, labels) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gauc_matches_per_group_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    n = 400
    scores = torch.randint(0, 5, (n,), generator=gen).to(torch.float64)  # many ties
    # Skewed labels and small groups so several groups are single-class and get skipped.
    labels = (torch.rand(n, generator=gen) < 0.3).long()
    groups = torch.randint(0, 60, (n,), generator=gen) * 7 + 3  # sparse, non-contiguous ids
    expected = _slow_gauc(scores.tolist(), labels.tolist(), groups.tolist())
    assert not math.isnan(expected)
    assert gauc(scores, labels, groups) == pytest.approx(expected, abs=1e-12)
