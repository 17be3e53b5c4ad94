"""Recipe → built objects for one seed: the data module, the model, its losses and evaluator."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn

from rex.config.errors import RecipeError, RexError
from rex.config.registry import build, load_plugins
from rex.config.schema import Recipe
from rex.data.datamodule import RexDataModule
from rex.data.prepare import ensure_dataset, repeated_targets
from rex.data.schema import data_hash
from rex.engine.allocator import available_memory
from rex.engine.module import RexModule, WeightedLoss
from rex.engine.optim import check_optimizer, check_scheduler, default_optimizer, freeze
from rex.eval.evaluators import Evaluator

# Keys of a loss node that belong to the core, not to the loss component.
LOSS_KEYS = ("weight", "optional")


@dataclass
class Built:
    datamodule: RexDataModule
    module: RexModule
    data_hash: str
    skipped_losses: list[str] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)
    history_masking: HistoryMasking | None = None


@dataclass(frozen=True)
class HistoryMasking:
    """``eval.exclude_history`` as a run applies it, and why: the recipe's own setting
    (``chosen``) or the default for its data, which depends on the evaluation targets that repeat
    an item of their history (``repeats`` of ``rows``)."""

    exclude: bool
    chosen: bool
    repeats: int
    rows: int

    def notice(self) -> str | None:
        """What to tell the user when the default decided on data with repeats."""
        if self.chosen or not self.repeats:
            return None
        return (
            f"eval.exclude_history defaults to false here: {self.repeats:,} of {self.rows:,} "
            "evaluation targets repeat an item of their history, which masking would make certain "
            "misses; set eval.exclude_history in the recipe to choose"
        )


def history_masking(recipe: Recipe, datamodule: RexDataModule) -> HistoryMasking | None:
    """How the evaluation splits' history is masked, for views whose rows hold a ``history`` and
    a ``target`` (None for other views, where the setting does not apply)."""
    fields = datamodule.view.fields
    if "history" not in fields or "target" not in fields:
        return None
    repeats = rows = 0
    for split in ("valid", "test"):
        if split in datamodule.view.tables:
            split_repeats, split_rows = repeated_targets(datamodule.table(split))
            repeats, rows = repeats + split_repeats, rows + split_rows
    chosen = recipe.eval.exclude_history
    exclude = chosen if chosen is not None else repeats == 0
    return HistoryMasking(exclude, chosen is not None, repeats, rows)


def build_run(
    recipe: Recipe, seed: int, source: str, extra_context: Mapping[str, Any] | None = None
) -> Built:
    """Data, model, losses, evaluator and optimizer settings for one seed.

    ``extra_context`` holds what earlier stages exported; components receive it by argument name
    like ``num_items``. Errors name the recipe file and key path.
    """
    L.seed_everything(seed, workers=True, verbose=False)
    try:
        dataset_dir = ensure_dataset(recipe.data.name)
    except RexError as exc:  # an unknown name, say: it is the recipe's data.name at fault
        if exc.file is None:
            exc.file, exc.key = source, exc.key or "data.name"
        raise
    datamodule = RexDataModule(recipe, dataset_dir, seed, extra_context)
    load_plugins(recipe.plugins)
    context = datamodule.context()
    masking = history_masking(recipe, datamodule)
    try:
        assert recipe.model is not None and recipe.losses is not None, "validated by Recipe"
        check_training_memory(recipe, context)
        model = build(recipe.model, "model", context)
        outputs = _declared_outputs(model)
        losses, skipped = _build_losses(recipe.losses, context, outputs)
        evaluator = build(
            recipe.eval.evaluator, "eval.evaluator", _evaluator_context(recipe, masking, context["roles"])
        )
        if not isinstance(evaluator, Evaluator):
            raise RecipeError("must be an eval/... component (see `rex list eval`)", key="eval.evaluator")
        _check_reads(evaluator.reads, outputs, "eval.evaluator", "this evaluator")
        optimizer = recipe.optimizer or default_optimizer(
            recipe.train.optimizer, recipe.train.lr, recipe.train.weight_decay
        )
        # Checked now; Lightning builds them with the parameters once training starts.
        check_optimizer(optimizer)
        if recipe.scheduler is not None:
            check_scheduler(recipe.scheduler)
        module = RexModule(
            model,
            losses,
            evaluator,
            optimizer,
            recipe.scheduler,
            str(recipe.eval.monitor),
            count_samples=datamodule.task.samples,
            compile_model=recipe.train.compile,
        )
        frozen = freeze(module, recipe.freeze)
    except RecipeError as exc:
        exc.file = exc.file or source
        raise
    return Built(datamodule, module, data_hash(dataset_dir), skipped, frozen, masking)


# Training holds each parameter four times over: weights, gradients and Adam's two moments.
TRAINING_COPIES = 4


def check_training_memory(recipe: Recipe, context: Mapping[str, Any]) -> None:
    """Refuse, before anything is allocated, a CPU model whose training state cannot fit in the
    memory the machine has left: the model is built once on the meta device (shapes, no data)
    and its parameters counted. A size that merely looks plausible would otherwise be allocated
    and only fail, or swap, once initialisation touches it."""
    if recipe.train.accelerator not in ("cpu", "auto") or torch.cuda.is_available():
        return
    # Whatever the meta build draws from a random generator, the real build must draw the same.
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            shapes = build(recipe.model, "model", context)
    except RecipeError:
        raise  # the same mistake the real build would report
    except Exception:  # noqa: BLE001 - a component needs real tensors to be built: it is built for real next
        return
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    parameters = dict(shapes.named_parameters())
    need = TRAINING_COPIES * sum(p.numel() * p.element_size() for p in parameters.values())
    available = available_memory()
    if available is None or need <= available:
        return
    name, largest = max(parameters.items(), key=lambda item: item[1].numel())
    raise RecipeError(
        f"training this model needs about {need / 1e9:,.1f} GB (weights, gradients and Adam state) "
        f"and the machine has {available / 1e9:,.1f} GB available; the largest parameter is "
        f"model.{name} {tuple(largest.shape)}: lower its sizes",
        key="model",
    )


def _declared_outputs(model: nn.Module) -> frozenset[str] | None:
    """The output names a model declares (``model.outputs``); None for a plugin that declares none."""
    outputs = getattr(model, "outputs", None)
    return frozenset(outputs) if outputs is not None else None


def _check_reads(reads: tuple[str, ...], outputs: frozenset[str] | None, key: str, what: str) -> None:
    missing = [name for name in reads if outputs is not None and name not in outputs]
    if missing:
        raise RecipeError(
            f"{what} reads model output {', '.join(missing)}, which the model does not produce "
            f"(it produces: {', '.join(sorted(outputs or ()))}); mark the loss `optional: true` "
            "if an ablation removes it",
            key=key,
        )


def _build_losses(
    nodes: list[dict[str, Any]], context: Mapping[str, Any], outputs: frozenset[str] | None
) -> tuple[list[WeightedLoss], list[str]]:
    """The weighted losses, minus the optional ones whose model outputs an ablation removed."""
    losses, skipped = [], []
    for i, node in enumerate(nodes):
        node = dict(node)
        weight = node.pop("weight", 1.0)
        optional = node.pop("optional", False)
        if not isinstance(weight, int | float) or isinstance(weight, bool):
            raise RecipeError(f"weight must be a number, got {weight!r}", key=f"losses[{i}].weight")
        if not isinstance(optional, bool):
            raise RecipeError(
                f"optional must be true or false, got {optional!r}", key=f"losses[{i}].optional"
            )
        module = build(node, f"losses[{i}]", context)
        name = str(node.get("_component_", "loss")).rsplit("/", 1)[-1]
        reads = tuple(getattr(module, "reads", ()))
        if optional and outputs is not None and not set(reads) <= outputs:
            skipped.append(name)
            continue
        _check_reads(reads, outputs, f"losses[{i}]", f"loss {node.get('_component_')}")
        losses.append(WeightedLoss(name, float(weight), module))
    if not losses:
        raise RecipeError("every loss was optional and skipped: nothing to train", key="losses")
    return losses, skipped


def _evaluator_context(
    recipe: Recipe, masking: HistoryMasking | None, roles: dict[str, str]
) -> dict[str, Any]:
    context: dict[str, Any] = {"metrics": list(recipe.eval.metrics or []), "roles": roles}
    if masking is not None:
        context["exclude_history"] = masking.exclude
    return context
