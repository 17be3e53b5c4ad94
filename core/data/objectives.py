"""Multi-objective retrieval data: the rows ``task/multi_objective`` serves from a ``retrieval``
view (taobao_mb's view, cart and buy, or tmall_mb's collect, cart and buy, as objectives; see
:mod:`rex.data.datasets.behavior`).

The view names its objectives by field role, in funnel order: ``target:<name>`` (a held-out item
per user, 0 for none) and ``history:<name>`` (the user's known items of that behaviour).

* Training rows are (``user``, ``item``, ``objective`` 1..K) pairs; each batch gets the user's
  ``history_<name>`` lists joined by user id from the view's ``users`` table, without the row's
  own item in the list of the row's own behaviour (the pair it is trained to retrieve). Its other
  lists keep it: a carted item the user also viewed is in the view list, as a test cart's may be.
* Evaluation rows: ``user``, the lists (the model reads each list's last ``max_len`` items),
  ``target_<name>`` and ``seen_<name>``, the whole list, which the evaluator excludes from
  objective ``name``'s ranking (its own known items can never be its held-out item).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from rex.config.errors import DataError
from rex.data.datamodule import column
from rex.data.lance_io import read_columns
from rex.data.loader import Column, Ragged
from rex.data.sequences import whole_lists

if TYPE_CHECKING:
    from rex.data.datamodule import RexDataModule
    from rex.data.schema import ViewSpec


def objective_fields(view: ViewSpec) -> dict[str, tuple[str, str]]:
    """Objective name -> (its history field, its target field), in the view's (funnel) order."""
    by_role = {spec.role: name for name, spec in view.fields.items() if spec.role}
    names = [role.split(":", 1)[1] for role in by_role if role.startswith("target:")]
    missing = [name for name in names if f"history:{name}" not in by_role]
    if not names or missing:
        raise DataError(
            "a multi-objective view needs a target:<name> and a history:<name> field per objective "
            "(the retrieval views of taobao_mb and tmall_mb have them)",
            key="data.view",
        )
    return {name: (by_role[f"history:{name}"], by_role[f"target:{name}"]) for name in names}


class ObjectiveJoin:
    """Adds each user's behaviour lists to a training batch, by its ``user`` ids; the list of the
    row's own objective loses the row's ``item``.

    The lists are held once per user (row ``u`` = user ``u``), as :class:`rex.data.datamodule.UserJoin`
    holds them, which drops the item from every list instead.
    """

    def __init__(self, lists: dict[str, Ragged]) -> None:
        self.lists = lists  # history field -> lists, in objective order (objective k is k + 1)

    def __call__(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        users, item, objective = batch["user"].long(), batch["item"].long(), batch["objective"].long()
        out = dict(batch)
        for k, (name, lists) in enumerate(self.lists.items(), start=1):
            ids = lists.gather(users).long()
            out[name] = ids.masked_fill((ids == item[:, None]) & (objective[:, None] == k), 0)
        return out


def objective_columns(data: RexDataModule, split: str) -> tuple[dict[str, Column], ObjectiveJoin | None]:
    """The split's columns, and for training the join that completes its batches."""
    fields = objective_fields(data.view)
    histories = [history for history, _ in fields.values()]
    if split != "train":
        columns = data.read(split, ["user", *histories, *(target for _, target in fields.values())])
        for name, (history, _) in fields.items():
            columns[f"seen_{name}"] = whole_lists(columns[history])
        return columns, None
    table = data.view.tables.get("users")
    if table is None:
        raise DataError(
            f"view {data.recipe.data.view!r} has no users table to join the lists from", key="data.view"
        )
    raw = read_columns(data.dataset_dir / f"{table}.lance", ["user", *histories])
    users = torch.from_numpy(np.array(raw.pop("user"), dtype=np.int64))
    if not torch.equal(users, torch.arange(len(users))):
        raise DataError(f"{table}.lance must hold row u = user u", file=str(data.dataset_dir))
    lists = {name: column(raw[name], data.recipe.data.max_len) for name in histories}
    assert all(isinstance(c, Ragged) for c in lists.values())
    join = ObjectiveJoin({name: c for name, c in lists.items() if isinstance(c, Ragged)})
    return data.read(split, ["user", "item", "objective"]), join
