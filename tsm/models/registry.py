"""The family registry: ``@register`` on a `Family` subclass makes ``model.family: <its name>`` work.

A new family is one file in ``tsm/models/`` with one ``@register``: `tsm.models` imports every module of
the package, so nothing else needs an edit (the config's list of families comes from here).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tsm.errors import TsmError

if TYPE_CHECKING:
    from tsm.models.base import Family

FAMILY_CLASSES: dict[str, type[Family]] = {}


def register(cls: type[Family]) -> type[Family]:
    """Class decorator: register a family under its ``name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a non-empty name to be registered")
    if cls.name in FAMILY_CLASSES and FAMILY_CLASSES[cls.name] is not cls:
        raise TypeError(
            f"two families are named {cls.name!r}: {FAMILY_CLASSES[cls.name].__name__}, {cls.__name__}"
        )
    FAMILY_CLASSES[cls.name] = cls
    return cls


def get_family(name: str) -> Family:
    """A fresh instance of the family registered as ``name``."""
    if name not in FAMILY_CLASSES:
        raise TsmError(f"unknown model family {name!r}; choose one of {', '.join(FAMILY_CLASSES)}")
    return FAMILY_CLASSES[name]()


def family_names() -> tuple[str, ...]:
    return tuple(FAMILY_CLASSES)
