"""Merge methods, one module each, registered by name.

A method turns chunks of the base and of each fine-tuned model into a chunk of the output;
the engine owns reading, chunking and writing. See ``base.MergeMethod`` for the interface.
"""

from __future__ import annotations

from .base import MergeMethod

REGISTRY: dict[str, type[MergeMethod]] = {}


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    """Class decorator: make a method available by its ``name``."""
    REGISTRY[cls.name] = cls
    return cls


def method_names() -> list[str]:
    return sorted(REGISTRY)


def get_method(name: str) -> type[MergeMethod]:
    """The method class registered under ``name``; SpecError listing the choices otherwise."""
    from ..errors import SpecError

    if name not in REGISTRY:
        raise SpecError(f"unknown merge method {name!r}; choose one of: {', '.join(method_names())}")
    return REGISTRY[name]


# Importing the modules registers them.
from . import linear  # noqa: E402,F401
