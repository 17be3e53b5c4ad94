"""Recipe loading: YAML in, a validated :class:`Recipe` and its resolved dict out.

This is the only module that parses recipe YAML. It handles ``extends:`` (one base or a list,
merged in order, paths relative to the recipe; ``stages:`` merge by stage name), ``${...}``
interpolation and command-line dotlist overrides, and turns every failure into a
:class:`RecipeError` naming the file and key path.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ValidationError

from rex.config.errors import RecipeError
from rex.config.registry import load_plugins
from rex.config.schema import Recipe, StageConfig

OVERRIDE_SOURCE = "command-line override"


@dataclass(frozen=True)
class LoadedStage:
    """One stage of a staged recipe: its settings merged over the recipe's, validated whole."""

    config: StageConfig
    recipe: Recipe
    resolved: dict[str, Any]

    @property
    def name(self) -> str:
        return self.config.name


@dataclass(frozen=True)
class LoadedRecipe:
    path: Path
    recipe: Recipe
    resolved: dict[str, Any]
    stages: tuple[LoadedStage, ...] = ()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.resolved, sort_keys=False)


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def read_yaml_mapping(path: Path, shown: str, what: str, sections: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping; a missing file, a syntax error (with line and
    column) or another shape is a :class:`RecipeError` naming ``shown``."""
    if not path.is_file():
        raise RecipeError(f"{what} not found; check the path", file=shown)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise RecipeError(
            f"not UTF-8 text (byte {exc.start} is 0x{exc.object[exc.start]:02x}); save it as UTF-8",
            file=shown,
        ) from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"YAML syntax error at {where}{problem}", file=shown) from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"a {what} must be a mapping of {sections}", file=shown)
    return data


def _read_yaml(path: Path) -> DictConfig:
    shown = _display(path)
    # yaml first: its errors carry line and column, OmegaConf's do not.
    data = read_yaml_mapping(path, shown, "recipe file", "sections (data, model, train, ...)")
    try:
        return OmegaConf.create(data)
    except OmegaConfBaseException as exc:
        raise RecipeError(f"cannot read recipe: {exc}", file=shown) from exc


def _load_with_bases(path: Path, chain: tuple[Path, ...] = ()) -> DictConfig:
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(_display(p) for p in (*chain, path))
        raise RecipeError(f"extends forms a cycle: {cycle}", file=_display(chain[0]), key="extends")
    node = _read_yaml(path)
    bases = node.pop("extends", None)
    if bases is None:
        return node
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, ListConfig | list) or not all(isinstance(b, str) for b in bases):
        raise RecipeError("extends must be a path or a list of paths", file=_display(path), key="extends")
    merged = OmegaConf.create({})
    for i, base in enumerate(bases):
        base_path = path.parent / base
        if not base_path.is_file():
            raise RecipeError(
                f"base recipe {base!r} not found (looked in {_display(base_path.parent)})",
                file=_display(path),
                key=f"extends[{i}]" if len(bases) > 1 else "extends",
            )
        merged = _merge_over(merged, _load_with_bases(base_path, (*chain, path)))
    return _merge_over(merged, node)


def _merge_over(base: DictConfig, node: DictConfig) -> DictConfig:
    """``node`` merged over ``base``. Its ``stages:`` list gives the cascade's order, and an entry
    named like a base stage keeps each of that stage's keys it does not set, so a variant restates
    only what it changes (``- name: cart`` keeps the base's cart as it is). A key it sets replaces
    the base stage's whole, unmerged: a stage's mappings hold values such as fusion weights,
    where a deep merge would keep the base's entries."""
    base_stages, node_stages = base.get("stages"), node.get("stages")
    if isinstance(base_stages, ListConfig) and isinstance(node_stages, ListConfig):
        inherited = {
            stage["name"]: stage
            for stage in _plain_list(base_stages)
            if isinstance(stage, dict) and "name" in stage
        }
        node = node.copy()
        node["stages"] = [
            {**inherited[stage["name"]], **stage}
            if isinstance(stage, dict) and stage.get("name") in inherited
            else stage
            for stage in _plain_list(node_stages)
        ]
    return OmegaConf.merge(base, node)  # type: ignore[return-value]


def _plain_list(node: ListConfig) -> list[Any]:
    """A list node as plain Python, its ``${...}`` left for the merged recipe to resolve."""
    plain = OmegaConf.to_container(node, resolve=False)
    assert isinstance(plain, list)
    return plain


def _apply_overrides(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} must look like key.path=value", file=OVERRIDE_SOURCE)
        key, value = item.split("=", 1)
        key = _stage_index_path(cfg, key)
        _check_override_path(cfg, key)
        try:
            parsed = yaml.safe_load(value) if value else None
        except yaml.YAMLError:
            parsed = value
        try:
            OmegaConf.update(cfg, key, parsed, merge=False, force_add=True)
        except OmegaConfBaseException as exc:
            raise RecipeError(f"cannot set {key}: {exc}", file=OVERRIDE_SOURCE, key=key) from exc
    return cfg


def _stage_index_path(cfg: DictConfig, key: str) -> str:
    """``stages.NAME.rest`` → ``stages.I.rest``, where stage I is named NAME."""
    parts = key.split(".")
    if parts[0] != "stages" or len(parts) < 3 or parts[1].isdigit():
        return key
    stages = cfg.get("stages")
    names = [str(s.get("name")) for s in stages] if isinstance(stages, ListConfig) else []
    if parts[1] not in names:
        raise RecipeError(
            f"no stage named {parts[1]!r} (stages: {', '.join(names) or 'none'})",
            file=OVERRIDE_SOURCE,
            key=key,
        )
    return ".".join(["stages", str(names.index(parts[1])), *parts[2:]])


def _check_override_path(cfg: DictConfig, key: str) -> None:
    """Reject overrides through keys that do not exist, unless the schema or a component allows them.

    ``train.patience=3`` may add a key the recipe leaves at its default, and
    ``model.encoder.num_layers=3`` may set a component argument left at its default; the
    pydantic models and the registry validate those. ``trian.lr=1`` cannot be right.
    """
    parts = key.split(".")
    if not all(parts):
        raise RecipeError(f"override path {key!r} is malformed", file=OVERRIDE_SOURCE, key=key)
    top = parts[0]
    fields = set(Recipe.model_fields)
    if top not in fields:
        close = difflib.get_close_matches(top, sorted(fields), n=1)
        hint = f" (did you mean {close[0]}?)" if close else f" (sections: {', '.join(sorted(fields))})"
        raise RecipeError(f"no such recipe section {top!r}{hint}", file=OVERRIDE_SOURCE, key=key)
    node: Any = cfg
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, ListConfig) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]  # a stage, by the index _stage_index_path gave it
            continue
        if not isinstance(node, DictConfig) or part not in node:
            return  # below here, validation or the builder reports unknown keys with their path
        node = node[part]
        if not isinstance(node, DictConfig | ListConfig):
            prefix = ".".join(parts[: depth + 1])
            raise RecipeError(
                f"{prefix} is a value, not a section, so {key} cannot be set", file=OVERRIDE_SOURCE, key=key
            )


def _pydantic_message(exc: ValidationError, file: str, overrides: list[str]) -> RecipeError:
    err = exc.errors()[0]
    loc = ""
    for part in err["loc"]:
        loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
    if err["type"] == "extra_forbidden":
        parent_loc, _, leaf = loc.rpartition(".")
        allowed = _allowed_keys(parent_loc)
        close = difflib.get_close_matches(leaf, allowed, n=1)
        hint = (
            f" (did you mean {close[0]}?)"
            if close
            else (f" (allowed: {', '.join(allowed)})" if allowed else "")
        )
        message = f"unknown key{hint}"
    elif err["type"] == "missing":
        message = "required key is missing"
    else:
        message = err["msg"]
        if "input" in err and err["type"] not in ("value_error",):
            message += f" (got {err['input']!r})"
    source = file
    if loc and any(o.split("=", 1)[0] == loc or o.split("=", 1)[0].startswith(loc + ".") for o in overrides):
        source = OVERRIDE_SOURCE
    return RecipeError(message.replace("Value error, ", ""), file=source, key=loc or None)


def _allowed_keys(loc: str) -> list[str]:
    model: type[BaseModel] = Recipe
    for part in [p for p in loc.split(".") if p]:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        candidates = getattr(annotation, "__args__", (annotation,))
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return []
        model = nested[0]
    return sorted(model.model_fields)


def _refuse_environment_reads(node: Any, key: str, shown: str) -> None:
    """A recipe must not read environment variables: the resolved recipe is written to the run
    folder and to W&B, so ``${oc.env:WANDB_API_KEY}`` would put a secret there."""
    if isinstance(node, dict):
        for name, value in node.items():
            _refuse_environment_reads(value, f"{key}.{name}" if key else str(name), shown)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _refuse_environment_reads(value, f"{key}[{i}]", shown)
    elif isinstance(node, str) and re.search(r"\$\{\s*oc\.env\s*:", node):
        raise RecipeError(
            "recipes cannot read environment variables (${oc.env:...}): the resolved recipe is "
            "saved with the run; pass the value as a command-line override instead",
            file=shown,
            key=key,
        )


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> LoadedRecipe:
    """Load, merge, override, resolve and validate a recipe."""
    path = Path(path)
    overrides = list(overrides or [])
    shown = _display(path)
    cfg = _load_with_bases(path)
    cfg = _apply_overrides(cfg, overrides)
    if "name" not in cfg:
        cfg["name"] = path.stem
    _refuse_environment_reads(OmegaConf.to_container(cfg, resolve=False), "", shown)
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or None
        detail = str(exc).splitlines()[0]
        raise RecipeError(f"cannot resolve interpolation: {detail}", file=shown, key=key) from exc
    assert isinstance(resolved, dict)
    recipe = _validate({str(k): v for k, v in resolved.items()}, shown, overrides)
    resolved = recipe.model_dump(mode="json")
    if recipe.stages is None:
        return LoadedRecipe(path=path, recipe=recipe, resolved=resolved)
    # A stage keeps only what it sets, so a reloaded run folder merges exactly as the recipe did.
    resolved["stages"] = [stage.model_dump(mode="json", exclude_unset=True) for stage in recipe.stages]
    base = {k: v for k, v in resolved.items() if k != "stages"}
    stages = tuple(_load_stage(base, stage, shown, overrides) for stage in recipe.stages)
    return LoadedRecipe(path=path, recipe=recipe, resolved=resolved, stages=stages)


def _validate(resolved: dict[str, Any], shown: str, overrides: list[str], prefix: str = "") -> Recipe:
    try:
        # Plugins first: they may register the task or evaluator that validation looks up.
        plugins = resolved.get("plugins") or []
        if isinstance(plugins, list) and all(isinstance(p, str) for p in plugins):
            load_plugins(plugins)
        return Recipe.model_validate(resolved)
    except ValidationError as exc:
        error = _pydantic_message(exc, shown, overrides)
    except RecipeError as exc:  # a registry lookup, such as an unknown task
        error = exc
        error.file = error.file or shown
    if prefix:
        error.key = f"{prefix}.{error.key}" if error.key else prefix
    raise error


def _load_stage(base: dict[str, Any], stage: StageConfig, shown: str, overrides: list[str]) -> LoadedStage:
    sections = stage.model_dump(
        mode="json", exclude_unset=True, exclude={"name", "description", "init_from", "export"}
    )
    if stage.task is not None and stage.task != base.get("task"):
        # The recipe's view, metrics, monitor and evaluator were chosen for its own task: a stage
        # of another task starts from that task's defaults unless it sets them itself.
        base = {
            **base,
            "data": {k: v for k, v in base["data"].items() if k != "view"},
            "eval": {k: v for k, v in base["eval"].items() if k not in ("metrics", "monitor", "evaluator")},
        }
    merged = merge_sections(base, sections)
    recipe = _validate(merged, shown, overrides, prefix=f"stages.{stage.name}")
    return LoadedStage(config=stage, recipe=recipe, resolved=recipe.model_dump(mode="json"))


def merge_sections(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` merged into ``base`` key by key. A component node whose ``_component_`` differs
    from the base's replaces it whole (a stage's model/tiger keeps none of model/rqvae's
    arguments); lists and plain values replace."""
    out = dict(base)
    for key, value in update.items():
        current = out.get(key)
        replaces = (
            isinstance(value, dict)
            and "_component_" in value
            and (not isinstance(current, dict) or current.get("_component_") != value["_component_"])
        )
        if isinstance(value, dict) and isinstance(current, dict) and not replaces:
            out[key] = merge_sections(current, value)
        else:
            out[key] = value
    return out


def recipe_files(paths: list[str]) -> list[Path]:
    """Expand directories into the recipes they hold (``recipes/base`` holds partial bases, skipped)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found.extend(sorted(f for f in p.glob("*.yaml")))
        else:
            found.append(p)
    return found
