"""Expert bank, fusion gates (router, FDAF) and the decoupling and InfoNCE losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rex.components.experts.bank import ExpertBank
from rex.components.gates.fdaf import FDAF
from rex.components.gates.router import SoftmaxRouter
from rex.components.losses.contrastive import InfoNCE
from rex.components.losses.decouple import CosineDecoupling
from tests.test_components import assert_all_grads


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# --------------------------------------------------------------------------- experts/bank


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_expert_bank_shapes_grads_and_stream_isolation(kind: str) -> None:
    bank = ExpertBank(8, ["id", "text", "image"], num_shared=2, kind=kind)  # type: ignore[arg-type]
    x = torch.randn(2, 3, 5, 8)
    mask = torch.tensor([[True] * 5, [False, False, True, True, True]])
    out = bank(x, mask)
    assert out.shape == (2, 5, 5, 8) and bank.num_experts == 5
    out.pow(2).sum().backward()
    assert_all_grads(bank)
    # A specific expert sees its own stream only; shared experts see every stream.
    changed = x.clone()
    changed[:, 1] += torch.randn(2, 5, 8)
    again = bank(changed, mask)
    torch.testing.assert_close(again[:, [0, 2]], out[:, [0, 2]].detach())
    assert not torch.allclose(again[:, 3], out[:, 3])
    assert bank(x[:, :, 0]).shape == (2, 5, 8)
    with pytest.raises(ValueError):
        bank(torch.randn(2, 2, 5, 8))


# --------------------------------------------------------------------------- gates


def test_router_weights_sum_to_one_and_mix_experts() -> None:
    router = SoftmaxRouter(4, num_experts=3, temperature=0.5)
    query, experts = torch.randn(5, 4), torch.randn(5, 3, 4)
    mixed, weights = router(query, experts)
    assert mixed.shape == (5, 4) and weights.shape == (5, 3)
    torch.testing.assert_close(weights.sum(-1), torch.ones(5))
    torch.testing.assert_close(mixed, (weights[..., None] * experts).sum(1))
    mixed.pow(2).sum().backward()
    assert_all_grads(router)
    with pytest.raises(ValueError):
        router(query, torch.randn(5, 2, 4))


def test_fdaf_shapes_grads_masking_and_length_independence() -> None:
    fdaf = FDAF(8, score_dim=4)
    experts, targets = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 8)
    mask = torch.tensor([[True] * 5, [False, False, False, True, True]])
    out = fdaf(experts, targets, mask)
    assert out.shape == (2, 3, 4)
    out.pow(2).sum().backward()
    assert_all_grads(fdaf)
    # Padded positions do not change the result, whatever they hold.
    changed = experts.clone()
    changed[1, :, :3] = 7.0
    with torch.no_grad():
        torch.testing.assert_close(fdaf(changed, targets, mask)[1], out[1].detach())
    # An all-padding row scores zero, without NaN.
    empty = fdaf(experts, targets, torch.zeros(2, 5, dtype=torch.bool))
    assert torch.equal(empty, torch.zeros_like(empty))


# --------------------------------------------------------------------------- losses


def test_cos_decouple_is_zero_for_orthogonal_and_one_for_identical_experts() -> None:
    loss = CosineDecoupling("experts")
    eye = torch.eye(4)[:3].expand(2, 3, 4)
    assert loss({"experts": eye}, {}).item() == pytest.approx(0.0, abs=1e-6)
    same = torch.randn(2, 1, 4).expand(2, 3, 4)
    assert loss({"experts": same}, {}).item() == pytest.approx(1.0, abs=1e-5)
    # (B, E, L, d): positions are averaged first.
    x = torch.randn(2, 3, 5, 4, requires_grad=True)
    value = loss({"experts": x}, {})
    means = F.normalize(x.mean(2), dim=-1)
    expected = torch.stack([(means[:, i] * means[:, j]).sum(-1) for i, j in ((0, 1), (0, 2), (1, 2))]).mean()
    torch.testing.assert_close(value, expected)
    value.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_infonce_matches_a_hand_computed_case_and_masks_same_user_rows() -> None:
    anchor = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    positive = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    loss = InfoNCE(temperature=0.5, group="user")
    # Row 0: cosines (1, 1/sqrt2); row 1: cosines (0, 1/sqrt2); divided by 0.5.
    s = 1 / math.sqrt(2)
    row0 = -math.log(math.exp(2) / (math.exp(2) + math.exp(2 * s)))
    row1 = -math.log(math.exp(2 * s) / (math.exp(0) + math.exp(2 * s)))
    batch = {"user": torch.tensor([1, 2])}
    value = loss({"anchor": anchor, "positive": positive}, batch)
    assert value.item() == pytest.approx((row0 + row1) / 2, rel=1e-5)
    # Two rows of one user are not each other's negatives: only the positive remains, loss 0.
    same = loss({"anchor": anchor, "positive": positive}, {"user": torch.tensor([3, 3])})
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    a = torch.randn(4, 3, requires_grad=True)
    InfoNCE(group=None)({"anchor": a, "positive": torch.randn(4, 3)}, {}).backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        InfoNCE(temperature=0.0)
