"""`evolve`: `dataclasses.replace` for the control cycle's frozen value types, without running `__init__`.

The policy copies its per-service state, diagnostics and forecast profile about ten times per service per
control tick; `dataclasses.replace` rebuilds the instance through `__init__` (every field set with
`object.__setattr__`), which was a fifth of a simulated day. `evolve` copies the instance's attribute dict and
applies the changes: the same result for a frozen dataclass with no `__post_init__`, no derived attributes
(`functools.cached_property`) and no `__slots__`, which it checks once per class. Unknown field names raise, as
they do in `replace`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TypeVar

T = TypeVar("T")
_FIELDS: dict[type, frozenset[str]] = {}


def _fields(cls: type) -> frozenset[str]:
    names = _FIELDS.get(cls)
    if names is None:
        params = getattr(cls, "__dataclass_params__", None)
        if params is None or not params.frozen:
            raise TypeError(f"evolve: {cls.__name__} is not a frozen dataclass")
        if hasattr(cls, "__post_init__") or "__slots__" in cls.__dict__ or any(
                isinstance(v, functools.cached_property) for k in cls.__mro__ for v in vars(k).values()):
            raise TypeError(f"evolve: {cls.__name__} has __post_init__, __slots__ or a cached property: use "
                            "dataclasses.replace")
        fields = dataclasses.fields(cls)
        if any(not f.init for f in fields):
            raise TypeError(f"evolve: {cls.__name__} has fields outside __init__: use dataclasses.replace")
        names = _FIELDS[cls] = frozenset(f.name for f in fields)
    return names


def evolve(obj: T, **changes) -> T:
    """A copy of the frozen dataclass instance `obj` with `changes` (see the module docstring)."""
    cls = type(obj)
    if not _fields(cls).issuperset(changes):
        raise TypeError(f"{cls.__name__} has no field {sorted(set(changes) - _fields(cls))[0]!r}")
    new = object.__new__(cls)
    attrs = new.__dict__
    attrs.update(obj.__dict__)
    attrs.update(changes)
    return new
