"""Pydantic models of a recipe's top-level sections.

Every model forbids unknown keys: a misspelt key is an error, never silently ignored.
``model`` and ``losses`` hold component nodes; the registry validates those when it builds them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from rex.config.base import Strict
from rex.eval.metrics import parse_metric_name

TaskName = Literal["ctr", "next_item"]

DEFAULT_METRICS: dict[str, list[str]] = {
    "ctr": ["auc", "gauc", "logloss"],
    "next_item": [f"{m}@{k}" for m in ("recall", "ndcg", "mrr") for k in (5, 10, 20)],
}
DEFAULT_MONITOR: dict[str, str] = {"ctr": "auc", "next_item": "ndcg@10"}
LOWER_IS_BETTER = {"logloss"}


class DataConfig(Strict):
    name: str = Field(description="dataset name, as prepared by `rex data prepare NAME`")
    view: Literal["sequence", "ctr"] = Field(description="which tables of the dataset to read")
    max_len: int = Field(50, ge=1, description="histories keep their most recent max_len items")
    user_columns: list[str] = Field(
        [],
        description="list columns of the dataset's users view (e.g. history_view) joined to each "
        "batch row by its user id, without the row's own item",
    )


class TrainConfig(Strict):
    max_epochs: int = Field(20, ge=1)
    batch_size: int = Field(256, ge=1)
    batch_samples: int | None = Field(
        None,
        ge=1,
        description="next-item training only: instead of batch_size sequences, batches of "
        "similar-length sequences holding about this many training positions (samples) each",
    )
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal["adam", "adamw"] = "adam"
    patience: int | None = Field(5, ge=1, description="early stopping on the monitored validation metric")
    grad_clip: float | None = Field(None, gt=0)
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    precision: Literal["32", "bf16-mixed", "16-mixed"] = "32"
    num_threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: torch's)")
    checkpoint_every_n_steps: int | None = Field(
        None, ge=1, description="also save last.ckpt every n steps, so a killed run resumes mid-epoch"
    )
    limit_train_batches: int | None = Field(None, ge=1, description="cap on batches per epoch (smoke runs)")
    limit_eval_batches: int | None = Field(None, ge=1)


class EvalConfig(Strict):
    protocol: Literal["leave_one_out", "holdout"] = Field(
        description="leave_one_out: last item per user is test, the one before is valid; "
        "holdout: the dataset's prepared train/valid/test rows"
    )
    metrics: list[str] | None = None
    monitor: str | None = Field(None, description="validation metric used for model selection")
    exclude_history: bool = Field(True, description="next_item: never rank items already in the history")
    batch_size: int = Field(1024, ge=1)

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, names: list[str] | None) -> list[str] | None:
        for name in names or []:
            parse_metric_name(name)
        return names


class WandbConfig(Strict):
    project: str = "rex"
    mode: Literal["auto", "online", "offline", "disabled"] = Field(
        "auto", description="auto: online with an API key, offline without; never prompts"
    )
    group: str | None = None


class LoggingConfig(Strict):
    run_root: str = "runs"
    progress_bar: bool = True
    log_every_n_steps: int = Field(50, ge=1)
    wandb: WandbConfig | None = None


class Recipe(Strict):
    name: str
    description: str | None = None
    task: TaskName
    data: DataConfig
    model: dict[str, Any]
    losses: list[dict[str, Any]] = Field(min_length=1)
    train: TrainConfig = TrainConfig()
    eval: EvalConfig
    logging: LoggingConfig = LoggingConfig()
    seed: int | list[int] = 42
    plugins: list[str] = []

    @model_validator(mode="after")
    def _fill_task_defaults(self) -> Recipe:
        if self.eval.metrics is None:
            self.eval.metrics = list(DEFAULT_METRICS[self.task])
        if self.eval.monitor is None:
            self.eval.monitor = DEFAULT_MONITOR[self.task]
        if self.eval.monitor not in self.eval.metrics:
            raise ValueError(
                f"eval.monitor {self.eval.monitor!r} must be one of eval.metrics {self.eval.metrics}"
            )
        if self.task == "next_item":
            if self.eval.protocol != "leave_one_out" or self.data.view != "sequence":
                raise ValueError("task next_item needs data.view: sequence and eval.protocol: leave_one_out")
            if any(parse_metric_name(m)[1] is None for m in self.eval.metrics):
                raise ValueError("task next_item takes ranking metrics such as ndcg@10 in eval.metrics")
            if self.train.batch_samples is not None and self.train.batch_samples < self.data.max_len:
                raise ValueError(
                    f"train.batch_samples ({self.train.batch_samples}) must be at least data.max_len "
                    f"({self.data.max_len}): one sequence holds up to max_len samples"
                )
        elif self.train.batch_samples is not None:
            raise ValueError("train.batch_samples applies to task next_item only; use train.batch_size")
        if self.task == "ctr" and any(parse_metric_name(m)[1] is not None for m in self.eval.metrics):
            raise ValueError("task ctr takes auc, gauc and logloss in eval.metrics")
        return self

    @property
    def seeds(self) -> list[int]:
        return list(self.seed) if isinstance(self.seed, list) else [self.seed]

    @property
    def monitor_mode(self) -> Literal["min", "max"]:
        return "min" if self.eval.monitor in LOWER_IS_BETTER else "max"
