"""Diff-MSIN and M3BSR recipes on real data: every parameter learns from one real batch, the
ablation switches, deterministic scoring, and the user-keyed join of taobao_mb's view and cart
lists into CTR batches."""

from __future__ import annotations

import importlib.util
import math
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from rex.config.recipe import load_recipe
from rex.data.features import FEATURES_DIR
from rex.data.lance_io import read_columns
from rex.data.mirror import mirror_dir
from rex.data.prepare import prepare_dataset
from rex.engine.build import build_run
from tests.conftest import REPO, run_rex
from tests.test_components import assert_all_grads

pytestmark = pytest.mark.skipif(
    mirror_dir() is None, reason="no data mirror (../shared/data or REX_DATA_MIRROR)"
)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A data home with scientific_mm and taobao_mb prepared from the mirror. The working copy's
    MiniLM cache is copied in when present, so the slow encoder runs only where it is missing."""
    root = tmp_path_factory.mktemp("rex_data")
    cache = REPO / "data" / FEATURES_DIR
    if cache.is_dir():
        shutil.copytree(cache, root / FEATURES_DIR, dirs_exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("REX_DATA_HOME", str(root))
        for name in ("scientific_mm", "taobao_mb"):
            prepare_dataset(name, root=root)
        yield root


def _built(recipe: str, *overrides: str):  # type: ignore[no-untyped-def]
    loaded = load_recipe(REPO / "recipes" / recipe, ["train.batch_size=64", *overrides])
    return build_run(loaded.recipe, 0, recipe)


RECIPES = {
    "diff_msin.yaml": ["experts", "synergy", "fusion", "interest", "tables"],
    "m3bsr_scientific.yaml": ["denoisers", "experts", "router", "tables"],
    "m3bsr.yaml": ["denoisers", "experts", "router"],
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_every_parameter_gets_a_gradient_from_one_real_batch(home: Path, recipe: str) -> None:
    built = _built(recipe)
    batch = next(iter(built.datamodule.loader("train")))
    module = built.module
    module.train()
    # Gated cross-attention starts with gamma = 0, which blocks the gradient to the attention it
    # gates on the first step; open the gates so every parameter behind them is checked too.
    for name, param in module.model.named_parameters():
        if name.endswith("gamma"):
            param.data.fill_(0.5)
    outputs = module.model(batch)
    terms = [loss.module(outputs, batch) for loss in module.losses]
    assert all(torch.isfinite(t) for t in terms)
    # The auxiliary objectives are real terms, not constants.
    assert all(t.abs() > 0 for t in terms)
    sum(loss.weight * t for loss, t in zip(module.losses, terms, strict=True)).backward()
    for name in RECIPES[recipe]:
        component = getattr(module.model, name)
        assert sum(p.numel() for p in component.parameters()) > 0, name
        assert_all_grads(component)
    assert_all_grads(module.model)


@pytest.mark.parametrize(
    ("recipe", "switch", "gone"),
    [
        ("diff_msin.yaml", "model.synergy=null", "synergy"),
        ("m3bsr.yaml", "model.denoiser=null", "denoisers"),
        ("m3bsr_scientific.yaml", "model.denoiser=null", "denoisers"),
    ],
)
def test_ablation_switch_removes_the_module_and_its_loss(
    home: Path, recipe: str, switch: str, gone: str
) -> None:
    full, ablated = _built(recipe), _built(recipe, switch)
    removed = getattr(ablated.module.model, gone)
    assert removed is None or len(removed) == 0
    # the denoising loss is optional: it goes with the module whose outputs it reads, and only then
    assert "eps_mse" in {loss.name for loss in full.module.losses}
    assert "eps_mse" not in {loss.name for loss in ablated.module.losses}
    assert ablated.skipped_losses == ["eps_mse"] and full.skipped_losses == []
    batch = next(iter(ablated.datamodule.loader("train")))
    outputs = ablated.module.model(batch)
    assert torch.isfinite(sum(loss.module(outputs, batch) for loss in ablated.module.losses))
    assert sum(p.numel() for p in ablated.module.parameters()) < sum(
        p.numel() for p in full.module.parameters()
    )


def test_scores_are_deterministic_in_eval(home: Path) -> None:
    built = _built("diff_msin.yaml", "eval.batch_size=128")
    batch = next(iter(built.datamodule.loader("valid")))
    model = built.module.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(batch)["logit"], model(batch)["logit"])


def test_user_join_gathers_each_users_lists_without_the_rows_own_item(home: Path) -> None:
    built = _built("m3bsr.yaml", "data.max_len=5")
    loader = built.datamodule.loader("train")
    # The lists live once per user in the join, not as columns of the 1.85M-row table.
    assert "history_view" not in loader.columns and "history_cart" not in loader.columns
    batch = next(iter(loader))
    users = read_columns(home / "taobao_mb" / "users.lance", ["user", "history_view", "history_cart"])
    for name in ("history_view", "history_cart"):
        lists = users[name]
        assert batch[name].shape[0] == 64 and batch[name].shape[1] <= 5
        for row in range(64):
            user, item = int(batch["user"][row]), int(batch["item"][row])
            full = lists.values[lists.offsets[user] : lists.offsets[user + 1]].tolist()
            expected = [i for i in full[-5:] if i != item]
            got = [i for i in batch[name][row].tolist() if i > 0]
            assert got == expected, (name, row)
    # Some rows' own item is in their view list in the data, and is dropped from the batch.
    view = batch["history_view"]
    assert not (view == batch["item"][:, None]).any()


def test_user_columns_on_a_dataset_without_users_view_is_a_short_error(home: Path, tmp_path: Path) -> None:
    out = run_rex(
        "train",
        "recipes/diff_msin.yaml",
        "data.user_columns=[history_view]",
        f"logging.run_root={tmp_path}",  # a failed run must not leave a folder in the repo's runs/
        env={"REX_DATA_HOME": str(home)},
    )
    assert out.returncode == 2
    assert "data.user_columns" in out.stderr and "no users view" in out.stderr
    assert "Traceback" not in out.stderr


def _results_entries() -> list:  # type: ignore[type-arg]
    spec = importlib.util.spec_from_file_location("results", REPO / "scripts" / "results.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["results"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return list(module.ENTRIES)


def _structure(recipe: str, overrides: tuple[str, ...]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    model = _built(recipe, *overrides).module.model
    return tuple((name, tuple(value.shape)) for name, value in model.state_dict().items())


def _size(structure: tuple[tuple[str, tuple[int, ...]], ...]) -> int:
    return sum(math.prod(shape) for _, shape in structure)


@pytest.mark.parametrize("dataset", ["scientific_mm", "taobao_mb"])
def test_every_ablation_row_builds_a_model_unlike_any_other_row(home: Path, dataset: str) -> None:
    """An ablation removes one module: a row whose model is another row's by construction (as
    DMAE with sim_bucket=null was DIN's) is a duplicate, not a result."""
    entries = [e for e in _results_entries() if e.dataset == dataset and not e.runs_of]
    structures = {e.label: _structure(e.recipe, e.overrides) for e in entries}
    ablations = [e for e in entries if e.role == "ablation"]
    assert ablations
    for entry in ablations:
        ablated = structures[entry.label]
        assert all(ablated != other for label, other in structures.items() if label != entry.label), (
            entry.label
        )
        (paper,) = [e for e in entries if e.role == "paper" and e.recipe == entry.recipe]
        assert _size(ablated) < _size(structures[paper.label]), entry.label  # something was removed
