"""Training and evaluation runs: recipe → data, model, Trainer → run folder."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger
from rich.console import Console
from rich.table import Table
from torch import Tensor

from rex.config.errors import RexError
from rex.config.recipe import LoadedRecipe, load_recipe
from rex.config.schema import Recipe
from rex.engine.allocator import reuse_freed_memory
from rex.engine.build import Built, build_run
from rex.engine.distributed import (
    RUN_DIR_ENV,
    is_distributed,
    is_main_process,
    shared_run_dir,
)
from rex.engine.runs import (
    ENV_FILE,
    METRICS_FILE,
    RECIPE_FILE,
    STAGES_FILE,
    AtomicCheckpointIO,
    MetricsRecorder,
    atomic_write_json,
    atomic_write_text,
    environment,
    load_checkpoint,
    new_run_dir,
    read_metrics,
)

console = Console(stderr=True, emoji=False)  # user text (names, ids) is printed as written
CHECKPOINTS = "checkpoints"


def quiet_lightning() -> None:
    """Keep Lightning's start-up chatter and known-harmless warnings out of the run output."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*Checkpoint directory.*exists and is not empty.*")
    warnings.filterwarnings("ignore", message=".*is not a `torch.utils.data.DataLoader`.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
    # Evaluation metrics are computed once over every process's rows (rex.eval.gather), so
    # Lightning's advice to average them over processes does not apply.
    warnings.filterwarnings("ignore", message=".*when logging on epoch level in distributed setting.*")


class Throughput(Callback):
    """Training samples per second over the run, excluding validation; a sample is what the
    task counts (a row for CTR, a position with a next item for next-item training)."""

    def __init__(self, count: Callable[[dict[str, Tensor]], int]) -> None:
        self.count = count
        self.samples = 0
        self.seconds = 0.0
        self._start = 0.0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.seconds += time.perf_counter() - self._start
        self.samples += self.count(batch)


def _loggers(recipe: Recipe, run_dir: Path) -> list[Logger]:
    # version=None: a resumed run logs to csv/version_1 rather than deleting version_0's epochs
    loggers: list[Logger] = [CSVLogger(save_dir=str(run_dir), name="csv", version=None)]
    if recipe.logging.wandb is not None:
        from rex.engine.tracking import wandb_logger

        logger = wandb_logger(recipe.logging.wandb, run_dir, recipe.name)
        if logger is not None:
            loggers.append(logger)
    return loggers


def _trainer(recipe: Recipe, run_dir: Path, callbacks: list[Callback]) -> L.Trainer:
    cfg = recipe.train
    return distributed_trainer(
        recipe,
        default_root_dir=str(run_dir),
        max_epochs=cfg.max_epochs,
        precision=cfg.precision,
        gradient_clip_val=cfg.grad_clip,
        limit_train_batches=cfg.limit_train_batches,
        limit_val_batches=cfg.limit_eval_batches,
        limit_test_batches=cfg.limit_eval_batches,
        num_sanity_val_steps=0,
        enable_model_summary=False,
        enable_progress_bar=recipe.logging.progress_bar,
        log_every_n_steps=recipe.logging.log_every_n_steps,
        logger=_loggers(recipe, run_dir),
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
    )


def distributed_trainer(recipe: Recipe, **settings: Any) -> L.Trainer:
    """A Trainer on the recipe's accelerator, devices, nodes and strategy.

    Lightning launches and joins the processes (its own launcher, torchrun or SLURM); a setting
    it refuses (fsdp without GPUs, deepspeed not installed, more devices than there are) is the
    recipe's error."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    cfg = recipe.train
    try:
        return L.Trainer(
            accelerator=cfg.accelerator,
            devices=cfg.devices,
            num_nodes=cfg.num_nodes,
            strategy=cfg.strategy,  # ddp on CPU uses gloo: Lightning picks it from the accelerator
            **settings,
        )
    except (MisconfigurationException, ImportError, RuntimeError, ValueError) as exc:
        raise RexError(
            f"Lightning cannot run accelerator={cfg.accelerator}, devices={cfg.devices}, "
            f"num_nodes={cfg.num_nodes}, strategy={cfg.strategy}: {str(exc).splitlines()[0]}",
            key="train.strategy",
        ) from exc


def run_one(
    loaded: LoadedRecipe,
    seed: int,
    run_dir: Path,
    resume: bool = False,
    extra_callbacks: Sequence[Callback] = (),
    test: bool = True,
    reuse: Path | None = None,
) -> dict[str, Any]:
    """Train one seed into ``run_dir`` (or continue it), then test the best checkpoint once.

    ``extra_callbacks`` run after the metrics recorder (a sweep's pruning callback sees an epoch
    only once it is in metrics.json). ``test=False`` leaves the test split untouched: sweep
    trials select on validation only, and only the final re-run of the best trial is tested.
    A staged recipe runs its stages in order (see :mod:`rex.engine.stages`); ``reuse`` names an
    earlier run whose finished stages with the same settings are taken over rather than rerun.
    """
    if loaded.stages:
        from rex.engine.stages import run_stages

        return run_stages(loaded, seed, run_dir, resume, extra_callbacks, test, reuse)
    return fit_and_test(
        loaded.recipe, loaded.resolved, str(loaded.path), seed, run_dir, resume, extra_callbacks, test
    ).metrics


class StepCheckpoint(ModelCheckpoint):
    """last.ckpt every n training steps, except after an epoch's last batch.

    Lightning resumes a checkpoint taken after the last batch as if that epoch's validation had
    run, so a run killed between that batch and the end of validation would skip the validation
    (and its model selection) on resume. The epoch-end last.ckpt, written after validation,
    covers that batch instead."""

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx + 1 < trainer.num_training_batches:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


@dataclass
class Fitted:
    """A finished fit: what metrics.json holds, the trained objects and the best checkpoint."""

    metrics: dict[str, Any]
    built: Built
    best_checkpoint: Path


def fit_and_test(
    recipe: Recipe,
    resolved: dict[str, Any],
    source: str,
    seed: int,
    run_dir: Path,
    resume: bool = False,
    extra_callbacks: Sequence[Callback] = (),
    test: bool = True,
    context: Mapping[str, Any] | None = None,
    before_fit: Callable[[Built], None] | None = None,
) -> Fitted:
    """One recipe (or one stage) trained into ``run_dir``: see :func:`run_one`. ``context`` holds
    earlier stages' exports; ``before_fit`` prepares the built module (a stage's init_from)."""
    quiet_lightning()
    reuse_freed_memory()
    if recipe.train.num_threads:
        torch.set_num_threads(recipe.train.num_threads)
    built = build_run(recipe, seed, source, context)
    if built.skipped_losses:
        console.print(
            f"[dim]optional losses skipped (their model outputs are absent): {', '.join(built.skipped_losses)}[/]"
        )
    notice = built.history_masking.notice() if built.history_masking else None
    if notice:
        console.print(notice, style="yellow", markup=False, highlight=False)
    if before_fit is not None and not resume:
        before_fit(built)
    writer = is_main_process(recipe)
    if not resume and writer:
        atomic_write_text(run_dir / RECIPE_FILE, yaml.safe_dump({**resolved, "seed": seed}, sort_keys=False))
        atomic_write_json(run_dir / ENV_FILE, environment(built.data_hash))
    monitor = f"val/{recipe.eval.monitor}"
    ckpt_dir = run_dir / CHECKPOINTS
    best = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="best",
        monitor=monitor,
        mode=recipe.monitor_mode,
        save_top_k=1,
        save_last=True,
        enable_version_counter=False,
    )
    callbacks: list[Callback] = [best]
    if recipe.train.checkpoint_every_n_steps:
        callbacks.append(
            StepCheckpoint(
                dirpath=ckpt_dir,
                save_top_k=0,
                save_last=True,
                every_n_train_steps=recipe.train.checkpoint_every_n_steps,
            )
        )
    if recipe.train.patience:
        callbacks.append(
            EarlyStopping(monitor=monitor, mode=recipe.monitor_mode, patience=recipe.train.patience)
        )
    header = {
        "recipe": recipe.name,
        "seed": seed,
        "task": recipe.task,
        "dataset": recipe.data.name,
        "monitor": monitor,
    }
    if built.history_masking is not None:
        header["exclude_history"] = built.history_masking.exclude
    recorder = MetricsRecorder(run_dir, header, write=writer)
    throughput = Throughput(built.datamodule.task.samples)
    callbacks += [recorder, throughput, *extra_callbacks]
    if recipe.logging.wandb is not None:
        from rex.engine.tracking import WandbRunInfo

        callbacks.append(WandbRunInfo({**resolved, "seed": seed}, built.data_hash, run_dir))
    trainer = _trainer(recipe, run_dir, callbacks)
    started = time.perf_counter()
    last = ckpt_dir / "last.ckpt"
    try:
        trainer.fit(built.module, datamodule=built.datamodule, ckpt_path=str(last) if resume else None)
    except RexError as exc:  # raised inside a step (a loss gone NaN): name the recipe it ran
        exc.file = exc.file or source
        raise
    fit_seconds = time.perf_counter() - started
    if trainer.interrupted:
        raise RexError(
            "training was interrupted; continue it with `rex train --resume RUN_DIR`", file=str(run_dir)
        )
    best_path = best.best_model_path or str(last)
    previous_train = recorder.data.get("train", {})
    recorder.record(
        "best",
        {"checkpoint": str(Path(best_path).relative_to(run_dir)), "score": _float(best.best_model_score)},
    )
    recorder.record(
        "train",
        {
            "wall_time_s": round(previous_train.get("wall_time_s", 0.0) + fit_seconds, 2),
            # Ranks step together on equal shares, so one rank's rate times their number is the run's.
            "samples_per_s": round(trainer.world_size * throughput.samples / throughput.seconds, 1)
            if throughput.seconds
            else None,
            "epochs": trainer.current_epoch,
            "global_steps": trainer.global_step,
            "processes": trainer.world_size,
        },
    )
    if test:
        tested = trainer.test(built.module, datamodule=built.datamodule, ckpt_path=best_path, verbose=False)
        recorder.record("test", {k.removeprefix("test/"): float(v) for k, v in tested[0].items()})
    if recipe.logging.wandb is not None:
        from rex.engine.tracking import finish_wandb

        finish_wandb(trainer, run_dir)
    return Fitted(recorder.data, built, Path(best_path))


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def train(
    recipe_path: str | Path,
    overrides: list[str],
    seeds: int | None = None,
    reuse_stages: Path | None = None,
    summary_to: Path | None = None,
) -> Path:
    """``rex train``: one run folder per seed; several seeds share a parent with a summary.
    ``reuse_stages`` names an earlier run whose finished stages (same settings) are taken over;
    ``summary_to`` also writes the test metrics (mean ± std over seeds) to that file, for
    pipelines such as ``dvc repro`` that need a fixed output path."""
    loaded = load_recipe(recipe_path, overrides)
    if reuse_stages is not None:
        if not loaded.stages:
            raise RexError("--reuse-stages needs a recipe with stages", file=str(recipe_path))
        if not reuse_stages.is_dir():
            raise RexError("--reuse-stages: no such run folder", file=str(reuse_stages))
    recipe = loaded.recipe
    seed_list = [recipe.seeds[0] + i for i in range(seeds)] if seeds else recipe.seeds
    writer = is_main_process(recipe)
    inherited = RUN_DIR_ENV in os.environ
    root = _run_root(recipe)
    try:
        results = _train_seeds(loaded, seed_list, root, reuse_stages, writer)
    finally:
        if not inherited:
            # Passed to this run's processes only: a later run in this process gets its own folder.
            os.environ.pop(RUN_DIR_ENV, None)
    if not writer:
        return root
    print_summary(recipe, results, root)
    if summary_to is not None:
        atomic_write_json(summary_to, {"recipe": recipe.name, "run": str(root), **summarize(results)})
    return root


def _train_seeds(
    loaded: LoadedRecipe, seed_list: list[int], root: Path, reuse_stages: Path | None, writer: bool
) -> list[dict[str, Any]]:
    recipe = loaded.recipe
    try:
        if len(seed_list) == 1:
            results = [run_one(loaded, seed_list[0], root, reuse=reuse_stages)]
        else:
            results = []
            for seed in seed_list:
                run_dir = root / f"seed-{seed}"
                run_dir.mkdir(exist_ok=not writer)
                if writer:
                    console.rule(f"{recipe.name} · seed {seed}")
                results.append(run_one(loaded, seed, run_dir, reuse=reuse_stages))
            if writer:
                atomic_write_json(root / "summary.json", summarize(results))
    except BaseException as exc:
        if writer and not _remove_if_empty(root):
            _mark_failed(root, exc)
        raise
    return results


def _run_root(recipe: Recipe) -> Path:
    """A new run folder, or the one the processes of a distributed run share."""
    shared = shared_run_dir(recipe)
    if shared is not None:
        shared.mkdir(parents=True, exist_ok=True)
        return shared
    root = new_run_dir(Path(recipe.logging.run_root).resolve(), recipe.name)
    if is_distributed(recipe):
        # The processes Lightning starts on this machine inherit the environment.
        os.environ[RUN_DIR_ENV] = str(root)
    return root


def _remove_if_empty(run_dir: Path) -> bool:
    """A run that failed before writing anything (a data error, say) leaves no folder behind."""
    if not run_dir.is_dir() or not all(p.is_dir() for p in run_dir.rglob("*")):
        return False
    for folder in sorted(run_dir.rglob("*"), reverse=True):
        folder.rmdir()
    run_dir.rmdir()
    return True


def _mark_failed(root: Path, exc: BaseException) -> None:
    """Each unfinished run folder under ``root`` records in ``metrics.json`` why it stopped, so a
    folder an error left behind is not taken for a run in progress; ``--resume`` still works."""
    reason = f"{type(exc).__name__}: {exc}" if not isinstance(exc, RexError) else str(exc)
    for run_dir in [root, *sorted(root.glob("seed-*"))]:
        if (run_dir / RECIPE_FILE).is_file():
            with contextlib.suppress(RexError):
                metrics = read_metrics(run_dir)
                if "test" not in metrics:
                    atomic_write_json(run_dir / METRICS_FILE, {**metrics, "failed": reason})


def resume(run_dir: Path) -> Path:
    """``rex train --resume RUN_DIR``: continue from ``checkpoints/last.ckpt`` with the run's recipe."""
    run_dir = run_dir.resolve()
    recipe_file = run_dir / RECIPE_FILE
    if not recipe_file.is_file():
        raise RexError(
            f"not a run folder (no {RECIPE_FILE}); pass runs/<recipe>/<timestamp>", file=str(run_dir)
        )
    if "test" in read_metrics(run_dir):
        raise RexError("this run already finished (metrics.json has test metrics)", file=str(run_dir))
    loaded = load_recipe(recipe_file)
    # A staged run continues at its first unfinished stage, whether or not that one has started.
    if not loaded.stages and not (run_dir / CHECKPOINTS / "last.ckpt").is_file():
        raise RexError("no checkpoints/last.ckpt to resume from; start a new run instead", file=str(run_dir))
    writer = is_main_process(loaded.recipe)
    try:
        result = run_one(loaded, loaded.recipe.seeds[0], run_dir, resume=True)
    except BaseException as exc:
        if writer:
            _mark_failed(run_dir, exc)
        raise
    if writer:
        print_summary(loaded.recipe, [result], run_dir)
    return run_dir


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    names = list(results[0].get("test", {}))
    summary: dict[str, Any] = {"seeds": [r["seed"] for r in results], "test": {}}
    for name in names:
        values = [r["test"][name] for r in results]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        summary["test"][name] = {"mean": mean, "std": std, "values": values}
    return summary


def print_summary(recipe: Recipe, results: list[dict[str, Any]], root: Path) -> None:
    table = Table(title=f"{recipe.name} · {recipe.data.name} · test (best val. checkpoint)")
    table.add_column("metric")
    if len(results) == 1:
        table.add_column("test", justify="right")
        for name, value in results[0]["test"].items():
            table.add_row(name, f"{value:.4f}")
    else:
        table.add_column(f"mean ± std over {len(results)} seeds", justify="right")
        for name, stats in summarize(results)["test"].items():
            table.add_row(name, f"{stats['mean']:.4f} ± {stats['std']:.4f}")
    out = Console()
    out.print(table)
    wall = sum(r.get("train", {}).get("wall_time_s", 0.0) for r in results)
    out.print(f"run folder: {root}   training wall time: {wall:.0f} s")


@dataclass
class Restored:
    """A finished run's model at a checkpoint, built from the run's own recipe."""

    built: Built
    recipe: Recipe
    checkpoint: Path


def restore(target: Path, evaluator: Mapping[str, Any] | None = None) -> Restored:
    """The model of a run folder's best checkpoint (or of a given .ckpt file) with its data
    module; a staged run is restored at its last stage (or at the stage folder given), with what
    the stages before it exported. ``evaluator`` adds arguments to the recipe's evaluator node
    (``rex eval --index``)."""
    if not target.exists():
        raise RexError("no such run folder or checkpoint", file=str(target))
    if target.is_file():
        ckpt, run_dir = target, target.parent.parent
    else:
        run_dir = target
        ckpt = run_dir / CHECKPOINTS / "best.ckpt"
    if not (run_dir / RECIPE_FILE).is_file():
        raise RexError(f"no {RECIPE_FILE} beside the checkpoint; pass a run folder", file=str(target))
    quiet_lightning()
    loaded = load_recipe(run_dir / RECIPE_FILE)
    recipe, context = loaded.recipe, None
    staged_run = run_dir if loaded.stages else run_dir.parent
    if (staged_run / "stages.json").is_file():
        from rex.engine.stages import stage_contexts

        whole = load_recipe(staged_run / RECIPE_FILE)
        stage = whole.stages[-1] if loaded.stages else next(s for s in whole.stages if s.name == run_dir.name)
        if loaded.stages and not target.is_file():
            ckpt = run_dir / stage.name / CHECKPOINTS / "best.ckpt"
        recipe, context = stage.recipe, stage_contexts(whole, staged_run)[stage.name]
    if not ckpt.is_file():
        # Never fall back to last.ckpt unasked: its metrics are not the selected model's.
        raise RexError(
            "no best.ckpt (the run stopped before its first validation?); to test the last "
            f"state anyway, pass {ckpt.with_name('last.ckpt')}",
            file=str(ckpt),
        )
    if evaluator:
        node = {**(recipe.eval.evaluator or {}), **evaluator}
        recipe = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"evaluator": node})})
    built = build_run(recipe, recipe.seeds[0], str(run_dir / RECIPE_FILE), context)
    console.print(f"checkpoint: {ckpt}", markup=False, highlight=False, soft_wrap=True)
    state = load_checkpoint(ckpt)
    try:
        built.module.load_state_dict(state["state_dict"])
    except (KeyError, RuntimeError) as exc:
        raise RexError(
            f"checkpoint does not match the run's recipe: {str(exc).splitlines()[0]}", file=str(ckpt)
        ) from exc
    return Restored(built, recipe, ckpt)


def evaluate(
    target: Path, record: bool = False, devices: int = 1, index: Path | None = None
) -> dict[str, float] | None:
    """``rex eval``: test metrics of a run's best checkpoint (or of a given .ckpt file).

    ``record`` writes them into the run's metrics.json as its test result (after an evaluator
    fix, say), keeping the result they replace under ``retests``; only a run's own best.ckpt
    may be recorded. ``devices`` > 1 splits the test set over that many data-parallel
    processes; the metrics are the whole split's, returned by the main process (None elsewhere).
    ``index`` ranks from that vector index's top items (``rex export-index``) instead of
    exactly, through the evaluator's ``index`` argument."""
    if record and index is not None:
        raise RexError(
            "--record takes the exact ranking: an index result is not the run's test result",
            file="command line",
        )
    restored = restore(target, {"index": str(index)} if index is not None else None)
    built, recipe, ckpt = restored.built, restored.recipe, restored.checkpoint
    trainer = distributed_trainer(
        recipe.model_copy(
            update={"train": recipe.train.model_copy(update={"devices": devices, "num_nodes": 1})}
        ),
        precision=recipe.train.precision,  # a bf16 run is tested in bf16, as its own test was
        logger=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        limit_test_batches=recipe.train.limit_eval_batches,
    )
    result = trainer.test(built.module, datamodule=built.datamodule, verbose=False)[0]
    tested = {k.removeprefix("test/"): float(v) for k, v in result.items()}
    if not trainer.is_global_zero:
        return None
    if record:
        if ckpt.name != "best.ckpt":
            raise RexError(
                "--record takes a run folder: only its best.ckpt is its test result", file=str(target)
            )
        masking = built.history_masking.exclude if built.history_masking else None
        record_retest(ckpt.parent.parent, tested, masking)
    return tested


def record_retest(run_dir: Path, tested: dict[str, float], exclude_history: bool | None) -> None:
    """``tested`` becomes ``run_dir``'s test result in metrics.json, the one it replaces kept
    under ``retests``; a staged run's stages.json, and its top-level metrics.json when this is
    its last stage, follow."""
    metrics = read_metrics(run_dir)
    retest = {"date": datetime.now().isoformat(timespec="seconds"), "replaced": metrics.get("test")}
    if exclude_history is not None:
        retest["exclude_history"] = exclude_history
    metrics["retests"] = [*metrics.get("retests", []), retest]
    metrics["test"] = tested
    atomic_write_json(run_dir / METRICS_FILE, metrics)
    stages_file = run_dir.parent / STAGES_FILE
    if not stages_file.is_file():
        return
    stages = json.loads(stages_file.read_text())
    stages["stages"][run_dir.name]["test"] = tested
    atomic_write_json(stages_file, stages)
    top = read_metrics(run_dir.parent)
    if list(stages["stages"])[-1] == run_dir.name:
        top.update(test=tested, retests=metrics["retests"])
    top["stages"] = {name: entry.get("test") for name, entry in stages["stages"].items()}
    atomic_write_json(run_dir.parent / METRICS_FILE, top)
