"""interaction/cross (DCN-V2) and interaction/self_attention (AutoInt): shapes, gradients, and each
layer against its formula computed by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rex.components.interactions.cross import CrossNetwork
from rex.components.interactions.self_attention import InteractingLayers
from rex.config.errors import RecipeError
from rex.config.registry import build


def test_cross_layer_is_x0_times_w_x_plus_b_plus_x() -> None:
    # x0 = [1, 2], W = [[1, 0], [1, 1]], b = [0, 1]: x1 = x0 * (W x0 + b) + x0 = [1*1+1, 2*4+2].
    cross = CrossNetwork(num_fields=1, dim=2, layers=1)
    with torch.no_grad():
        cross.crosses[0].weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
        cross.crosses[0].bias.copy_(torch.tensor([0.0, 1.0]))
        cross.head.weight.copy_(torch.tensor([[1.0, 10.0]]))
        cross.head.bias.zero_()
    out = cross(torch.tensor([[[1.0, 2.0]]]))
    assert out.tolist() == [2.0 + 10.0 * 10.0]


@pytest.mark.parametrize("rank", [None, 3])
def test_cross_network_shapes_grads_and_rank(rank: int | None) -> None:
    emb = torch.randn(4, 5, 6, requires_grad=True)
    cross = CrossNetwork(num_fields=5, dim=6, layers=2, rank=rank)
    out = cross(emb)
    assert out.shape == (4,)
    out.sum().backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    full = 2 * (30 * 30 + 30) + 31
    low = 2 * (30 * 3 + 3 * 30 + 30) + 31
    assert sum(p.numel() for p in cross.parameters()) == (full if rank is None else low)


def test_interacting_layer_is_softmax_attention_plus_residual_then_relu() -> None:
    torch.manual_seed(0)
    layers = InteractingLayers(num_fields=3, dim=4, layers=1, heads=2, head_dim=2)
    emb = torch.randn(2, 3, 4)
    h = layers.qkv[0].weight  # (3 * 4, 4): rows for q, k, v, each 2 heads of 2
    q, k, v = (emb @ h[i * 4 : (i + 1) * 4].T for i in range(3))
    heads = []
    for head in range(2):
        cols = slice(2 * head, 2 * head + 2)
        weights = torch.softmax(q[..., cols] @ k[..., cols].transpose(1, 2), dim=-1)  # unscaled
        heads.append(weights @ v[..., cols])
    expected_h = torch.relu(torch.cat(heads, dim=-1) + layers.residual[0](emb))
    expected = layers.head(expected_h.flatten(1)).squeeze(-1)
    torch.testing.assert_close(layers(emb), expected)


def test_interacting_layers_shapes_and_grads() -> None:
    emb = torch.randn(4, 5, 6, requires_grad=True)
    layers = InteractingLayers(num_fields=5, dim=6, layers=2, heads=2, head_dim=3)
    out = layers(emb)
    assert out.shape == (4,)
    out.sum().backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ({"_component_": "interaction/cross", "layers": 0}, "layers must be at least 1"),
        ({"_component_": "interaction/cross", "rank": 0}, "rank must be a positive integer"),
        ({"_component_": "interaction/self_attention", "heads": 0}, "must be positive"),
    ],
)
def test_bad_arguments_name_the_key(node: dict, message: str) -> None:
    model = {
        "_component_": "model/ctr",
        "embed": {"_component_": "embedding/field", "dim": 4},
        "tower": {"_component_": "encoder/mlp", "hidden": [8]},
        "interaction": node,
    }
    with pytest.raises(RecipeError, match=message) as info:
        build(model, "model", {"fields": {"user": 5, "item": 7}})
    assert info.value.key.startswith("model.interaction")


def test_the_ctr_model_gives_the_field_layout_to_interactions_that_take_it() -> None:
    def model(interaction: dict) -> nn.Module:
        node = {
            "_component_": "model/ctr",
            "embed": {"_component_": "embedding/field", "dim": 4},
            "tower": {"_component_": "encoder/mlp", "hidden": [8]},
            "interaction": interaction,
        }
        return build(node, "model", {"fields": {"user": 5, "item": 7, "genre": 3}})

    cross = model({"_component_": "interaction/cross", "layers": 1})
    assert cross.interaction.crosses[0].in_features == 3 * 4
    attention = model({"_component_": "interaction/self_attention", "layers": 1, "heads": 1, "head_dim": 2})
    assert attention.interaction.head.in_features == 3 * 2
    fm = model({"_component_": "interaction/fm"})  # takes no layout: built as before
    batch = {"user": torch.tensor([1, 2]), "item": torch.tensor([3, 4]), "genre": torch.tensor([0, 2])}
    for built in (cross, attention, fm):
        assert built(batch)["logit"].shape == (2,)
