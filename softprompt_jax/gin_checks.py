"""Checks of parsed gin settings before a command runs: typos, unset macros, mistyped values.

gin itself keeps a macro that nothing uses (`--gin.TRAIN_STEP=2` beside `TRAIN_STEPS`), fails
on an unset one only when it is read (`macro() missing 1 required positional argument`) and
passes `'10'` on where an int is needed. Each check here raises SoftpromptError with one line
naming the macro. gin 0.5 has no public view of a parsed config, so this module alone reads
`gin.config._CONFIG` (binding key -> {parameter: value}) and `gin.config._REGISTRY`.
"""

from __future__ import annotations

import collections
import difflib
import inspect
import types
import typing
from collections.abc import Iterable, Iterator
from typing import Any

import gin
from softprompt_jax.errors import SoftpromptError

MACRO = "gin.macro"  # `NAME = value` is bound as parameter `value` of this selector, scope NAME
_SCALARS = (bool, int, float, str, type(None))

# A binding key: (scope, selector); a macro's is (its name, MACRO).
Key = tuple[str, str]


def defined_macros() -> set[str]:
    """The names of the macros bound so far."""
    return {scope for scope, selector in gin.config._CONFIG if selector == MACRO}


def used_macros() -> set[str]:
    """The names of the macros some binding refers to (`%NAME`)."""
    return {_macro_name(ref) for ref in _references(gin.config._CONFIG) if _is_macro(ref)}


def setting_names(configurables: Iterable[str]) -> set[str]:
    """`name.parameter` for every parameter of the given configurables (close-match candidates)."""
    names = set()
    for name in configurables:
        configurable = gin.config._REGISTRY.get_match(name)
        for parameter in inspect.signature(configurable.wrapped).parameters:
            names.add(f"{name}.{parameter}")
    return names


def check_unused(macros: Iterable[str], file_macros: set[str], settings: Iterable[str]) -> None:
    """Each of `macros` (set on the command line) must be defined in a gin file or used."""
    used = used_macros()
    for name in macros:
        if name not in used and name not in file_macros:
            raise SoftpromptError(
                f"unknown macro {name}: no gin file of this run defines or uses it"
                + did_you_mean(name, file_macros | used | set(settings))
            )


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """'; did you mean A or B?' for the close matches of `name`, or ''."""
    matches = difflib.get_close_matches(name, sorted(set(candidates)), n=3)
    return f"; did you mean {' or '.join(matches)}?" if matches else ""


def check_reachable(entry: str) -> None:
    """Every macro the settings of `entry` (a configurable's name) reach is set and well typed.

    Walks `entry`'s bindings, the macros they use and the configurables they reference, so
    a macro only another command would read is not required.
    """
    start = gin.config._REGISTRY.get_match(entry).selector
    pending: collections.deque[Key] = collections.deque([("", start)])
    seen: set[Key] = set()
    while pending:
        key = pending.popleft()
        if key in seen:
            continue
        seen.add(key)
        for parameter, value in _bindings(key).items():
            for ref in _references(value):
                if _is_macro(ref) and (_macro_name(ref), MACRO) not in gin.config._CONFIG:
                    name = _macro_name(ref)
                    raise SoftpromptError(
                        f"macro {name} is not set ({_setting(key, parameter)} = %{name}); "
                        f"set it in a gin file or with --gin.{name}=VALUE"
                    )
                pending.append(ref.config_key)
            _check_type(key, parameter, value)


def _check_type(key: Key, parameter: str, value: Any) -> None:
    """A literal (or a macro's literal) must be one of the scalar types the annotation names."""
    where = _setting(key, parameter)
    while isinstance(value, gin.config.ConfigurableReference) and _is_macro(value):
        where = _macro_name(value)
        if (where, MACRO) not in gin.config._CONFIG:
            return  # unset: the walk in `check_reachable` names it
        value = gin.config._CONFIG[(where, MACRO)]["value"]
    allowed = _scalar_types(_annotation(key, parameter))
    if allowed is None or isinstance(value, gin.config.ConfigurableReference):
        return
    if _fits(value, allowed):
        return
    wanted = " or ".join(_a(t) for t in allowed)
    raise SoftpromptError(
        f"{where} = {value!r} is {_a(type(value))}, but {_setting(key, parameter)} takes {wanted}"
    )


def _a(kind: type) -> str:
    """'an int', 'a str', 'None': a type as a message names it."""
    if kind is type(None):
        return "None"
    return f"{'an' if kind.__name__[0] in 'aeiou' else 'a'} {kind.__name__}"


def _fits(value: Any, allowed: tuple[type, ...]) -> bool:
    if isinstance(value, bool):  # bool is an int to Python, not to a setting
        return bool in allowed
    if isinstance(value, int) and float in allowed:
        return True
    return isinstance(value, allowed)


def _scalar_types(annotation: Any) -> tuple[type, ...] | None:
    """The scalar types an annotation allows; None where it allows more (left unchecked)."""
    if annotation is None:
        return None
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    options = typing.get_args(annotation) if union else (annotation,)
    return options if all(option in _SCALARS for option in options) else None


def _annotation(key: Key, parameter: str) -> Any:
    """The type annotation of a configurable's parameter (None for macros and the unannotated)."""
    if key[1] == MACRO:
        return None
    wrapped = gin.config._REGISTRY.get_match(key[1]).wrapped
    try:
        return typing.get_type_hints(wrapped).get(parameter)
    except (NameError, TypeError):  # an annotation Python cannot evaluate here
        return None


def _bindings(key: Key) -> dict[str, Any]:
    """The parameters bound for `key`, a scoped binding inheriting its outer scopes' ones."""
    scope, selector = key
    parts = scope.split("/") if scope else []
    bound: dict[str, Any] = {}
    for i in range(len(parts) + 1):
        bound.update(gin.config._CONFIG.get(("/".join(parts[:i]), selector), {}))
    return bound


def _references(value: Any) -> Iterator[gin.config.ConfigurableReference]:
    return gin.config.iterate_references(value)


def _is_macro(ref: gin.config.ConfigurableReference) -> bool:
    return ref.configurable.selector == MACRO


def _macro_name(ref: gin.config.ConfigurableReference) -> str:
    return "/".join(ref.scopes)


def _setting(key: Key, parameter: str) -> str:
    """How a user writes the binding: `NAME` for a macro, `configurable.parameter` otherwise."""
    scope, selector = key
    if selector == MACRO:
        return scope
    name = gin.config._REGISTRY.get_match(selector).name
    return f"{scope}/{name}.{parameter}" if scope else f"{name}.{parameter}"
