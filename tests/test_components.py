"""Unit tests for the built-in layers: shapes, gradients and one behavioural property each."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rex.components.attention.target import TargetAttention
from rex.components.embeddings.field import FieldEmbedding
from rex.components.encoders.activation import Dice, make_activation
from rex.components.encoders.mlp import MLP
from rex.components.encoders.transformer import TransformerEncoder
from rex.components.interactions.fm import FactorizationMachine
from rex.components.losses.classification import BCEWithLogits, SoftmaxCrossEntropy
from rex.config.errors import RecipeError
from rex.config.registry import ComponentFactory, build, lookup


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def assert_all_grads(module: nn.Module) -> None:
    for name, param in module.named_parameters():
        assert param.grad is not None, f"{name} received no gradient"
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def left_padded_mask(lengths: list[int], length: int) -> torch.Tensor:
    """(B, L) bool, True = padding, sequences right-aligned."""
    pos = torch.arange(length)
    return pos[None, :] < (length - torch.tensor(lengths))[:, None]


# --------------------------------------------------------------------------- embedding/field


def test_field_embedding_shapes_and_grad() -> None:
    emb = FieldEmbedding({"user": 5, "item": 7, "cat": 3}, dim=4)
    batch = {"user": torch.tensor([1, 4]), "item": torch.tensor([6, 0]), "cat": torch.tensor([2, 1])}
    out = emb(batch)
    assert out.shape == (2, 3, 4)
    assert emb.names == ["user", "item", "cat"] and emb.dim == 4
    assert emb(batch, names=["cat", "user"]).shape == (2, 2, 4)
    out.sum().backward()
    assert_all_grads(emb)


def test_field_embedding_fields_do_not_share_rows_and_lookup_matches_forward() -> None:
    emb = FieldEmbedding({"user": 5, "item": 7}, dim=4, init_std=1.0)
    ids = torch.tensor([3, 3])
    out = emb({"user": ids, "item": ids})
    assert not torch.allclose(out[:, 0], out[:, 1])
    torch.testing.assert_close(emb.lookup("item", ids), out[:, 1])
    torch.testing.assert_close(emb(({"user": ids, "item": ids}), names=["item"])[:, 0], out[:, 1])
    history = torch.tensor([[0, 1, 6], [2, 2, 3]])
    hist = emb.lookup("item", history)
    assert hist.shape == (2, 3, 4)
    torch.testing.assert_close(hist[1, 2], out[0, 1])


def test_field_embedding_gradient_is_bit_identical_to_nn_embedding() -> None:
    torch.manual_seed(0)
    emb = FieldEmbedding({"user": 50, "item": 300}, dim=8)
    batch = {"user": torch.randint(0, 50, (512,)), "item": torch.randint(0, 300, (512,))}
    history = torch.randint(0, 300, (512, 20))  # repeated ids: gradients accumulate per row
    upstream = torch.randn(512, 2, 8), torch.randn(512, 20, 8)
    fast = torch.autograd.grad(
        (emb(batch) * upstream[0]).sum() + (emb.lookup("item", history) * upstream[1]).sum(),
        emb.embedding.weight,
    )[0]
    reference_ids = torch.stack([batch["user"], batch["item"] + 50], dim=-1)
    reference = torch.autograd.grad(
        (torch.nn.functional.embedding(reference_ids, emb.embedding.weight) * upstream[0]).sum()
        + (torch.nn.functional.embedding(history + 50, emb.embedding.weight) * upstream[1]).sum(),
        emb.embedding.weight,
    )[0]
    assert torch.equal(fast, reference)


def test_field_embedding_rejects_bad_config() -> None:
    with pytest.raises(ValueError):
        FieldEmbedding({"user": 0}, dim=4)
    with pytest.raises(ValueError):
        FieldEmbedding({}, dim=4)


# --------------------------------------------------------------------------- encoder/mlp


@pytest.mark.parametrize("activation", ["relu", "prelu", "dice", "gelu", "sigmoid", "tanh"])
def test_mlp_shapes_and_grad(activation: str) -> None:
    mlp = MLP(6, [8, 3], activation=activation, dropout=0.1, batch_norm=True)  # type: ignore[arg-type]
    assert mlp.out_dim == 3
    out = mlp(torch.randn(5, 6))
    assert out.shape == (5, 3)
    (out * torch.randn_like(out)).sum().backward()
    assert_all_grads(mlp)


def test_mlp_output_activation_off_gives_linear_last_layer() -> None:
    mlp = MLP(4, [8, 1], activation="relu", output_activation=False)
    assert isinstance(mlp.net[-1], nn.Linear)
    # A relu on the last layer could never produce a negative logit.
    assert (mlp(torch.randn(256, 4)) < 0).any()


# --------------------------------------------------------------------------- activations


def test_dice_shapes_grad_and_eval_determinism() -> None:
    dice = Dice(4)
    for shape in [(6, 4), (3, 5, 4)]:
        x = torch.randn(*shape)
        out = dice(x)
        assert out.shape == x.shape
        (out * torch.randn_like(out)).sum().backward()
    assert_all_grads(dice)
    dice.eval()
    x = torch.randn(3, 4)
    torch.testing.assert_close(dice(x), dice(x))
    # In eval a row's output does not depend on the rest of the batch.
    torch.testing.assert_close(dice(x)[:1], dice(x[:1]))


def test_make_activation_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown activation"):
        make_activation("swish2", 4)


# --------------------------------------------------------------------------- encoder/transformer


def test_transformer_shapes_grad_and_zero_padding() -> None:
    enc = TransformerEncoder(dim=8, num_layers=2, num_heads=2, dropout=0.1)
    x = torch.randn(3, 5, 8)
    pad = left_padded_mask([5, 3, 1], 5)
    out = enc(x, pad)
    assert out.shape == (3, 5, 8)
    assert (out[pad] == 0).all()
    (out * torch.randn_like(out)).sum().backward()
    assert_all_grads(enc)


def test_transformer_is_causal() -> None:
    enc = TransformerEncoder(dim=8, num_layers=2, num_heads=2).eval()
    x = torch.randn(2, 6, 8)
    pad = left_padded_mask([6, 4], 6)
    t = 3
    changed = x.clone()
    changed[:, t + 1 :] = torch.randn(2, 6 - t - 1, 8)
    before, after = enc(x, pad), enc(changed, pad)
    torch.testing.assert_close(before[:, : t + 1], after[:, : t + 1])
    assert not torch.allclose(before[:, t + 1 :], after[:, t + 1 :])


def test_transformer_ignores_padding_content_and_all_padding_row_is_finite() -> None:
    enc = TransformerEncoder(dim=8, num_layers=1, num_heads=2, causal=False).eval()
    x = torch.randn(2, 4, 8)
    pad = left_padded_mask([2, 0], 4)
    noisy = x.clone()
    noisy[pad] = torch.randn(int(pad.sum()), 8) * 100
    out = enc(x, pad)
    assert torch.isfinite(out).all()
    assert (out[1] == 0).all()
    torch.testing.assert_close(out, enc(noisy, pad))
    enc.train()
    out = enc(x, pad)
    out.sum().backward()
    for p in enc.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()


def test_transformer_last_only_equals_the_last_position_of_the_full_output() -> None:
    enc = TransformerEncoder(dim=8, num_layers=2, num_heads=2).eval()
    x = torch.randn(3, 6, 8)
    pad = left_padded_mask([6, 2, 0], 6)
    last = enc(x, pad, last_only=True)
    assert last.shape == (3, 1, 8)
    torch.testing.assert_close(last, enc(x, pad)[:, -1:])


def test_transformer_rejects_bad_heads() -> None:
    with pytest.raises(ValueError, match="divisible"):
        TransformerEncoder(dim=6, num_heads=4)


# --------------------------------------------------------------------------- attention/target


@pytest.mark.parametrize("softmax", [False, True])
def test_target_attention_shapes_and_grad(softmax: bool) -> None:
    att = TargetAttention(dim=4, hidden=[8, 4], softmax=softmax)
    target, history = torch.randn(6, 4), torch.randn(6, 5, 4)
    mask = ~left_padded_mask([5, 4, 3, 2, 1, 1], 5)
    out = att(target, history, mask)
    assert out.shape == (6, 4)
    (out * torch.randn_like(out)).sum().backward()
    assert_all_grads(att)


def test_softmax_target_attention_loads_a_checkpoint_with_the_old_score_bias() -> None:
    att = TargetAttention(dim=4, hidden=[8], softmax=True).eval()
    target, history = torch.randn(3, 4), torch.randn(3, 5, 4)
    old = {**att.state_dict(), "score.bias": torch.tensor([0.7])}
    restored = TargetAttention(dim=4, hidden=[8], softmax=True).eval()
    restored.load_state_dict(old)
    torch.testing.assert_close(restored(target, history), att(target, history))
    # DIN's unnormalised scores keep their bias, and a checkpoint must hold it.
    din = TargetAttention(dim=4, hidden=[8]).state_dict()
    with pytest.raises(RuntimeError, match="score.bias"):
        TargetAttention(dim=4, hidden=[8]).load_state_dict(
            {k: v for k, v in din.items() if k != "score.bias"}
        )


@pytest.mark.parametrize("softmax", [False, True])
def test_target_attention_ignores_padded_positions(softmax: bool) -> None:
    att = TargetAttention(dim=4, softmax=softmax).eval()
    target, history = torch.randn(2, 4), torch.randn(2, 5, 4)
    mask = ~left_padded_mask([3, 0], 5)
    noisy = history.clone()
    noisy[~mask] = torch.randn(int((~mask).sum()), 4) * 100
    out = att(target, history, mask)
    torch.testing.assert_close(out, att(target, noisy, mask))
    assert torch.isfinite(out).all()
    assert (out[1] == 0).all()  # no valid position: zero vector, no NaN


def test_target_attention_default_hidden() -> None:
    att = TargetAttention(dim=4)
    assert [m.out_features for m in att.mlp.net if isinstance(m, nn.Linear)] == [80, 40]


# --------------------------------------------------------------------------- interaction/fm


def test_fm_matches_brute_force_pairwise() -> None:
    emb = torch.randn(3, 5, 4, requires_grad=True)
    out = FactorizationMachine()(emb)
    assert out.shape == (3,)
    brute = sum((emb[:, i] * emb[:, j]).sum(-1) for i in range(5) for j in range(i + 1, 5))
    torch.testing.assert_close(out, brute)
    out.sum().backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0


# --------------------------------------------------------------------------- losses


def test_bce_hand_computed() -> None:
    loss = BCEWithLogits()
    logit = torch.tensor([0.0, 0.0], requires_grad=True)
    value = loss({"logit": logit}, {"label": torch.tensor([1, 0])})
    assert value.shape == ()
    assert value.item() == pytest.approx(math.log(2))
    value.backward()
    torch.testing.assert_close(logit.grad, torch.tensor([-0.25, 0.25]))
    x, y = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 0.0])
    expected = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-1.0))) / 2
    assert loss({"logit": x}, {"label": y}).item() == pytest.approx(expected)


def test_softmax_ce_matches_reference() -> None:
    logits = torch.randn(4, 6, requires_grad=True)
    labels = torch.tensor([0, 5, 2, 2])
    value = SoftmaxCrossEntropy()({"logits": logits, "labels": labels}, {})
    assert value.shape == ()
    torch.testing.assert_close(value, nn.functional.cross_entropy(logits, labels))
    value.backward()
    assert logits.grad is not None
    uniform = SoftmaxCrossEntropy(label_smoothing=0.1)(
        {"logits": torch.zeros(2, 4), "labels": torch.tensor([1, 3])}, {}
    )
    assert uniform.item() == pytest.approx(math.log(4))
    with pytest.raises(ValueError):
        SoftmaxCrossEntropy(label_smoothing=1.0)


# --------------------------------------------------------------------------- registry


def test_components_build_through_registry() -> None:
    assert isinstance(build({"_component_": "encoder/mlp", "in_dim": 4, "hidden": [8]}), MLP)
    emb = build({"_component_": "embedding/field", "dim": 4}, context={"fields": {"user": 3, "item": 5}})
    assert isinstance(emb, FieldEmbedding) and emb.names == ["user", "item"]
    built = {
        "encoder/transformer": build({"_component_": "encoder/transformer", "dim": 8, "ffn_dim": None}),
        "attention/target": build({"_component_": "attention/target", "dim": 4, "activation": "prelu"}),
        "interaction/fm": build({"_component_": "fm"}),
        "loss/bce": build({"_component_": "loss/bce"}),
        "loss/softmax_ce": build({"_component_": "loss/softmax_ce", "label_smoothing": 0.1}),
    }
    for key, module in built.items():
        assert isinstance(module, nn.Module), key

    # A parent receiving the MLP as a factory (a Factory[nn.Module] argument) supplies in_dim.
    tower = ComponentFactory(lookup("mlp"), {"hidden": [4]}, "model.tower", {})
    assert tower(in_dim=6)(torch.randn(2, 6)).shape == (2, 4)


def test_registry_rejects_badly_typed_arguments() -> None:
    with pytest.raises(RecipeError, match="hidden"):
        build({"_component_": "encoder/mlp", "in_dim": 4, "hidden": 8})
    with pytest.raises(RecipeError, match="activation"):
        build({"_component_": "encoder/mlp", "in_dim": 4, "hidden": [8], "activation": "swish"})


def test_component_docstrings_have_summary_lines() -> None:
    for cls in [FieldEmbedding, MLP, TransformerEncoder, TargetAttention, FactorizationMachine]:
        assert cls.__doc__ and cls.__doc__.strip().splitlines()[0].strip()
    for cls in [BCEWithLogits, SoftmaxCrossEntropy]:
        assert cls.__doc__ and cls.__doc__.strip().splitlines()[0].strip()


def test_shared_argument_checks_name_every_bad_argument() -> None:
    from rex.components.clustering.kmeans import BalancedKMeans
    from rex.components.encoders.sim_bucket import SimBucket

    with pytest.raises(ValueError, match=r"k and iters must be >= 1, got k=0, iters=0"):
        BalancedKMeans(k=0, iters=0)
    with pytest.raises(ValueError, match=r"dim and num_buckets must be >= 1, got dim=0, num_buckets=0"):
        SimBucket(dim=0, max_len=5, num_buckets=0)
