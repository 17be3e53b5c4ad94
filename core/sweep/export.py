"""``rex sweep SPEC --export-best``: the best trial's recipe as a recipe file, or its values as a
params.yaml section."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import optuna
from rich.console import Console

from rex.config.errors import RexError
from rex.engine.runs import atomic_write_text
from rex.sweep.spec import (
    load_spec,
)
from rex.sweep.storage import default_storage, make_storage, shown_storage

out = Console()


# ----------------------------------------------------------------------------- export best
PARAMS_SECTION = "sweep_best"
PARAMS_COMMENT = "# best sweep parameters, written by `rex sweep --export-best`"


def export_best(spec_path: Path, target: Path | None, params_yaml: Path | None) -> Path:
    """Write the best trial as a recipe that extends the base (``rex train`` it directly), and
    optionally as a ``sweep_best`` section of params.yaml for DVC stages to depend on."""
    spec = load_spec(spec_path)
    name = spec.name or spec_path.stem
    storage_url = spec.storage or default_storage(spec_path, name)
    try:
        study = optuna.load_study(study_name=name, storage=make_storage(storage_url, spec, spec_path))
        best = study.best_trial
    except (KeyError, ValueError) as exc:
        raise RexError(
            f"no completed trial in study {name!r} at {shown_storage(storage_url)}; run the sweep first",
            file=str(spec_path),
        ) from exc
    import yaml

    overrides = [
        *spec.overrides,
        f"eval.monitor={spec.objective.metric}",
        *best.user_attrs.get("overrides", []),
    ]
    nested: dict[str, Any] = {}
    for item in overrides:
        key, value = item.split("=", 1)
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value)
    target = target or spec_path.resolve().parent / f"{name}.best.yaml"
    recipe_path = (spec_path.resolve().parent / spec.recipe).resolve()
    header = (
        f"# Best trial {best.number} of sweep {name}: validation {spec.objective.metric} "
        f"{best.value:.4f}. Written by `rex sweep --export-best`.\n"
    )
    body = {
        "extends": os.path.relpath(recipe_path, target.resolve().parent),
        "name": f"{name}_best",
        **nested,
    }
    atomic_write_text(target, header + yaml.safe_dump(body, sort_keys=False))
    if params_yaml is not None:
        _write_params_section(
            params_yaml,
            name,
            {
                k.split("=", 1)[0]: v
                for k, v in zip(
                    overrides, [yaml.safe_load(o.split("=", 1)[1]) for o in overrides], strict=True
                )
            },
        )
    return target


def _write_params_section(path: Path, name: str, values: dict[str, Any]) -> None:
    """Replace (or add) one study's entry under ``sweep_best:`` and keep the rest of the file,
    comments included: params.yaml also holds the data stages' hand-written settings."""
    import yaml

    text = path.read_text() if path.is_file() else ""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.rstrip() == f"{PARAMS_SECTION}:"), None)
    current: dict[str, Any] = {}
    if start is not None:
        end = next(
            (
                i
                for i in range(start + 1, len(lines))
                if lines[i] and not lines[i][0].isspace() and not lines[i].startswith("#")
            ),
            len(lines),
        )
        current = (yaml.safe_load("\n".join(lines[start:end])) or {}).get(PARAMS_SECTION) or {}
        if start and lines[start - 1] == PARAMS_COMMENT:
            start -= 1  # our own comment goes with the block it introduces
        lines = lines[:start] + lines[end:]
    current[name] = values
    block = yaml.safe_dump({PARAMS_SECTION: current}, sort_keys=False).rstrip().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    atomic_write_text(
        path,
        "\n".join([*lines, "", PARAMS_COMMENT, *block]) + "\n",
    )
