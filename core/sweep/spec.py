"""Sweep specs: a base recipe, a search space over recipe paths, the objective and the search setup.

A spec is checked in full before the first trial: its own keys (pydantic), the objective against
the base recipe's metrics, and every search key against the resolved base recipe, by loading
and building the recipe at each end of every range. Errors read like recipe errors: file, key,
what to change.
"""

from __future__ import annotations

import difflib
import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import optuna
import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from rex.config.base import Strict
from rex.config.errors import RecipeError
from rex.config.recipe import read_yaml_mapping
from rex.eval.names import lower_is_better

Direction = Literal["maximize", "minimize"]
# The study's storage URL, over a spec's storage: (`--storage` sets it). A URL may hold a
# password: the environment keeps it out of files, and local workers get it this way too.
STORAGE_ENV = "REX_SWEEP_STORAGE"


# A condition is a recipe path (active when that value is set, i.e. not null) or a mapping
# {path: value or [values]} (active when the value is one of them).
Condition = str | dict[str, Any]


class FloatParam(Strict):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0)
    when: Condition | None = None

    @model_validator(mode="after")
    def _range(self) -> FloatParam:
        if self.high < self.low:
            raise ValueError(f"empty range: high {self.high} is below low {self.low}")
        if self.log and self.low <= 0:
            raise ValueError(f"log: true needs low > 0 (got {self.low})")
        if self.log and self.step is not None:
            raise ValueError("a float range takes either log: true or a step, not both")
        return self

    def distribution(self) -> optuna.distributions.BaseDistribution:
        return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def probes(self) -> list[Any]:
        return [self.low, self.high]

    def grid(self) -> list[Any]:
        if self.step is None:
            raise ValueError("the grid sampler needs a step for float ranges")
        n = int(math.floor((self.high - self.low) / self.step + 1e-9))
        return [round(self.low + i * self.step, 12) for i in range(n + 1)]


class IntParam(Strict):
    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = Field(1, ge=1)
    when: Condition | None = None

    @model_validator(mode="after")
    def _range(self) -> IntParam:
        if self.high < self.low:
            raise ValueError(f"empty range: high {self.high} is below low {self.low}")
        if self.log and (self.low < 1 or self.step != 1):
            raise ValueError("log: true needs low >= 1 and step 1")
        return self

    def distribution(self) -> optuna.distributions.BaseDistribution:
        return optuna.distributions.IntDistribution(self.low, self.high, log=self.log, step=self.step)

    def probes(self) -> list[Any]:
        return [self.low, self.high]

    def grid(self) -> list[Any]:
        return list(range(self.low, self.high + 1, self.step))


class CategoricalParam(Strict):
    type: Literal["categorical"]
    choices: list[Any] = Field(min_length=1)
    when: Condition | None = None

    def labels(self) -> list[Any]:
        """Optuna stores scalars only; a mapping or list choice (a component node) is stored as
        its one-line YAML form and mapped back when the trial's recipe is built."""
        return [c if _scalar(c) else _flow_yaml(c) for c in self.choices]

    def value_of(self, label: Any) -> Any:
        return self.choices[self.labels().index(label)]

    def distribution(self) -> optuna.distributions.BaseDistribution:
        return optuna.distributions.CategoricalDistribution(self.labels())

    def probes(self) -> list[Any]:
        return list(self.choices)

    def grid(self) -> list[Any]:
        return self.labels()


Param = Annotated[FloatParam | IntParam | CategoricalParam, Field(discriminator="type")]


class Objective(Strict):
    metric: str = Field(description="a validation metric of the base recipe, e.g. ndcg@10 or auc")
    direction: Direction


class SamplerSpec(Strict):
    type: Literal["tpe", "random", "grid", "cmaes"] = "tpe"
    seed: int | None = None
    n_startup_trials: int | None = Field(None, ge=0, description="tpe/cmaes: random trials first")


class PrunerSpec(Strict):
    type: Literal["median", "hyperband", "none"] = "median"
    n_startup_trials: int = Field(5, ge=0, description="median: trials that finish before any is pruned")
    n_warmup_steps: int = Field(0, ge=0, description="median: epochs before a trial may be pruned")
    min_resource: int = Field(1, ge=1, description="hyperband: fewest epochs a trial gets")
    reduction_factor: int = Field(3, ge=2, description="hyperband: keep 1/factor of trials per rung")


class SweepSpec(Strict):
    name: str | None = Field(None, description="study name (default: the spec file's stem)")
    recipe: str = Field(description="base recipe, relative to the spec file")
    overrides: list[str] = Field([], description="fixed dotlist overrides for every trial and the re-run")
    trial_overrides: list[str] = Field(
        [], description="overrides for trials only, not the final re-run on test (a cheaper search budget)"
    )
    params: dict[str, Param] = Field(min_length=1)
    objective: Objective
    sampler: SamplerSpec = SamplerSpec()
    pruner: PrunerSpec = PrunerSpec()
    trials: int = Field(20, ge=1, description="trials in the study in all, failed ones included")
    timeout: float | None = Field(None, gt=0, description="seconds; no trial starts after it")
    seeds: int = Field(1, ge=1, description="seeds per trial; the objective is their mean")
    test_seeds: int = Field(1, ge=1, description="seeds of the best trial's final re-run on test")
    storage: str | None = Field(
        None, description=f"SQLAlchemy URL (default: SQLite in .studies/); --storage or {STORAGE_ENV} wins"
    )
    heartbeat_interval: int = Field(10, ge=1, description="seconds between a running trial's heartbeats")
    grace_period: int = Field(60, ge=2, description="a trial silent this long is stale and marked failed")


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


def _flow_yaml(value: Any) -> str:
    return (
        str(yaml.safe_dump(value, default_flow_style=True, width=10_000)).strip().removesuffix("...").strip()
    )


def override(key: str, value: Any) -> str:
    """A dotlist override that ``load_recipe`` parses back to exactly ``value``."""
    return f"{key}={_flow_yaml(value)}"


def _error_key(loc: tuple[Any, ...]) -> str:
    key = ""
    for part in loc:
        if isinstance(part, int):
            key += f"[{part}]"
        elif part in ("float", "int", "categorical"):
            continue  # the discriminator's branch name is not a key the user wrote
        else:
            key += f".{part}" if key else str(part)
    return key


def load_spec(path: Path) -> SweepSpec:
    """The checked spec, with its storage replaced by ``REX_SWEEP_STORAGE`` where that is set."""
    shown = str(path)
    data = read_yaml_mapping(path, shown, "sweep spec", "recipe, params, objective, ...")
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = _error_key(err["loc"])
        if err["type"] == "extra_forbidden":
            parent, _, leaf = key.rpartition(".")
            allowed = _allowed(parent)
            close = difflib.get_close_matches(leaf, allowed, n=1)
            message = (
                f"unknown key (did you mean {close[0]}?)"
                if close
                else f"unknown key (allowed: {', '.join(allowed)})"
            )
        elif err["type"] == "union_tag_invalid":
            message = f"unknown distribution type {err['input'].get('type')!r}; use float, int or categorical"
        elif err["type"] == "union_tag_not_found":
            message = "each parameter needs type: float, int or categorical"
        else:
            message = err["msg"].replace("Value error, ", "")
            if err["type"] == "literal_error":
                message += f" (got {err['input']!r})"
        raise RecipeError(message, file=shown, key=key or None) from exc
    spec.storage = os.environ.get(STORAGE_ENV) or spec.storage
    return spec


def _allowed(parent: str) -> list[str]:
    parts = parent.split(".") if parent else []
    if not parts:
        return sorted(SweepSpec.model_fields)
    if parts[0] == "params":  # params.<dotted recipe key>: the key's own dots are not nesting
        return sorted(set(FloatParam.model_fields) | set(CategoricalParam.model_fields))
    sections: dict[str, type[BaseModel]] = {
        "objective": Objective,
        "sampler": SamplerSpec,
        "pruner": PrunerSpec,
    }
    nested = sections.get(parts[0])
    return sorted(nested.model_fields) if nested else []


def check_objective(spec: SweepSpec, metrics: list[str], file: str) -> None:
    metric = spec.objective.metric
    if metric not in metrics:
        raise RecipeError(
            f"{metric!r} is not a validation metric of the base recipe (it has: {', '.join(metrics)})",
            file=file,
            key="objective.metric",
        )
    natural: Direction = "minimize" if lower_is_better(metric) else "maximize"
    if spec.objective.direction != natural:
        better = "lower" if natural == "minimize" else "higher"
        raise RecipeError(
            f"{metric} is {better}-is-better, so direction must be {natural}",
            file=file,
            key="objective.direction",
        )


def condition_keys(cond: Condition) -> list[str]:
    return [cond] if isinstance(cond, str) else list(cond)


def condition_holds(cond: Condition | None, lookup: dict[str, Any]) -> bool:
    """``lookup`` maps a path to its current value (a sampled one, else the base recipe's)."""
    if cond is None:
        return True
    if isinstance(cond, str):
        return lookup.get(cond) is not None
    for key, wanted in cond.items():
        options = wanted if isinstance(wanted, list) else [wanted]
        if lookup.get(key) not in options:
            return False
    return True
