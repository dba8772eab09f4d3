"""Merge methods, one module each, registered by name.

A method turns chunks of the base and of each fine-tuned model into a chunk of the output;
the engine owns reading, chunking and writing. See ``base.MergeMethod`` for the interface.
"""

from __future__ import annotations

from typing import Any

from .base import ChunkContext, MergeMethod, TensorContext

__all__ = ["ChunkContext", "MergeMethod", "REGISTRY", "TensorContext", "create_method", "get_method",
           "method_names", "register"]

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


def create_method(name: str, n_models: int, **params: Any) -> MergeMethod:
    """Build method ``name`` for ``n_models`` fine-tuned models from keyword parameters.

    Parameters left as None take the method's defaults; an unknown parameter is a SpecError
    naming it and the ones the method accepts.
    """
    from ..errors import SpecError

    cls = get_method(name)
    accepted = cls.parameter_names()
    params = {k: v for k, v in params.items() if v is not None}
    for key in params:
        if key not in accepted:
            shown = ", ".join("lambda" if a == "lambda_" else a for a in accepted) or "none"
            raise SpecError(f"method {name!r} takes no parameter {key.rstrip('_')!r} (it takes: {shown})")
    return cls(n_models, **params)


# Importing the modules registers them.
from . import (arcee_fusion, breadcrumbs, breadcrumbs_ties, dare_linear, dare_ties, della,  # noqa: E402,F401
               della_linear, karcher, linear,
               model_stock, multislerp, nearswap, nuslerp, passthrough, ram, ramplus_tl, sce, slerp,
               task_arithmetic, ties)
