"""Staged recipes on real data: init_from, freeze, exports, resume of a killed stage, reuse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rex.config.errors import RecipeError, RexError
from rex.config.recipe import load_recipe
from rex.engine.build import build_run
from rex.engine.runs import load_checkpoint
from rex.engine.stages import copy_modules, stage_key
from rex.engine.train import evaluate, train
from rex.engine.validate import validate_recipe
from tests.conftest import REPO, kill_rex_when, run_rex

STAGED = f"""
extends: {REPO}/recipes/base/next_item.yaml
name: staged
data: {{name: ml-100k, max_len: 20}}
model:
  _component_: model/sequential
  dim: 16
  max_len: ${{data.max_len}}
  dropout: 0.1
  encoder: {{_component_: encoder/transformer, num_layers: 1, num_heads: 1, dropout: 0.1, causal: true}}
train: {{batch_size: 64, max_epochs: 2, limit_train_batches: 6, limit_eval_batches: 2, patience: null}}
logging: {{progress_bar: false}}
stages:
  - name: pretrain
    export: {{item_vectors: item_embedding.weight}}
  - name: finetune
    init_from: {{stage: pretrain, modules: {{model.item_embedding: model.item_embedding}}}}
    freeze: [model.item_embedding.*]
    optimizer: {{_component_: optim/adamw, lr: 5.0e-4, weight_decay: 0.01}}
    scheduler: {{_component_: sched/warmup_cosine, warmup_steps: 2}}
"""


@pytest.fixture
def staged(tmp_path: Path) -> Path:
    path = tmp_path / "staged.yaml"
    path.write_text(STAGED)
    return path


def _state(run_dir: Path, stage: str, checkpoint: str = "best") -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / stage / "checkpoints" / f"{checkpoint}.ckpt")["state_dict"]


def test_stages_run_in_order_with_init_from_freeze_and_exports(staged, data_home, tmp_path):
    run_dir = train(staged, [f"logging.run_root={tmp_path / 'runs'}"])
    record = json.loads((run_dir / "stages.json").read_text())
    assert list(record["stages"]) == ["pretrain", "finetune"]
    assert all(entry["status"] == "trained" for entry in record["stages"].values())
    for stage in ("pretrain", "finetune"):
        assert (run_dir / stage / "recipe.yaml").is_file() and (run_dir / stage / "metrics.json").is_file()
    final = json.loads((run_dir / "metrics.json").read_text())
    assert final["test"] == json.loads((run_dir / "finetune" / "metrics.json").read_text())["test"]
    assert set(final["stages"]) == {"pretrain", "finetune"}

    pretrained, finetuned = _state(run_dir, "pretrain"), _state(run_dir, "finetune")
    # init_from copied the embedding, and freezing kept it bit for bit through the stage
    for checkpoint in ("best", "last"):
        frozen = _state(run_dir, "finetune", checkpoint)["model.item_embedding.weight"]
        assert torch.equal(frozen, pretrained["model.item_embedding.weight"])
    # the rest of the model did train on in the second stage
    name = "model.encoder.blocks.0.qkv.weight"
    assert name in finetuned and not torch.equal(finetuned[name], pretrained[name])

    exported = run_dir / "pretrain" / "exports" / "item_vectors.lance"
    assert exported.is_dir()
    # rex eval on the run evaluates its last stage, with the exports of the stages before it
    assert evaluate(run_dir) == pytest.approx(final["test"], abs=1e-6)
    pretrain_test = json.loads((run_dir / "pretrain" / "metrics.json").read_text())["test"]
    assert evaluate(run_dir / "pretrain") == pytest.approx(pretrain_test, abs=1e-6)
    _record_retest_updates_every_record_of_the_stage(run_dir)
    resolved = load_recipe(run_dir / "finetune" / "recipe.yaml").recipe
    assert resolved.optimizer == {"_component_": "optim/adamw", "lr": 5.0e-4, "weight_decay": 0.01}


def _record_retest_updates_every_record_of_the_stage(run_dir: Path) -> None:
    # An evaluator fix re-tests finished runs: `rex eval --record` replaces the last stage's test
    # result in its metrics.json, stages.json and the run's metrics.json, and keeps the old one.
    stage_file, top_file = run_dir / "finetune" / "metrics.json", run_dir / "metrics.json"
    stale = {**json.loads(stage_file.read_text()), "test": {"ndcg@10": -1.0}}
    stage_file.write_text(json.dumps(stale))
    tested = evaluate(run_dir, record=True)
    stage = json.loads(stage_file.read_text())
    assert stage["test"] == tested and stage["retests"][0]["replaced"] == {"ndcg@10": -1.0}
    assert isinstance(stage["retests"][0]["exclude_history"], bool)
    assert json.loads((run_dir / "stages.json").read_text())["stages"]["finetune"]["test"] == tested
    top = json.loads(top_file.read_text())
    assert top["test"] == tested and top["stages"]["finetune"] == tested
    with pytest.raises(RexError, match="--record takes a run folder"):
        evaluate(run_dir / "finetune" / "checkpoints" / "last.ckpt", record=True)


def test_init_from_copies_exactly_the_mapped_tensors(staged, data_home):
    loaded = load_recipe(staged)
    pretrain, finetune = loaded.stages
    source = build_run(pretrain.recipe, seed=1, source="test").module.state_dict()
    target = build_run(finetune.recipe, seed=2, source="test")
    before = {k: v.clone() for k, v in target.module.state_dict().items()}
    copy_modules(source, target, finetune)
    after = target.module.state_dict()
    mapped = {k for k in after if k.startswith("model.item_embedding.")}
    assert mapped == {"model.item_embedding.weight"}
    for name, value in after.items():
        expected = source[name] if name in mapped else before[name]
        assert torch.equal(value, expected), name
    assert any(not torch.equal(source[n], before[n]) for n in before if n not in mapped)


def test_killed_second_stage_resumes_to_the_uninterrupted_metrics(staged, data_home, tmp_path):
    slow = ["stages.finetune.train.checkpoint_every_n_steps=1", "stages.finetune.train.max_epochs=3"]
    whole = train(staged, [*slow, f"logging.run_root={tmp_path / 'whole'}"])
    expected = json.loads((whole / "metrics.json").read_text())["test"]

    found = kill_rex_when(
        "train",
        str(staged),
        *slow,
        f"logging.run_root={tmp_path / 'killed'}",
        root=tmp_path / "killed",
        pattern="staged/*/finetune/checkpoints/last.ckpt",
    )
    assert found is not None, "the run should have reached its second stage"
    run_dir = found.parents[2]
    assert not (run_dir / "metrics.json").exists()
    record = json.loads((run_dir / "stages.json").read_text())
    assert list(record["stages"]) == ["pretrain"]

    resumed = run_rex("train", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = json.loads((run_dir / "metrics.json").read_text())["test"]
    assert got == pytest.approx(expected, abs=1e-6)
    assert json.loads((run_dir / "stages.json").read_text())["stages"]["pretrain"]["status"] == "trained"


def test_reuse_stages_takes_over_only_unchanged_stages(staged, data_home, tmp_path):
    first = train(staged, [f"logging.run_root={tmp_path}"])
    again = train(
        staged, ["stages.finetune.train.lr=1.0e-4", f"logging.run_root={tmp_path}"], reuse_stages=first
    )
    stages = json.loads((again / "stages.json").read_text())["stages"]
    assert stages["pretrain"]["status"] == "reused" and stages["finetune"]["status"] == "trained"
    assert torch.equal(
        _state(again, "pretrain")["model.item_embedding.weight"],
        _state(first, "pretrain")["model.item_embedding.weight"],
    )

    changed = train(
        staged, ["stages.pretrain.train.lr=2.0e-3", f"logging.run_root={tmp_path}"], reuse_stages=first
    )
    assert all(
        s["status"] == "trained" for s in json.loads((changed / "stages.json").read_text())["stages"].values()
    )


def test_a_stage_key_covers_its_exports(staged, data_home):
    # A later stage reads what an earlier one exports: dropping the export (an ablation that
    # leaves the next stage on its own) must not take over the exporting stage's result.
    with_export = load_recipe(staged).stages[0]
    without = load_recipe(staged, ["stages.pretrain.export={}"]).stages[0]
    assert with_export.config.export and not without.config.export
    assert stage_key(with_export, 42, []) != stage_key(without, 42, [])
    assert stage_key(with_export, 42, []) == stage_key(load_recipe(staged).stages[0], 42, [])


def test_staged_recipe_validates_shows_and_reports_stage_errors(staged, data_home, tmp_path):
    summary = validate_recipe(staged)
    assert summary.startswith("pretrain: model/sequential") and "finetune: model/sequential" in summary
    shown = run_rex("show", str(staged))
    assert shown.returncode == 0 and "# ---- stage finetune, resolved" in shown.stdout

    with pytest.raises(RecipeError) as info:
        load_recipe(staged, ["stages.finetune.train.lrr=1"])
    assert info.value.key == "stages.finetune.train.lrr" and "did you mean lr" in str(info.value)
    with pytest.raises(RecipeError) as info:
        load_recipe(staged, ["stages.tune.train.lr=1"])
    assert "no stage named 'tune'" in str(info.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text(STAGED.replace("model.item_embedding.*]", "model.item_embeding.*]"))
    out = run_rex("validate", str(bad))
    assert (
        out.returncode == 2
        and "matches no parameter" in out.stdout
        and "Traceback" not in out.stdout + out.stderr
    )


def test_a_sweep_can_search_a_stage_key(staged, data_home, tmp_path):
    from rex.sweep.study import prepare

    spec = tmp_path / "sweep.yaml"
    params = "params:\n  stages.finetune.train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n"
    spec.write_text(
        f"recipe: {staged}\n{params}objective: {{metric: ndcg@10, direction: maximize}}\ntrials: 2\n"
    )
    prep = prepare(spec, [], None, None, 1)  # checks every key against the resolved stage
    assert list(prep.spec.params) == ["stages.finetune.train.lr"]
    spec.write_text(spec.read_text().replace("train.lr:", "train.lrr:"))
    with pytest.raises(RecipeError) as info:
        prepare(spec, [], None, None, 1)
    assert "did you mean lr" in str(info.value)
