"""Pydantic models of a recipe's top-level sections.

Every model forbids unknown keys: a misspelt key is an error, never silently ignored.
``model``, ``losses``, ``optimizer``, ``scheduler`` and ``eval.evaluator`` hold component nodes;
the registry validates those when it builds them. A staged recipe lists ``stages``, each a
partial recipe merged over the top-level sections (see :mod:`rex.config.recipe`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from rex.config.base import Strict
from rex.config.registry import COMPONENT_KEY
from rex.eval.names import lower_is_better, parse_metric_name

if TYPE_CHECKING:
    from rex.data.tasks import Task

# Stage and export names become folder names and context keys.
IDENTIFIER = r"^[A-Za-z_][A-Za-z0-9_]*$"


class DataConfig(Strict):
    name: str = Field(description="dataset name, as prepared by `rex data prepare NAME`")
    view: str | None = Field(
        None, description="which tables of the dataset to read (default: the task's, e.g. sequence)"
    )
    max_len: int = Field(50, ge=1, description="histories keep their most recent max_len items")
    stream: bool = Field(
        False,
        description="read training batches from the Lance tables fragment by fragment instead of "
        "holding whole columns in memory (ctr-style tasks, whose rows are served as stored)",
    )
    stream_buffer_rows: int = Field(
        65_536,
        ge=1,
        description="data.stream: rows shuffled together; two such buffers are held, one served "
        "while the next is read (at least a batch)",
    )
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
    optimizer: str = Field(
        "adam",
        description="shorthand for `optimizer: {_component_: optim/NAME, lr: train.lr, weight_decay: "
        "train.weight_decay}` when the recipe has no optimizer node",
    )
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
    devices: int | Literal["auto"] = Field(
        1, description="devices (processes) per machine, passed to Lightning; >1 trains data-parallel"
    )
    num_nodes: int = Field(
        1, ge=1, description="machines, passed to Lightning (torchrun or SLURM starts them)"
    )
    strategy: Literal["auto", "ddp", "fsdp", "deepspeed"] = Field(
        "auto", description="Lightning's distribution strategy (deepspeed: where it is installed)"
    )
    compile: bool = Field(False, description="torch.compile the model before training")

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_as_text(cls, precision: object) -> object:
        # `train.precision=32` on the command line is read as YAML, an int.
        return str(precision) if isinstance(precision, int) and not isinstance(precision, bool) else precision

    @field_validator("devices")
    @classmethod
    def _positive_devices(cls, devices: int | str) -> int | str:
        if isinstance(devices, int) and devices < 1:
            raise ValueError("devices must be a positive number of processes, or auto")
        return devices


class EvalConfig(Strict):
    protocol: Literal["leave_one_out", "holdout"] | None = Field(
        None,
        description="leave_one_out: last item per user is test, the one before is valid; "
        "holdout: the dataset's prepared train/valid/test rows",
    )
    evaluator: dict[str, Any] | None = Field(
        None, description="an eval/... component node (default: the task's evaluator)"
    )
    metrics: list[str] | None = None
    monitor: str | None = Field(None, description="validation metric used for model selection")
    exclude_history: bool | None = Field(
        None,
        description="next_item: never rank an item of the user's whole training history. Default: "
        "true where no evaluation target repeats an item of its history; false where some do, "
        "since masking makes those certain misses (set it to choose)",
    )
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


class InitFrom(Strict):
    stage: str = Field(description="an earlier stage of the same recipe")
    modules: dict[str, str] = Field(
        min_length=1,
        description="module name in that stage -> module name in this one (e.g. model.encoder: model.encoder)",
    )


class StageConfig(Strict):
    """One stage: a partial recipe merged over the top-level sections, plus what links stages."""

    name: str = Field(pattern=IDENTIFIER)
    description: str | None = None
    task: str | None = None
    data: dict[str, Any] | None = None
    model: dict[str, Any] | None = None
    losses: list[dict[str, Any]] | None = None
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    freeze: list[str] | None = None
    train: dict[str, Any] | None = None
    eval: dict[str, Any] | None = None
    init_from: InitFrom | None = None
    export: dict[str, str] = Field(
        {},
        description="artifact name -> method of the trained model that returns it (a tensor with "
        "one row per item); later stages receive it by name in their build context",
    )


class Recipe(Strict):
    name: str
    description: str | None = None
    task: str
    data: DataConfig
    model: dict[str, Any] | None = None
    losses: list[dict[str, Any]] | None = Field(None, min_length=1)
    optimizer: dict[str, Any] | None = Field(
        None, description="an optim/... node with parameter groups (default: train.optimizer)"
    )
    scheduler: dict[str, Any] | None = Field(None, description="a sched/... node (default: constant lr)")
    freeze: list[str] = Field([], description="parameter-name globs to freeze (requires_grad=False)")
    train: TrainConfig = TrainConfig()
    eval: EvalConfig
    logging: LoggingConfig = LoggingConfig()
    seed: int | list[int] = 42
    plugins: list[str] = []
    stages: list[StageConfig] | None = Field(None, min_length=1)

    @field_validator("model", "optimizer", "scheduler")
    @classmethod
    def _names_its_component(cls, node: dict[str, Any] | None) -> dict[str, Any] | None:
        if node is not None and COMPONENT_KEY not in node:
            raise ValueError(f"add {COMPONENT_KEY}: KIND/NAME (`rex list` shows the registered components)")
        return node

    @field_validator("losses")
    @classmethod
    def _each_names_its_component(cls, nodes: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        for i, node in enumerate(nodes or []):
            if COMPONENT_KEY not in node:
                raise ValueError(f"losses[{i}]: add {COMPONENT_KEY}: loss/NAME (`rex list loss` shows them)")
        return nodes

    @model_validator(mode="after")
    def _fill_task_defaults(self) -> Recipe:
        if self.stages is not None:
            names = [stage.name for stage in self.stages]
            if len(set(names)) != len(names):
                raise ValueError(f"stage names must be unique, got {names}")
            return self  # each stage is validated as a whole recipe once merged
        if self.model is None or self.losses is None:
            missing = "model" if self.model is None else "losses"
            raise ValueError(f"{missing} is required (or declare stages)")
        task = self.task_spec
        if self.data.view is None:
            self.data.view = task.view
        if self.eval.metrics is None:
            self.eval.metrics = list(task.metrics)
        if self.eval.monitor is None:
            self.eval.monitor = task.monitor
        if self.eval.monitor not in self.eval.metrics:
            raise ValueError(
                f"eval.monitor {self.eval.monitor!r} must be one of eval.metrics {self.eval.metrics}"
            )
        if self.eval.evaluator is None:
            self.eval.evaluator = {"_component_": task.evaluator}
        task.check(self)
        return self

    @property
    def task_spec(self) -> Task:
        from rex.data.tasks import task_named

        return task_named(self.task)

    @property
    def seeds(self) -> list[int]:
        return list(self.seed) if isinstance(self.seed, list) else [self.seed]

    @property
    def monitor_mode(self) -> Literal["min", "max"]:
        return "min" if lower_is_better(str(self.eval.monitor)) else "max"
