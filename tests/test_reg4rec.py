"""REG4Rec (arXiv:2508.15308): quantizer/parallel (MPQ), model/reg4rec's reasoning paths and its
preference pairs (PARS, MSRA), loss/dpo, search/corp (CORP) in eval/generative, and the staged
recipe's kill-and-resume. Model and search tests run on test_tiger's real Beauty code table
(200 items, 3 columns); the staged run on a slice of Scientific."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor

import rex.builtins  # noqa: F401
from rex.components.decoding.corp import ConsistencyPruning, path_search
from rex.components.losses.preference import DirectPreference
from rex.components.quantizers.parallel import ParallelQuantizer
from rex.config.registry import build
from rex.eval.generative import GenerativeEvaluator
from tests.conftest import REPO, kill_rex_when, prepared_home, run_rex
from tests.test_tiger import _pairs, _tiger, beauty  # noqa: F401  (beauty: a fixture)


def _reg4rec(codes: Tensor, **overrides: object) -> torch.nn.Module:
    return _tiger(codes, _component_="model/reg4rec", **overrides)


def test_parallel_quantizer_gives_each_item_one_token_per_codebook_and_learns() -> None:
    torch.manual_seed(0)
    table = {"text": torch.randn(301, 16)}
    node = {"_component_": "model/rqvae", "content": "text", "hidden": [16], "dim": 8}
    node["quantizer"] = {"_component_": "quantizer/parallel", "levels": 3, "codes": 8}
    model = build(node, "model", {"item_features": table})
    assert isinstance(model.quantizer, ParallelQuantizer)
    out = model({"item": torch.arange(1, 301)})
    assert out["reconstruction"].shape == (300, 16) and out["codes"].shape == (300, 3)
    (out["reconstruction"].square().mean() + out["quantization_loss"]).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and bool(parameter.grad.abs().sum() > 0), name
    codes = model.item_codes()
    # One code per codebook (columns 0..2, each in [0, 8)), plus the collision code.
    assert codes.shape == (301, 4) and bool((codes[1:, :3] >= 0).all() & (codes[1:, :3] < 8).all())
    assert len(torch.unique(codes[1:], dim=0)) == 300
    with pytest.raises(ValueError, match="levels"):
        ParallelQuantizer(8, levels=0)


def test_split_latent_experts_each_read_only_their_own_slice() -> None:
    torch.manual_seed(0)
    quantizer = ParallelQuantizer(9, levels=3, codes=8, split_latent=True)
    quantizer.train()
    quantizer(torch.randn(64, 9))  # k-means initialisation of every codebook
    quantizer.eval()
    latent = torch.randn(32, 9)
    _, codes, _ = quantizer(latent)
    moved = latent.clone()
    moved[:, 3:6] += 5 * torch.randn(32, 3)  # the middle expert's slice only
    _, moved_codes, _ = quantizer(moved)
    assert torch.equal(codes[:, [0, 2]], moved_codes[:, [0, 2]])
    assert not torch.equal(codes[:, 1], moved_codes[:, 1])
    with pytest.raises(ValueError, match="split_latent"):
        ParallelQuantizer(2, levels=3, split_latent=True)


def test_dpo_is_log_2_at_the_reference_and_prefers_the_chosen_path() -> None:
    loss = DirectPreference(beta=0.5)
    chosen = torch.zeros(3, requires_grad=True)
    value = loss({"chosen_log_ratio": chosen, "rejected_log_ratio": torch.zeros(3)}, {})
    assert value.item() == pytest.approx(math.log(2))
    value.backward()
    assert chosen.grad is not None
    assert torch.allclose(chosen.grad, torch.full((3,), -0.5 / 2 / 3))  # -beta * sigmoid(0) / pairs
    better = loss({"chosen_log_ratio": torch.ones(3), "rejected_log_ratio": -torch.ones(3)}, {})
    assert better.item() == pytest.approx(-math.log(1 / (1 + math.exp(-1.0))))
    empty = loss({"chosen_log_ratio": torch.zeros(0), "rejected_log_ratio": torch.zeros(0)}, {})
    assert empty.item() == 0.0


def test_paths_train_on_every_order_and_generation_closes_used_codebooks(beauty: dict[str, Tensor]) -> None:  # noqa: F811
    model = _reg4rec(beauty["codes"])
    batch = _pairs(beauty["train"][:8])
    out = model(batch)
    positions = int((batch["targets"] > 0).sum())
    assert out["logits"].shape == (positions * 3, model.vocab_size) and out["labels"].shape == (
        positions * 3,
    )
    levels = (out["labels"].reshape(positions, 3) // model.width).sort(1).values
    assert torch.equal(levels, torch.arange(3).expand(positions, 3))  # one token per codebook, any order
    torch.nn.functional.cross_entropy(out["logits"], out["labels"]).backward()
    assert model.token_embedding.weight.grad is not None
    model.eval()
    state = model.start(beauty["histories"][:2])
    paths = model.item_tokens[torch.tensor([[5], [9]])]  # (2, 1, 3): each item's 3 tokens
    log_probs = model.next_token_log_probs(state, paths[:, :, [2, 0]])
    open_level = model.token_level[log_probs[0, 0].isfinite()]
    assert set(open_level.tolist()) == {1}
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(2, 1))


def test_corp_returns_only_items_that_a_kept_path_reaches(beauty: dict[str, Tensor]) -> None:  # noqa: F811
    model = _reg4rec(beauty["codes"]).eval()
    history, seen = beauty["histories"], beauty["histories"]
    items, scores, codes = ConsistencyPruning()(model, history, 10, seen)
    allowed = torch.ones(len(history), len(beauty["codes"]), dtype=torch.bool)
    allowed[:, 0] = False
    allowed.scatter_(1, seen, False)
    paths, path_scores, _ = path_search(model, model.start(history), 10, allowed, merge=True)
    kept = [{frozenset(p.tolist()) for p, s in zip(row, srow, strict=True) if s > -torch.inf}
            for row, srow in zip(paths, path_scores, strict=True)]  # fmt: skip
    for row, found in enumerate(items):
        for item in found[found > 0].tolist():
            assert frozenset(model.item_tokens[item].tolist()) in kept[row]
            assert item not in seen[row].tolist()
    assert torch.equal(codes[items > 0], model.item_codes[items[items > 0]])
    # Orders of one token set share a beam, so the 10 kept paths reach 10 distinct items.
    assert bool((items > 0).all()) and all(len(set(row.tolist())) == 10 for row in items)
    # Without CORP every path is still credited to a real unseen item.
    loose, _, _ = ConsistencyPruning(consistent=False)(model, history, 10, seen)
    assert bool((loose[:, 0] > 0).all())
    assert not bool(((loose[:, :, None] == seen[:, None]) & (loose[:, :, None] > 0)).any())


def test_preference_pairs_rank_by_reward_and_train_the_policy_alone(beauty: dict[str, Tensor]) -> None:  # noqa: F811
    model = _reg4rec(beauty["codes"], paths=4, horizon=2, dropout=0.0)
    model.train()
    out = model(_pairs(beauty["train"][:16]))
    assert bool(model.reference_synced)
    assert not any(p.requires_grad for p in model.reference.parameters())
    chosen, rejected = out["chosen_log_ratio"], out["rejected_log_ratio"]
    assert chosen.shape == rejected.shape and len(chosen) > 0
    # The reference searched with the policy's own weights, so every ratio starts at 0.
    assert torch.allclose(chosen, torch.zeros_like(chosen), atol=1e-4)
    assert torch.allclose(rejected, torch.zeros_like(rejected), atol=1e-4)
    DirectPreference()(out, {}).backward()
    assert model.token_embedding.weight.grad is not None
    # A path holding the target's tokens is rewarded 1 for it; MSRA adds 0.5^s for later items.
    targets = torch.tensor([[7, 8, 9]])
    valid = targets > 0
    paths = model.item_tokens[targets[valid]][:, None]  # each position's own target as its path
    rewards = model.rewards(paths, targets, valid)
    assert rewards[0, 0].item() >= 1.0 and rewards[2, 0].item() == pytest.approx(1.0)


def test_generative_evaluator_takes_corp_as_its_search(beauty: dict[str, Tensor]) -> None:  # noqa: F811
    model = _reg4rec(beauty["codes"]).eval()
    history = beauty["histories"]
    evaluator = GenerativeEvaluator(["recall@10", "ndcg@10"], True, beam=10, search=ConsistencyPruning())
    evaluator.update(model, {"history": history, "seen": history, "target": history[:, -1]})
    metrics = evaluator.compute()
    assert metrics["recall@10"] == 0.0  # seen targets are never returned
    assert metrics["invalid_beams"] == 0.0 and metrics["duplicate_beams"] == 0.0


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A data home with scientific prepared (see prepared_home)."""
    with prepared_home(tmp_path_factory, "scientific") as root:
        yield root


TINY = [
    "logging.progress_bar=false",
    "stages.tokenizer.train.max_epochs=1",
    "stages.tokenizer.train.limit_train_batches=1",
    "stages.tokenizer.model.quantizer.codes=32",
    "stages.recommender.train.batch_size=32",
    "stages.recommender.train.max_epochs=1",
    "stages.recommender.train.limit_train_batches=2",
    "stages.recommender.train.limit_eval_batches=1",
    "stages.recommender.eval.batch_size=32",
    "stages.reason.train.max_epochs=2",
    "stages.reason.train.limit_train_batches=3",
    "stages.reason.train.limit_eval_batches=1",
    "stages.reason.train.checkpoint_every_n_steps=1",
    "stages.reason.train.batch_size=32",
    "stages.reason.eval.batch_size=32",
]


def test_killed_reason_stage_resumes_to_the_uninterrupted_metrics(home: Path, tmp_path: Path) -> None:
    path, env = REPO / "recipes" / "reg4rec.yaml", {"REX_DATA_HOME": str(home)}
    whole = run_rex("train", str(path), *TINY, f"logging.run_root={tmp_path / 'whole'}", env=env)
    assert whole.returncode == 0, whole.stderr[-2000:]
    (whole_dir,) = (tmp_path / "whole" / "reg4rec").iterdir()
    expected = json.loads((whole_dir / "metrics.json").read_text())
    assert set(expected["stages"]) == {"tokenizer", "recommender", "reason"}
    found = kill_rex_when(
        "train", str(path), *TINY, f"logging.run_root={tmp_path / 'killed'}",
        root=tmp_path / "killed", pattern="reg4rec/*/reason/checkpoints/last.ckpt", env=env,
    )  # fmt: skip
    assert found is not None, "the run should have reached its last stage"
    run_dir = found.parents[2]
    assert list(json.loads((run_dir / "stages.json").read_text())["stages"]) == ["tokenizer", "recommender"]
    resumed = run_rex("train", "--resume", str(run_dir), env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = json.loads((run_dir / "metrics.json").read_text())
    assert got["test"] == pytest.approx(expected["test"], abs=1e-6)
