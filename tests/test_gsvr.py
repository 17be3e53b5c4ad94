"""GSVR (arXiv:2508.14493): the scenario-specific Gaussian posterior, the cluster prior, the KL
loss, the plug-in over every multi-scenario backbone, and recipes/gsvr.yaml on amazon_multidomain."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor

from rex.components.losses.variational import GaussianKL, gaussian_kl
from rex.components.variational.gsvr import GSVR, TERMS, ClusterPrior, ScenarioGaussian
from rex.config.errors import RecipeError
from rex.config.registry import build
from rex.engine.train import train
from tests.conftest import REPO, run_rex
from tests.test_components import assert_all_grads

S, DIM = 3, 4
FIELDS = {"user": 10, "item": 20, "domain": S + 1}
ROLES = {"user": "user", "item": "item", "scenario": "domain", "history": "history", "label": "label"}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def batch() -> dict[str, Tensor]:
    """Six rows; user 1 appears in two scenarios, every scenario is present."""
    return {
        "user": torch.tensor([1, 1, 2, 3, 4, 5]),
        "item": torch.tensor([3, 4, 5, 6, 7, 3]),
        "domain": torch.tensor([1, 2, 3, 1, 2, 3]),
        "history": torch.tensor([[0, 1, 2], [0, 0, 3], [4, 5, 6], [0, 0, 0], [0, 7, 8], [0, 0, 9]]),
    }


def gsvr(**settings) -> GSVR:
    return GSVR(FIELDS, ROLES, S, **{"dim": DIM, "clusters": 2, **settings})


def kl_loss(terms: dict[str, Tensor]) -> Tensor:
    return GaussianKL()(terms, {})


# ----------------------------------------------------------------------------- the KL term


def test_gaussian_kl_matches_torch_and_is_exactly_zero_at_the_prior() -> None:
    mean, logvar, prior_mean, prior_logvar = torch.randn(4, 5, 3).unbind(0)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, (0.5 * logvar).exp()),
        torch.distributions.Normal(prior_mean, (0.5 * prior_logvar).exp()),
    )
    torch.testing.assert_close(gaussian_kl(mean, logvar, prior_mean, prior_logvar), expected)
    assert torch.equal(gaussian_kl(mean, logvar, mean, logvar), torch.zeros_like(mean))
    assert (gaussian_kl(mean, logvar, mean + 0.1, logvar) > 0).all()  # another mean
    assert (gaussian_kl(mean, logvar, mean, logvar - 0.1) > 0).all()  # another variance


def test_kl_loss_sums_a_rows_latents_and_averages_rows() -> None:
    terms = dict(zip(TERMS, torch.randn(4, 6, 2, DIM).unbind(0), strict=True))
    per_element = gaussian_kl(*(terms[name] for name in TERMS))
    torch.testing.assert_close(kl_loss(terms), per_element.sum(dim=(1, 2)).mean())
    assert GaussianKL("other").reads == (
        "other_mean",
        "other_logvar",
        "other_prior_mean",
        "other_prior_logvar",
    )


def test_kl_is_zero_when_every_posterior_equals_its_prior_and_positive_otherwise() -> None:
    module = gsvr()
    rows = batch()
    scenario = rows["domain"] - 1
    with torch.no_grad():  # write each (entity, scenario) posterior row as its prior
        for name, shared, posterior, prior in zip(
            module.fields, module.shared, module.posteriors, module.priors, strict=True
        ):
            index = rows[name] * S + scenario
            mean, logvar = prior(shared(rows[name]))
            posterior.mean.weight[index] = mean
            posterior.logvar.weight[index] = logvar
    _, terms = module(rows, scenario)
    assert kl_loss(terms).item() == 0.0
    with torch.no_grad():
        module.posteriors[1].mean.weight[rows["item"][0] * S + scenario[0]] += 0.1
    _, terms = module(rows, scenario)
    assert kl_loss(terms).item() > 0.0


# ----------------------------------------------------------------------------- the parts


def test_posterior_has_one_gaussian_per_entity_and_scenario_and_samples_only_in_training() -> None:
    posterior = ScenarioGaussian(num=5, scenarios=S, dim=DIM)
    ids, scenario = torch.tensor([1, 1, 2]), torch.tensor([0, 2, 0])
    mean, logvar = posterior(ids, scenario)
    assert mean.shape == logvar.shape == (3, DIM)
    assert not torch.equal(mean[0], mean[1])  # the same entity in two scenarios: two Gaussians
    torch.testing.assert_close(mean[0], posterior.mean.weight[1 * S + 0])
    draws = torch.stack([posterior.sample(mean, logvar) for _ in range(2000)])
    torch.testing.assert_close(draws.mean(0), mean, atol=0.01, rtol=0)
    torch.testing.assert_close(draws.var(0).log(), logvar, atol=0.1, rtol=0)
    posterior.eval()
    assert torch.equal(posterior.sample(mean, logvar), mean)


def test_cluster_prior_gives_similar_global_embeddings_the_same_prior_mass() -> None:
    prior = ClusterPrior(dim=DIM, clusters=3, temperature=0.01)
    g = prior.centres.detach()[[0, 0, 2]] * torch.tensor([[1.0], [3.0], [0.5]])  # scaled centres
    weights = prior.weights(g)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3))
    torch.testing.assert_close(weights[0], weights[1])  # same direction: same multinomial
    assert weights[0].argmax() == 0 and weights[2].argmax() == 2
    mean, logvar = prior(g)
    torch.testing.assert_close(mean, weights @ prior.centres)
    torch.testing.assert_close(logvar.exp(), weights @ prior.logvar.exp())
    torch.testing.assert_close(mean[2], prior.centres[2], atol=1e-3, rtol=0)  # a sharp assignment


def test_gsvr_shapes_and_every_parameter_gets_a_gradient() -> None:
    module = gsvr()
    rows = batch()
    features, terms = module(rows, rows["domain"] - 1)
    assert module.out_dim == 2 * 2 * DIM and features.shape == (6, module.out_dim)
    assert set(terms) == module.outputs and all(t.shape == (6, 2, DIM) for t in terms.values())
    (features.pow(2).sum() + kl_loss(terms)).backward()
    assert_all_grads(module)


def test_gsvr_entities_name_roles() -> None:
    module = gsvr(entities=["item"])
    features, terms = module(batch(), torch.zeros(6, dtype=torch.long))
    assert (
        module.fields == ["item"]
        and features.shape == (6, 2 * DIM)
        and terms["gsvr_mean"].shape == (6, 1, DIM)
    )


# ----------------------------------------------------------------------------- the plug-in


BACKBONES = {
    "shared_bottom": {
        "_component_": "backbone/shared_bottom",
        "bottom": {"_component_": "encoder/mlp", "hidden": [8]},
        "tower": {"_component_": "encoder/mlp", "hidden": [4]},
    },
    "mmoe": {
        "_component_": "backbone/mmoe",
        "experts": {"_component_": "experts/bank", "num_shared": 2, "hidden": 8},
        "gate": {"_component_": "gate/router"},
        "tower": {"_component_": "encoder/mlp", "hidden": [4]},
    },
    "ple": {
        "_component_": "backbone/ple",
        "experts": {"_component_": "experts/bank", "num_shared": 1, "hidden": 8},
        "gate": {"_component_": "gate/router"},
        "tower": {"_component_": "encoder/mlp", "hidden": [4]},
    },
    "star": {
        "_component_": "backbone/star",
        "hidden": [8],
        "aux": {"_component_": "encoder/mlp", "hidden": [4]},
    },
}


def model(backbone: str, plugin: dict | None = None):
    node = {
        "_component_": "model/multi_scenario",
        "use_fields": ["item", "domain"],
        "embed": {"_component_": "embedding/field", "dim": DIM},
        "interest": {"_component_": "attention/target", "hidden": [8]},
        "backbone": BACKBONES[backbone],
        "gsvr": plugin,
    }
    return build(node, "model", {"fields": FIELDS, "roles": ROLES})


ON = {"_component_": "variational/gsvr", "dim": DIM, "clusters": 2}


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_one_key_puts_gsvr_on_every_backbone(backbone: str) -> None:
    plain, plugged = model(backbone), model(backbone, ON)
    assert plain.gsvr is None and plain.outputs == {"logit"}
    assert plugged.outputs == {"logit", *TERMS}
    out = plugged(batch())
    assert out["logit"].shape == (6,) and set(out) == plugged.outputs
    (out["logit"].pow(2).sum() + kl_loss(out)).backward()
    assert_all_grads(plugged.gsvr)


def test_the_prior_stays_float32_under_bf16_autocast() -> None:
    net = model("ple", ON)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(batch())
    assert all(out[name].dtype == torch.float32 for name in TERMS)
    (out["logit"].float().sum() + kl_loss(out)).backward()
    assert_all_grads(net.gsvr)


@pytest.mark.parametrize("backbone", ["mmoe", "star"])
def test_evaluation_uses_the_posterior_mean_and_training_samples(backbone: str) -> None:
    net = model(backbone, ON)
    rows = batch()
    net.train()
    first, second = net(rows)["logit"], net(rows)["logit"]
    assert not torch.equal(first, second)  # fresh draws each forward
    net.eval()
    with torch.no_grad():
        once, again = net(rows), net(rows)
        assert torch.equal(once["logit"], again["logit"])
        features, _ = net.gsvr(rows, rows["domain"] - 1)
    mean = once["gsvr_mean"]  # the z half of each entity's [g, z] is its posterior mean
    torch.testing.assert_close(features.view(6, 2, 2, DIM)[:, :, 1], mean)


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        ({"entities": ["user", "shop"]}, "entities ['shop']"),
        ({"entities": []}, "at least one"),
        ({"entities": ["item", "item"]}, "distinct"),
        ({"dim": 0}, "dim must be >= 1"),
        ({"clusters": 0}, "clusters must be >= 1"),
        ({"temperature": 0.0}, "temperature must be positive"),
        ({"dimm": 8}, "did you mean dim"),
    ],
)
def test_bad_gsvr_settings_are_named(settings: dict, fragment: str) -> None:
    with pytest.raises(RecipeError, match="model.gsvr") as error:
        model("mmoe", {**ON, **settings})
    assert fragment in str(error.value)


# ----------------------------------------------------------------------------- real data

SMOKE = [
    "train.max_epochs=1",
    "train.limit_train_batches=3",
    "train.limit_eval_batches=3",
    "logging.progress_bar=false",
]


def test_recipe_trains_gsvr_with_its_kl_loss_and_off_drops_both(data_home: Path, tmp_path: Path) -> None:
    on = train(REPO / "recipes" / "gsvr.yaml", [*SMOKE, f"logging.run_root={tmp_path / 'on'}"])
    assert math.isfinite(json.loads((on / "metrics.json").read_text())["test"]["auc"])
    logged = next(csv.DictReader((next((on / "csv").rglob("metrics.csv"))).open()))
    assert "train/loss_gaussian_kl_epoch" in logged
    off = train(
        REPO / "recipes" / "gsvr.yaml", [*SMOKE, "model.gsvr=null", f"logging.run_root={tmp_path / 'off'}"]
    )
    state = torch.load(off / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    assert not any("gsvr" in name for name in state)
    logged = next(csv.DictReader((next((off / "csv").rglob("metrics.csv"))).open()))
    assert "train/loss_gaussian_kl_epoch" not in logged


def test_the_key_over_another_backbone_from_the_command_line(data_home: Path, tmp_path: Path) -> None:
    done = run_rex(
        "train", "recipes/star.yaml", "model.gsvr={_component_: variational/gsvr}", *SMOKE,
        f"logging.run_root={tmp_path}",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    bad = run_rex(
        "train", "recipes/gsvr.yaml", "model.gsvr.entities=[user, shop]", f"logging.run_root={tmp_path}"
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr + bad.stdout
    assert "model.gsvr" in bad.stderr and "shop" in bad.stderr, bad.stderr
