"""Optimizers and learning-rate schedulers as recipe components, parameter groups and freezing.

torch's own optimizers and schedulers are registered as they are (``optim/adamw`` is
``torch.optim.AdamW``), so a recipe node takes exactly their arguments. Two keys belong to rex:

* ``groups`` on an optimizer node: ``[{params: GLOB or [GLOB, ...], lr: ..., weight_decay: ...}]``.
  A parameter joins the first group whose glob matches its name (``model.encoder.*``); the rest
  form the default group with the node's own arguments.
* ``interval`` on a scheduler node: ``step`` (the default: the schedule counts optimizer steps)
  or ``epoch``.

The optimizer and scheduler receive ``params``/``optimizer`` from the core, and a scheduler may
ask for ``total_steps``, the run's number of optimizer steps.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR

from rex.config.errors import RecipeError
from rex.config.registry import ComponentFactory, build, build_factory, register

OPTIMIZERS = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
}
SCHEDULERS = {
    "cosine": CosineAnnealingLR,
    "linear": LinearLR,
    "step": torch.optim.lr_scheduler.StepLR,
    "multistep": torch.optim.lr_scheduler.MultiStepLR,
    "exponential": torch.optim.lr_scheduler.ExponentialLR,
    "onecycle": torch.optim.lr_scheduler.OneCycleLR,
}
for _name, _target in OPTIMIZERS.items():
    register(f"optim/{_name}")(_target)
for _name, _target in SCHEDULERS.items():
    register(f"sched/{_name}")(_target)


@register("sched/warmup_cosine")
def warmup_cosine(
    optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0
) -> LRScheduler:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr`` at ``total_steps``:
    torch's LinearLR then CosineAnnealingLR, chained by SequentialLR.

    A run no longer than its warm-up (a smoke run with a few batches, say) warms up over its whole
    length and never decays; it says so rather than failing."""
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if warmup_steps >= total_steps:
        warnings.warn(
            f"sched/warmup_cosine: the run has {total_steps} optimizer steps, not more than "
            f"warmup_steps={warmup_steps}; it warms up over all of them and never decays",
            stacklevel=2,
        )
        return LinearLR(optimizer, start_factor=1.0 / (warmup_steps + 1), total_iters=warmup_steps)
    decay = CosineAnnealingLR(optimizer, T_max=total_steps - warmup_steps, eta_min=min_lr)
    if warmup_steps == 0:
        return decay
    warmup = LinearLR(optimizer, start_factor=1.0 / (warmup_steps + 1), total_iters=warmup_steps)
    return SequentialLR(optimizer, [warmup, decay], milestones=[warmup_steps])


def _globs(value: Any, key: str) -> list[str]:
    globs = [value] if isinstance(value, str) else value
    if not isinstance(globs, list) or not globs or not all(isinstance(g, str) for g in globs):
        raise RecipeError("must be a parameter-name glob or a list of them, e.g. model.encoder.*", key=key)
    return globs


def _matching(names: Iterable[str], globs: list[str], key: str) -> set[str]:
    names = list(names)
    matched: set[str] = set()
    for glob in globs:
        hits = fnmatch.filter(names, glob)
        if not hits:
            shown = ", ".join(sorted({n.rsplit(".", 1)[0] for n in names})[:6])
            raise RecipeError(f"{glob!r} matches no parameter (modules include: {shown}, ...)", key=key)
        matched.update(hits)
    return matched


def freeze(module: nn.Module, globs: list[str], key: str = "freeze") -> list[str]:
    """Set ``requires_grad=False`` on the parameters whose names match any glob; their names."""
    if not globs:
        return []
    named = dict(module.named_parameters())
    frozen = _matching(named, _globs(globs, key), key)
    for name in frozen:
        named[name].requires_grad_(False)
    return sorted(frozen)


def check_optimizer(node: Mapping[str, Any], key: str = "optimizer") -> tuple[ComponentFactory, list[Group]]:
    """The optimizer node validated (component, arguments, parameter groups), ready to build."""
    node = dict(node)
    groups = node.pop("groups", None) or []
    if not isinstance(groups, list):
        raise RecipeError("groups must be a list of {params: GLOB, lr: ..., ...}", key=f"{key}.groups")
    factory = build_factory(node, key)
    checked = []
    for i, group in enumerate(groups):
        where = f"{key}.groups[{i}]"
        if not isinstance(group, dict) or "params" not in group:
            raise RecipeError("each group needs params: GLOB plus the settings it overrides", key=where)
        settings = {k: v for k, v in group.items() if k != "params"}
        for name, value in settings.items():
            factory.check_argument(name, value, f"{where}.{name}")
        checked.append(Group(_globs(group["params"], f"{where}.params"), settings, f"{where}.params"))
    return factory, checked


@dataclass(frozen=True)
class Group:
    globs: list[str]
    settings: dict[str, Any]
    key: str


def build_optimizer(node: Mapping[str, Any], module: nn.Module, key: str = "optimizer") -> Optimizer:
    """The optimizer of ``node`` over ``module``'s trainable parameters, in parameter groups."""
    factory, groups = check_optimizer(node, key)
    trainable = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    if not trainable:
        raise RecipeError("every parameter is frozen: nothing to train (check freeze)", key="freeze")
    taken: set[str] = set()
    param_groups: list[dict[str, Any]] = []
    for group in groups:
        names = _matching([n for n, _ in trainable], group.globs, group.key) - taken
        taken |= names
        param_groups.append({"params": [p for n, p in trainable if n in names], **group.settings})
    rest = [p for n, p in trainable if n not in taken]
    if rest:
        param_groups.insert(0, {"params": rest})
    # One group of every trainable parameter in order: exactly what `optimizer(module.parameters())`
    # built before groups existed, so existing recipes train bit for bit as they did.
    params: Any = param_groups[0]["params"] if not groups else param_groups
    return factory(params=params)


def default_optimizer(name: str, lr: float, weight_decay: float) -> dict[str, Any]:
    """The node that ``train.optimizer``/``train.lr``/``train.weight_decay`` stand for."""
    return {"_component_": f"optim/{name}", "lr": lr, "weight_decay": weight_decay}


def check_scheduler(node: Mapping[str, Any], key: str = "scheduler") -> tuple[dict[str, Any], str]:
    """The scheduler node without rex's ``interval`` key, validated, and that interval."""
    node = dict(node)
    interval = node.pop("interval", "step")
    if interval not in ("step", "epoch"):
        raise RecipeError(f"interval must be step or epoch, got {interval!r}", key=f"{key}.interval")
    build_factory(node, key)
    return node, interval


def build_scheduler(
    node: Mapping[str, Any], optimizer: Optimizer, total_steps: int, key: str = "scheduler"
) -> dict[str, Any]:
    """Lightning's lr-scheduler config for ``node``: the scheduler and how often it steps."""
    node, interval = check_scheduler(node, key)
    scheduler = build(node, key, {"optimizer": optimizer, "total_steps": total_steps})
    if not isinstance(scheduler, LRScheduler):
        raise RecipeError(f"{node.get('_component_')} is not a learning-rate scheduler", key=key)
    return {"scheduler": scheduler, "interval": interval, "frequency": 1}
