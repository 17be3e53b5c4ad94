"""PLE's Customized Gate Control layer (Tang et al., RecSys 2020), over scenario streams."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rex.components.checks import at_least
from rex.config.registry import Factory, register

# A sub-component node that its parent builds with the sizes it alone knows.
Node = Factory[nn.Module]


@register("experts/cgc")
class CGC(nn.Module):
    """One CGC layer: a specific expert per scenario, shared experts, one gate per scenario.

    ``forward(x: (B, S + 1, dim)) -> (B, S + 1, dim)`` (``(B, S, dim)`` without
    ``shared_output``). Stream s < S feeds scenario s's specific expert and the last stream the
    shared experts (``experts``, an ``experts/bank`` node; the layer supplies its dim, streams
    and ``shared_stream``). Gate s (``gate``, a ``gate/router`` node, queried by stream s) mixes scenario s's expert with the shared ones into output stream s;
    with ``shared_output`` a shared gate, queried by the shared stream, mixes every expert into
    the last output stream, the next layer's shared input (PLE's lower layers).
    """

    def __init__(
        self, dim: int, scenarios: int, experts: Node, gate: Node, shared_output: bool = True
    ) -> None:
        super().__init__()
        at_least(1, dim=dim, scenarios=scenarios)
        self.scenarios = scenarios
        streams = [f"scenario{s + 1}" for s in range(scenarios)]
        self.experts = experts(dim=dim, streams=streams, shared_stream=True)
        shared = self.experts.num_shared
        self.gates = nn.ModuleList(gate(dim=dim, num_experts=1 + shared) for _ in range(scenarios))
        self.shared_gate = gate(dim=dim, num_experts=scenarios + shared) if shared_output else None

    def forward(self, x: Tensor) -> Tensor:
        experts = self.experts(x)  # (B, S + num_shared, dim): specific ones first
        shared = experts[:, self.scenarios :]
        out = [
            gate(x[:, s], torch.cat([experts[:, s : s + 1], shared], dim=1))[0]
            for s, gate in enumerate(self.gates)
        ]
        if self.shared_gate is not None:
            out.append(self.shared_gate(x[:, self.scenarios], experts)[0])
        return torch.stack(out, dim=1)
