"""Residual quantizer, RQ-VAE tokenizer, its losses and eval/reconstruction: unit behaviour on small
tensors, then an RQ-VAE trained on the real ``scientific`` item-text vectors."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from rex.components.models.rqvae import RQVAE
from rex.components.quantizers.codes import collision_ranks, collision_rate
from rex.components.quantizers.residual import ResidualQuantizer
from rex.config.errors import RecipeError
from rex.config.registry import build
from rex.eval.reconstruction import ReconstructionEvaluator


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _clusters(n_per: int, centres: list[list[float]], spread: float = 0.05) -> Tensor:
    """``n_per`` points around each centre, (n_per * len(centres), d)."""
    c = torch.tensor(centres)
    return (c[:, None, :] + spread * torch.randn(len(c), n_per, c.shape[1])).reshape(-1, c.shape[1])


# --------------------------------------------------------------------------- quantizer/residual


def test_quantizer_shapes_nearest_codes_and_positive_loss() -> None:
    quantizer = ResidualQuantizer(dim=8, levels=3, codes=16)
    x = torch.randn(64, 8)
    quantized, codes, loss = quantizer(x)
    assert quantized.shape == (64, 8) and codes.shape == (64, 3) and codes.dtype == torch.long
    assert loss.dim() == 0 and loss > 0  # codebook + commitment terms of an imperfect quantization
    assert bool(quantizer.initialised) and int(quantizer.step) == 1
    torch.testing.assert_close(quantized, quantizer.lookup(codes))
    # Each level's code is the nearest one to that level's residual.
    residual = x
    for level in range(3):
        book = quantizer.codebooks[level].detach()
        assert torch.equal(codes[:, level], torch.cdist(residual, book).argmin(1))
        residual = residual - book[codes[:, level]]
    # k-means on the first batch: balanced, so every first-level code is used.
    assert (quantizer.usage[0] > 0).all() and int(quantizer.usage.sum()) == 64 * 3


def test_quantizer_straight_through_gradient_reaches_the_encoder_and_codebooks() -> None:
    encoder = nn.Linear(4, 8)
    quantizer = ResidualQuantizer(dim=8, levels=2, codes=8)
    quantized, _, loss = quantizer(encoder(torch.randn(32, 4)))
    (quantized.square().sum() + loss).backward()
    assert encoder.weight.grad is not None and encoder.weight.grad.abs().sum() > 0
    assert quantizer.codebooks.grad is not None and quantizer.codebooks.grad.abs().sum() > 0

    # The straight-through estimator passes the output's gradient to the input unchanged.
    x = torch.randn(32, 8, requires_grad=True)
    quantized, _, _ = quantizer(x)
    quantized.sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, torch.ones_like(x))


def test_quantizer_commitment_loss_is_beta_weighted() -> None:
    x = torch.randn(40, 4)
    torch.manual_seed(1)
    _, _, no_commit = ResidualQuantizer(dim=4, levels=2, codes=8, beta=0.0)(x)
    torch.manual_seed(1)
    _, _, with_commit = ResidualQuantizer(dim=4, levels=2, codes=8, beta=1.0)(x)
    # Same seed, same k-means: the commitment term equals the codebook term in value.
    torch.testing.assert_close(with_commit, 2 * no_commit)
    assert no_commit > 0


def test_quantizer_is_deterministic_given_the_global_seed() -> None:
    x = torch.randn(128, 6)
    results = []
    for _ in range(2):
        torch.manual_seed(7)
        quantizer = ResidualQuantizer(dim=6, levels=2, codes=16, dead_after=1)
        codes = [quantizer(x)[1] for _ in range(3)]
        results.append((quantizer.codebooks.detach().clone(), torch.stack(codes)))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_dead_code_is_reseeded_to_a_current_residual() -> None:
    x = _clusters(8, [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    quantizer = ResidualQuantizer(dim=2, levels=1, codes=4, dead_after=2)
    quantizer(x)  # step 1: k-means initialisation, every code used
    with torch.no_grad():
        quantizer.codebooks[0, 3] = torch.tensor([100.0, 100.0])  # far from everything: dead
    before = quantizer.codebooks.detach().clone()
    _, codes, _ = quantizer(x)  # step 2: unused for one step, not yet dead
    assert not (codes == 3).any()
    assert torch.equal(quantizer.codebooks.detach(), before)
    quantizer(x)  # step 3: unused for two steps: reset to a row of the batch
    moved = quantizer.codebooks[0, 3].detach()
    assert not torch.equal(moved, before[0, 3])
    assert (x == moved).all(1).any(), "the dead code must be reset to one of the batch's residuals"
    assert torch.equal(quantizer.codebooks[0, :3].detach(), before[0, :3])  # live codes untouched
    assert int(quantizer.usage[0, 3]) == 0 and int(quantizer.last_used[0, 3]) == 3


def test_quantizer_eval_mode_changes_no_state_and_bad_arguments_are_rejected() -> None:
    quantizer = ResidualQuantizer(dim=4, levels=2, codes=8)
    quantizer(torch.randn(16, 4))
    state = {k: v.clone() for k, v in quantizer.state_dict().items()}
    quantizer.eval()
    quantizer(torch.randn(16, 4))
    assert all(torch.equal(v, quantizer.state_dict()[k]) for k, v in state.items())

    with pytest.raises(ValueError, match="at least codes=8"):
        ResidualQuantizer(dim=4, levels=2, codes=8)(torch.randn(5, 4))
    with pytest.raises(ValueError, match="codes"):
        ResidualQuantizer(dim=4, codes=0)
    with pytest.raises(ValueError, match="beta"):
        ResidualQuantizer(dim=4, beta=-1.0)
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        ResidualQuantizer(dim=4)(torch.randn(3, 5))


# --------------------------------------------------------------------------- model/rqvae


def _tiny_rqvae(num_items: int = 7, width: int = 6, codes: int = 4) -> RQVAE:
    table = torch.randn(num_items, width)
    model = build(
        {
            "_component_": "model/rqvae",
            "content": "text",
            "hidden": [8],
            "dim": 4,
            "chunk_size": 4,
            "quantizer": {"_component_": "quantizer/residual", "levels": 2, "codes": codes},
        },
        "model",
        {"item_features": {"text": table}, "num_items": num_items},
    )
    assert isinstance(model, RQVAE)
    return model


def test_rqvae_outputs_and_every_parameter_learns() -> None:
    model = _tiny_rqvae()
    out = model({"item": torch.tensor([1, 2, 3, 4, 5, 6], dtype=torch.int32)})
    assert set(out) == model.outputs
    assert out["reconstruction"].shape == out["target"].shape == (6, 6)
    assert out["codes"].shape == (6, 2) and out["quantization_loss"].dim() == 0
    torch.testing.assert_close(out["target"], model.table[1:7])
    loss = (out["reconstruction"] - out["target"]).square().mean() + out["quantization_loss"]
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_item_codes_pad_row_and_disambiguation_column() -> None:
    model = _tiny_rqvae()
    hand = torch.tensor([[1, 2], [0, 0], [1, 2], [3, 1], [1, 2], [0, 0]])
    model.raw_codes = lambda: hand  # type: ignore[method-assign,assignment]
    rows = model.item_codes()
    assert rows.shape == (7, 3) and rows.dtype == torch.long
    assert (rows[0] == -1).all()
    assert torch.equal(rows[1:, :2], hand)
    assert rows[1:, 2].tolist() == [0, 0, 1, 0, 2, 1]  # 0 for the first of a tuple, then 1, 2 ...
    assert len(torch.unique(rows[1:], dim=0)) == 6
    assert collision_rate(hand) == pytest.approx(5 / 6)
    assert collision_ranks(hand).tolist() == [0, 0, 1, 0, 2, 1]


def test_item_codes_are_the_eval_mode_codes_and_keep_the_training_mode() -> None:
    model = _tiny_rqvae()
    model({"item": torch.arange(1, 7)})  # initialise the codebooks
    model.train()
    rows = model.item_codes()  # chunk_size 4: two chunks for the 6 items
    assert model.training
    model.eval()
    assert torch.equal(rows[1:, :2], model({"item": torch.arange(1, 7)})["codes"])
    stats = model.code_stats()
    assert stats["usage"].shape == (2,) and stats["collision_rate"] == collision_rate(rows[1:, :2])


def test_rqvae_rejects_an_unknown_modality() -> None:
    with pytest.raises(RecipeError, match="unknown content 'image'.*text"):
        build(
            {
                "_component_": "model/rqvae",
                "content": "image",
                "quantizer": {"_component_": "quantizer/residual"},
            },
            "model",
            {"item_features": {"text": torch.zeros(3, 4)}},
        )


# --------------------------------------------------------------------------- losses


def test_generative_losses_declare_and_compute_their_reads() -> None:
    mse = build({"_component_": "loss/mse"})
    assert mse.reads == ("reconstruction", "target")
    outputs = {"reconstruction": torch.tensor([[1.0, 2.0]]), "target": torch.tensor([[0.0, 0.0]])}
    assert float(mse(outputs, {})) == pytest.approx(2.5)
    custom = build({"_component_": "loss/mse", "prediction": "a", "target": "b"})
    assert custom.reads == ("a", "b")
    term = build({"_component_": "loss/output", "key": "quantization_loss"})
    assert term.reads == ("quantization_loss",)
    assert float(term({"quantization_loss": torch.tensor(0.3)}, {})) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="scalar"):
        term({"quantization_loss": torch.ones(2)}, {})


# --------------------------------------------------------------------------- eval/reconstruction


class _Fixed(nn.Module):
    """Returns fixed outputs for the rows named by ``batch["item"]``."""

    codebook_size = 4

    def __init__(self, recon: Tensor, target: Tensor, codes: Tensor) -> None:
        super().__init__()
        self.recon, self.target, self.codes = recon, target, codes

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        i = batch["item"]
        return {"reconstruction": self.recon[i], "target": self.target[i], "codes": self.codes[i]}


def test_reconstruction_evaluator_on_a_hand_computed_case() -> None:
    model = _Fixed(
        recon=torch.tensor([[1.0, 0.0], [0.0, 0.0], [2.0, 2.0]]),
        target=torch.zeros(3, 2),
        codes=torch.tensor([[0, 1], [0, 1], [2, 1]]),
    )
    evaluator = build(
        {"_component_": "eval/reconstruction", "metrics": ["recon_mse", "codebook_usage", "collision_rate"]}
    )
    evaluator.reset()
    evaluator.update(model, {"item": torch.tensor([0, 1])})
    evaluator.update(model, {"item": torch.tensor([2])})
    # Squared errors 1 + 0 + 8 over 6 elements; level 0 uses codes {0, 2} of 4, level 1 only {1};
    # items 0 and 1 share the tuple (0, 1).
    assert evaluator.compute() == pytest.approx(
        {"recon_mse": 1.5, "codebook_usage": 0.25, "collision_rate": 2 / 3}
    )
    evaluator.reset()
    evaluator.update(model, {"item": torch.tensor([2])})
    assert evaluator.compute()["collision_rate"] == 0.0


def test_reconstruction_evaluator_names_its_metrics_on_a_bad_one() -> None:
    for bad in ("auc", "nope"):
        with pytest.raises(ValueError, match="recon_mse, codebook_usage, collision_rate"):
            ReconstructionEvaluator([bad])


# --------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def text_vectors(data_home: Path) -> Tensor:
    """The ``scientific`` items' 384-d MiniLM text vectors (num_items, 384), row 0 padding, from
    the session's data home (prepared once; the TIGER recipe test reads the same dataset)."""
    from rex.data.features import item_vectors
    from rex.data.prepare import prepare_dataset
    from rex.data.schema import load_schema

    prepare_dataset("scientific", root=data_home)
    directory = data_home / "scientific"
    return torch.from_numpy(item_vectors(directory, load_schema(directory))["text"])


def test_rqvae_tokenizes_real_item_text(text_vectors: Tensor) -> None:
    """3 levels x 256 codes on 4,385 items, 800 Adam steps of 512 items (about 93 epochs).

    Baselines: ``random codes`` decodes, with the trained codebooks and decoder, codes drawn
    uniformly at every level, i.e. a code that carries no information about the item; ``mean``
    predicts the mean text vector for every item.
    """
    num_items, width = text_vectors.shape
    assert (num_items, width) == (4386, 384)
    model = build(
        {
            "_component_": "model/rqvae",
            "content": "text",
            "hidden": [256, 128],
            "dim": 32,
            "quantizer": {"_component_": "quantizer/residual", "levels": 3, "codes": 256, "dead_after": 20},
        },
        "model",
        {"item_features": {"text": text_vectors}, "num_items": num_items},
    )
    losses = [
        build({"_component_": "loss/mse"}),
        build({"_component_": "loss/output", "key": "quantization_loss"}),
    ]
    assert all(set(loss.reads) <= model.outputs for loss in losses)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    started, step = time.perf_counter(), 0
    model.train()
    while step < 800:
        for ids in (torch.randperm(num_items - 1) + 1).split(512):
            outputs = model({"item": ids})
            loss = sum(term(outputs, {}) for term in losses)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step == 800:
                break
    trained_s = time.perf_counter() - started

    stats = model.code_stats()
    rows = model.item_codes()
    model.eval()
    evaluator = ReconstructionEvaluator(["recon_mse", "codebook_usage", "collision_rate"])
    for ids in torch.arange(1, num_items).split(1000):
        evaluator.update(model, {"item": ids})
    metrics = evaluator.compute()
    with torch.no_grad():
        target = text_vectors[1:]
        random_codes = torch.randint(model.codebook_size, (num_items - 1, model.levels))
        random_mse = float((model.decoder(model.quantizer.lookup(random_codes)) - target).square().mean())
        mean_mse = float((target - target.mean(0)).square().mean())
    print(
        f"\ntrained {trained_s:.1f}s; usage {stats['usage'].tolist()}; collisions "
        f"{stats['collision_rate']:.4f}; mse {metrics['recon_mse']:.6f} vs random codes {random_mse:.6f} "
        f"and mean {mean_mse:.6f}; largest collision group {int(rows[1:, -1].max()) + 1}"
    )

    assert (stats["usage"] > 0.5).all()
    assert metrics["codebook_usage"] == pytest.approx(float(stats["usage"].min()))
    assert metrics["collision_rate"] == pytest.approx(stats["collision_rate"])
    assert rows.shape == (num_items, 4) and (rows[0] == -1).all() and (rows[1:] >= 0).all()
    assert len(torch.unique(rows[1:], dim=0)) == num_items - 1  # no collision after disambiguation
    assert metrics["recon_mse"] < 0.5 * random_mse
    assert metrics["recon_mse"] < 0.8 * mean_mse
