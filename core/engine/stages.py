"""Staged runs: a recipe's stages train in order inside one run folder.

``<run>/recipe.yaml`` holds the whole staged recipe; ``<run>/<stage>/`` is an ordinary run folder
for each stage (its resolved recipe, metrics.json, checkpoints) plus ``exports/<name>.lance``;
``<run>/stages.json`` records each finished stage; ``<run>/metrics.json`` is the last stage's,
with every stage's test metrics under ``stages``.

A stage may start from an earlier stage's trained modules (``init_from``), freeze modules
(``freeze``) and export artifacts (``export``). An export is a Lance table keyed by the stage's
resolved recipe, the seed, the data hash and the keys of the stages before it, so
``--reuse-stages`` takes over a finished stage only when everything it depended on is the same.
Later stages receive each export by name in their build context, as they receive ``num_items``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from rex.config.errors import DataError, RecipeError, RexError
from rex.config.recipe import LoadedRecipe, LoadedStage
from rex.data.lance_io import read_columns, read_metadata, vector_column, write_table
from rex.data.prepare import ensure_dataset
from rex.data.schema import data_hash
from rex.engine.build import Built
from rex.engine.distributed import barrier, is_main_process
from rex.engine.runs import (
    METRICS_FILE,
    RECIPE_FILE,
    STAGES_FILE,
    atomic_write_json,
    atomic_write_text,
    load_checkpoint,
    read_metrics,
)
from rex.engine.train import console, fit_and_test

EXPORTS = "exports"
KEY_METADATA = b"rex.export_key"


def run_stages(
    loaded: LoadedRecipe,
    seed: int,
    run_dir: Path,
    resume: bool = False,
    extra_callbacks: Sequence[Callback] = (),
    test: bool = True,
    reuse: Path | None = None,
) -> dict[str, Any]:
    """Run every stage of ``loaded`` for ``seed`` into ``run_dir``; the final metrics record.

    Resuming skips the stages ``stages.json`` lists as finished and continues the first
    unfinished one from its ``last.ckpt``. ``extra_callbacks`` (a sweep's pruner) watch the last
    stage, whose validation metric the run is selected on.
    """
    writer = is_main_process(loaded.recipe)
    if not resume and writer:
        atomic_write_text(
            run_dir / RECIPE_FILE, yaml.safe_dump({**loaded.resolved, "seed": seed}, sort_keys=False)
        )
    record = read_record(run_dir)
    context: dict[str, Tensor] = {}
    upstream: list[str] = []
    metrics: dict[str, Any] = {}
    for i, stage in enumerate(loaded.stages):
        stage_dir = run_dir / stage.name
        key = stage_key(stage, seed, upstream)
        done = record["stages"].get(stage.name, {})
        if done.get("key") == key:
            status = done["status"]
        elif reuse is not None and (earlier := _reusable(reuse, stage.name, key)) is not None:
            _copy_stage(earlier, stage_dir)
            status = "reused"
            console.print(f"stage {stage.name}: reused from {earlier}")
        else:
            last = i == len(loaded.stages) - 1
            console.rule(f"stage {i + 1}/{len(loaded.stages)}: {stage.name}")
            stage_dir.mkdir(exist_ok=True)
            fitted = fit_and_test(
                stage.recipe,
                stage.resolved,
                f"{loaded.path} (stage {stage.name})",
                seed,
                stage_dir,
                resume=(stage_dir / "checkpoints" / "last.ckpt").is_file(),
                extra_callbacks=extra_callbacks if last else (),
                test=test,
                context=context,
                before_fit=lambda built, stage=stage: init_from(built, stage, run_dir),  # type: ignore[misc]
            )
            _restore(fitted.built, fitted.best_checkpoint)
            for name, method in stage.config.export.items():
                value = export_value(fitted.built, name, method)
                if writer:
                    write_export(stage_dir / EXPORTS / f"{name}.lance", value, key)
            # The other processes of a data-parallel run read what the main one just wrote.
            barrier()
            status = "trained"
        context.update(read_exports(stage_dir, stage, key))
        metrics = read_metrics(stage_dir)
        record["stages"][stage.name] = {
            "key": key,
            "status": status,
            "test": metrics.get("test"),
            "exports": sorted(stage.config.export),
        }
        if writer:
            atomic_write_json(run_dir / STAGES_FILE, record)
        upstream.append(key)
    final = {**metrics, "stages": {name: entry.get("test") for name, entry in record["stages"].items()}}
    if writer:
        atomic_write_json(run_dir / METRICS_FILE, final)
    return final


def read_record(run_dir: Path) -> dict[str, Any]:
    path = run_dir / STAGES_FILE
    if not path.is_file():
        return {"stages": {}}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RexError(
            f"corrupt stage record ({exc}); delete it to rerun every stage", file=str(path)
        ) from exc


def stage_key(stage: LoadedStage, seed: int, upstream: list[str]) -> str:
    """What a stage's result depends on: its settings (logging aside) and what it is initialised
    from, the seed, the data and the stages before it."""
    settings = {k: v for k, v in stage.resolved.items() if k != "logging"}
    content = {
        "stage": stage.name,
        "recipe": settings,
        "seed": seed,
        "data": data_hash(ensure_dataset(stage.recipe.data.name)),
        "upstream": upstream,
    }
    if stage.config.init_from is not None:
        # Where a stage starts from is a setting too (stage.resolved leaves it out): otherwise a
        # from-scratch ablation, init_from=null, would take over the initialised stage's result.
        content["init_from"] = stage.config.init_from.model_dump(mode="json")
    if stage.config.export:
        # So are its exports: a later stage reads them, and stage.resolved leaves them out too
        # (an ablation with export={} must not take over a run whose stage exported codes).
        content["export"] = stage.config.export
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- between stages


def init_from(built: Built, stage: LoadedStage, run_dir: Path) -> None:
    """Copy the mapped modules' tensors from the named earlier stage's best checkpoint."""
    spec = stage.config.init_from
    if spec is None:
        return
    key = f"stages.{stage.name}.init_from"
    source_dir = run_dir / spec.stage
    if not (source_dir / METRICS_FILE).is_file():
        raise RecipeError(f"stage {spec.stage!r} has not run before {stage.name!r}", key=f"{key}.stage")
    best = read_metrics(source_dir).get("best", {}).get("checkpoint", "checkpoints/last.ckpt")
    copy_modules(load_checkpoint(source_dir / best)["state_dict"], built, stage)


def copy_modules(source: Mapping[str, Tensor], built: Built, stage: LoadedStage) -> None:
    """The tensors of the modules ``stage.init_from`` maps, from ``source`` into ``built``; any
    other tensor is left as built. Names and shapes are checked first."""
    spec = stage.config.init_from
    assert spec is not None
    key = f"stages.{stage.name}.init_from"
    target = built.module.state_dict()
    updates: dict[str, Tensor] = {}
    for src, dst in spec.modules.items():
        names = [n for n in source if n == src or n.startswith(f"{src}.")]
        if not names:
            raise RecipeError(f"stage {spec.stage!r} has no module {src!r}", key=f"{key}.modules")
        for name in names:
            to = dst + name[len(src) :]
            if to not in target:
                raise RecipeError(
                    f"this stage's model has no tensor {to!r} to copy {name!r} into", key=f"{key}.modules"
                )
            if target[to].shape != source[name].shape:
                raise RecipeError(
                    f"{name} {tuple(source[name].shape)} does not fit {to} {tuple(target[to].shape)}",
                    key=f"{key}.modules",
                )
            updates[to] = source[name]
    built.module.load_state_dict(updates, strict=False)


def _restore(built: Built, checkpoint: Path) -> None:
    """The best validation checkpoint's weights, so exports come from the selected model."""
    built.module.load_state_dict(load_checkpoint(checkpoint)["state_dict"])


def export_value(built: Built, name: str, method: str) -> Tensor:
    """``model.<method>()`` of the trained model (a dotted attribute such as
    ``item_embedding.weight`` works too), as a tensor."""
    value: Any = built.module.model
    for part in method.split("."):
        value = getattr(value, part, None)
        if value is None:
            raise RecipeError(
                f"the model has no method or attribute {method!r} to export", key=f"export.{name}"
            )
    built.module.eval()
    with torch.no_grad():
        value = value() if callable(value) else value
    if not isinstance(value, Tensor) or value.dim() not in (1, 2):
        raise RecipeError(f"{method} must give a 1-D or 2-D tensor (one row per item)", key=f"export.{name}")
    return value.detach().cpu()


def write_export(path: Path, value: Tensor, key: str) -> None:
    """One row per tensor row: ``row`` and ``value`` (a scalar or a fixed-size list)."""
    array = value.numpy()
    column = array if array.ndim == 1 else _fixed_list(array)
    table = pa.table({"row": np.arange(len(array)), "value": column})
    path.parent.mkdir(parents=True, exist_ok=True)
    write_table(path, table.replace_schema_metadata({KEY_METADATA: key.encode()}))


def _fixed_list(array: np.ndarray) -> pa.FixedSizeListArray:
    if array.dtype.kind == "f":
        return vector_column(array)
    return pa.FixedSizeListArray.from_arrays(pa.array(array.ravel()), array.shape[1])


def read_exports(stage_dir: Path, stage: LoadedStage, key: str) -> dict[str, Tensor]:
    """The stage's exports as tensors, checked against the key they were written under."""
    out = {}
    for name in stage.config.export:
        path = stage_dir / EXPORTS / f"{name}.lance"
        try:
            written = read_metadata(path).get(KEY_METADATA) if path.exists() else None
        except DataError as exc:  # a damaged export: its stage writes it again
            raise RexError(f"export {name!r} cannot be read; rerun the stage", file=str(path)) from exc
        if written != key.encode():
            raise RexError(
                f"export {name!r} is missing or was written by other settings; rerun the stage",
                file=str(path),
            )
        out[name] = torch.from_numpy(np.array(read_columns(path, ["value"])["value"]))
    return out


# --------------------------------------------------------------------------- --reuse-stages


def _reusable(earlier_run: Path, name: str, key: str) -> Path | None:
    """The earlier run's folder of stage ``name`` when it finished under the same key."""
    for run in (earlier_run, *sorted(earlier_run.glob("seed-*"))):
        entry = read_record(run)["stages"].get(name, {})
        if entry.get("key") == key:
            return run / name
    return None


def _copy_stage(source: Path, target: Path) -> None:
    """The stage folder copied whole (checkpoints hard-linked where the file system allows)."""
    if target.exists():
        shutil.rmtree(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, copy_function=_link_or_copy)
    os.replace(tmp, target)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def stage_contexts(loaded: LoadedRecipe, run_dir: Path) -> Mapping[str, Mapping[str, Tensor]]:
    """Each stage's build context from a finished run's exports (for ``rex eval``)."""
    record = read_record(run_dir)
    context: dict[str, Tensor] = {}
    out: dict[str, dict[str, Tensor]] = {}
    for stage in loaded.stages:
        out[stage.name] = dict(context)
        entry = record["stages"].get(stage.name)
        if entry is None:
            break
        context.update(read_exports(run_dir / stage.name, stage, entry["key"]))
    return out
