"""MMQ (arXiv:2508.15281): model/mmq, quantizer/residual's soft indexing, loss/orthogonal,
embedding/item_codes and model/ctr's codes, then recipes/mmq.yaml and recipes/mmq_din.yaml on
real scientific_mm data: stage 2 starts from stage 1, and each staged recipe resumes from a kill
in its last stage to the uninterrupted run's metrics."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import rex.builtins  # noqa: F401
from rex.components.embeddings.attributes import ItemCodeEmbedding
from rex.components.losses.decouple import SubspaceOrthogonality
from rex.components.models.mmq import MMQ
from rex.components.quantizers.residual import ResidualQuantizer
from rex.config.errors import RecipeError
from rex.config.recipe import load_recipe
from rex.config.registry import build
from rex.engine.build import build_run
from rex.engine.stages import copy_modules
from tests.conftest import REPO, kill_rex_when, prepared_home, run_rex

ITEMS = 24  # ids 1..23 of the random tables, 0 is padding


def _mmq(**overrides: object) -> MMQ:
    torch.manual_seed(0)
    features = {
        "text": torch.randn(ITEMS, 12),
        "image": torch.randn(ITEMS, 10),
        "other": torch.randn(ITEMS, 3),
    }
    node = {
        "_component_": "model/mmq",
        "width": 16,
        "dim": 8,
        "hidden": [8],
        "temperature": 0.5,
        "chunk_size": 5,
        "quantizer": {"_component_": "quantizer/residual", "levels": 2, "codes": 4, "dead_after": None},
        "experts": {"_component_": "experts/bank", "num_shared": 2},
        "router": {"_component_": "gate/router"},
        **overrides,
    }
    model = build(node, "model", {"item_features": features})
    assert isinstance(model, MMQ)
    return model


def _item_losses(out: dict[str, Tensor]) -> Tensor:
    recon = sum(F.mse_loss(out[f"reconstruction_{m}"], out[f"target_{m}"]) for m in ("text", "image"))
    orthogonal = SubspaceOrthogonality()(out, {})
    return recon + out["quantization_loss"] + orthogonal  # type: ignore[return-value]


SEQUENCES = {
    "items": torch.tensor([[0, 0, 3, 5, 7], [1, 2, 3, 4, 5], [0, 0, 0, 9, 3]]),
    "targets": torch.tensor([[0, 0, 5, 7, 11], [2, 3, 4, 5, 6], [0, 0, 0, 3, 12]]),
}


# --------------------------------------------------------------------------- model/mmq


def test_item_batch_shapes_and_every_parameter_learns() -> None:
    model = _mmq()
    out = model({"item": torch.arange(1, 17)})
    assert set(out) <= model.outputs
    assert out["reconstruction_text"].shape == out["target_text"].shape == (16, 12)
    assert out["reconstruction_image"].shape == out["target_image"].shape == (16, 10)
    assert out["reconstruction"].shape == out["target"].shape == (16, 22)
    torch.testing.assert_close(out["target_image"], model.table[1:17, 12:])
    assert out["codes"].shape == (16, 2) and out["codes"].dtype == torch.long
    assert out["shared"].shape == (16, 2, 16) and out["specific"].shape == (16, 2, 16)
    _item_losses(out).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_sequence_batch_gives_a_softmax_over_the_batch_items_without_the_row_own_items() -> None:
    model = _mmq()
    model({"item": torch.arange(1, 17)})  # k-means initialisation, as stage 1 leaves it
    out = model(SEQUENCES)
    ids = [1, 2, 3, 4, 5, 6, 7, 9, 11, 12]  # the batch's distinct items, sorted
    targets = SEQUENCES["targets"][SEQUENCES["targets"] > 0]
    assert out["logits"].shape == (len(targets), len(ids))
    assert [ids[i] for i in out["labels"].tolist()] == targets.tolist()
    assert out["reconstruction"].shape == (len(ids), 22)
    masked = out["logits"] == torch.finfo(out["logits"].dtype).min
    first = {ids[j] for j in range(len(ids)) if masked[0, j]}  # row 0, position 2 -> item 5
    assert first == {3, 7, 11}  # the row's other items; the label (5) stays a candidate
    assert not masked[torch.arange(len(targets)), out["labels"]].any()
    # The first position's user vector is item 3's own soft-quantized vector.
    with torch.no_grad():
        soft = model.quantizer.soft(model.encode(torch.tensor(ids))["latent"], model.temperature)
        cosines = F.normalize(soft[2], dim=0) @ F.normalize(soft, dim=1).T / model.behaviour_temperature
    unmasked = ~masked[0]
    torch.testing.assert_close(out["logits"][0, unmasked], cosines[unmasked])


def test_behaviour_loss_alone_moves_the_codebooks_through_soft_indexing() -> None:
    model = _mmq()
    model({"item": torch.arange(1, 17)})
    out = model(SEQUENCES)
    F.cross_entropy(out["logits"], out["labels"]).backward()
    assert model.quantizer.codebooks.grad is not None and model.quantizer.codebooks.grad.abs().sum() > 0
    for module in (model.inputs, model.experts, model.router, model.to_latent):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_evaluation_history_batch_scores_every_item_by_the_hard_codes() -> None:
    model = _mmq().eval()
    history = torch.tensor([[0, 0, 3, 5], [1, 2, 3, 4]])
    scores = model({"history": history})["scores"]
    assert scores.shape == (2, ITEMS)
    table = model.quantizer.lookup(model.raw_codes())
    user = table[torch.tensor([2, 4])].mean(0)  # items 3 and 5 (rows 2 and 4 of items 1..)
    expected = F.normalize(user, dim=0) @ F.normalize(table, dim=1).T
    torch.testing.assert_close(scores[0, 1:], expected)


def test_codes_are_deterministic_at_eval_and_keep_the_training_mode() -> None:
    model = _mmq()
    model({"item": torch.arange(1, 17)})
    model.train()
    first = model.item_codes()
    assert model.training and first.shape == (ITEMS, 3) and (first[0] == -1).all()
    assert torch.equal(first, model.item_codes())
    model.chunk_size = 100  # one chunk: codes do not depend on what else is in the batch
    assert torch.equal(first, model.item_codes())
    model.eval()
    assert torch.equal(first[1:, :2], model({"item": torch.arange(1, ITEMS)})["codes"])
    assert len(torch.unique(first[1:], dim=0)) == ITEMS - 1  # the last column separates collisions


def test_modalities_are_chosen_by_name_and_bad_arguments_are_recipe_errors() -> None:
    one = _mmq(modalities=["other"])
    assert one({"item": torch.arange(1, 9)})["reconstruction"].shape == (8, 3)
    with pytest.raises(RecipeError, match="unknown modalities.*audio.*image, other, text"):
        _mmq(modalities=["text", "audio"])
    with pytest.raises(RecipeError, match="temperature"):
        _mmq(temperature=0.0)


# --------------------------------------------------------------------------- soft indexing


def test_soft_indexing_tends_to_the_hard_codes_and_passes_gradients() -> None:
    torch.manual_seed(1)
    quantizer = ResidualQuantizer(dim=6, levels=3, codes=8, dead_after=None)
    x = torch.randn(32, 6, requires_grad=True)
    hard, codes, _ = quantizer(x)
    state = {k: v.clone() for k, v in quantizer.state_dict().items()}
    torch.testing.assert_close(quantizer.soft(x, 1e-6), quantizer.lookup(codes))
    assert not torch.allclose(quantizer.soft(x, 10.0), hard)
    soft = quantizer.soft(x, 0.5)
    assert soft.shape == (32, 6)
    soft.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert quantizer.codebooks.grad is not None and (quantizer.codebooks.grad.abs().sum((1, 2)) > 0).all()
    assert all(torch.equal(state[k], v) for k, v in quantizer.state_dict().items())  # no state moves
    with pytest.raises(ValueError, match="temperature must be positive"):
        quantizer.soft(x, 0.0)


# --------------------------------------------------------------------------- loss/orthogonal


def test_orthogonal_loss_is_zero_for_orthogonal_inputs_and_positive_otherwise() -> None:
    torch.manual_seed(2)
    loss = SubspaceOrthogonality()
    shared = torch.zeros(16, 2, 8)
    specific = torch.zeros(16, 3, 8)
    shared[..., :4] = torch.randn(16, 2, 4)  # the shared experts span dims 0..3,
    specific[..., 4:] = torch.randn(16, 3, 4)  # the specific ones dims 4..7
    assert float(loss({"shared": shared, "specific": specific}, {})) == pytest.approx(0.0, abs=1e-7)
    mixed = {"shared": torch.randn(16, 2, 8, requires_grad=True), "specific": torch.randn(16, 3, 8)}
    value = loss(mixed, {})
    assert value.dim() == 0 and float(value.detach()) > 0
    value.backward()
    assert mixed["shared"].grad is not None and mixed["shared"].grad.abs().sum() > 0
    same = torch.randn(1, 8).expand(16, 8)  # one direction on both sides, (B, d) for one expert
    assert float(loss({"shared": same, "specific": 3 * same}, {})) == pytest.approx(1.0)
    assert loss.reads == ("shared", "specific")
    with pytest.raises(ValueError, match="loss/orthogonal needs"):
        loss({"shared": torch.randn(16, 2, 8), "specific": torch.randn(16, 3, 5)}, {})


# --------------------------------------------------------------------------- embedding/item_codes


CODES = torch.tensor([[-1, -1, -1, -1], [0, 2, 1, 0], [0, 2, 1, 1], [3, 0, 0, 0], [1, 1, 1, 0]])


def test_item_codes_embed_each_kept_column_as_its_own_field() -> None:
    embedding = ItemCodeEmbedding(CODES, dim=4, columns=3)
    assert embedding.out_dim == 12
    out = embedding(torch.tensor([[1, 2], [0, 3]]))
    assert out.shape == (2, 2, 12)
    assert (out[1, 0] == 0).all()  # the padding item
    torch.testing.assert_close(out[0, 0], out[0, 1])  # items 1 and 2 differ only in column 4
    ids = embedding.ids(torch.arange(1, 5))
    # column c's code k is id 1 + offset_c + k: sizes 4, 3, 2, so offsets 0, 4, 7
    assert ids.tolist() == [[1, 7, 9], [1, 7, 9], [4, 5, 8], [2, 6, 9]]
    out.sum().backward()
    assert embedding.embedding.weight.grad is not None and embedding.embedding.weight.grad.abs().sum() > 0
    assert ItemCodeEmbedding(CODES, dim=2).out_dim == 8  # every column by default
    with pytest.raises(ValueError, match="columns must lie in"):
        ItemCodeEmbedding(CODES, dim=2, columns=5)
    with pytest.raises(ValueError, match="integer"):
        ItemCodeEmbedding(CODES.float(), dim=2)


def _din(codes: dict | None) -> nn.Module:
    node = {
        "_component_": "model/ctr",
        "use_fields": ["item"],
        "embed": {"_component_": "embedding/field", "dim": 4},
        "interest": {"_component_": "attention/target", "hidden": [8]},
        "tower": {"_component_": "encoder/mlp", "hidden": [8]},
        "codes": codes,
    }
    return build(node, "model", {"fields": {"user": 3, "item": 5}, "item_codes": CODES})


def test_ctr_model_appends_the_codes_to_the_target_and_every_history_item() -> None:
    plain, coded = _din(None), _din({"_component_": "embedding/item_codes", "dim": 2, "columns": 3})
    assert coded.width == plain.width + 2 * 6  # the target's and the pooled interest's codes
    batch = {
        "user": torch.tensor([1, 2]),
        "item": torch.tensor([1, 3]),
        "history": torch.tensor([[0, 2], [4, 1]]),
    }
    out = coded(batch)["logit"]
    assert out.shape == (2,)
    out.sum().backward()
    assert coded.codes.embedding.weight.grad.abs().sum() > 0
    # The same item in another history position reads the same codes.
    x, _, _ = coded.inputs(batch)
    assert x.shape == (2, coded.width)


# --------------------------------------------------------------------------- recipes on real data


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A data home with scientific_mm prepared (see prepared_home)."""
    with prepared_home(tmp_path_factory, "scientific_mm") as root:
        yield root


def test_finetune_stage_starts_from_the_whole_tokenizer(home: Path) -> None:
    loaded = load_recipe(REPO / "recipes" / "mmq.yaml", ["stages.tokenizer.train.batch_size=256"])
    tokenizer, finetune, _ = loaded.stages
    source_built = build_run(tokenizer.recipe, seed=1, source="test")
    model = source_built.module.model
    model.train()
    model({"item": torch.arange(1, 257)})  # initialises the codebooks: a trained stage 1's state
    source = source_built.module.state_dict()
    target = build_run(finetune.recipe, seed=2, source="test")
    copy_modules(source, target, finetune)
    after = target.module.state_dict()
    assert set(after) == set(source)
    for name, value in after.items():
        assert torch.equal(value, source[name]), name
    assert bool(target.module.model.quantizer.initialised)  # stage 2 never re-runs k-means


TINY = [
    "logging.progress_bar=false",
    "stages.tokenizer.train.max_epochs=1",
    "stages.tokenizer.train.limit_train_batches=1",
    "stages.finetune.train.max_epochs=1",
    "stages.finetune.train.limit_train_batches=2",
    "stages.finetune.train.limit_eval_batches=1",
]
LAST = {"mmq": "recommender", "mmq_din": "ranker"}


@pytest.mark.parametrize("recipe", ["mmq", "mmq_din"])
def test_killed_last_stage_resumes_to_the_uninterrupted_metrics(
    home: Path, tmp_path: Path, recipe: str
) -> None:
    last = LAST[recipe]
    budget = [
        *TINY,
        f"stages.{last}.train.max_epochs=2",
        f"stages.{last}.train.limit_train_batches=4",
        f"stages.{last}.train.limit_eval_batches=1",
        f"stages.{last}.train.checkpoint_every_n_steps=1",
        f"stages.{last}.eval.batch_size=64",
    ]
    path = REPO / "recipes" / f"{recipe}.yaml"
    env = {"REX_DATA_HOME": str(home)}
    whole = run_rex("train", str(path), *budget, f"logging.run_root={tmp_path / 'whole'}", env=env)
    assert whole.returncode == 0, whole.stderr[-2000:]
    (whole_dir,) = (tmp_path / "whole" / recipe).iterdir()
    expected = json.loads((whole_dir / "metrics.json").read_text())
    assert set(expected["stages"]) == {"tokenizer", "finetune", last}

    found = kill_rex_when(
        "train",
        str(path),
        *budget,
        f"logging.run_root={tmp_path / 'killed'}",
        root=tmp_path / "killed",
        pattern=f"{recipe}/*/{last}/checkpoints/last.ckpt",
        env=env,
    )
    assert found is not None, "the run should have reached its last stage"
    run_dir = found.parents[2]
    assert not (run_dir / "metrics.json").exists()
    assert list(json.loads((run_dir / "stages.json").read_text())["stages"]) == ["tokenizer", "finetune"]

    resumed = run_rex("train", "--resume", str(run_dir), env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = json.loads((run_dir / "metrics.json").read_text())
    assert got["test"] == pytest.approx(expected["test"], abs=1e-6)
    for stage, metrics in expected["stages"].items():
        assert got["stages"][stage] == pytest.approx(metrics, abs=1e-6), stage
