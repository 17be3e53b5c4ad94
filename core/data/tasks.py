"""Tasks: how a recipe's training and evaluation batches are built, and what selects models.

A task is a registered component (``task/ctr``, ``task/next_item``, ``task/items``,
``task/multi_objective``) that a recipe names in ``task:``. It binds the data view it reads by
default, the columns of each split, the transform that turns a training batch into model inputs,
and the default evaluator, metrics and monitor. Adding a task never means editing the core:
register a :class:`Task`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import TYPE_CHECKING

from rex.config.errors import RecipeError
from rex.config.registry import entries, register

# Types only: importing a task (to read a recipe's defaults) must not import torch or the data
# stack, so that `rex show` starts fast; methods that read data import what they use.
if TYPE_CHECKING:
    from torch import Tensor

    from rex.config.schema import Recipe
    from rex.data.datamodule import RexDataModule
    from rex.data.loader import Column

    Transform = Callable[[dict[str, Tensor]], dict[str, Tensor]]
RANKING = tuple(f"{m}@{k}" for m in ("recall", "ndcg", "mrr") for k in (5, 10, 20))


class Task:
    """Base class of tasks. Subclasses set the class attributes and override what differs."""

    view: str = ""
    evaluator: str = ""
    metrics: tuple[str, ...] = ()
    monitor: str = ""

    def check(self, recipe: Recipe) -> None:
        """Raise ValueError when the recipe's settings cannot work for this task."""
        if recipe.train.batch_samples is not None:
            raise ValueError("train.batch_samples applies to task next_item only; use train.batch_size")

    def columns(self, data: RexDataModule, split: str) -> dict[str, Column]:
        """The split's columns, read from the view's table (``valid`` and ``test`` alike)."""
        return data.read(split, _stored_columns(data))

    def stream_columns(self, data: RexDataModule) -> list[str] | None:
        """The training table's columns that ``data.stream`` reads a buffer at a time: those
        :meth:`columns` reads, where the task serves them as stored; None for a task that builds
        its columns otherwise (next_item drops and windows sequences), which cannot stream."""
        return _stored_columns(data) if type(self).columns is Task.columns else None

    def transform(self, split: str) -> Transform | None:
        """What turns a loader batch into model inputs; None leaves it as read."""
        return None

    def sample_weights(self, columns: dict[str, Column]) -> Tensor | None:
        """Training samples per row, for ``train.batch_samples``; None when rows are samples."""
        return None

    def samples(self, batch: dict[str, Tensor]) -> int:
        """Supervised predictions in a training batch, the unit of samples/s: one per row here."""
        return int(next(iter(batch.values())).shape[0])


@register("task/ctr")
class ClickTask(Task):
    """Click-through-rate prediction: one labelled (user, item, features) row per sample."""

    view = "ctr"
    evaluator = "eval/click"
    metrics = ("auc", "gauc", "logloss")
    monitor = "auc"


@register("task/next_item")
class NextItemTask(Task):
    """Next-item prediction under leave-one-out: training sequences supervise every position;
    evaluation rows are a ``history`` (the model's last ``max_len`` items), its held-out
    ``target``, and ``seen``, the whole history, which the evaluator excludes from the ranking."""

    view = "sequence"
    evaluator = "eval/ranking"
    metrics = RANKING
    monitor = "ndcg@10"

    def check(self, recipe: Recipe) -> None:
        if recipe.eval.protocol != "leave_one_out":
            raise ValueError("task next_item needs eval.protocol: leave_one_out")
        samples = recipe.train.batch_samples
        if samples is not None and samples < recipe.data.max_len:
            raise ValueError(
                f"train.batch_samples ({samples}) must be at least data.max_len "
                f"({recipe.data.max_len}): one sequence holds up to max_len samples"
            )

    def columns(self, data: RexDataModule, split: str) -> dict[str, Column]:
        from rex.data.sequences import next_item_columns

        return next_item_columns(data, split)

    def transform(self, split: str) -> Transform | None:
        from rex.data.sequences import next_item_pairs

        return next_item_pairs if split == "train" else None

    def sample_weights(self, columns: dict[str, Column]) -> Tensor | None:
        from rex.data.loader import Ragged

        items = columns["items"]
        assert isinstance(items, Ragged)
        return items.lengths() - 1  # inputs with a next item

    def samples(self, batch: dict[str, Tensor]) -> int:
        """One per position with a next item (every position is supervised), as the benchmarks
        count them."""
        return int((batch["targets"] > 0).sum())


@register("task/items")
class ItemsTask(Task):
    """Item-level training, such as a semantic-ID tokenizer: every split is the ``item`` ids
    1 .. num_items - 1 (the content is the item's own, so no split can leak a label), shuffled
    for training. Models read the items' content from context (``item_features``)."""

    view = "items"
    evaluator = "eval/reconstruction"
    metrics = ("recon_mse", "codebook_usage", "collision_rate")
    monitor = "recon_mse"

    def columns(self, data: RexDataModule, split: str) -> dict[str, Column]:
        import torch

        return {"item": torch.arange(1, data.schema.num_items, dtype=torch.int32)}


@register("task/multi_objective")
class MultiObjectiveTask(Task):
    """Multi-objective retrieval (view, cart, buy): training rows are (user, item, objective)
    pairs with the user's behaviour lists joined by user id; evaluation rows hold each objective's
    held-out item, ranked by the model against every item (``eval/retrieval``). See
    :mod:`rex.data.objectives`."""

    view = "retrieval"
    evaluator = "eval/retrieval"
    metrics = ("recall@50", "recall@200", "ndcg@50")
    monitor = "ndcg@50"

    def __init__(self) -> None:
        self._join: Transform | None = None

    def columns(self, data: RexDataModule, split: str) -> dict[str, Column]:
        from rex.data.objectives import objective_columns

        columns, join = objective_columns(data, split)
        if join is not None:
            # The join holds the users' lists, read here from the view's users table; the
            # datamodule asks for a split's transform right after its columns.
            self._join = join
        return columns

    def transform(self, split: str) -> Transform | None:
        if split != "train":
            return None
        assert self._join is not None, "columns('train') reads the lists the join needs"
        return self._join


def _stored_columns(data: RexDataModule) -> list[str]:
    """The view's columns a row is served with: every non-list field, and the ``history`` list."""
    return [n for n, spec in data.view.fields.items() if spec.kind != "sequence" or n == "history"]


def task_named(name: str) -> Task:
    """The registered task ``task/NAME``; a RecipeError listing the tasks otherwise."""
    tasks = {entry.key.split("/", 1)[1]: entry for entry in entries("task")}
    if name not in tasks:
        close = difflib.get_close_matches(name, list(tasks), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise RecipeError(f"unknown task {name!r} ({hint}tasks: {', '.join(sorted(tasks))})", key="task")
    task: Task = tasks[name].target()
    return task
