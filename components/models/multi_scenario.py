"""One CTR model for several scenarios: model/ctr's inputs, then a multi-scenario backbone."""

from __future__ import annotations

import torch
from torch import Tensor

from rex.components.experts.cgc import Node
from rex.components.models.ctr import CTRInputs
from rex.config.registry import register


@register("model/multi_scenario")
class MultiScenarioCTR(CTRInputs):
    """Multi-scenario CTR: field embeddings → [target attention] → ``backbone`` → click logit.

    The inputs are model/ctr's (``embed``, ``interest`` over ``history``, ``use_fields``): a
    (B, width) vector per row. ``backbone`` (a ``backbone/...`` node: shared_bottom, mmoe, ple, star) gets ``in_dim`` and ``scenarios``
    and maps it to the row's logit in its scenario. The scenario is the field whose role is
    ``scenario`` (``roles`` comes from the dataset's view): ids 1..S, S = its vocabulary
    size - 1; it is embedded as a feature too when ``use_fields`` names it. Returns ``logit``
    (B,) and any loss terms of the interest module.

    ``gsvr`` (a ``variational/gsvr`` node, GSVR; null = off) appends scenario-specific Gaussian
    user and item representations to the backbone's input and returns the posterior's and the
    prior's parameters for ``loss/gaussian_kl``.
    """

    def __init__(
        self,
        fields: dict[str, int],
        roles: dict[str, str],
        embed: Node,
        backbone: Node,
        interest: Node | None = None,
        use_fields: list[str] | None = None,
        gsvr: Node | None = None,
    ) -> None:
        scenario = roles.get("scenario")
        if scenario is None or scenario not in fields:
            known = ", ".join(f"{name} ({role})" for role, name in sorted(roles.items()))
            raise ValueError(
                f"model/multi_scenario needs a categorical field with role 'scenario'; this view's "
                f"fields with roles: {known or 'none'} (use a multi-scenario dataset: amazon_multidomain)"
            )
        super().__init__(fields, embed, interest, use_fields=use_fields)
        self.scenario_field = scenario
        self.scenarios = fields[scenario] - 1
        self.gsvr = gsvr(scenarios=self.scenarios) if gsvr is not None else None
        width = self.width + (self.gsvr.out_dim if self.gsvr is not None else 0)
        self.backbone = backbone(in_dim=width, scenarios=self.scenarios)
        if self.gsvr is not None:
            self.outputs = self.outputs | self.gsvr.outputs

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        x, _, extra = self.inputs(batch)
        scenario = batch[self.scenario_field] - 1
        if self.gsvr is not None:
            features, terms = self.gsvr(batch, scenario)
            x, extra = torch.cat([x, features], dim=1), {**extra, **terms}
        return {"logit": self.backbone(x, scenario), **extra}
