"""DMAE / DMGIN / din_mm components: shapes, gradients and one behavioural property each, plus
the item-feature plumbing of the datamodule on real prepared data."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from rex.components.encoders.modality_table import ModalityTable
from rex.data.features import FEATURES_DIR
from rex.data.lance_io import read_columns
from rex.data.mirror import mirror_dir
from rex.data.prepare import prepare_dataset
from rex.datamodule import RexDataModule
from rex.errors import RecipeError
from rex.recipe import load_recipe
from rex.registry import build
from tests.conftest import REPO
from tests.test_components import assert_all_grads


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _features(num_items: int = 6, dims: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    dims = dims or {"text": 5, "image": 3}
    tables = {name: torch.randn(num_items, d) for name, d in dims.items()}
    for table in tables.values():
        table[0] = 0.0
    return tables


# --------------------------------------------------------------------------- encoder/modality_table


@pytest.mark.parametrize("finetune", [False, True])
def test_modality_table_shapes_and_grad(finetune: bool) -> None:
    table = ModalityTable(_features(), "text", dim=4, finetune=finetune)
    ids = torch.tensor([[0, 1, 5], [2, 2, 3]])
    out = table(ids)
    assert out.shape == (2, 3, 4)
    out.sum().backward()
    assert_all_grads(table)
    params = dict(table.named_parameters())
    assert ("table" in params) is finetune
    if finetune:
        assert params["table"].grad is not None and params["table"].grad[0].abs().sum() == 0


def test_modality_table_frozen_vectors_do_not_move_and_padding_feeds_zeros() -> None:
    features = _features()
    table = ModalityTable(features, "image", dim=4)
    torch.testing.assert_close(table.table, features["image"])
    assert "table" not in table.state_dict()  # read from the dataset, never from a checkpoint
    # id 0 feeds a zero vector: its output is exactly the projection's bias
    torch.testing.assert_close(table(torch.tensor([0]))[0], table.proj.bias)
    # same id, same output; the projection sees the pretrained row
    torch.testing.assert_close(table(torch.tensor([3]))[0], table.proj(features["image"][3]))


def test_modality_table_unknown_modality_names_the_available_ones() -> None:
    with pytest.raises(ValueError, match="'audio'.*image, text"):
        ModalityTable(_features(), "audio", dim=4)
    with pytest.raises(RecipeError, match="image, text"):
        build(
            {"_component_": "encoder/modality_table", "modality": "audio", "dim": 4},
            "model.text",
            {"item_features": _features()},
        )


def test_modality_table_is_built_from_context() -> None:
    built = build(
        {"_component_": "encoder/modality_table", "modality": "text", "dim": 4},
        "m",
        {"item_features": _features()},
    )
    assert isinstance(built, ModalityTable) and built.in_dim == 5


# --------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A data home with scientific_mm and ml-100k prepared from the mirror.

    The MiniLM caches of the working copy's data/_features are copied in when present, so the
    real (slow) encoder runs only where they are missing; the vectors are the real ones either way.
    """
    if mirror_dir() is None:
        pytest.skip("no data mirror (../shared/data or REX_DATA_MIRROR)")
    root = tmp_path_factory.mktemp("home")
    cache = REPO / "data" / FEATURES_DIR
    if cache.is_dir():
        shutil.copytree(cache, root / FEATURES_DIR)
    previous = os.environ.get("REX_DATA_HOME")
    os.environ["REX_DATA_HOME"] = str(root)
    for name in ("scientific_mm", "ml-100k"):
        prepare_dataset(name, root=root)
    yield root
    if previous is None:
        os.environ.pop("REX_DATA_HOME", None)
    else:
        os.environ["REX_DATA_HOME"] = previous


def _datamodule(root: Path, recipe: str, *overrides: str) -> RexDataModule:
    loaded = load_recipe(REPO / "recipes" / recipe, list(overrides))
    return RexDataModule(loaded.recipe, root / loaded.recipe.data.name, seed=0)


def test_item_features_are_indexed_by_item_id_with_a_zero_padding_row(home: Path) -> None:
    dm = _datamodule(home, "din.yaml", "data.name=scientific_mm")
    features = dm.context()["item_features"]
    assert set(features) == {"text", "image", "text_minilm"}
    raw = read_columns(home / "scientific_mm" / "items.lance", ["item", "image", "text_minilm"])
    for name, dim in (("image", 512), ("text_minilm", 384)):
        table = features[name]
        assert table.shape == (1586, dim) and table.dtype == torch.float32
        assert table[0].abs().sum() == 0
        torch.testing.assert_close(table[torch.as_tensor(raw["item"])], torch.as_tensor(raw[name]))
    # MiniLM vectors are unit-norm: the rows are real embeddings, not zeros
    assert torch.allclose(features["text_minilm"][1:].norm(dim=1), torch.ones(1585), atol=1e-4)


def test_item_features_are_empty_without_vectors(data_home: Path) -> None:
    dm = _datamodule(data_home, "din.yaml")  # beauty: an items view of ids only
    assert dm.context()["item_features"] == {}
