"""Multi-scenario CTR backbones: shared-bottom, MMoE, PLE and STAR.

A backbone maps a row's features to its click logit in the row's scenario:
``forward(x: (B, in_dim), scenario: (B,) long in 0..S-1) -> (B,)``. ``in_dim`` and
``scenarios`` (S) are supplied by the parent model (``model/multi_scenario``). Each has one
tower or gate per scenario, and a row goes through its own scenario's only.
"""

from __future__ import annotations

from torch import Tensor, nn

from rex.components.checks import at_least
from rex.components.encoders.mlp import Activation
from rex.components.experts.cgc import CGC, Node
from rex.components.experts.scenario import ScenarioTowers, route
from rex.components.experts.star import PartitionedNorm, StarFCN
from rex.config.registry import Factory, register


@register("backbone/shared_bottom")
class SharedBottom(nn.Module):
    """Shared-bottom: one ``bottom`` network for every scenario, then one tower per scenario.

    ``forward(x: (B, in_dim), scenario: (B,)) -> (B,)``: ``tower_s(bottom(x))`` for a row of
    scenario s (Caruana's hard parameter sharing, the usual multi-scenario baseline).
    """

    def __init__(
        self, in_dim: int, scenarios: int, bottom: Factory[nn.Module], tower: Factory[nn.Module]
    ) -> None:
        super().__init__()
        self.bottom = bottom(in_dim=in_dim)
        self.towers = ScenarioTowers(self.bottom.out_dim, scenarios, tower)

    def forward(self, x: Tensor, scenario: Tensor) -> Tensor:
        return self.towers(self.bottom(x), scenario)


@register("backbone/mmoe")
class MMoE(nn.Module):
    """MMoE (Ma et al., KDD 2018): shared experts, one softmax gate and one tower per scenario.

    ``forward(x: (B, in_dim), scenario: (B,)) -> (B,)``. ``experts`` (an ``experts/bank`` node)
    is built over one stream, x: its stream's expert and its ``num_shared`` shared experts all
    read x, so it holds ``1 + num_shared`` experts. Scenario s's ``gate`` (a ``gate/router``
    node) mixes them, queried by x, and scenario s's tower reads the mix.
    """

    def __init__(self, in_dim: int, scenarios: int, experts: Node, gate: Node, tower: Node) -> None:
        super().__init__()
        self.scenarios = scenarios
        self.experts = experts(dim=in_dim, streams=["input"])
        self.gates = nn.ModuleList(
            gate(dim=in_dim, num_experts=self.experts.num_experts) for _ in range(scenarios)
        )
        self.towers = ScenarioTowers(in_dim, scenarios, tower)

    def _one(self, s: int, x: Tensor, experts: Tensor) -> Tensor:
        return self.towers.one(s, self.gates[s](x, experts)[0])

    def forward(self, x: Tensor, scenario: Tensor) -> Tensor:
        experts = self.experts(x.unsqueeze(1))  # (B, E, in_dim)
        return route(scenario, self.scenarios, self._one, x, experts)


@register("backbone/ple")
class PLE(nn.Module):
    """PLE (Tang et al., RecSys 2020): ``layers`` stacked ``experts/cgc`` layers, then towers.

    ``forward(x: (B, in_dim), scenario: (B,)) -> (B,)``. Every stream of the first layer is x;
    each later layer reads the previous one's scenario streams and shared stream (progressive
    separation); the last layer has no shared gate, and a row's tower reads its scenario's
    stream. Each layer's ``experts`` (an ``experts/bank`` node) has one specific expert per
    scenario and its ``num_shared`` shared ones; ``gate`` is a ``gate/router`` node.
    """

    def __init__(
        self, in_dim: int, scenarios: int, experts: Node, gate: Node, tower: Node, layers: int = 2
    ) -> None:
        super().__init__()
        at_least(1, layers=layers)
        self.scenarios = scenarios
        self.layers = nn.ModuleList(
            CGC(in_dim, scenarios, experts, gate, shared_output=i < layers - 1) for i in range(layers)
        )
        self.towers = ScenarioTowers(in_dim, scenarios, tower)

    def forward(self, x: Tensor, scenario: Tensor) -> Tensor:
        h = x.unsqueeze(1).expand(-1, self.scenarios + 1, -1)
        for layer in self.layers:
            h = layer(h)
        return self.towers(h, scenario)


@register("backbone/star")
class STAR(nn.Module):
    """STAR (Sheng et al., CIKM 2021): partitioned norm → star topology FCN, plus an auxiliary net.

    ``forward(x: (B, in_dim), scenario: (B,)) -> (B,)``: ``experts/partitioned_norm`` on x, then
    the ``experts/star_fcn`` (``hidden`` widths, one logit), whose layers for scenario s use the
    shared weights ⊙ scenario s's; plus the auxiliary network's logit, ``aux`` (an MLP) over an
    ``aux_dim`` embedding of the scenario id, a Linear to one. ``norm: false`` drops PN and
    ``aux: null`` the auxiliary network (the paper's ablations).
    """

    def __init__(
        self,
        in_dim: int,
        scenarios: int,
        hidden: list[int],
        activation: Activation = "relu",
        norm: bool = True,
        aux: Factory[nn.Module] | None = None,
        aux_dim: int = 16,
    ) -> None:
        super().__init__()
        at_least(1, aux_dim=aux_dim)
        self.norm = PartitionedNorm(in_dim, scenarios) if norm else None
        self.fcn = StarFCN(in_dim, hidden, scenarios, activation=activation)
        self.scenario_embedding = nn.Embedding(scenarios, aux_dim) if aux is not None else None
        self.aux = aux(in_dim=aux_dim) if aux is not None else None
        self.aux_head = nn.Linear(self.aux.out_dim, 1) if self.aux is not None else None

    def forward(self, x: Tensor, scenario: Tensor) -> Tensor:
        if self.norm is not None:
            x = self.norm(x, scenario)
        logit = self.fcn(x, scenario).squeeze(-1)
        if self.aux is not None and self.aux_head is not None and self.scenario_embedding is not None:
            logit = logit + self.aux_head(self.aux(self.scenario_embedding(scenario))).squeeze(-1)
        return logit
