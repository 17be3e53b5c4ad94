"""``rex validate``: everything a run needs, checked without training."""

from __future__ import annotations

from pathlib import Path

import torch

from rex.config.errors import DataError
from rex.config.recipe import load_recipe
from rex.engine.build import build_run
from rex.engine.train import quiet_lightning


def validate_recipe(path: Path) -> str:
    """Load and build the recipe, read its data, and push one train and one validation batch
    through the model and losses, so a schema mismatch shows up here rather than mid-run."""
    quiet_lightning()
    loaded = load_recipe(path)
    recipe = loaded.recipe
    built = build_run(recipe, recipe.seeds[0], str(path))
    module, datamodule = built.module, built.datamodule
    train_batch = next(iter(datamodule.loader("train")))
    valid_batch = next(iter(datamodule.loader("valid")))
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
            file=str(path),
            key="model",
        ) from exc
    params = sum(p.numel() for p in module.parameters())
    return f"{recipe.model['_component_']} on {recipe.data.name}/{recipe.data.view}: {params:,} parameters"
