"""Registry and builder: typed argument validation, factories, context, plugins."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from rex.components.encoders.mlp import MLP
from rex.config.errors import RecipeError
from rex.config.registry import (
    ComponentFactory,
    build,
    entries,
    load_plugins,
    lookup,
    summaries,
    type_matches,
)
from tests.conftest import REPO


def test_every_builtin_kind_is_registered_without_importing_it_first():
    kinds = {e.key.split("/")[0] for e in entries()}
    assert {"model", "encoder", "embedding", "attention", "interaction", "loss", "metric"} <= kinds


def test_short_name_and_full_name_find_the_same_component():
    assert lookup("transformer").key == "encoder/transformer"
    assert lookup("encoder/transformer").target is lookup("transformer").target


def test_unknown_component_suggests_the_close_name():
    with pytest.raises(RecipeError, match=r"did you mean encoder/transformer"):
        build({"_component_": "encoder/transfomer", "dim": 8}, "model.encoder")


def test_unknown_argument_names_the_path_and_suggests():
    with pytest.raises(RecipeError) as info:
        build({"_component_": "encoder/transformer", "dim": 8, "nmu_layers": 2}, "model.encoder")
    assert info.value.key == "model.encoder.nmu_layers"
    assert "did you mean num_layers" in str(info.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("big", "expected int"), (2.5, "expected int"), (True, "expected int")],
)
def test_wrong_type_is_rejected(value, expected):
    with pytest.raises(RecipeError, match=expected):
        build({"_component_": "encoder/transformer", "dim": value}, "m")


def test_missing_required_argument_is_named():
    with pytest.raises(RecipeError, match="missing required argument dim"):
        build({"_component_": "encoder/transformer"}, "m")


def test_literal_and_list_types_are_checked():
    with pytest.raises(RecipeError, match="expected"):
        build({"_component_": "encoder/mlp", "in_dim": 4, "hidden": [8], "activation": "swish"}, "m")
    with pytest.raises(RecipeError, match="expected list"):
        build({"_component_": "encoder/mlp", "in_dim": 4, "hidden": ["8"]}, "m")


def test_float_accepts_int_but_not_bool():
    assert type_matches(1, float)
    assert not type_matches(True, float)
    assert type_matches(None, int | None)
    assert not type_matches({"a": "x"}, dict[str, int])


def test_factory_arguments_are_completed_by_the_parent():
    model = build(
        {
            "_component_": "model/sequential",
            "max_len": 10,
            "encoder": {"_component_": "encoder/transformer", "num_layers": 1, "num_heads": 2},
        },
        "model",
        {"num_items": 20},
    )
    from rex.components.encoders.transformer import TransformerEncoder

    assert isinstance(model.encoder, TransformerEncoder)
    assert model.item_embedding.num_embeddings == 20  # from the context
    assert model.encoder(torch.zeros(2, 3, 64), None).shape == (2, 3, 64)  # the parent passed dim=64


def test_factory_missing_argument_reports_recipe_path():
    node = {"_component_": "encoder/mlp", "hidden": [4]}
    from rex.config.registry import _build

    factory = _build(node, "model.tower", {}, as_factory=True)
    assert isinstance(factory, ComponentFactory)
    assert isinstance(factory(in_dim=3), MLP)
    with pytest.raises(RecipeError, match="missing required argument in_dim") as info:
        factory()
    assert info.value.key == "model.tower"


def test_context_fills_only_missing_required_arguments():
    emb = build({"_component_": "embedding/field", "dim": 4}, "e", {"fields": {"user": 5, "item": 7}})
    assert emb.names == ["user", "item"]
    explicit = build(
        {"_component_": "embedding/field", "dim": 4, "fields": {"x": 2}}, "e", {"fields": {"user": 5}}
    )
    assert explicit.names == ["x"]


def test_plugins_must_be_importable_and_can_register(tmp_path, monkeypatch):
    (tmp_path / "my_rex_plugin.py").write_text(
        "from torch import nn\nfrom rex.config.registry import register\n\n"
        "@register('encoder/identity_test')\nclass Identity(nn.Module):\n"
        "    '''Returns its input.'''\n    def __init__(self, dim: int) -> None:\n        super().__init__()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RecipeError, match="encoder/identity_test|unknown component"):
        build({"_component_": "encoder/identity_test", "dim": 2})
    load_plugins(["my_rex_plugin"])
    assert build({"_component_": "encoder/identity_test", "dim": 2}) is not None
    with pytest.raises(RecipeError, match="cannot import plugin module"):
        load_plugins(["no_such_rex_plugin"])


def test_a_plugin_that_only_imports_builtins_registers_nothing(tmp_path, monkeypatch):
    # Importing a built-in component module registers built-ins, not the plugin's own.
    (tmp_path / "borrowing_plugin.py").write_text("from rex.components.models import tiger\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RecipeError, match="registers no component"):
        load_plugins(["borrowing_plugin"])


def test_the_builtin_index_is_current():
    # components.json is generated from the modules; a component added, renamed or redocumented
    # without regenerating it fails here with the command that fixes it.
    result = subprocess.run(
        [sys.executable, "-m", "rex.config.index", "--check"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert {key for key, _ in summaries()} == {entry.key for entry in entries()}


def test_reading_a_recipe_and_listing_components_import_no_component():
    # rex show and rex list start fast because neither imports torch or a component module;
    # a lookup imports only the module of the component it finds.
    code = (
        "import sys\n"
        "from rex.config.recipe import load_recipe\n"
        "from rex.config.registry import lookup, summaries\n"
        "load_recipe('recipes/tiger.yaml'); summaries()\n"
        "print(sorted(m for m in ('torch', 'lightning', 'lance') if m in sys.modules))\n"
        "lookup('encoder/mlp')\n"
        "print('rex.components.encoders.mlp' in sys.modules, 'rex.components.models.tiger' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert result.stdout.split("\n")[:2] == ["[]", "True False"]
