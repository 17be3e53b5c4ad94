"""Sweep specs are checked in full before the first trial: a bad spec is a clear error, exit 2."""

from __future__ import annotations

import os

import optuna
import pytest
import yaml

from rex.config.errors import RecipeError
from rex.config.recipe import load_recipe
from rex.sweep.space import check_space, make_sampler, sample
from rex.sweep.spec import override
from rex.sweep.study import prepare
from tests.conftest import REPO, run_rex

GOOD = {
    "recipe": str(REPO / "recipes" / "deepfm.yaml"),
    "overrides": ["train.max_epochs=1"],
    "params": {
        "train.lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-2, "log": True},
        "model.embed.dim": {"type": "categorical", "choices": [8, 16]},
    },
    "objective": {"metric": "auc", "direction": "maximize"},
}


def _spec(tmp_path, **changes):
    data = {**GOOD, **changes}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _error(tmp_path, **changes) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        prepare(_spec(tmp_path, **changes), [], None, None, 1)
    return info.value


def test_a_good_spec_passes(data_home, tmp_path):
    prep = prepare(_spec(tmp_path), [], None, None, 1)
    assert "eval.monitor=auc" in prep.job.base_overrides
    assert prep.job.storage.endswith("/.studies/spec.db")
    assert prep.job.trial_overrides == []
    # With W&B on, every trial joins one group named after the study; workers share the cores.
    prep = prepare(_spec(tmp_path, overrides=["logging.wandb={mode: disabled}"]), [], None, None, 2)
    assert "logging.wandb.group=spec" in prep.job.base_overrides
    assert prep.job.trial_overrides == [f"train.num_threads={max(1, (os.cpu_count() or 1) // 2)}"]


@pytest.mark.parametrize(
    ("param", "key", "message"),
    [
        (
            {"model.embed.dimm": {"type": "int", "low": 4, "high": 8}},
            "params.model.embed.dimm",
            "unknown argument for embedding/field (did you mean dim?)",
        ),
        ({"train.lrr": {"type": "float", "low": 0.1, "high": 0.2}}, "params.train.lrr", "did you mean lr?"),
        (
            {"trian.lr": {"type": "float", "low": 0.1, "high": 0.2}},
            "params.trian.lr",
            "no such recipe section",
        ),
        (
            {"model.tower.hidden.deep": {"type": "int", "low": 1, "high": 2}},
            "params.model.tower.hidden.deep",
            "model.tower.hidden is not a section",
        ),
        (
            {"model.interest.hidden": {"type": "int", "low": 1, "high": 2}},
            "params.model.interest.hidden",
            "add `when: model.interest`",
        ),
        ({"train.lr": {"type": "float", "low": -1.0, "high": 0.1}}, "params.train.lr", "greater than 0"),
        ({"train.lr": {"type": "float", "low": 0.1, "high": 0.01}}, "params.train.lr", "empty range"),
        (
            {"train.batch_size": {"type": "int", "low": 64, "high": 32}},
            "params.train.batch_size",
            "empty range",
        ),
        (
            {"model.embed.dim": {"type": "categorical", "choices": []}},
            "params.model.embed.dim.choices",
            "at least 1 item",
        ),
        (
            {"train.lr": {"type": "normal", "low": 0.1, "high": 0.2}},
            "params.train.lr",
            "unknown distribution type 'normal'",
        ),
        ({"train.lr": {"type": "float", "low": 0.0, "high": 0.2, "log": True}}, "params.train.lr", "low > 0"),
        (
            {"train.lr": {"type": "float", "low": 0.1, "high": 0.2, "lg": True}},
            "params.train.lr.lg",
            "did you mean log?",
        ),
    ],
    ids=[
        "unknown-arg",
        "unknown-train-key",
        "unknown-section",
        "not-a-section",
        "needs-when",
        "out-of-bounds",
        "empty-float",
        "empty-int",
        "empty-choices",
        "bad-type",
        "bad-log",
        "typo",
    ],
)
def test_bad_search_space(data_home, tmp_path, param, key, message):
    err = _error(tmp_path, params=param)
    assert err.file == str(tmp_path / "spec.yaml")
    assert err.key == key
    assert message in err.detail


def test_a_list_entry_is_searched_by_its_index(data_home, tmp_path):
    """A loss's weight is named as in a dotlist override, ``losses.0.weight`` (here of an
    optional loss, whose core-level keys the check must not pass to the component); an index
    past the list's end is an error like any missing key."""
    optional_loss = "losses=[{_component_: loss/bce, weight: 1.0, optional: true}]"
    prep = prepare(
        _spec(
            tmp_path,
            overrides=[*GOOD["overrides"], optional_loss],
            params={"losses.0.weight": {"type": "categorical", "choices": [0.5, 2.0]}},
        ),
        [],
        None,
        None,
        1,
    )
    trial = optuna.create_study().ask()
    values = sample(trial, prep.spec, prep.base.resolved)
    assert values == {"losses.0.weight": trial.params["losses.0.weight"]}
    trial_recipe = load_recipe(REPO / "recipes" / "deepfm.yaml", [override(k, v) for k, v in values.items()])
    assert trial_recipe.recipe.losses[0]["weight"] == values["losses.0.weight"]
    err = _error(tmp_path, params={"losses.1.weight": {"type": "float", "low": 0.1, "high": 1.0}})
    assert err.key == "params.losses.1.weight" and "losses.1 is not a section" in err.detail


def test_wrong_direction_and_unknown_metric(data_home, tmp_path):
    err = _error(tmp_path, objective={"metric": "auc", "direction": "minimize"})
    assert err.key == "objective.direction" and "direction must be maximize" in err.detail
    err = _error(tmp_path, objective={"metric": "ndcg@10", "direction": "maximize"})
    assert err.key == "objective.metric" and "auc, gauc, logloss" in err.detail
    err = _error(tmp_path, objective={"metric": "auc", "direction": "up"})
    assert err.key == "objective.direction" and "'up'" in err.detail


def test_conditional_parameter_is_sampled_only_when_its_condition_holds(data_home, tmp_path):
    path = _spec(
        tmp_path,
        recipe=str(REPO / "recipes" / "din.yaml"),
        params={
            "model.interest": {
                "type": "categorical",
                "choices": [None, {"_component_": "attention/target", "hidden": [16], "activation": "relu"}],
            },
            "model.interest.hidden": {
                "type": "categorical",
                "choices": [[8], [32, 8]],
                "when": "model.interest",
            },
        },
    )
    prep = prepare(path, [], None, None, 1)  # the conditional key is checked with interest set
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        values = sample(trial, prep.spec, prep.base.resolved)
        seen.add(values["model.interest"] is None)
        assert ("model.interest.hidden" in values) == (values["model.interest"] is not None)
        study.tell(trial, 0.5)
    assert seen == {True, False}
    # The same condition on a key that never exists is an error before any trial.
    prep.spec.params["model.interest.nope"] = prep.spec.params["model.interest.hidden"]
    with pytest.raises(RecipeError, match="unknown argument for attention/target"):
        check_space(prep.spec, str(path), prep.base.path, prep.base, prep.job.base_overrides)


def test_cli_exits_2_without_traceback_and_before_any_trial(data_home, tmp_path):
    path = _spec(tmp_path, params={"model.embed.dimm": {"type": "int", "low": 4, "high": 8}})
    result = run_rex("sweep", str(path), f"logging.run_root={tmp_path / 'runs'}")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "spec.yaml: params.model.embed.dimm: unknown argument" in result.stderr
    assert not (tmp_path / ".studies" / "spec.db").exists()
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("kind", ["tpe", "random", "grid", "cmaes"])
def test_every_sampler_proposes_points_in_the_space(data_home, tmp_path, kind):
    params = {**GOOD["params"], "train.weight_decay": {"type": "float", "low": 0.0, "high": 0.2, "step": 0.1}}
    if kind == "grid":
        params["train.lr"] = {"type": "float", "low": 0.001, "high": 0.003, "step": 0.001}
    prep = prepare(_spec(tmp_path, params=params, sampler={"type": kind, "seed": 0}), [], None, None, 1)
    study = optuna.create_study(sampler=make_sampler(prep.spec), direction="maximize")
    for _ in range(4):
        trial = study.ask()
        values = sample(trial, prep.spec, prep.base.resolved)
        assert values["model.embed.dim"] in (8, 16) and values["train.weight_decay"] in (0.0, 0.1, 0.2)
        assert 1e-4 <= values["train.lr"] <= 1e-2
        study.tell(trial, values["train.lr"])


def test_grid_sampler_needs_steps(data_home, tmp_path):
    err = _error(tmp_path, sampler={"type": "grid"})
    assert err.key == "params.train.lr" and "grid sampler needs a step" in err.detail


def test_a_storage_that_cannot_open_names_the_spec_and_hides_the_password(data_home, tmp_path):
    path = _spec(tmp_path, storage="postgresql://rex:hunter2@127.0.0.1:1/studies")
    result = run_rex("sweep", str(path), f"logging.run_root={tmp_path / 'runs'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert (
        "spec.yaml: storage: cannot open study storage postgresql://rex:***@127.0.0.1:1/studies"
        in result.stderr
    )
    assert "hunter2" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) <= 3
