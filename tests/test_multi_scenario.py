"""Multi-scenario CTR: the backbones (shared-bottom, MMoE, PLE, STAR), their expert layers,
model/multi_scenario, eval/click's per-scenario and sparse-user metrics, and the recipes on
amazon_multidomain."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from rex.components.backbones.multi_scenario import PLE, STAR, MMoE, SharedBottom
from rex.components.encoders.mlp import MLP
from rex.components.experts.bank import ExpertBank
from rex.components.experts.cgc import CGC
from rex.components.experts.scenario import ScenarioTowers, route
from rex.components.experts.star import PartitionedNorm, StarFCN
from rex.components.gates.router import SoftmaxRouter
from rex.components.models.multi_scenario import MultiScenarioCTR
from rex.config.registry import build
from rex.engine.train import train
from rex.eval.evaluators import ClickEvaluator
from tests.conftest import REPO, run_rex
from tests.test_components import assert_all_grads

DIM, S = 6, 3


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def mlp(hidden: list[int]):  # a factory, as the registry hands one to a parent
    return lambda in_dim: MLP(in_dim, hidden)


def bank(num_shared: int):  # experts/bank and gate/router factories
    return lambda **sizes: ExpertBank(**sizes, num_shared=num_shared, hidden=8)


def router(**sizes) -> SoftmaxRouter:
    return SoftmaxRouter(**sizes)


def rows() -> tuple[Tensor, Tensor]:
    """8 rows of DIM features; every scenario present."""
    return torch.randn(8, DIM), torch.tensor([0, 1, 2, 0, 2, 1, 1, 0])


def changes_only(before: Tensor, after: Tensor, scenario: Tensor, s: int) -> None:
    """``after`` differs from ``before`` on every row of scenario s and on no other row."""
    mine = scenario == s
    torch.testing.assert_close(after[~mine], before[~mine])
    assert (after[mine] - before[mine]).abs().min() > 0


def perturb(module: nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.5)


# ----------------------------------------------------------------------------- routing, towers


def test_route_puts_each_scenarios_rows_back_in_order_and_rejects_unknown_ids() -> None:
    x, scenario = rows()
    out = route(scenario, S, lambda s, r: r.sum(1) * (s + 1), x)
    torch.testing.assert_close(out, x.sum(1) * (scenario + 1))
    with pytest.raises(ValueError, match="scenario ids must lie in 1..3"):
        route(torch.tensor([0, 3]), S, lambda s, r: r, torch.zeros(2, 1))


def test_scenario_towers_shapes_grads_and_each_tower_only_moves_its_rows() -> None:
    x, scenario = rows()
    towers = ScenarioTowers(DIM, S, mlp([4]))
    out = towers(x, scenario)
    assert out.shape == (8,)
    out.pow(2).sum().backward()
    assert_all_grads(towers)
    with torch.no_grad():
        before = towers(x, scenario)
        perturb(towers.towers[1])
        changes_only(before, towers(x, scenario), scenario, 1)
        # One stream per scenario: a row reads its own scenario's stream only.
        streams = torch.randn(8, S, DIM)
        picked = towers(streams, scenario)
        streams[scenario != 2, 2] += 10.0  # scenario 2's stream, on rows of other scenarios
        torch.testing.assert_close(towers(streams, scenario), picked)


def test_an_absent_scenario_keeps_its_parameters_in_the_graph() -> None:
    towers = ScenarioTowers(DIM, S, mlp([4]))
    towers(torch.randn(5, DIM), torch.tensor([0, 0, 1, 1, 0])).sum().backward()
    grad = towers.heads[2].weight.grad
    assert grad is not None and not grad.any()  # zero, but there: data-parallel training needs it


# ----------------------------------------------------------------------------- expert layers


def test_bank_shared_stream_feeds_the_shared_experts_the_last_stream() -> None:
    bank = ExpertBank(DIM, ["a", "b"], num_shared=2, shared_stream=True)
    x = torch.randn(4, 3, DIM)
    out = bank(x)
    assert out.shape == (4, 4, DIM)
    changed = x.clone()
    changed[:, 0] += 1.0  # a specific stream: the shared experts do not see it
    torch.testing.assert_close(bank(changed)[:, 2:], out[:, 2:])
    changed = x.clone()
    changed[:, 2] += 1.0  # the shared stream: only the shared experts see it
    again = bank(changed)
    torch.testing.assert_close(again[:, :2], out[:, :2])
    assert not torch.allclose(again[:, 2:], out[:, 2:])
    with pytest.raises(ValueError, match=r"expected 3 streams \(a, b, shared\)"):
        bank(torch.randn(4, 2, DIM))


def test_cgc_shapes_grads_and_a_scenarios_output_reads_its_stream_and_the_shared_one() -> None:
    layer = CGC(DIM, S, bank(2), router)
    x = torch.randn(5, S + 1, DIM)
    out = layer(x)
    assert out.shape == (5, S + 1, DIM)
    out.pow(2).sum().backward()
    assert_all_grads(layer)
    with torch.no_grad():
        changed = x.clone()
        changed[:, 0] += 1.0  # scenario 0's stream
        again = layer(changed)
        torch.testing.assert_close(again[:, 1:S], out[:, 1:S])  # other scenarios' outputs: same
        assert not torch.allclose(again[:, 0], out[:, 0])
        assert not torch.allclose(again[:, S], out[:, S])  # the shared gate mixes every expert
    assert CGC(DIM, S, bank(1), router, shared_output=False)(x).shape == (5, S, DIM)


def test_star_fcn_weights_are_shared_times_specific_and_start_shared() -> None:
    fcn = StarFCN(DIM, [5], S, activation="relu")
    x, scenario = rows()
    # At initialisation (specific weights 1, biases 0) every scenario computes the same function.
    same = fcn(x, torch.zeros_like(scenario))
    torch.testing.assert_close(fcn(x, scenario), same)
    perturb(fcn)
    out = fcn(x, scenario)
    assert out.shape == (8, 1)
    for b in range(8):
        s = int(scenario[b])
        h = torch.relu(x[b] @ (fcn.shared[0] * fcn.specific[0][s]) + fcn.bias[0] + fcn.specific_bias[0][s])
        expected = h @ (fcn.shared[1] * fcn.specific[1][s]) + fcn.bias[1] + fcn.specific_bias[1][s]
        torch.testing.assert_close(out[b], expected)
    torch.testing.assert_close(fcn.weights(1, 2), fcn.shared[1] * fcn.specific[1][2])
    out.pow(2).sum().backward()
    assert_all_grads(fcn)


def test_partitioned_norm_normalises_each_scenario_by_its_own_statistics() -> None:
    norm = PartitionedNorm(DIM, S, momentum=1.0)
    x, scenario = rows()
    x = x + 5.0 * scenario[:, None]  # scenarios with far apart means
    out = norm(x, scenario)
    for s in range(S):
        mine = out[scenario == s]
        torch.testing.assert_close(mine.mean(0), torch.zeros(DIM), atol=1e-5, rtol=0)
        torch.testing.assert_close(mine.var(0, unbiased=False), torch.ones(DIM), atol=1e-3, rtol=0)
        torch.testing.assert_close(norm.running_mean[s], x[scenario == s].mean(0))
    out.pow(3).sum().backward()
    assert_all_grads(norm)
    norm.eval()  # running statistics: with momentum 1, this batch's mean and unbiased variance
    expected = torch.empty_like(x)
    for s in range(S):
        mine = x[scenario == s]
        expected[scenario == s] = (mine - mine.mean(0)) / (mine.var(0) + 1e-5).sqrt()
    evaluated = norm(x, scenario).detach()
    torch.testing.assert_close(evaluated, expected)
    with torch.no_grad():
        norm.specific_gamma[1] += 1.0
    changes_only(evaluated, norm(x, scenario).detach(), scenario, 1)


# ----------------------------------------------------------------------------- backbones


def backbones() -> dict[str, nn.Module]:
    return {
        "shared_bottom": SharedBottom(DIM, S, bottom=mlp([8]), tower=mlp([4])),
        "mmoe": MMoE(DIM, S, bank(2), router, tower=mlp([4])),
        "ple": PLE(DIM, S, bank(2), router, tower=mlp([4]), layers=2),
        "star": STAR(DIM, S, hidden=[8, 4], aux=mlp([4]), aux_dim=3),
    }


# What is scenario 1's own, per backbone: its tower, gate or specific weights.
OWN = {
    "shared_bottom": lambda m: m.towers.towers[1],
    "mmoe": lambda m: m.gates[1],
    "ple": lambda m: m.layers[-1].gates[1],
    "star": lambda m: m.fcn,  # perturbed through scenario 1's slices only, below
}


@pytest.mark.parametrize("name", ["shared_bottom", "mmoe", "ple", "star"])
def test_backbone_shapes_grads_and_a_scenarios_own_part_only_moves_its_rows(name: str) -> None:
    model = backbones()[name]
    x, scenario = rows()
    out = model(x, scenario)
    assert out.shape == (8,)
    out.pow(2).sum().backward()
    assert_all_grads(model)
    model.eval()
    with torch.no_grad():
        before = model(x, scenario)
        own = OWN[name](model)
        if name == "star":
            for p in [*own.specific, *own.specific_bias]:
                p[1] += torch.randn_like(p[1]) * 0.5
        else:
            perturb(own)
        changes_only(before, model(x, scenario), scenario, 1)


def test_mmoe_and_ple_gates_weigh_their_experts() -> None:
    model = MMoE(DIM, S, bank(2), router, tower=mlp([4]))
    x, _ = rows()
    experts = model.experts(x.unsqueeze(1))
    assert experts.shape == (8, 3, DIM)
    _, weights = model.gates[0](x, experts)
    torch.testing.assert_close(weights.sum(-1), torch.ones(8))
    ple = PLE(DIM, S, bank(1), router, tower=mlp([4]), layers=3)
    assert [layer.shared_gate is None for layer in ple.layers] == [False, False, True]


def test_star_aux_network_adds_a_per_scenario_logit_and_ablations_drop_parts() -> None:
    model = STAR(DIM, S, hidden=[8], aux=mlp([4]), aux_dim=3)
    x, scenario = rows()
    model.eval()
    with torch.no_grad():
        assert model.aux is not None and model.aux_head is not None and model.scenario_embedding is not None
        aux = model.aux_head(model.aux(model.scenario_embedding.weight)).squeeze(-1)  # (S,)
        main = model.fcn(model.norm(x, scenario), scenario).squeeze(-1)  # type: ignore[misc]
        torch.testing.assert_close(model(x, scenario), main + aux[scenario])
    bare = STAR(DIM, S, hidden=[8], norm=False)
    assert bare.norm is None and bare.aux is None
    assert bare(x, scenario).shape == (8,)


# ----------------------------------------------------------------------------- the model


FIELDS = {"user": 10, "item": 20, "domain": S + 1}
ROLES = {"user": "user", "item": "item", "scenario": "domain", "history": "history", "label": "label"}


def model_node(backbone: dict) -> dict:
    return {
        "_component_": "model/multi_scenario",
        "use_fields": ["item", "domain"],
        "embed": {"_component_": "embedding/field", "dim": 4},
        "interest": {"_component_": "attention/target", "hidden": [8]},
        "backbone": backbone,
    }


def test_model_reads_the_scenario_field_by_its_role() -> None:
    node = model_node(
        {
            "_component_": "backbone/mmoe",
            "experts": {"_component_": "experts/bank", "num_shared": 2},
            "gate": {"_component_": "gate/router"},
            "tower": {"_component_": "encoder/mlp", "hidden": [4]},
        }
    )
    model = build(node, "model", {"fields": FIELDS, "roles": ROLES})
    assert isinstance(model, MultiScenarioCTR) and model.scenarios == S and model.scenario_field == "domain"
    batch = {
        "user": torch.tensor([1, 2, 3, 4]),
        "item": torch.tensor([3, 4, 5, 6]),
        "domain": torch.tensor([1, 2, 3, 1]),
        "history": torch.tensor([[0, 1, 2], [0, 0, 3], [4, 5, 6], [0, 0, 0]]),
    }
    out = model(batch)
    assert set(out) == {"logit"} and out["logit"].shape == (4,)
    out["logit"].sum().backward()
    with torch.no_grad():
        before = model(batch)["logit"]
        perturb(model.backbone.gates[1])  # scenario id 2
        changes_only(before, model(batch)["logit"], batch["domain"] - 1, 1)
    with pytest.raises(Exception, match="needs a categorical field with role 'scenario'"):
        build(node, "model", {"fields": {"user": 10, "item": 20}, "roles": {"item": "item"}})


# ----------------------------------------------------------------------------- metrics


class Fixed(nn.Module):
    """A model whose logits are given: the evaluator's arithmetic alone is under test."""

    def __init__(self, logit: list[float]) -> None:
        super().__init__()
        self.logit = torch.tensor(logit)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"logit": self.logit[batch["row"]]}


# Seven rows: scenario a (id 1) rows 0-2, b (id 2) rows 3-6.
LOGIT = [2.0, 1.0, 0.0, 0.5, 2.0, 3.0, 1.0]
LABEL = [1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0]
USER = [1, 1, 2, 1, 3, 3, 3]
DOMAIN = [1, 1, 1, 2, 2, 2, 2]
KNOWN = [1, 3, 0, 1, 2, 0, 1]  # earlier interactions: non-padding history entries


def click_batch(rows: list[int]) -> dict[str, Tensor]:
    history = torch.zeros(len(rows), 3, dtype=torch.long)
    for i, r in enumerate(rows):
        if KNOWN[r]:
            history[i, -KNOWN[r] :] = torch.arange(1, KNOWN[r] + 1)
    pick = torch.tensor(rows)
    return {
        "row": pick,
        "label": torch.tensor(LABEL)[pick],
        "user": torch.tensor(USER)[pick],
        "domain": torch.tensor(DOMAIN)[pick],
        "history": history,
    }


def test_per_scenario_and_sparse_user_metrics_match_hand_computed_values() -> None:
    evaluator = ClickEvaluator(
        ["auc", "gauc", "logloss", "sparse_auc"], ROLES, scenarios=["a", "b"], sparse_max=1
    )
    model = Fixed(LOGIT)
    for part in ([0, 1, 2, 3], [4, 5, 6]):  # two batches
        evaluator.update(model, click_batch(part))
    got = evaluator.compute()
    # Overall AUC: positives {2, 0, 3, 1}, negatives {1, 0.5, 2}: 2 beats 1 and 0.5 and ties 2
    # (2.5); 0 beats none; 3 beats all three; 1 ties 1, beats 0.5 (1.5): 7 of 12 pairs.
    assert got["auc"] == pytest.approx(7 / 12)
    # gAUC: user 1 (rows 0, 1, 3) 1.0 over 3 rows, user 2 single-class, user 3 (rows 4-6) 0.5.
    assert got["gauc"] == pytest.approx((3 * 1.0 + 3 * 0.5) / 6)
    loss = [
        -math.log(1 / (1 + math.exp(-z))) if y else -math.log(1 - 1 / (1 + math.exp(-z)))
        for z, y in zip(LOGIT, LABEL, strict=True)
    ]
    assert got["logloss"] == pytest.approx(sum(loss) / 7)
    # Sparse rows (at most 1 earlier interaction): 0, 2, 3, 5, 6: positives {2, 0, 3, 1} vs 0.5.
    assert got["sparse_auc"] == pytest.approx(3 / 4)
    # Scenario a: positives {2, 0} vs 1; b: {3, 1} vs {0.5, 2}.
    assert got["auc:a"] == pytest.approx(1 / 2)
    assert got["auc:b"] == pytest.approx(3 / 4)
    assert got["gauc:a"] == pytest.approx(1.0)  # user 1 only: user 2 has one class
    assert got["gauc:b"] == pytest.approx(0.5)  # user 3 only
    assert got["logloss:a"] == pytest.approx(sum(loss[:3]) / 3)
    assert math.isnan(got["sparse_auc:a"])  # rows 0 and 2: positives only
    assert got["sparse_auc:b"] == pytest.approx(1.0)  # rows 3, 5, 6: {3, 1} vs 0.5
    assert list(got)[:4] == ["auc", "gauc", "logloss", "sparse_auc"]


def test_click_evaluator_without_the_options_is_unchanged_and_bad_options_are_named() -> None:
    plain = ClickEvaluator(["auc", "gauc"], {"user": "user"})
    plain.update(Fixed(LOGIT), click_batch(list(range(7))))
    assert set(plain.compute()) == {"auc", "gauc"}
    with pytest.raises(ValueError, match="role 'scenario'"):
        ClickEvaluator(["auc"], {"user": "user"}, scenarios=["a", "b"])
    with pytest.raises(ValueError, match="history"):
        ClickEvaluator(["sparse_auc"], {"user": "user"})
    with pytest.raises(ValueError, match="distinct"):
        ClickEvaluator(["auc"], ROLES, scenarios=["a", "a"])


# ----------------------------------------------------------------------------- recipes, real data

SMOKE = ["train.max_epochs=1", "train.limit_train_batches=3", "logging.progress_bar=false"]


def test_recipe_reports_every_scenario_and_two_processes_evaluate_alike(
    data_home: Path, tmp_path: Path
) -> None:
    run_dir = train(REPO / "recipes" / "mmoe.yaml", [*SMOKE, f"logging.run_root={tmp_path}"])
    test = json.loads((run_dir / "metrics.json").read_text())["test"]
    names = ["auc", "gauc", "logloss", "sparse_auc"]
    assert set(test) == {*names, *(f"{n}:{s}" for n in names for s in ("beauty", "sports"))}
    assert all(math.isfinite(v) for v in test.values())
    assert all(0.0 <= test[n] <= 1.0 for n in test if "logloss" not in n)
    outputs = {}
    for devices in (1, 2):
        out = tmp_path / f"eval{devices}.json"
        done = run_rex("eval", str(run_dir), "--devices", str(devices), "--output", str(out))
        assert done.returncode == 0, done.stderr[-3000:]
        outputs[devices] = json.loads(out.read_text())
    assert outputs[1] == pytest.approx(test, abs=1e-6)
    assert outputs[2] == pytest.approx(outputs[1], abs=1e-6)


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (["data.name=beauty"], ["recipes/mmoe.yaml", "model", "role 'scenario'"]),
        (["model.backbone.expert=3"], ["model.backbone.expert", "did you mean experts"]),
        (["model.backbone._component_=backbone/mmo"], ["model.backbone._component_", "backbone/mmoe"]),
        (["model.backbone.experts.num_shared=many"], ["model.backbone.experts.num_shared", "expected int"]),
        (["model.backbone.gate=null"], ["model.backbone.gate", "got None"]),
    ],
)
def test_bad_multi_scenario_recipe_input_gives_a_clean_error(
    data_home, tmp_path, overrides, fragments
) -> None:
    result = run_rex("train", "recipes/mmoe.yaml", *overrides, f"logging.run_root={tmp_path}")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    # The first test to read amazon_multidomain prepares it, which says so on stderr first.
    lines = [
        line for line in result.stderr.splitlines() if line.strip() and not line.startswith("[rex data]")
    ]
    assert 1 <= len(lines) <= 3, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, result.stderr)


@pytest.mark.parametrize("name", ["shared_bottom", "mmoe", "ple", "star"])
def test_backbone_runs_under_bf16_autocast(name: str) -> None:
    model = backbones()[name]
    x, scenario = rows()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # bf16 features, as a bf16 interest module hands them over
        out = model(x.to(torch.bfloat16), scenario)
    assert out.shape == (8,) and torch.isfinite(out.float()).all()
    out.float().sum().backward()
