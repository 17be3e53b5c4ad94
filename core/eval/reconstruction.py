"""Tokenizer evaluation: reconstruction error, codebook usage and collisions of item codes."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rex.components.quantizers.codes import codebook_usage, collision_rate
from rex.config.registry import register
from rex.eval.evaluators import Evaluator, check_metrics
from rex.eval.gather import gather_rows, sum_counts


@register("eval/reconstruction")
class ReconstructionEvaluator(Evaluator):
    """A tokenizer's reconstruction and codes over a split's ``item`` batches.

    Reads ``reconstruction`` and ``target`` (B, d) and ``codes`` (B, L) long. ``recon_mse`` is the
    mean squared error over every element of the split; ``codebook_usage`` the smallest share, over
    levels, of the ``model.codebook_size`` codes that the split's items use; ``collision_rate`` the
    share of the split's items whose L-code tuple another of them holds (before disambiguation).
    """

    reads = ("reconstruction", "target", "codes")
    METRICS = ("recon_mse", "codebook_usage", "collision_rate")

    def __init__(self, metrics: list[str]) -> None:
        self.metric_names = check_metrics(metrics, self.METRICS, "eval/reconstruction")
        self.reset()

    def reset(self) -> None:
        self._squared = 0.0
        self._elements = 0
        self._codes: list[Tensor] = []
        self._size: int | None = None

    @torch.no_grad()
    def update(self, model: nn.Module, batch: dict[str, Tensor]) -> None:
        size = getattr(model, "codebook_size", None)
        if not isinstance(size, int):
            raise ValueError(f"eval/reconstruction needs a model with an int codebook_size, got {size!r}")
        self._size = size
        outputs = model(batch)
        error = outputs["reconstruction"].double() - outputs["target"].double()
        self._squared += float(error.square().sum())
        self._elements += error.numel()
        self._codes.append(outputs["codes"].long().cpu())

    def compute(self) -> dict[str, float]:
        if not self._codes or self._size is None:
            raise ValueError("eval/reconstruction saw no batches")
        codes = gather_rows(torch.cat(self._codes))
        squared, elements = sum_counts(self._squared, self._elements)
        values = {
            "recon_mse": lambda: squared / elements,
            "codebook_usage": lambda: float(codebook_usage(codes, self._size).min()),
            "collision_rate": lambda: collision_rate(codes),
        }
        return {name: values[name]() for name in self.metric_names}
