"""Building blocks of the typed configs: string enums and dataclass construction with clear errors.

A module of its own (importing nothing from the package) so that ``config.py`` and ``dynamic/config.py``
share it without an import cycle.
"""

from __future__ import annotations

import dataclasses
from enum import Enum
from typing import TypeVar

_E = TypeVar("_E", bound="NamedEnum")


class NamedEnum(str, Enum):
    """A string enum whose parser names the allowed values on a bad input."""

    @classmethod
    def parse(cls: type[_E], value: object, what: str) -> _E:
        """``value`` (a member, or its name in any case, as YAML gives it) as a member of ``cls``."""
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in cls)
            raise ValueError(f"{what}={value!r} is not valid; allowed values: {allowed}") from None

    def __str__(self) -> str:
        return self.value


def build_dataclass(cls: type, values: dict, what: str):
    """Builds dataclass ``cls`` from a mapping, naming unknown keys and the allowed ones."""
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ValueError(f"{what}: unknown option(s) {unknown}; allowed: {sorted(allowed)}")
    return cls(**values)


def checkpoint_safe_types() -> list[type]:
    """lightning_sparse's own enum types, which hyper-parameters saved in a checkpoint may hold (e.g. a data
    module's ``dense_transform``): plain string enums, safe for ``torch.load(weights_only=True)``."""
    found, pending = [], list(NamedEnum.__subclasses__())
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found
