"""``rex validate``: everything a run needs, checked without training."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from rex.config.errors import DataError, RecipeError
from rex.config.recipe import load_recipe
from rex.config.schema import Recipe
from rex.engine.build import Built, build_run
from rex.engine.stages import copy_modules, export_value
from rex.engine.train import quiet_lightning


def validate_recipe(path: Path) -> str:
    """Load and build the recipe, read its data, and push one train and one validation batch
    through the model and losses, so a schema mismatch shows up here rather than mid-run.

    A staged recipe is checked stage by stage: each later stage is built with what the earlier
    stages export from their (untrained) models, and its init_from mapping is applied."""
    quiet_lightning()
    loaded = load_recipe(path)
    if not loaded.stages:
        return _check(loaded.recipe, build_run(loaded.recipe, loaded.recipe.seeds[0], str(path)), str(path))
    context: dict[str, Tensor] = {}
    states: dict[str, dict[str, Tensor]] = {}
    summaries = []
    for stage in loaded.stages:
        source = f"{path} (stage {stage.name})"
        built = build_run(stage.recipe, stage.recipe.seeds[0], source, context)
        if stage.config.init_from is not None:
            if stage.config.init_from.stage not in states:
                raise RecipeError(
                    f"init_from names {stage.config.init_from.stage!r}, which is not an earlier stage",
                    file=str(path),
                    key=f"stages.{stage.name}.init_from.stage",
                )
            copy_modules(states[stage.config.init_from.stage], built, stage)
        summaries.append(f"{stage.name}: {_check(stage.recipe, built, source)}")
        states[stage.name] = built.module.state_dict()
        context.update(
            {name: export_value(built, name, method) for name, method in stage.config.export.items()}
        )
    return "; ".join(summaries)


# A few validation rows check the evaluator's reads as well as a whole batch does, and a
# generative evaluator's beam search over a whole batch would take most of the check's time.
VALID_ROWS = 16


def _first_rows(batch: dict[str, Tensor], rows: int) -> dict[str, Tensor]:
    """``batch`` cut to its first ``rows`` rows (a field with another leading size is kept whole)."""
    size = next(iter(batch.values())).shape[0]
    return {name: value[:rows] if value.shape[0] == size else value for name, value in batch.items()}


def _check(recipe: Recipe, built: Built, source: str) -> str:
    module, datamodule = built.module, built.datamodule
    train_batch = next(iter(datamodule.loader("train")))
    valid_batch = _first_rows(next(iter(datamodule.loader("valid"))), VALID_ROWS)
    try:
        module.train()
        outputs = module.model(train_batch)
        for loss in module.losses:
            loss.module(outputs, train_batch)
        module.eval()
        module.evaluator.reset()
        with torch.no_grad():
            module.evaluator.update(module.model, valid_batch)
    except KeyError as exc:
        raise DataError(
            f"the model needs batch field {exc} that view {recipe.data.view!r} of {recipe.data.name!r} "
            f"does not have (it has: {', '.join(sorted(train_batch))})",
            file=source,
            key="model",
        ) from exc
    params = sum(p.numel() for p in module.parameters())
    assert recipe.model is not None
    return f"{recipe.model['_component_']} on {recipe.data.name}/{recipe.data.view}: {params:,} parameters"
