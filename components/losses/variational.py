"""The KL term of variational representations (GSVR): posterior against prior, both Gaussian."""

from __future__ import annotations

from torch import Tensor, nn

from rex.config.registry import register


def gaussian_kl(mean: Tensor, logvar: Tensor, prior_mean: Tensor, prior_logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(prior_mean, exp(prior_logvar))) per element, diagonal.

    Written with the log-variance difference so that equal arguments give exactly 0 (exp(0) = 1).
    """
    diff = logvar - prior_logvar
    return 0.5 * (diff.exp() + (mean - prior_mean).pow(2) * (-prior_logvar).exp() - 1.0 - diff)


@register("loss/gaussian_kl")
class GaussianKL(nn.Module):
    """Closed-form KL of diagonal Gaussian posteriors from their priors; scalar.

    Reads ``outputs[key + "_mean"]``, ``key + "_logvar"``, ``key + "_prior_mean"`` and
    ``key + "_prior_logvar"``, each (B, ..., d) (GSVR: (B, entities, d)). The KL of each row's
    latent variables is summed over every axis but the first, then averaged over rows: the
    ELBO's KL term per training row. 0 exactly when the posterior equals the prior.
    """

    def __init__(self, key: str = "gsvr") -> None:
        super().__init__()
        self.key = key
        self.reads = tuple(f"{key}_{part}" for part in ("mean", "logvar", "prior_mean", "prior_logvar"))

    def forward(self, outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
        # In float32: under bf16 autocast the terms arrive in bf16, too coarse to sum d * entities of.
        mean, logvar, prior_mean, prior_logvar = (outputs[name].float() for name in self.reads)
        return gaussian_kl(mean, logvar, prior_mean, prior_logvar).flatten(1).sum(1).mean()
