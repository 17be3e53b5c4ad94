"""The one LightningModule: every model trains, validates and tests through it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from rex.config.errors import RexError
from rex.engine.optim import build_optimizer, build_scheduler
from rex.eval.evaluators import Evaluator


@dataclass
class WeightedLoss:
    name: str
    weight: float
    module: nn.Module


class RexModule(L.LightningModule):
    """Runs ``model(batch) -> outputs`` and sums the recipe's weighted loss components."""

    def __init__(
        self,
        model: nn.Module,
        losses: list[WeightedLoss],
        evaluator: Evaluator,
        optimizer: dict[str, Any],
        scheduler: dict[str, Any] | None,
        monitor: str,
        count_samples: Callable[[dict[str, Tensor]], int] | None = None,
        compile_model: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.compile_model = compile_model
        self.loss_modules = nn.ModuleList([loss.module for loss in losses])
        self.losses = losses
        self.evaluator = evaluator
        self.optimizer_node = optimizer
        self.scheduler_node = scheduler
        self.monitor = monitor
        self.count_samples = count_samples or (lambda batch: int(next(iter(batch.values())).shape[0]))
        self._compiled = False
        self._last_step_end: float | None = None
        # The epoch's loss sums as (sum of row-weighted losses, rows), kept by hand rather than by
        # Lightning's on_epoch logging, which restarts at a resume: they go into checkpoints, so
        # the epoch mean of a run resumed mid-epoch covers the steps before the kill too.
        self._epoch_losses: dict[str, list[float]] = {}
        self._epoch_of_losses = -1

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.model(batch)

    def configure_model(self) -> None:
        """``train.compile``: compile the model's calls with ``torch.compile``, in place.

        ``nn.Module.compile`` keeps the model the same object, so state_dict keys stay as they
        are and checkpoints load into compiled and eager models alike (``torch.compile(model)``
        would prefix each key with ``_orig_mod.``). Compiling here rather than at build time runs
        it in the strategy's context, where a sharding strategy expects changes to the model.
        Lightning calls the hook at every fit and test; recompiling there would drop the
        compiled code, hence the check.
        """
        if self.compile_model and not self._compiled:
            self.model.compile()
            self._compiled = True

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        outputs = self.model(batch)
        rows = next(iter(batch.values())).shape[0]
        total: Tensor | None = None
        for loss in self.losses:
            value = loss.module(outputs, batch)
            if len(self.losses) > 1:
                self._log_loss(f"train/loss_{loss.name}", value, rows)
            total = value * loss.weight if total is None else total + value * loss.weight
        assert total is not None
        if not torch.isfinite(total.detach()):
            raise RexError(
                f"the training loss became {float(total.detach()):g} at epoch {self.current_epoch}, step "
                f"{self.global_step}; lower train.lr, set train.grad_clip or check the input data",
                key="train",
            )
        self._log_loss("train/loss", total, rows, prog_bar=True)
        self._log_throughput(self.count_samples(batch))
        return total

    def _log_loss(self, name: str, value: Tensor, rows: int, prog_bar: bool = False) -> None:
        """``NAME_step`` now; ``NAME_epoch``, the row-weighted mean, at the epoch's end."""
        if self._epoch_of_losses != self.current_epoch:
            self._epoch_losses, self._epoch_of_losses = {}, self.current_epoch
        self.log(f"{name}_step", value, prog_bar=prog_bar, on_step=True, on_epoch=False)
        total, count = self._epoch_losses.setdefault(name, [0.0, 0])
        self._epoch_losses[name] = [total + float(value.detach()) * rows, count + rows]

    def on_train_epoch_end(self) -> None:
        if self._epoch_of_losses == self.current_epoch:
            for name, (total, count) in self._epoch_losses.items():
                # sync_dist: each data-parallel process summed its own share of the epoch
                self.log(f"{name}_epoch", total / max(count, 1), on_step=False, on_epoch=True, sync_dist=True)

    def _log_throughput(self, samples: int) -> None:
        now = time.perf_counter()
        if self._last_step_end is not None and now > self._last_step_end:
            self.log("samples/s", samples / (now - self._last_step_end), prog_bar=True, on_step=True)
        self._last_step_end = now

    def on_train_epoch_start(self) -> None:
        self._last_step_end = None

    # --------------------------------------------------------------- evaluation, written once
    def on_validation_epoch_start(self) -> None:
        self.evaluator.reset()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.evaluator.update(self.model, batch)

    def on_validation_epoch_end(self) -> None:
        for name, value in self.evaluator.compute().items():
            self.log(f"val/{name}", value, prog_bar=name == self.monitor)

    def on_test_epoch_start(self) -> None:
        self.evaluator.reset()

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.evaluator.update(self.model, batch)

    def on_test_epoch_end(self) -> None:
        self.log_dict({f"test/{k}": v for k, v in self.evaluator.compute().items()})

    # --------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> Any:
        optimizer = build_optimizer(self.optimizer_node, self)
        if self.scheduler_node is None:
            return optimizer
        total_steps = int(self.trainer.estimated_stepping_batches)
        return {
            "optimizer": optimizer,
            "lr_scheduler": build_scheduler(self.scheduler_node, optimizer, total_steps),
        }

    # --------------------------------------------------------------- exact resume
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Dropout draws from the global generator: restoring it makes a resumed run take the
        # same steps as an uninterrupted one.
        checkpoint["rng_state"] = {"torch": torch.get_rng_state()}
        checkpoint["epoch_losses"] = {"epoch": self._epoch_of_losses, "sums": self._epoch_losses}
        if torch.cuda.is_available():
            checkpoint["rng_state"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        losses = checkpoint.get("epoch_losses")
        if losses:
            self._epoch_of_losses, self._epoch_losses = losses["epoch"], losses["sums"]
        state = checkpoint.get("rng_state")
        if state:
            torch.set_rng_state(state["torch"])
            if "cuda" in state and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda"])
