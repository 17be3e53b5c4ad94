"""Component registry and recursive builder.

A component registers under ``kind/name`` (``encoder/mlp``, ``loss/bce``). A recipe node
``{_component_: encoder/mlp, hidden: [64]}`` is built by looking the name up and checking every
argument against the constructor's type hints before calling it.

Two kinds of argument are not written in the recipe:

* **context** values (``num_items``, ``fields`` ...) that come from the dataset schema. The
  builder fills a parameter from the context when the recipe leaves it out.
* **factories**: a parameter annotated ``Factory[T]`` receives a :class:`ComponentFactory`
  instead of a built module, so the parent can supply arguments it alone knows (an input
  width, say) when it calls the factory.

The registry knows nothing about recipes or files; errors carry the key path and the caller
adds the file name.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, Union, get_args, get_origin, get_type_hints

from rex.config.errors import RecipeError

T = TypeVar("T")
COMPONENT_KEY = "_component_"


class Factory(Generic[T]):
    """Annotation marker: the argument is a recipe node built later by the parent component."""


@dataclass(frozen=True)
class Entry:
    key: str
    target: Callable[..., Any]

    @property
    def summary(self) -> str:
        """The docstring's first paragraph as plain text: ````x```` and ``:meth:`x``` read as ``x``."""
        doc = (inspect.getdoc(self.target) or "").strip()
        first = " ".join(doc.split("\n\n", 1)[0].split())
        return re.sub(r"(?::\w+:)?`+([^`]+)`+", r"\1", first)


_REGISTRY: dict[str, Entry] = {}


def register(key: str) -> Callable[[T], T]:
    """Class or function decorator: ``@register("encoder/mlp")``."""
    if key.count("/") != 1 or not all(key.split("/")):
        raise ValueError(f"component key must look like 'kind/name', got {key!r}")

    def decorate(target: T) -> T:
        existing = _REGISTRY.get(key)
        if existing is not None and existing.target is not target:
            raise ValueError(f"{key} is already registered to {existing.target!r}")
        _REGISTRY[key] = Entry(key, target)  # type: ignore[arg-type]
        return target

    return decorate


def entries(kind: str | None = None) -> list[Entry]:
    """The registered components (of ``kind``), built-ins imported as needed."""
    from rex.config.index import builtin_index

    for key, (module, _) in builtin_index().items():
        if (kind is None or key.split("/")[0] == kind) and key not in _REGISTRY:
            importlib.import_module(module)
    return sorted(
        (e for e in _REGISTRY.values() if kind is None or e.key.split("/")[0] == kind), key=lambda e: e.key
    )


def summaries(kind: str | None = None) -> list[tuple[str, str]]:
    """(key, one-line summary) of every component (of ``kind``), from the built-in index and
    whatever else this process registered, without importing any component."""
    from rex.config.index import builtin_index

    rows = {key: summary for key, (_, summary) in builtin_index().items()}
    rows.update({key: entry.summary for key, entry in _REGISTRY.items() if key not in rows})
    return sorted(
        (key, summary) for key, summary in rows.items() if kind is None or key.split("/")[0] == kind
    )


def lookup(name: str, path: str = "") -> Entry:
    """Find a component by ``kind/name``, or by ``name`` alone when that is unambiguous. A built-in
    is imported on first use (see :mod:`rex.config.index`)."""
    from rex.config.index import builtin_index

    index = builtin_index()
    known = set(_REGISTRY) | set(index)
    if name in known:
        key = name
    else:
        short = sorted(k for k in known if k.split("/", 1)[1] == name)
        if len(short) > 1:
            raise RecipeError(
                f"component name {name!r} is ambiguous: write one of {', '.join(short)}", key=path
            )
        if not short:
            close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.5)
            hint = f" (did you mean {' or '.join(close)}?)" if close else " (see `rex list`)"
            raise RecipeError(f"unknown component {name!r}{hint}", key=path)
        key = short[0]
    if key not in _REGISTRY:
        importlib.import_module(index[key][0])
        if key not in _REGISTRY:  # a component renamed without regenerating the index
            raise RuntimeError(f"{index[key][0]} no longer registers {key}: run `python -m rex.config.index`")
    return _REGISTRY[key]


MODULE_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def load_plugins(modules: list[str]) -> None:
    """Import the third-party modules a recipe lists under ``plugins:`` so they can register.

    A plugin must be an absolute module name that registers at least one component: ``os`` or
    any other module that registers nothing is refused, so ``plugins:`` cannot import arbitrary
    code for its side effects."""
    import sys

    for i, module in enumerate(modules):
        key = f"plugins[{i}]"
        if module in _PLUGINS:
            continue
        if not MODULE_NAME.match(module):
            raise RecipeError(
                f"{module!r} is not an absolute module name; write one such as my_lab.components", key=key
            )
        imported_before, keys_before = module in sys.modules, set(_REGISTRY)
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise RecipeError(
                f"cannot import plugin module {module!r}: {exc}. Install it or fix the name.", key=key
            ) from exc
        except Exception as exc:  # the plugin's own code failed: report it as the recipe's problem
            raise RecipeError(
                f"plugin module {module!r} failed while importing: {type(exc).__name__}: {exc}", key=key
            ) from exc
        # What the import registered, built-ins it imported on the way aside; a module imported
        # earlier is judged by where its components are defined.
        from rex.config.index import builtin_index

        registers = bool(set(_REGISTRY) - keys_before - set(builtin_index())) or (
            imported_before and any(_defined_in(entry, module) for entry in _REGISTRY.values())
        )
        if not registers:
            raise RecipeError(
                f"plugin module {module!r} registers no component; list only modules that "
                "@register components",
                key=key,
            )
        _PLUGINS.add(module)


_PLUGINS: set[str] = set()  # modules accepted as plugins in this process


def _defined_in(entry: Entry, module: str) -> bool:
    defined = getattr(entry.target, "__module__", "") or ""
    return defined == module or defined.startswith(module + ".")


# --------------------------------------------------------------------------- type checking


def _type_name(annotation: Any) -> str:
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and get_origin(annotation) is None:
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def type_matches(value: Any, annotation: Any) -> bool:
    """Whether a recipe value (plain YAML data or a built object) fits ``annotation``."""
    if annotation is Any or annotation is inspect.Parameter.empty:
        return True
    origin = get_origin(annotation)
    if origin is Union or origin is types.UnionType:
        return any(type_matches(value, arg) for arg in get_args(annotation))
    if origin is typing.Literal:
        return value in get_args(annotation)
    if origin is Factory:
        return isinstance(value, ComponentFactory)
    if origin in (list, tuple, typing.Sequence) or annotation in (list, tuple):
        if not isinstance(value, list | tuple):
            return False
        args = get_args(annotation)
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(args) == len(value) and all(
                type_matches(v, a) for v, a in zip(value, args, strict=True)
            )
        return not args or all(type_matches(v, args[0]) for v in value)
    if origin in (dict, Mapping) or annotation is dict:
        if not isinstance(value, Mapping):
            return False
        args = get_args(annotation)
        return not args or all(
            type_matches(k, args[0]) and type_matches(v, args[1]) for k, v in value.items()
        )
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


# --------------------------------------------------------------------------- building


class ComponentFactory:
    """A validated recipe node whose construction the parent component completes.

    ``factory(in_dim=64)`` builds the component with the recipe's arguments plus those given
    by the parent; an argument missing from both is reported with the recipe key path.
    """

    def __init__(self, entry: Entry, kwargs: dict[str, Any], path: str, context: Mapping[str, Any]) -> None:
        self.entry = entry
        self.kwargs = kwargs
        self.path = path
        self.context = context

    def __call__(self, **supplied: Any) -> Any:
        # The recipe's own arguments win over the context; a value the parent supplies must not be
        # contradicted by the recipe (a child's width other than the one the parent wires it to
        # would fail at the first forward, far from the key that caused it).
        for name, value in supplied.items():
            if name in self.kwargs and not _same(self.kwargs[name], value):
                raise RecipeError(
                    f"{self.entry.key} is given {name}={value!r} by its parent, so it cannot be "
                    f"{self.kwargs[name]!r}; remove this key and set the parent's instead",
                    key=_join(self.path, name),
                )
        kwargs = {**_from_context(self.entry, self.context), **supplied, **self.kwargs}
        _check_required(self.entry, kwargs, self.path)
        return _construct(self.entry, kwargs, self.path)

    def accepts(self, name: str) -> bool:
        """Whether the component takes an argument ``name`` (for a parent that supplies a
        setting only to the children that use it)."""
        return name in _signature(self.entry)[0]

    def check_argument(self, name: str, value: Any, path: str) -> None:
        """A RecipeError unless ``name`` is an argument of the component and ``value`` fits its type
        (for settings the parent passes through, such as an optimizer's parameter-group lr)."""
        _check_argument(self.entry, name, value, path)

    def __repr__(self) -> str:
        return f"ComponentFactory({self.entry.key}, {self.kwargs})"


def _signature(entry: Entry) -> tuple[dict[str, inspect.Parameter], dict[str, Any]]:
    target = entry.target
    init = target.__init__ if inspect.isclass(target) else target  # type: ignore[misc]
    params = dict(inspect.signature(init).parameters)
    params.pop("self", None)
    params = {n: p for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    try:
        hints = get_type_hints(init)
    except Exception as exc:  # a component with unresolvable hints is a programming error
        raise TypeError(f"cannot read type hints of {entry.key}: {exc}") from exc
    return params, hints


def _check_required(entry: Entry, kwargs: Mapping[str, Any], path: str) -> None:
    params, _ = _signature(entry)
    missing = [n for n, p in params.items() if p.default is p.empty and n not in kwargs]
    if missing:
        raise RecipeError(
            f"missing required argument{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
            f"for {entry.key}",
            key=path,
        )


def _from_context(entry: Entry, context: Mapping[str, Any]) -> dict[str, Any]:
    """Context values for the component's required parameters that the context provides."""
    params, _ = _signature(entry)
    return {n: context[n] for n, p in params.items() if p.default is p.empty and n in context}


def _check_argument(entry: Entry, key: str, value: Any, path: str, check_type: bool = True) -> None:
    params, hints = _signature(entry)
    if key not in params:
        close = difflib.get_close_matches(key, list(params), n=1)
        hint = f" (did you mean {close[0]}?)" if close else f" (arguments: {', '.join(params) or 'none'})"
        raise RecipeError(f"unknown argument for {entry.key}{hint}", key=path)
    annotation = hints.get(key, Any)
    if check_type and not type_matches(value, annotation):
        shown = value.entry.key if isinstance(value, ComponentFactory) else repr(value)
        raise RecipeError(f"expected {_type_name(annotation)} for {entry.key}, got {shown}", key=path)


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def build(node: Any, path: str = "", context: Mapping[str, Any] | None = None) -> Any:
    """Build a recipe node (plain dict/list data) recursively into objects."""
    return _build(node, path, context or {}, as_factory=False)


def build_factory(
    node: Mapping[str, Any], path: str, context: Mapping[str, Any] | None = None
) -> ComponentFactory:
    """Validate a component node now; the caller builds it later with the arguments it alone has
    (an optimizer's parameters, say)."""
    if COMPONENT_KEY not in node:
        raise RecipeError("must be a component node such as {_component_: optim/adamw, ...}", key=path)
    factory = _build(node, path, context or {}, as_factory=True)
    assert isinstance(factory, ComponentFactory)
    return factory


def _build(node: Any, path: str, context: Mapping[str, Any], as_factory: bool) -> Any:
    if isinstance(node, list):
        return [_build(v, _join(path, i), context, False) for i, v in enumerate(node)]
    if not isinstance(node, Mapping) or COMPONENT_KEY not in node:
        if isinstance(node, Mapping):
            return {k: _build(v, _join(path, k), context, False) for k, v in node.items()}
        return node
    name = node[COMPONENT_KEY]
    if not isinstance(name, str):
        raise RecipeError(
            "_component_ must be a string such as 'encoder/mlp'", key=_join(path, COMPONENT_KEY)
        )
    entry = lookup(name, _join(path, COMPONENT_KEY))
    _, hints = _signature(entry)
    kwargs: dict[str, Any] = {}
    for key, raw in node.items():
        if key == COMPONENT_KEY:
            continue
        arg_path = _join(path, key)
        annotation = hints.get(key, Any)
        wants_factory = get_origin(annotation) is Factory or any(
            get_origin(a) is Factory for a in get_args(annotation)
        )
        _check_argument(entry, key, None, arg_path, check_type=False)
        if wants_factory and isinstance(raw, Mapping) and COMPONENT_KEY not in raw:
            raise RecipeError(
                f"{entry.key} takes a component here: add {COMPONENT_KEY}: KIND/NAME "
                "(`rex list` shows the registered ones)",
                key=arg_path,
            )
        value = _build(raw, arg_path, context, as_factory=wants_factory and raw is not None)
        _check_argument(entry, key, value, arg_path)
        kwargs[key] = value
    if as_factory:
        return ComponentFactory(entry, kwargs, path, context)
    kwargs = {**_from_context(entry, context), **kwargs}
    _check_required(entry, kwargs, path)
    return _construct(entry, kwargs, path)


def _construct(entry: Entry, kwargs: dict[str, Any], path: str) -> Any:
    """``entry.target(**kwargs)``; an argument it rejects, or memory it cannot get, becomes a
    RecipeError at ``path``. A child built inside (a factory called by its parent) reports its
    own key, so the error names the deepest key at fault."""
    try:
        return entry.target(**kwargs)
    except RecipeError:
        raise
    except (ValueError, TypeError) as exc:
        # "dim must be positive" is about the argument dim: name its key, not only the node's
        named = re.match(r"(\w+) (must|should) ", str(exc))
        key = _join(path, named.group(1)) if named and named.group(1) in kwargs else path
        raise RecipeError(f"{entry.key} rejected its arguments: {exc}", key=key) from exc
    except (MemoryError, RuntimeError) as exc:
        if not isinstance(exc, MemoryError) and "alloc" not in str(exc).lower():
            raise
        asked = re.search(r"allocate (\d+) bytes", str(exc))
        size = f" ({int(asked.group(1)) / 1e9:,.1f} GB at once)" if asked else ""
        raise RecipeError(
            f"{entry.key} needs more memory than this machine has{size}; lower its sizes", key=path
        ) from exc


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # tensors and other values without a plain truth value: do not judge
        return True
