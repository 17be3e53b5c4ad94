"""STAR's scenario-conditioned layers (Sheng et al., CIKM 2021, arXiv:2101.11427).

* ``experts/star_fcn``: the star topology fully-connected network. Scenario s's layer uses
  ``W ⊙ W_s`` and ``b + b_s``: the centred (shared) weights times its own, its bias plus its own.
* ``experts/partitioned_norm``: batch normalisation whose statistics and affine terms are
  kept per scenario (PN): ``(γ·γ_s) (z − E_s) / sqrt(Var_s + ε) + (β + β_s)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rex.components.checks import at_least
from rex.components.encoders.activation import make_activation
from rex.components.encoders.mlp import Activation
from rex.components.experts.scenario import route
from rex.config.registry import register


@register("experts/star_fcn")
class StarFCN(nn.Module):
    """Star topology FCN: ``in_dim → hidden... → out_dim``, each layer's weights per scenario.

    ``forward(x: (B, in_dim), scenario: (B,) long in 0..S-1) -> (B, out_dim)``. Layer l of
    scenario s computes ``x (W_l ⊙ W_{l,s}) + b_l + b_{l,s}``, followed by the activation
    except after the last layer. The specific weights start at 1 and biases at 0, so every
    scenario starts from the shared network. ``weights(l, s)`` is scenario s's effective
    ``(in, out)`` matrix of layer l.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: list[int],
        scenarios: int,
        out_dim: int = 1,
        activation: Activation = "relu",
    ) -> None:
        super().__init__()
        at_least(1, in_dim=in_dim, scenarios=scenarios, out_dim=out_dim)
        if any(h <= 0 for h in hidden):
            raise ValueError(f"hidden widths must be positive, got {hidden}")
        widths = [in_dim, *hidden, out_dim]
        self.scenarios = scenarios
        self.out_dim = out_dim
        self.shared = nn.ParameterList()
        self.specific = nn.ParameterList()
        self.bias = nn.ParameterList()
        self.specific_bias = nn.ParameterList()
        for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=True):
            weight = torch.empty(fan_in, fan_out)
            nn.init.kaiming_uniform_(weight.T, a=5**0.5)  # nn.Linear's initialisation
            self.shared.append(nn.Parameter(weight))
            self.specific.append(nn.Parameter(torch.ones(scenarios, fan_in, fan_out)))
            bound = fan_in**-0.5
            self.bias.append(nn.Parameter(torch.empty(fan_out).uniform_(-bound, bound)))
            self.specific_bias.append(nn.Parameter(torch.zeros(scenarios, fan_out)))
        self.activations = nn.ModuleList(make_activation(activation, h) for h in hidden)

    def weights(self, layer: int, s: int) -> Tensor:
        return self.shared[layer] * self.specific[layer][s]

    def _one(self, s: int, rows: Tensor) -> Tensor:
        for layer in range(len(self.shared)):
            rows = rows @ self.weights(layer, s) + self.bias[layer] + self.specific_bias[layer][s]
            if layer < len(self.activations):
                rows = self.activations[layer](rows)
        return rows

    def forward(self, x: Tensor, scenario: Tensor) -> Tensor:
        return route(scenario, self.scenarios, self._one, x)


@register("experts/partitioned_norm")
class PartitionedNorm(nn.Module):
    """Partitioned normalisation: BatchNorm with each scenario's own statistics and affine terms.

    ``forward(x: (B, dim), scenario: (B,) long in 0..S-1) -> (B, dim)``. Training normalises
    a scenario's rows by their batch mean and (biased) variance and updates that scenario's
    running averages; evaluation, or a scenario with fewer than two rows in the batch, uses the
    running averages. The scale is ``γ ⊙ γ_s`` and the shift ``β + β_s``.
    """

    def __init__(self, dim: int, scenarios: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        at_least(1, dim=dim, scenarios=scenarios)
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        self.scenarios, self.momentum, self.eps = scenarios, momentum, eps
        self.gamma = nn.Parameter(torch.ones(dim))
        self.beta = nn.Parameter(torch.zeros(dim))
        self.specific_gamma = nn.Parameter(torch.ones(scenarios, dim))
        self.specific_beta = nn.Parameter(torch.zeros(scenarios, dim))
        self.register_buffer("running_mean", torch.zeros(scenarios, dim))
        self.register_buffer("running_var", torch.ones(scenarios, dim))

    def _one(self, s: int, rows: Tensor) -> Tensor:
        if self.training and rows.shape[0] > 1:
            mean, var = rows.mean(0), rows.var(0, unbiased=False)
            with torch.no_grad():  # kept in the buffers' dtype whatever autocast computes in
                unbiased = var * rows.shape[0] / (rows.shape[0] - 1)
                self.running_mean[s].lerp_(mean.to(self.running_mean.dtype), self.momentum)
                self.running_var[s].lerp_(unbiased.to(self.running_var.dtype), self.momentum)
        else:
            mean, var = self.running_mean[s], self.running_var[s]
        scale = self.gamma * self.specific_gamma[s]
        return (rows - mean) * torch.rsqrt(var + self.eps) * scale + self.beta + self.specific_beta[s]

    def forward(self, x: Tensor, scenario: Tensor) -> Tensor:
        return route(scenario, self.scenarios, self._one, x)
