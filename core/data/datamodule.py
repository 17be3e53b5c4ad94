"""The one LightningDataModule: a prepared dataset's view, as batches named by role."""

from __future__ import annotations

import contextlib
import ctypes
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch
from torch import Tensor

from rex.config.errors import DataError
from rex.config.schema import Recipe
from rex.data.clusters import item_groups
from rex.data.features import attribute_field, item_attributes, item_vectors
from rex.data.lance_io import RaggedColumn, read_columns
from rex.data.loader import BatchLoader, Column, Ragged
from rex.data.schema import DatasetSchema, ViewSpec, load_schema

if TYPE_CHECKING:
    from rex.data.stream import StreamLoader
    from rex.data.tasks import Task

INT32 = np.iinfo(np.int32)


def release_freed_memory() -> None:
    """Hand memory freed by the reader back to the OS (glibc keeps freed heap pages otherwise,
    so the full-width buffers a split was read through would stay in RSS for the whole run)."""
    # Not glibc: nothing to trim, and the freed pages are merely reusable.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def column(raw: Any, max_len: int) -> Column:
    """A column as read from Lance, as the loader holds it: lists as :class:`Ragged`."""
    if isinstance(raw, RaggedColumn):
        # Compacted and given Ragged's zero prefix in one allocation: no full-width second copy.
        values = np.asarray(raw.values)
        prefixed = np.zeros(max_len + values.size, dtype=_id_dtype(values))
        prefixed[max_len:] = values
        offsets = compact_tensor(raw.offsets, compact=False)
        return Ragged(torch.from_numpy(prefixed), offsets, max_len, prefixed=True)
    return compact_tensor(raw)


def _id_dtype(ids: np.ndarray) -> type[np.signedinteger[Any]]:
    """int32 when every id fits, else int64."""
    fits = ids.size == 0 or (ids.min() >= INT32.min and ids.max() <= INT32.max)
    return np.int32 if fits else np.int64


def compact_tensor(column: Any, compact: bool = True) -> Tensor:
    """A column as a tensor: floats as float32; ids as int32 when they fit (``compact``).

    Ids are most of a split's memory, and int32 halves it; the loader widens each batch back
    to int64, which is what embeddings and losses index with.
    """
    array = np.asarray(column)
    if array.dtype.kind == "f":
        array = np.asarray(array, dtype=np.float32)
    else:
        array = np.asarray(array, dtype=_id_dtype(array) if compact else np.int64)
    if array.flags.writeable:
        return torch.from_numpy(array)
    # A zero-copy view of Arrow's read-only buffer. Loaders only ever read their columns
    # (index_select makes each batch), so sharing the buffer is safe and saves a copy of the data.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


class UserJoin:
    """Adds user-level list columns to a batch, gathered by its ``user`` ids.

    Each user's list is held once (row ``u`` = user ``u``) rather than copied into every row of
    that user. The row's own ``item`` is dropped from each list, as the prepared ``history``
    drops it, so a row never sees a behaviour on the item it is scored for.
    """

    def __init__(self, columns: dict[str, Ragged]) -> None:
        self.columns = columns

    def __call__(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        users = batch["user"].long()
        out = dict(batch)
        for name, column in self.columns.items():
            ids = column.gather(users).long()
            if "item" in batch:
                ids = ids.masked_fill(ids == batch["item"].long()[:, None], 0)
            out[name] = ids
        return out


def _then(first: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None, second: UserJoin | None) -> Any:
    """The composition of two optional batch transforms."""
    if first is None or second is None:
        return first or second
    return lambda batch: second(first(batch))


class LazyContext(Mapping[str, Any]):
    """Context values where a callable is computed on first lookup, then kept."""

    def __init__(self, values: dict[str, Any]) -> None:
        self._values = values

    def __getitem__(self, key: str) -> Any:
        value = self._values[key]
        if callable(value):
            value = self._values[key] = value()
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


class RexDataModule(L.LightningDataModule):
    """Reads the recipe's view of a prepared dataset, split by split, as its task says.

    Batches carry tensors by role: ``user``, ``item``, ``label``, ``history``, ``target``,
    the categorical feature fields, and for sequence training ``items``/``targets``.
    """

    def __init__(
        self, recipe: Recipe, dataset_dir: Path, seed: int, extra_context: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__()
        self.recipe = recipe
        self.task: Task = recipe.task_spec
        self.extra_context = dict(extra_context or {})
        self.dataset_dir = dataset_dir
        self.seed = seed
        self.schema: DatasetSchema = load_schema(dataset_dir)
        view = self.schema.views.get(recipe.data.view)
        if view is None:
            raise DataError(
                f"dataset {self.schema.name!r} has no {recipe.data.view!r} view "
                f"(it has: {', '.join(self.schema.views)})",
                file=str(dataset_dir / "schema.json"),
                key="data.view",
            )
        self.view: ViewSpec = view
        self._loaders: dict[str, BatchLoader | StreamLoader] = {}
        self._user_join: UserJoin | None = None
        self._item_features: dict[str, Tensor] | None = None

    # ------------------------------------------------------------------ what models may ask for
    def context(self) -> Mapping[str, Any]:
        """Values the builder passes to components that declare them (``num_items``, ``fields``...)."""
        fields = {
            name: spec.vocab_size
            for name, spec in self.view.fields.items()
            if spec.kind == "categorical" and spec.vocab_size is not None
        }
        roles: dict[str, str] = {}
        for name, spec in self.view.fields.items():
            if spec.role is not None:
                roles.setdefault(spec.role, name)
        return LazyContext(
            {
                "num_items": self.schema.num_items,
                "num_users": self.schema.num_users,
                "fields": fields,
                # role -> the (first) field with it, for components that read a field by role
                "roles": roles,
                "max_len": self.recipe.data.max_len,
                # Computed on first use only: a recipe pays for what its components ask for.
                "item_features": self.item_features,
                "item_groups": lambda: torch.from_numpy(item_groups(self.dataset_dir)),
                # (num_items, A) attribute ids per item, right-padded with 0; ids < num_attributes
                "item_attributes": lambda: torch.from_numpy(item_attributes(self.dataset_dir, self.schema)),
                "num_attributes": lambda: attribute_field(self.dataset_dir, self.schema)[1],
                # what earlier stages exported (item_codes, say)
                **self.extra_context,
            }
        )

    def item_features(self) -> dict[str, Tensor]:
        """Each ``modality:NAME`` vector of the ``items`` view as a float32 (num_items, d) tensor
        indexed by item id, keyed by NAME; row 0 (padding) is zeros. Empty without an ``items``
        view. Read once and kept: several components of one model share the same tensors.

        An earlier stage's export of one float row per item joins them under the export's name,
        so a later stage reads learnt item vectors (a SASRec stage's item embeddings, say) the
        way it reads the dataset's own content."""
        if self._item_features is None:
            vectors = item_vectors(self.dataset_dir, self.schema)
            features = {name: torch.from_numpy(array) for name, array in vectors.items()}
            for name, value in self.extra_context.items():
                if _item_vectors(value, self.schema.num_items):
                    features[name] = value.float()
            self._item_features = features
        return self._item_features

    # ------------------------------------------------------------------ loading
    def table(self, split: str) -> Path:
        """The Lance table of ``split`` in the recipe's view."""
        name = self.view.tables.get(split)
        if name is None:
            raise DataError(
                f"view {self.recipe.data.view!r} has no {split} table", file=str(self.dataset_dir)
            )
        return self.dataset_dir / f"{name}.lance"

    def read(self, split: str, names: list[str]) -> dict[str, Column]:
        """Columns of the split's table, as the loader holds them."""
        # One column at a time, each compacted before the next is read: the peak is the compact
        # data plus one column as read, rather than every column at full width.
        path, max_len = self.table(split), self.recipe.data.max_len
        columns = {name: column(read_columns(path, [name])[name], max_len) for name in names}
        release_freed_memory()
        return columns

    def user_join(self) -> UserJoin | None:
        """The join of ``data.user_columns`` from the ``users`` view (None when none are asked for)."""
        names = self.recipe.data.user_columns
        if not names or self._user_join is not None:
            return self._user_join
        schema_file = str(self.dataset_dir / "schema.json")
        view = self.schema.views.get("users")
        if view is None:
            raise DataError(
                f"dataset {self.schema.name!r} has no users view to join: remove data.user_columns "
                "(multi-behaviour datasets such as taobao_mb have one)",
                file=schema_file,
                key="data.user_columns",
            )
        missing = [n for n in names if n not in view.fields or view.fields[n].kind != "sequence"]
        if missing:
            lists = [n for n, f in view.fields.items() if f.kind == "sequence"]
            raise DataError(
                f"the users view has no list column {', '.join(missing)} (it has: {', '.join(lists)})",
                file=schema_file,
                key="data.user_columns",
            )
        raw = read_columns(self.dataset_dir / f"{view.tables['all']}.lance", ["user", *names])
        if not np.array_equal(np.asarray(raw["user"]), np.arange(self.schema.num_users)):
            raise DataError(
                f"the users table must hold row u = user u; rebuild with `rex data prepare {self.schema.name} --force`",
                file=schema_file,
            )
        columns = {n: column(raw[n], self.recipe.data.max_len) for n in names}
        self._user_join = UserJoin({n: c for n, c in columns.items() if isinstance(c, Ragged)})
        return self._user_join

    def loader(self, split: str) -> BatchLoader | StreamLoader:
        """The split's loader, read from Lance on first use (a test split is not read to train).
        With ``data.stream`` the train split is read a buffer at a time as it is served."""
        if split not in self._loaders:
            train = split == "train"
            if train and self.recipe.data.stream:
                self._loaders[split] = self._stream_loader()
                return self._loaders[split]
            columns = self.task.columns(self, split)
            budget = None
            if train and self.recipe.train.batch_samples is not None:
                weights = self.task.sample_weights(columns)
                assert weights is not None, "Task.check allows batch_samples only where rows hold samples"
                budget = (weights, self.recipe.train.batch_samples)
            self._loaders[split] = BatchLoader(
                columns,
                self.recipe.train.batch_size if train else self.recipe.eval.batch_size,
                shuffle=train,
                seed=self.seed,
                transform=_then(self.task.transform(split), self.user_join()),
                by_length=not train,
                budget=budget,
            )
        return self._loaders[split]

    def _stream_loader(self) -> StreamLoader:
        from rex.data.stream import StreamLoader  # it imports this module

        names = self.task.stream_columns(self)
        if names is None:
            raise DataError(
                f"task {self.recipe.task} builds its training rows from the table rather than "
                "serving them as stored, so they cannot be streamed: remove data.stream",
                key="data.stream",
            )
        data = self.recipe.data
        return StreamLoader(
            self.table("train"),
            names,
            self.recipe.train.batch_size,
            buffer_rows=data.stream_buffer_rows,
            max_len=data.max_len,
            seed=self.seed,
            transform=_then(self.task.transform("train"), self.user_join()),
        )

    def train_dataloader(self) -> BatchLoader | StreamLoader:
        return self._this_process(self.loader("train"))

    def val_dataloader(self) -> BatchLoader | StreamLoader:
        return self._this_process(self.loader("valid"))

    def test_dataloader(self) -> BatchLoader | StreamLoader:
        return self._this_process(self.loader("test"))

    def _this_process(self, loader: BatchLoader | StreamLoader) -> BatchLoader | StreamLoader:
        """The loader serving this process's share of each epoch, in a data-parallel run."""
        trainer = self.trainer
        if trainer is not None:
            try:
                loader.shard(trainer.global_rank, trainer.world_size)
            except ValueError as exc:
                raise DataError(f"{exc}: use fewer train.devices", key="train.devices") from exc
        return loader

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        # Lightning's own progress counters say how many batches of this epoch the model has
        # consumed; the loader's position would be ahead by the prefetched batch.
        trainer = self.trainer
        if trainer is None:
            return {}
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        return {
            "epoch": trainer.current_epoch,
            "batches": progress.processed,  # type: ignore[attr-defined]
            "processes": trainer.world_size,
            "mid_epoch": progress.processed < trainer.num_training_batches,  # type: ignore[attr-defined]
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        batches, processes = int(state["batches"]), int(state.get("processes", 1))
        trainer = self.trainer
        now = trainer.world_size if trainer is not None else 1
        if state.get("mid_epoch", False) and processes != now:
            # Mid-epoch, the batches already run were this many processes' shares: another
            # world size would split the epoch differently and repeat or skip rows.
            raise DataError(
                f"this checkpoint stopped mid-epoch in a run of {processes} process(es); resume it with "
                f"{processes} (train.devices × train.num_nodes), or from an epoch-end checkpoint",
                key="train.devices",
            )
        self.loader("train").skip_batches(int(state["epoch"]), batches)


def _item_vectors(value: Any, num_items: int) -> bool:
    return (
        isinstance(value, Tensor)
        and value.is_floating_point()
        and value.dim() == 2
        and len(value) == num_items
    )
