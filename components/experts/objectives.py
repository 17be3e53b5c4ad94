"""Multi-objective heads: one input row, one output vector per objective.

``forward(x: (B, in_dim)) -> (B, K, out_dim)``, K = len(objectives). ``in_dim``, ``out_dim`` and
``objectives`` come from the parent model (``model/two_tower``). Each objective's own modules sit
under a module dict keyed by its name (``heads.<name>``, ``gates.<name>``), so a parameter's name
says which objective alone uses it; a parameter without one is shared (``mask/csmf`` reads this).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rex.config.registry import Factory, register


def objective_head(head: Factory[nn.Module] | None, in_dim: int, out_dim: int) -> nn.Module:
    """An objective's head: ``head`` (an MLP over ``in_dim``, if given), then a Linear to ``out_dim``."""
    if head is None:
        return nn.Linear(in_dim, out_dim)
    body = head(in_dim=in_dim)
    return nn.Sequential(body, nn.Linear(body.out_dim, out_dim))


class ObjectiveHeads(nn.Module):
    """One head per objective over ``in_dim`` features: ``head`` (an MLP, optional), then a
    Linear to ``out_dim``; ``heads(features: list of K (B, in_dim)) -> (B, K, out_dim)``."""

    def __init__(
        self, objectives: list[str], head: Factory[nn.Module] | None, in_dim: int, out_dim: int
    ) -> None:
        super().__init__()
        if not objectives:
            raise ValueError("objectives must name at least one objective")
        self.heads = nn.ModuleDict({name: objective_head(head, in_dim, out_dim) for name in objectives})

    def stack(self, features: list[Tensor]) -> Tensor:
        return torch.stack([head(x) for head, x in zip(self.heads.values(), features, strict=True)], dim=1)


@register("heads/shared_bottom")
class SharedBottomHeads(ObjectiveHeads):
    """Shared-bottom heads (hard parameter sharing; Caruana, Machine Learning 1997): one
    ``bottom`` network for every objective, then one small head per objective.

    ``forward(x: (B, in_dim)) -> (B, K, out_dim)``: objective k's vector is
    ``heads[k](bottom(x))``; a head is ``head`` (an MLP, optional) then a Linear to ``out_dim``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        objectives: list[str],
        bottom: Factory[nn.Module],
        head: Factory[nn.Module] | None = None,
    ) -> None:
        shared = bottom(in_dim=in_dim)
        super().__init__(objectives, head, shared.out_dim, out_dim)
        self.bottom = shared

    def forward(self, x: Tensor) -> Tensor:
        shared = self.bottom(x)
        return self.stack([shared] * len(self.heads))


@register("heads/mmoe")
class MMoEHeads(ObjectiveHeads):
    """MMoE heads (Ma et al., KDD 2018): shared experts, one softmax gate and one head per objective.

    ``forward(x: (B, in_dim)) -> (B, K, out_dim)``. ``experts`` (an ``experts/bank`` node) is built
    over one stream, x, so all its ``1 + num_shared`` experts read x; objective k's ``gate`` (a
    ``gate/router`` node, queried by x) mixes them, and its head (``head`` MLP, optional, then a
    Linear to ``out_dim``) reads the mix.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        objectives: list[str],
        experts: Factory[nn.Module],
        gate: Factory[nn.Module],
        head: Factory[nn.Module] | None = None,
    ) -> None:
        super().__init__(objectives, head, in_dim, out_dim)
        self.experts = experts(dim=in_dim, streams=["input"])
        count = self.experts.num_experts
        self.gates = nn.ModuleDict({name: gate(dim=in_dim, num_experts=count) for name in objectives})

    def forward(self, x: Tensor) -> Tensor:
        experts = self.experts(x.unsqueeze(1))  # (B, E, in_dim)
        return self.stack([self.gates[name](x, experts)[0] for name in self.heads])
