"""The search: samplers and pruners, checks of every search key against the resolved recipe
before any trial, and a trial's define-by-run sampling of its overrides."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from rex.config.errors import RecipeError, RexError
from rex.config.recipe import LoadedRecipe, load_recipe
from rex.config.schema import Recipe
from rex.sweep.spec import (
    CategoricalParam,
    SweepSpec,
    condition_holds,
    condition_keys,
    override,
)

# model and losses are free-form component trees: the registry checks their arguments when the
# probe recipe is built. Every other section is a pydantic model that rejects unknown keys.
COMPONENT_SECTIONS = ("model", "losses")


def _get(tree: Any, key: str) -> tuple[bool, Any]:
    """The node at a dotted key, where a number indexes a list (``losses.1.weight``), as in
    a dotlist override."""
    node = tree
    for part in key.split("."):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return False, None
    return True, node


def _stage_tree(loaded: LoadedRecipe, key: str) -> tuple[dict[str, Any], str]:
    """The resolved tree a search key lives in and its path there: the recipe's own, or for
    ``stages.NAME.rest`` the named stage's whole resolved recipe and ``rest``."""
    parts = key.split(".")
    if parts[0] == "stages" and len(parts) > 2:
        for stage in loaded.stages:
            if stage.name == parts[1]:
                return stage.resolved, ".".join(parts[2:])
    return loaded.resolved, key


def make_sampler(spec: SweepSpec, worker: int = 0) -> optuna.samplers.BaseSampler:
    cfg = spec.sampler
    # Each worker process has its own sampler: with one shared seed, parallel workers would draw
    # the very same random start-up trials.
    seed = None if cfg.seed is None else cfg.seed + worker
    startup = {} if cfg.n_startup_trials is None else {"n_startup_trials": cfg.n_startup_trials}
    if cfg.type == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if cfg.type == "grid":
        space = {key: p.grid() for key, p in spec.params.items()}
        return optuna.samplers.GridSampler(space, seed=seed)
    if cfg.type == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, **startup)
    # constant_liar: parallel workers see running trials as bad, so they do not all sample the
    # same promising point.
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True, **startup)


def make_pruner(spec: SweepSpec, max_epochs: int) -> optuna.pruners.BasePruner:
    cfg = spec.pruner
    if cfg.type == "none":
        return optuna.pruners.NopPruner()
    if cfg.type == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=cfg.min_resource, max_resource=max_epochs, reduction_factor=cfg.reduction_factor
        )
    return optuna.pruners.MedianPruner(
        n_startup_trials=cfg.n_startup_trials, n_warmup_steps=cfg.n_warmup_steps
    )


# ------------------------------------------------------------------------------ space checks
def check_space(
    spec: SweepSpec, spec_file: str, recipe_path: Path, base: LoadedRecipe, fixed: list[str]
) -> None:
    """Every search key must name something in the resolved base recipe (or an argument of the
    component there), and each end of its range must load and build. Runs before any trial."""
    from rex.config.registry import build, load_plugins
    from rex.data.datamodule import RexDataModule
    from rex.data.prepare import ensure_dataset
    from rex.engine.build import LOSS_KEYS

    load_plugins(base.recipe.plugins)
    context = RexDataModule(base.recipe, ensure_dataset(base.recipe.data.name), 0).context()
    keys = list(spec.params)
    for index, (key, param) in enumerate(spec.params.items()):
        where = f"params.{key}"
        top = key.split(".", 1)[0]
        if top not in Recipe.model_fields:
            close = difflib.get_close_matches(top, list(Recipe.model_fields), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise RecipeError(f"no such recipe section {top!r}{hint}", file=spec_file, key=where)
        enable = _enabling_overrides(spec, keys[:index], param.when, base, spec_file, where)
        enabled = _load(recipe_path, fixed + enable, spec_file, where, None)
        # stages.NAME.rest names a key of that stage's whole resolved recipe
        tree, tree_key = _stage_tree(enabled, key)
        top = tree_key.split(".", 1)[0] if tree is not enabled.resolved else top
        parent_key, _, leaf = tree_key.rpartition(".")
        found, parent = _get(tree, parent_key) if parent_key else (True, tree)
        if not found or not isinstance(parent, dict):
            hint = "" if param.when else f"; add `when: {parent_key}` if it is set by another parameter"
            raise RecipeError(
                f"{parent_key} is not a section of the base recipe, so {key} does not exist{hint}",
                file=spec_file,
                key=where,
            )
        is_component = "_component_" in parent
        if leaf not in parent and not is_component and top in COMPONENT_SECTIONS:
            raise RecipeError(f"{parent_key} has no key {leaf!r}", file=spec_file, key=where)
        for value in param.probes():
            probe = _load(recipe_path, [*fixed, *enable, override(key, value)], spec_file, where, value)
            # A later stage's components need what earlier stages export: its probe loads only.
            if top in COMPONENT_SECTIONS and tree is enabled.resolved:
                try:
                    build(probe.recipe.model, "model", context)
                    for i, node in enumerate(probe.recipe.losses or []):
                        build({k: v for k, v in node.items() if k not in LOSS_KEYS}, f"losses[{i}]", context)
                except RecipeError as exc:
                    raise _probe_error(exc, spec_file, where, value) from exc


def _probe_error(exc: RexError, spec_file: str, where: str, value: Any) -> RecipeError:
    inner = f"{exc.key}: " if exc.key and f"params.{exc.key}" != where else ""
    at = "" if value is None else f" (with value {value!r})"
    return RecipeError(f"{inner}{exc.detail}{at}", file=spec_file, key=where)


def _load(recipe: Path, overrides: list[str], spec_file: str, where: str, value: Any) -> LoadedRecipe:
    try:
        return load_recipe(recipe, overrides)
    except RecipeError as exc:
        raise _probe_error(exc, spec_file, where, value) from exc


def _enabling_overrides(
    spec: SweepSpec, earlier: list[str], cond: Any, base: LoadedRecipe, spec_file: str, where: str
) -> list[str]:
    """Overrides that make a conditional parameter active, for checking its key."""
    if cond is None:
        return []
    overrides = []
    for ckey in condition_keys(cond):
        if ckey not in earlier and not _get(base.resolved, ckey)[0]:
            raise RecipeError(
                f"when: {ckey!r} is neither a parameter listed before this one nor a key of the base recipe",
                file=spec_file,
                key=f"{where}.when",
            )
        wanted = cond.get(ckey) if isinstance(cond, dict) else None
        options = wanted if isinstance(wanted, list) else [wanted]
        if isinstance(cond, str):
            source = spec.params.get(ckey)
            options = (
                [c for c in source.choices if c is not None] if isinstance(source, CategoricalParam) else []
            )
        if options and options[0] is not None:
            overrides.append(override(ckey, options[0]))
    return overrides


# ---------------------------------------------------------------------------------- a trial
def sample(trial: optuna.Trial, spec: SweepSpec, base: dict[str, Any]) -> dict[str, Any]:
    """Define-by-run: a conditional parameter is suggested only when its condition holds."""
    values: dict[str, Any] = {}
    for key, param in spec.params.items():
        lookup = {k: values[k] if k in values else _get(base, k)[1] for k in condition_keys(param.when or {})}
        if not condition_holds(param.when, lookup):
            continue
        raw = suggest(trial, key, param.distribution())
        if isinstance(param, CategoricalParam):
            raw = param.value_of(raw)
        elif isinstance(raw, float) and getattr(param, "step", None):
            raw = round(raw, 10)  # 0.30000000000000004 from a 0.1 step reads back as 0.3
        values[key] = raw
    return values


def suggest(trial: optuna.Trial, name: str, distribution: BaseDistribution) -> Any:
    """``trial.suggest_*`` for a parameter's distribution, through Optuna's public API."""
    if isinstance(distribution, FloatDistribution):
        return trial.suggest_float(
            name, distribution.low, distribution.high, step=distribution.step, log=distribution.log
        )
    if isinstance(distribution, IntDistribution):
        return trial.suggest_int(
            name, distribution.low, distribution.high, step=distribution.step, log=distribution.log
        )
    assert isinstance(distribution, CategoricalDistribution)
    return trial.suggest_categorical(name, distribution.choices)
