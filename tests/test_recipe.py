"""Recipe loading: extends, interpolation, overrides and errors that name file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from rex.config.errors import RecipeError
from rex.config.recipe import OVERRIDE_SOURCE, load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


BASE = """
task: next_item
data: {name: beauty, view: sequence, max_len: 20}
model:
  _component_: model/sequential
  max_len: ${data.max_len}
  encoder: {_component_: encoder/transformer, num_layers: 2}
losses: [{_component_: loss/softmax_ce}]
eval: {protocol: leave_one_out}
"""


def test_extends_merges_in_order_and_interpolates(tmp_path):
    write(tmp_path, "base/a.yaml", BASE)
    write(tmp_path, "base/b.yaml", "train: {lr: 0.5, batch_size: 8}\n")
    path = write(
        tmp_path, "r.yaml", "extends: [base/a.yaml, base/b.yaml]\ntrain: {lr: 0.01}\ndata: {max_len: 7}\n"
    )
    loaded = load_recipe(path)
    assert loaded.recipe.name == "r"
    assert loaded.recipe.train.lr == 0.01 and loaded.recipe.train.batch_size == 8
    assert loaded.resolved["model"]["max_len"] == 7  # interpolation sees the merged value
    assert loaded.recipe.eval.metrics and "ndcg@10" in loaded.recipe.eval.metrics


def test_overrides_set_nested_and_new_component_arguments(tmp_path):
    path = write(tmp_path, "r.yaml", BASE)
    loaded = load_recipe(
        path,
        ["model.encoder.num_layers=3", "train.max_epochs=5", "model.encoder.dropout=0.1", "seed=[1,2,3]"],
    )
    assert loaded.resolved["model"]["encoder"]["num_layers"] == 3
    assert loaded.resolved["model"]["encoder"]["dropout"] == 0.1
    assert loaded.recipe.train.max_epochs == 5
    assert loaded.recipe.seeds == [1, 2, 3]


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        (BASE + "trian: {lr: 1}\n", "trian", "did you mean train"),
        (BASE + "train: {lrr: 1}\n", "train.lrr", "did you mean lr"),
        (
            BASE + "eval: {protocol: leave_one_out, exclude_histroy: true}\n",
            "eval.exclude_histroy",
            "did you mean exclude_history",
        ),
        (BASE + "train: {lr: fast}\n", "train.lr", "valid number"),
        (BASE.replace("task: next_item", "task: rank"), "task", "next_item"),
        (BASE.replace("eval: {protocol: leave_one_out}", ""), "eval", "missing"),
        (BASE + "eval: {protocol: leave_one_out, metrics: [ndcg@0]}\n", "eval.metrics", "ndcg"),
    ],
)
def test_validation_errors_name_file_and_key(tmp_path, text, key, fragment):
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.key == key
    assert fragment in str(info.value)
    assert "bad.yaml" in str(info.value)


def test_yaml_syntax_error_gives_line(tmp_path):
    path = write(tmp_path, "broken.yaml", "task: ctr\ndata: {name: x\nmodel: 3\n")
    with pytest.raises(RecipeError, match=r"broken.yaml: YAML syntax error at line \d+"):
        load_recipe(path)


def test_missing_recipe_and_missing_base(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    path = write(tmp_path, "r.yaml", "extends: base/missing.yaml\n")
    with pytest.raises(RecipeError, match="base recipe 'base/missing.yaml' not found") as info:
        load_recipe(path)
    assert info.value.key == "extends"


def test_extends_cycle_is_reported(tmp_path):
    write(tmp_path, "a.yaml", "extends: b.yaml\n")
    path = write(tmp_path, "b.yaml", "extends: a.yaml\n")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(path)


STAGED = (
    BASE
    + """
stages:
  - name: pretrain
    train: {lr: 0.01, max_epochs: 3}
  - name: tune
    init_from: {stage: pretrain, modules: {model: model}}
    model: {encoder: {_component_: encoder/transformer, num_layers: 2, dropout: 0.3}}
    train: {lr: 0.001, max_epochs: 5}
  - name: dropped
    train: {max_epochs: 1}
"""
)


def test_a_variant_merges_stages_by_name(tmp_path):
    write(tmp_path, "base.yaml", STAGED)
    path = write(
        tmp_path,
        "variant.yaml",
        """extends: base.yaml
stages:
  - name: pretrain
  - name: extra
    init_from: {stage: pretrain, modules: {model: model}}
    train: {max_epochs: 2}
  - name: tune
    init_from: {stage: extra, modules: {model: model}}
    model: {encoder: {_component_: encoder/transformer, num_layers: 1}}
""",
    )
    stages = {s["name"]: s for s in load_recipe(path).resolved["stages"]}
    assert list(stages) == ["pretrain", "extra", "tune"]  # the variant's order; unlisted ones go
    assert stages["pretrain"]["train"] == {"lr": 0.01, "max_epochs": 3}
    assert stages["tune"]["train"] == {"lr": 0.001, "max_epochs": 5}  # kept from the base
    assert stages["tune"]["init_from"]["stage"] == "extra"
    # A key the variant sets replaces the base stage's whole: no dropout merged in from it.
    assert stages["tune"]["model"]["encoder"] == {"_component_": "encoder/transformer", "num_layers": 1}


def test_bad_override_paths(tmp_path):
    path = write(tmp_path, "r.yaml", BASE)
    with pytest.raises(
        RecipeError, match="no such recipe section 'trian' \\(did you mean train\\?\\)"
    ) as info:
        load_recipe(path, ["trian.max_epochs=5"])
    assert info.value.file == OVERRIDE_SOURCE
    with pytest.raises(RecipeError, match="did you mean max_epochs") as info:
        load_recipe(path, ["train.max_epoch=5"])
    assert info.value.file == OVERRIDE_SOURCE
    with pytest.raises(RecipeError, match="is a value, not a section"):
        load_recipe(path, ["data.name.x=1"])
    with pytest.raises(RecipeError, match="must look like key.path=value"):
        load_recipe(path, ["train.max_epochs"])


def test_unresolvable_interpolation(tmp_path):
    path = write(tmp_path, "r.yaml", BASE.replace("${data.max_len}", "${data.maxlen}"))
    with pytest.raises(RecipeError, match="interpolation"):
        load_recipe(path)


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_load(recipe):
    loaded = load_recipe(recipe)
    assert loaded.recipe.name == recipe.stem


@pytest.mark.parametrize(
    ("recipe", "overrides", "fragment"),
    [
        ("deepfm.yaml", ["train.batch_samples=2048"], "applies to task next_item only"),
        ("sasrec.yaml", ["train.batch_samples=20"], "must be at least data.max_len"),
    ],
)
def test_batch_samples_is_checked_against_task_and_max_len(recipe, overrides, fragment):
    with pytest.raises(RecipeError, match=fragment):
        load_recipe(Path(__file__).resolve().parents[1] / "recipes" / recipe, overrides)
    assert load_recipe(
        Path(__file__).resolve().parents[1] / "recipes" / "sasrec.yaml", ["train.batch_samples=64"]
    )
