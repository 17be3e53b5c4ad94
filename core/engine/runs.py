"""Run folders: atomic files, the environment record, per-epoch metrics and checkpoints."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import Callback

from rex.config.errors import RexError

METRICS_FILE = "metrics.json"
RECIPE_FILE = "recipe.yaml"
ENV_FILE = "env.json"


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


STAGES_FILE = "stages.json"  # a staged run's record of its finished stages


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def new_run_dir(run_root: Path, recipe_name: str) -> Path:
    """``runs/<recipe>/<timestamp>/``, with a numeric suffix if two runs start in the same second."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = run_root / recipe_name / stamp
    candidate, n = base, 1
    while True:
        try:
            candidate.mkdir(parents=True, exist_ok=False)
            return candidate
        except FileExistsError:
            n += 1
            candidate = base.with_name(f"{stamp}-{n}")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def environment(data_hash: str) -> dict[str, Any]:
    import lightning
    import numpy

    from rex.engine.allocator import malloc_policy

    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "numpy": numpy.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "malloc": malloc_policy(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "data_hash": data_hash,
        "started": datetime.now().isoformat(timespec="seconds"),
    }


def read_metrics(run_dir: Path) -> dict[str, Any]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RexError(f"corrupt metrics file ({exc}); delete it to start over", file=str(path)) from exc


class MetricsRecorder(Callback):
    """Keeps ``metrics.json`` current: validation metrics per epoch, then the test metrics once."""

    def __init__(self, run_dir: Path, header: dict[str, Any], write: bool = True) -> None:
        self.path = run_dir / METRICS_FILE
        # Every process of a data-parallel run keeps the record; only the main one writes it.
        self.write = write
        existing = read_metrics(run_dir)
        self.data: dict[str, Any] = {**header, "validation": existing.get("validation", [])}
        for key in ("test", "best", "train"):
            if key in existing:
                self.data[key] = existing[key]
        # Elapsed time carries over a resume, so "time to reach a metric" stays comparable.
        validated = self.data["validation"]
        self._elapsed_before = validated[-1].get("elapsed_s", 0.0) if validated else 0.0
        self._fit_start = time.perf_counter()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def _save(self) -> None:
        if self.write:
            atomic_write_json(self.path, self.data)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        values = {
            k.removeprefix("val/"): float(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith("val/")
        }
        elapsed = self._elapsed_before + time.perf_counter() - self._fit_start
        record = {
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "elapsed_s": round(elapsed, 2),
            **values,
        }
        # A resumed run may validate an epoch again; keep one record per epoch.
        self.data["validation"] = [r for r in self.data["validation"] if r["epoch"] != record["epoch"]]
        self.data["validation"].append(record)
        self._save()

    def record(self, key: str, value: Any) -> None:
        self.data[key] = value
        self._save()


class AtomicCheckpointIO(CheckpointIO):
    """Checkpoints written atomically and read back with ``weights_only=True``."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        try:
            torch.save(checkpoint, tmp)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return load_checkpoint(Path(path), map_location)

    def remove_checkpoint(self, path: Any) -> None:
        Path(path).unlink(missing_ok=True)


def load_checkpoint(path: Path, map_location: Any | None = "cpu") -> dict[str, Any]:
    if not path.is_file():
        raise RexError("checkpoint not found", file=str(path))
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise RexError(
            f"cannot load checkpoint ({type(exc).__name__}): it is corrupt or not a rex checkpoint",
            file=str(path),
        ) from exc
