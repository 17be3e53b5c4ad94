"""GSVR (Zhang et al., 2025, arXiv:2508.14493): a Gaussian per user and per item in each scenario,
learnt by variational inference under a global-knowledge prior, as extra backbone input.

Where the paper leaves room, the simplest reading that keeps its purpose:

* The posterior of entity e in scenario s is a free diagonal Gaussian, one mean row and one
  log-variance row per (e, s) (``ScenarioGaussian``).
* The global knowledge is a scenario-shared embedding per entity. Its soft cluster assignment
  (cosine similarity to K learnt centres, softmax at ``temperature``) is the multinomial; each
  cluster holds a Gaussian. The paper's prior mixes the K Gaussians by those weights; here the
  prior is the one Gaussian whose mean and variance are the weight-averaged cluster ones
  (``ClusterPrior``), so that the KL term is closed-form (``loss/gaussian_kl``) and exactly 0
  when the posterior equals the prior. Entities near the same centres get nearly the same prior,
  so a sparse entity's scenario representation is pulled toward those of similar entities.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rex.components.checks import at_least
from rex.config.registry import register

# The names of GSVR's terms among the model's outputs, in the order forward stacks them.
TERMS = ("gsvr_mean", "gsvr_logvar", "gsvr_prior_mean", "gsvr_prior_logvar")


@register("variational/scenario_gaussian")
class ScenarioGaussian(nn.Module):
    """A diagonal Gaussian per (entity, scenario): the variational posterior of GSVR.

    ``forward(ids: (B,) long in [0, num), scenario: (B,) long in 0..S-1) -> (mean, logvar)``,
    each (B, dim): the rows of entity ``ids[b]`` in scenario ``scenario[b]``. ``sample(mean,
    logvar)`` is the reparameterised draw ``mean + exp(logvar / 2) * eps`` while training and
    the mean otherwise, so evaluation is deterministic.
    """

    def __init__(
        self, num: int, scenarios: int, dim: int, init_std: float = 0.01, init_logvar: float = -6.0
    ) -> None:
        super().__init__()
        at_least(1, num=num, scenarios=scenarios, dim=dim)
        if init_std <= 0:
            raise ValueError(f"init_std must be positive, got {init_std}")
        self.scenarios = scenarios
        self.mean = nn.Embedding(num * scenarios, dim)
        self.logvar = nn.Embedding(num * scenarios, dim)
        nn.init.normal_(self.mean.weight, std=init_std)
        nn.init.constant_(self.logvar.weight, init_logvar)

    def forward(self, ids: Tensor, scenario: Tensor) -> tuple[Tensor, Tensor]:
        rows = ids * self.scenarios + scenario
        return self.mean(rows), self.logvar(rows)

    def sample(self, mean: Tensor, logvar: Tensor) -> Tensor:
        if not self.training:
            return mean
        return mean + torch.randn_like(mean) * (0.5 * logvar).exp()


@register("variational/cluster_prior")
class ClusterPrior(nn.Module):
    """GSVR's global-knowledge prior: a Gaussian from a soft assignment to K learnt clusters.

    ``forward(g: (B, dim)) -> (mean, logvar)``, each (B, dim). ``weights(g) -> (B, K)``, the
    multinomial over clusters: softmax of cos(g, centre_k) / ``temperature``. The prior mean is
    ``weights @ centres`` and its variance ``weights @ exp(cluster_logvar)``: the centres live in
    the space of the global embeddings, so rows with similar ``g`` share prior mass.
    """

    def __init__(
        self,
        dim: int,
        clusters: int,
        temperature: float = 0.1,
        init_std: float = 0.01,
        init_logvar: float = -6.0,
    ) -> None:
        super().__init__()
        at_least(1, dim=dim, clusters=clusters)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature
        self.centres = nn.Parameter(torch.empty(clusters, dim))
        self.logvar = nn.Parameter(torch.full((clusters, dim), init_logvar))
        nn.init.normal_(self.centres, std=init_std)

    def weights(self, g: Tensor) -> Tensor:
        cosine = F.normalize(g, dim=-1) @ F.normalize(self.centres, dim=-1).T
        return torch.softmax(cosine / self.temperature, dim=-1)

    def forward(self, g: Tensor) -> tuple[Tensor, Tensor]:
        # In float32 even under bf16 autocast: the KL weighs the gap between posterior and prior
        # means against a small prior variance, and bf16 rounds the prior mean by more than that gap.
        with torch.autocast(g.device.type, enabled=False):
            weights = self.weights(g.float())
            return weights @ self.centres, (weights @ self.logvar.exp()).log()


@register("variational/gsvr")
class GSVR(nn.Module):
    """GSVR: scenario-specific Gaussian user and item representations under a cluster prior.

    A plug-in of ``model/multi_scenario`` (its ``gsvr`` key), which supplies ``scenarios``;
    ``fields`` (vocabulary sizes) and ``roles`` (role → field) come from the dataset. For each
    role in ``entities`` (the fields with roles ``user`` and ``item`` by default) it holds a
    scenario-shared embedding g (``dim``), a ``ScenarioGaussian`` posterior and a
    ``ClusterPrior`` over g (``clusters``, ``temperature``). Posteriors and clusters start at
    log-variance ``init_logvar`` (-6: a standard deviation of 0.05 against 0.01-scale means).

    ``forward(batch: {field: (B,) ids}, scenario: (B,) long in 0..S-1) -> (features, terms)``:
    ``features`` (B, out_dim), out_dim = 2 * len(entities) * dim, is [g, z] per entity with z
    drawn from the posterior (its mean outside training). ``terms`` holds the posterior's and the
    prior's parameters, each (B, len(entities), dim), under ``outputs``: ``gsvr_mean``,
    ``gsvr_logvar``, ``gsvr_prior_mean``, ``gsvr_prior_logvar`` (what ``loss/gaussian_kl`` reads).
    """

    outputs = frozenset(TERMS)

    def __init__(
        self,
        fields: dict[str, int],
        roles: dict[str, str],
        scenarios: int,
        dim: int = 16,
        clusters: int = 16,
        temperature: float = 0.1,
        entities: list[str] | None = None,
        init_logvar: float = -6.0,
    ) -> None:
        super().__init__()
        at_least(1, scenarios=scenarios, dim=dim, clusters=clusters)
        entities = ["user", "item"] if entities is None else entities
        if not entities or len(set(entities)) != len(entities):
            raise ValueError(f"entities must name distinct roles, at least one, got {entities}")
        missing = [role for role in entities if roles.get(role) not in fields]
        if missing:
            known = ", ".join(f"{role} ({name})" for role, name in sorted(roles.items()) if name in fields)
            raise ValueError(
                f"gsvr needs a categorical field for each of the entities {missing}; this view's "
                f"categorical fields with roles: {known or 'none'}"
            )
        self.fields = [roles[role] for role in entities]
        self.out_dim = 2 * len(entities) * dim
        self.shared = nn.ModuleList(nn.Embedding(fields[name], dim) for name in self.fields)
        for table in self.shared:
            nn.init.normal_(table.weight, std=0.01)  # embedding/field's scale
        self.posteriors = nn.ModuleList(
            ScenarioGaussian(fields[name], scenarios, dim, init_logvar=init_logvar) for name in self.fields
        )
        self.priors = nn.ModuleList(
            ClusterPrior(dim, clusters, temperature, init_logvar=init_logvar) for _ in self.fields
        )

    def forward(self, batch: dict[str, Tensor], scenario: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        features, parts = [], []
        for name, shared, posterior, prior in zip(
            self.fields, self.shared, self.posteriors, self.priors, strict=True
        ):
            g = shared(batch[name])
            mean, logvar = posterior(batch[name], scenario)
            features += [g, posterior.sample(mean, logvar)]
            parts.append((mean, logvar, *prior(g)))
        stacked = [torch.stack(column, dim=1) for column in zip(*parts, strict=True)]
        return torch.cat(features, dim=1), dict(zip(TERMS, stacked, strict=True))
