"""Routing rows by scenario, and one tower per scenario (multi-scenario CTR backbones)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from rex.components.checks import at_least
from rex.config.registry import Factory, register


def route(scenario: Tensor, count: int, apply: Callable[..., Tensor], *inputs: Tensor) -> Tensor:
    """``apply(s, *rows)`` on the rows of each scenario s in 0..count-1, put back in row order.

    ``scenario`` (B,) long; each input is (B, ...); ``apply`` returns (rows, ...). A scenario
    absent from the batch is still applied to zero rows, so its parameters stay in the graph
    (data-parallel training expects every parameter to receive a gradient). A row whose
    scenario is outside 0..count-1 is a ValueError.
    """
    parts, where = [], []
    for s in range(count):
        rows = (scenario == s).nonzero().squeeze(1)
        parts.append(apply(s, *(x.index_select(0, rows) for x in inputs)))
        where.append(rows)
    index = torch.cat(where)
    if index.numel() != scenario.numel():
        raise ValueError(f"scenario ids must lie in 1..{count} (0-based 0..{count - 1} here)")
    out = torch.cat(parts)
    return out.new_empty(out.shape).index_copy(0, index, out)


@register("experts/scenario_towers")
class ScenarioTowers(nn.Module):
    """One tower (``tower``, then a Linear to one logit) per scenario.

    ``forward(h: (B, in_dim) or (B, scenarios, in_dim), scenario: (B,) long in 0..S-1) -> (B,)``:
    row b goes through tower ``scenario[b]`` only (from ``h[b, scenario[b]]`` when ``h`` holds
    one stream per scenario). ``one(s, rows: (N, in_dim)) -> (N,)`` is scenario s's tower.
    """

    def __init__(self, in_dim: int, scenarios: int, tower: Factory[nn.Module]) -> None:
        super().__init__()
        at_least(1, in_dim=in_dim, scenarios=scenarios)
        self.scenarios = scenarios
        self.towers = nn.ModuleList(tower(in_dim=in_dim) for _ in range(scenarios))
        self.heads = nn.ModuleList(nn.Linear(t.out_dim, 1) for t in self.towers)

    def one(self, s: int, rows: Tensor) -> Tensor:
        return self.heads[s](self.towers[s](rows)).squeeze(-1)

    def forward(self, h: Tensor, scenario: Tensor) -> Tensor:
        if h.dim() == 3:  # one stream per scenario: each row keeps its own scenario's stream
            h = h[torch.arange(h.shape[0], device=h.device), scenario]
        return route(scenario, self.scenarios, self.one, h)
