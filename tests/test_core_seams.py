"""The open core: optimizer and scheduler nodes, parameter groups, freeze, declared loss reads,
evaluator nodes and registered tasks, each through a real recipe build."""

from __future__ import annotations

import math
import sys
import textwrap

import pytest
import torch

from rex.config.errors import RecipeError
from rex.config.recipe import load_recipe
from rex.engine.build import build_run
from rex.engine.optim import build_optimizer, build_scheduler
from tests.conftest import REPO

SASREC = REPO / "recipes" / "sasrec.yaml"
SMALL = ["data.name=ml-100k", "model.dim=16", "model.encoder.num_heads=1"]


def built(recipe=SASREC, overrides=()):
    loaded = load_recipe(recipe, [*SMALL, *overrides] if recipe == SASREC else list(overrides))
    return build_run(loaded.recipe, 0, str(recipe))


def test_train_lr_shorthand_builds_the_same_single_group_optimizer(data_home):
    module = built(overrides=["train.lr=0.003", "train.weight_decay=0.1"]).module
    optimizer = module.configure_optimizers()
    assert type(optimizer) is torch.optim.Adam
    (group,) = optimizer.param_groups
    assert group["lr"] == 0.003 and group["weight_decay"] == 0.1
    assert [id(p) for p in group["params"]] == [id(p) for p in module.parameters()]


def test_parameter_groups_select_modules_by_glob(data_home):
    node = (
        "optimizer={_component_: optim/adamw, lr: 0.001, weight_decay: 0.01, "
        "groups: [{params: model.encoder.*, lr: 0.0001}, {params: [model.*embedding.weight], weight_decay: 0.0}]}"
    )
    module = built(overrides=[node]).module
    optimizer = module.configure_optimizers()
    assert type(optimizer) is torch.optim.AdamW
    names = {id(p): n for n, p in module.named_parameters()}
    # every parameter is in one of the two groups, so there is no default group
    encoder, embeddings = optimizer.param_groups
    assert (
        encoder["lr"] == 0.0001
        and encoder["weight_decay"] == 0.01
        and all(names[id(p)].startswith("model.encoder.") for p in encoder["params"])
    )
    assert {names[id(p)] for p in embeddings["params"]} == {
        "model.item_embedding.weight",
        "model.position_embedding.weight",
    }
    assert embeddings["weight_decay"] == 0.0 and embeddings["lr"] == 0.001
    every = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(every) == sorted(id(p) for p in module.parameters())  # each parameter once


@pytest.mark.parametrize(
    ("override", "key", "fragment"),
    [
        (
            "optimizer={_component_: optim/adamw, groups: [{params: model.encodr.*}]}",
            "optimizer.groups[0].params",
            "matches no parameter",
        ),
        (
            "optimizer={_component_: optim/adamw, groups: [{params: model.*, lrr: 1}]}",
            "optimizer.groups[0].lrr",
            "did you mean lr",
        ),
        (
            "optimizer={_component_: optim/adamw, groups: [{params: model.*, lr: fast}]}",
            "optimizer.groups[0].lr",
            "expected",
        ),
        ("optimizer={_component_: optim/adamx}", "optimizer._component_", "did you mean optim/adam"),
        ("freeze=[model.nothing.*]", "freeze", "matches no parameter"),
        ("freeze=[model.*]", "freeze", "every parameter is frozen"),
        (
            "scheduler={_component_: sched/warmup_cosine, warmup_step: 3}",
            "scheduler.warmup_step",
            "did you mean warmup_steps",
        ),
    ],
)
def test_bad_optimizer_settings_fail_at_build_with_the_key(data_home, override, key, fragment):
    with pytest.raises(RecipeError) as info:
        module = built(overrides=[override]).module
        module.configure_optimizers()
    assert info.value.key == key and fragment in str(info.value)


def test_freeze_leaves_frozen_parameters_out_of_the_optimizer(data_home):
    result = built(overrides=["freeze=[model.encoder.*]"])
    assert result.frozen and all(name.startswith("model.encoder.") for name in result.frozen)
    optimizer = build_optimizer({"_component_": "optim/adam", "lr": 0.1}, result.module)
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for name, param in result.module.named_parameters():
        assert (id(param) in trained) == (not name.startswith("model.encoder.")), name


def test_warmup_cosine_follows_its_hand_computed_schedule():
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    config = build_scheduler(
        {"_component_": "sched/warmup_cosine", "warmup_steps": 3}, optimizer, total_steps=11
    )
    assert config["interval"] == "step"
    seen = []
    for _ in range(11):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        config["scheduler"].step()
    warmup = [1 / 4, 2 / 4, 3 / 4]  # linear from 1/(warmup+1) to 1 over 3 steps
    decay = [0.5 * (1 + math.cos(math.pi * t / 8)) for t in range(8)]  # cosine over the 8 left
    assert seen == pytest.approx(warmup + decay)


def test_a_run_shorter_than_its_warmup_warms_up_throughout_and_says_so():
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    node = {"_component_": "sched/warmup_cosine", "warmup_steps": 4}
    with pytest.warns(UserWarning, match="3 optimizer steps, not more than warmup_steps=4"):
        config = build_scheduler(node, optimizer, total_steps=3)
    seen = []
    for _ in range(3):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        config["scheduler"].step()
    assert seen == pytest.approx([1 / 5, 2 / 5, 3 / 5])  # the configured slope, cut short
    with pytest.raises(RecipeError, match="warmup_steps must be >= 0"):
        build_scheduler({**node, "warmup_steps": -1}, optimizer, total_steps=3)


def test_a_loss_reading_an_absent_output_fails_at_build(data_home):
    with pytest.raises(RecipeError) as info:
        built(overrides=["losses=[{_component_: loss/bce}]"])
    message = str(info.value)
    assert info.value.key == "losses[0]" and "reads model output logit" in message
    assert "produces: labels, logits, scores" in message and "optional: true" in message


def test_an_optional_loss_drops_out_only_when_its_outputs_are_absent(data_home):
    full = load_recipe(
        REPO / "recipes" / "dmae.yaml", ["data.name=ml-100k", "model.modalities=[text_minilm]"]
    )
    assert [loss.name for loss in build_run(full.recipe, 0, "dmae").module.losses] == [
        "bce",
        "interest_reconstruction",
    ]
    ablated = load_recipe(
        REPO / "recipes" / "dmae.yaml",
        ["data.name=ml-100k", "model.modalities=[text_minilm]", "model.sim_bucket=null"],
    )
    result = build_run(ablated.recipe, 0, "dmae")
    assert [loss.name for loss in result.module.losses] == ["bce"]
    assert result.skipped_losses == ["interest_reconstruction"]


def test_evaluator_node_replaces_the_task_default(data_home):
    default = built()
    chunked = built(overrides=["eval.evaluator={_component_: eval/ranking, chunk_rows: 7}"])
    assert chunked.module.evaluator.chunk_rows == 7
    batch = next(iter(default.datamodule.loader("valid")))
    results = []
    for result in (default, chunked):
        result.module.eval()
        result.module.evaluator.reset()
        result.module.evaluator.update(result.module.model, batch)
        results.append(result.module.evaluator.compute())
    assert results[0] == pytest.approx(results[1], abs=1e-7)
    with pytest.raises(RecipeError) as info:
        built(overrides=["eval.metrics=[auc]", "eval.monitor=auc"])
    assert info.value.key == "eval.evaluator" and "cannot compute 'auc'" in str(info.value)


def test_a_plugin_registers_a_new_task_without_touching_the_core(data_home, tmp_path, monkeypatch):
    (tmp_path / "my_tasks.py").write_text(
        textwrap.dedent(
            """
            from rex.config.registry import register
            from rex.data.tasks import NextItemTask

            @register("task/last_item")
            class LastItemTask(NextItemTask):
                '''Next-item training supervised only at each sequence's last position.'''

                def transform(self, split):
                    base = super().transform(split)
                    if base is None:
                        return None
                    def last_only(batch):
                        out = base(batch)
                        targets = out["targets"].clone()
                        targets[:, :-1] = 0
                        return {**out, "targets": targets}
                    return last_only
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_tasks", raising=False)
    recipe = tmp_path / "last.yaml"
    recipe.write_text(f"extends: {SASREC}\nplugins: [my_tasks]\ntask: last_item\n")
    result = build_run(load_recipe(recipe, SMALL).recipe, 0, str(recipe))
    batch = next(iter(result.datamodule.loader("train")))
    assert (batch["targets"][:, :-1] == 0).all() and (batch["targets"][:, -1] > 0).any()
    assert result.module.evaluator.__class__.__name__ == "RankingEvaluator"


def test_samples_per_second_count_what_each_task_supervises():
    from rex.data.sequences import next_item_pairs
    from rex.data.tasks import ClickTask, NextItemTask

    sequences = {"items": torch.tensor([[0, 2, 3, 4], [0, 0, 6, 5]]), "user": torch.tensor([1, 2])}
    batch = next_item_pairs(sequences)  # positions with a next item: 2 + 1
    assert NextItemTask().samples(batch) == 3
    assert ClickTask().samples({"label": torch.ones(7), "item": torch.ones(7)}) == 7
