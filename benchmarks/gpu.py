"""Training throughput of SASRec and DeepFM in fp32 and bf16-mixed, eager and compiled, and the
share of the GPU's bf16 dense peak that their dense layers reach.

Each measurement is a training run of the model's own recipe on its own data (SASRec on Beauty,
DeepFM on ml-100k) at the recipe's batch size, through ``rex.train.run_one`` as ``rex train``
runs it, with ``train.precision`` and ``train.compile`` set as recipe overrides. A callback that
only reads the clock skips ``--warmup`` batches (compilation happens there), then times
``--steps`` batches, each from the end of the one before to its own end (making the batch,
forward, backward, the optimiser step and Lightning's per-step logging; on CUDA the clock
synchronises the device first). Batches may run over an epoch's end; validation and
checkpointing between epochs are not timed. A compiled model recompiles once for an epoch's
short last batch, so keep ``--warmup`` + ``--steps`` within an epoch to leave that out.

The dense FLOPs of the timed steps (matrix products, linear layers and attention, forward and
backward, as ``torch.utils.flop_counter.FlopCounterMode`` counts them) come from one more, eager
fp32 run over the same batches (the order is seeded), since counting slows a step down; the
products are the same at any precision. Dense TFLOP/s is their sum over the timed seconds; the
peak share divides it by the GPU's bf16 dense peak (``PEAK_BF16_TFLOPS`` by
``torch.cuda.get_device_name()``, or ``--peak-tflops``). On CPU the peak share is n/a.

    python benchmarks/gpu.py                                    # everything, on the GPU
    python benchmarks/gpu.py --compile off --steps 5 --warmup 2 # a CPU smoke check

Results: a table on stdout and ``benchmarks/results/gpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.flop_counter import FlopCounterMode

from rex.config.recipe import load_recipe
from rex.engine.module import RexModule
from rex.engine.train import run_one

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "gpu.json"
RECIPES = {"sasrec": REPO / "recipes" / "sasrec.yaml", "deepfm": REPO / "recipes" / "deepfm.yaml"}
PRECISIONS = ("32", "bf16-mixed")
# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, by a pattern of the CUDA device name; the
# first match wins, so the PCIe H100 comes before the SXM one. L4 must not match L40/L40S.
PEAK_BF16_TFLOPS = (
    (r"H100.*PCIe", 756.0),
    (r"H100|H200", 989.0),
    (r"A100", 312.0),
    (r"\bL4\b", 121.0),
)
# Each run is short and throw-away: no early stopping, one validation batch between epochs.
RUN_OVERRIDES = ["train.patience=null", "train.limit_eval_batches=1", "logging.progress_bar=false"]


class Steps(Callback):
    """Stops training after ``warmup`` + ``steps`` batches, and either times the last ``steps``
    (samples and seconds) or counts their dense FLOPs; the counting run is not timed."""

    def __init__(self, warmup: int, steps: int, count_flops: bool = False) -> None:
        self.warmup = warmup
        self.steps = steps
        self.counter = FlopCounterMode(display=False) if count_flops else None
        self.seen = self.samples = self.flops = 0
        self.seconds = 0.0
        self._last = 0.0

    def _timed(self) -> bool:
        return self.warmup <= self.seen < self.warmup + self.steps

    def _now(self, module: L.LightningModule) -> float:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)
        return time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # An epoch's first batch is timed from here, which leaves out validation and checkpoints.
        self._last = self._now(pl_module)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.counter is not None and self._timed():
            self.counter.__enter__()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = self._now(pl_module)
        if self._timed():
            if self.counter is not None:
                self.counter.__exit__(None, None, None)
                self.flops += self.counter.get_total_flops()
            self.seconds += now - self._last
            assert isinstance(pl_module, RexModule)
            self.samples += pl_module.count_samples(batch)  # a sample as the task counts it
        self._last = now
        self.seen += 1
        if self.seen >= self.warmup + self.steps:
            trainer.should_stop = True


def train_steps(model: str, overrides: list[str], warmup: int, steps: int, count_flops: bool) -> Steps:
    """One training run of ``model``'s recipe with ``overrides``, through ``run_one``."""
    torch._dynamo.reset()  # each compiled run compiles afresh, as a new `rex train` would
    clock = Steps(warmup, steps, count_flops)
    # Every epoch holds at least one batch, so this many epochs always reach the last step.
    epochs = f"train.max_epochs={warmup + steps}"
    loaded = load_recipe(RECIPES[model], [*RUN_OVERRIDES, epochs, *overrides])
    with tempfile.TemporaryDirectory(prefix="rex-gpu-bench-") as run_dir:
        run_one(loaded, loaded.recipe.seeds[0], Path(run_dir), extra_callbacks=[clock], test=False)
    if clock.seen < warmup + steps:
        raise SystemExit(f"{model}: the run stopped after {clock.seen} of {warmup + steps} batches")
    return clock


def precision_override(precision: str) -> str:
    # Quoted: an override's value is read as YAML, where a bare 32 is a number, not the string.
    return f"train.precision='{precision}'"


def peak_tflops(device: str) -> float | None:
    """The bf16 dense peak of a CUDA device by its name; None for one not in the table."""
    return next((peak for pattern, peak in PEAK_BF16_TFLOPS if re.search(pattern, device)), None)


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()})"


def measure(args: argparse.Namespace, peak: float | None) -> list[dict[str, Any]]:
    """Every model × precision × compile setting asked for: one row each."""
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    rows = []
    for model in args.model:
        print(f"{model}: counting dense FLOPs (eager fp32) ...", file=sys.stderr, flush=True)
        eager_fp32 = [precision_override("32"), *args.override]
        counted = train_steps(model, eager_fp32, args.warmup, args.steps, True)
        for precision in args.precision:
            for compiled in compiles:
                label = f"{model}: precision {precision}, compile {'on' if compiled else 'off'}"
                print(f"{label}, {args.warmup} + {args.steps} steps ...", file=sys.stderr, flush=True)
                settings = [precision_override(precision), f"train.compile={str(compiled).lower()}"]
                clock = train_steps(model, [*settings, *args.override], args.warmup, args.steps, False)
                if clock.samples != counted.samples:  # the FLOPs were counted on other batches
                    raise SystemExit(f"{label}: the timed batches differ from the counted ones")
                tflops = counted.flops / clock.seconds / 1e12
                rows.append(
                    {
                        "model": model,
                        "recipe": str(RECIPES[model].relative_to(REPO)),
                        "precision": precision,
                        "compile": compiled,
                        "steps": args.steps,
                        "samples": clock.samples,
                        "seconds": round(clock.seconds, 4),
                        "samples_per_s": round(clock.samples / clock.seconds, 1),
                        "step_ms": round(1000 * clock.seconds / args.steps, 2),
                        "dense_gflop_per_step": round(counted.flops / args.steps / 1e9, 3),
                        "dense_tflops": round(tflops, 4),
                        "bf16_peak_share": round(tflops / peak, 5) if peak else None,
                    }
                )
    return rows


def table(rows: list[dict[str, Any]], device: str, peak: float | None) -> str:
    """Plain-text table, one row per run."""
    header = (
        f"{'model':<8}{'precision':<12}{'compile':<9}{'samples/s':>12}{'step ms':>10}"
        f"{'GFLOP/step':>12}{'TFLOP/s':>10}{'bf16 peak':>11}"
    )
    peak_note = f"bf16 dense peak {peak:g} TFLOP/s" if peak else "no bf16 peak known: peak share n/a"
    lines = [f"device: {device} ({peak_note})", header, "-" * len(header)]
    for row in rows:
        share = f"{row['bf16_peak_share']:.2%}" if row["bf16_peak_share"] is not None else "n/a"
        lines.append(
            f"{row['model']:<8}{row['precision']:<12}{'on' if row['compile'] else 'off':<9}"
            f"{row['samples_per_s']:>12,.0f}{row['step_ms']:>10.2f}{row['dense_gflop_per_step']:>12.3f}"
            f"{row['dense_tflops']:>10.4f}{share:>11}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", action="append", choices=sorted(RECIPES), help="repeatable (default: both)"
    )
    parser.add_argument("--precision", action="append", choices=PRECISIONS, help="repeatable (default: both)")
    parser.add_argument("--compile", choices=("off", "on", "both"), default="both", help="train.compile")
    parser.add_argument("--warmup", type=int, default=10, help="untimed batches first (compilation)")
    parser.add_argument("--steps", type=int, default=50, help="timed training batches")
    parser.add_argument("--peak-tflops", type=float, help="the device's bf16 dense peak (default: the table)")
    parser.add_argument("--override", action="append", default=[], help="extra recipe override, repeatable")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.warmup < 0 or args.steps < 1:
        parser.error("--warmup must be >= 0 and --steps >= 1")
    args.model = args.model or list(RECIPES)
    args.precision = args.precision or list(PRECISIONS)

    device = device_name()
    cuda = torch.cuda.is_available()
    peak = args.peak_tflops or (peak_tflops(device) if cuda else None)
    rows = measure(args, peak)
    report = {
        "benchmark": "gpu",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device,
        "bf16_peak_tflops": peak,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "versions": {"torch": torch.__version__, "lightning": L.__version__, "cuda": torch.version.cuda},
        "settings": {
            "warmup": args.warmup,
            "steps": args.steps,
            "overrides": args.override,
            "torch_threads": torch.get_num_threads(),
        },
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(rows, device, peak))
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
