"""Recipe → built objects for one seed: the data module, the model and its weighted losses."""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L

from rex.config.errors import RecipeError
from rex.config.registry import build, load_plugins
from rex.config.schema import Recipe
from rex.data.datamodule import RexDataModule
from rex.data.prepare import ensure_dataset
from rex.data.schema import data_hash
from rex.engine.module import RexModule, WeightedLoss
from rex.eval.evaluators import make_evaluator


@dataclass
class Built:
    datamodule: RexDataModule
    module: RexModule
    data_hash: str


def build_run(recipe: Recipe, seed: int, source: str) -> Built:
    """Data, model and losses for one seed; errors name the recipe file and key path."""
    L.seed_everything(seed, workers=True, verbose=False)
    dataset_dir = ensure_dataset(recipe.data.name)
    datamodule = RexDataModule(recipe, dataset_dir, seed)
    load_plugins(recipe.plugins)
    context = datamodule.context()
    try:
        model = build(recipe.model, "model", context)
        losses = []
        for i, node in enumerate(recipe.losses):
            node = dict(node)
            weight = node.pop("weight", 1.0)
            if not isinstance(weight, int | float):
                raise RecipeError(f"weight must be a number, got {weight!r}", key=f"losses[{i}].weight")
            module = build(node, f"losses[{i}]", context)
            name = str(node.get("_component_", "loss")).rsplit("/", 1)[-1]
            losses.append(WeightedLoss(name, float(weight), module))
    except RecipeError as exc:
        exc.file = exc.file or source
        raise
    module = RexModule(model, losses, make_evaluator(recipe), recipe.train, str(recipe.eval.monitor))
    return Built(datamodule, module, data_hash(dataset_dir))
