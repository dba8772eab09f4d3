"""The safetensors dtype names, their numpy equivalents, and the user-facing aliases."""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy; safetensors.numpy needs it too)
import numpy as np


@dataclass(frozen=True)
class DType:
    """One safetensors dtype: its header name, element size and numpy type."""

    name: str
    itemsize: int
    numpy: np.dtype | None
    is_float: bool

    @property
    def computable(self) -> bool:
        """Whether merges do arithmetic on this dtype (others are copied from the base)."""
        return self.name in COMPUTE_DTYPES


def _dt(name: str, itemsize: int, numpy_type, is_float: bool) -> DType:
    return DType(name, itemsize, np.dtype(numpy_type) if numpy_type is not None else None, is_float)


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        _dt("F64", 8, np.float64, True),
        _dt("F32", 4, np.float32, True),
        _dt("F16", 2, np.float16, True),
        _dt("BF16", 2, ml_dtypes.bfloat16, True),
        _dt("F8_E4M3", 1, ml_dtypes.float8_e4m3fn, True),
        _dt("F8_E5M2", 1, ml_dtypes.float8_e5m2, True),
        _dt("I64", 8, np.int64, False),
        _dt("I32", 4, np.int32, False),
        _dt("I16", 2, np.int16, False),
        _dt("I8", 1, np.int8, False),
        _dt("U64", 8, np.uint64, False),
        _dt("U32", 4, np.uint32, False),
        _dt("U16", 2, np.uint16, False),
        _dt("U8", 1, np.uint8, False),
        _dt("BOOL", 1, np.bool_, False),
    )
}

# The float dtypes merges compute on; fp8 is stored but copied from the base, never blended.
COMPUTE_DTYPES = ("F64", "F32", "F16", "BF16")

# What --dtype accepts, mapped to safetensors names. "auto" (None) keeps the base's dtype per tensor.
DTYPE_ALIASES: dict[str, str | None] = {
    "auto": None,
    "bf16": "BF16",
    "bfloat16": "BF16",
    "fp16": "F16",
    "float16": "F16",
    "half": "F16",
    "fp32": "F32",
    "float32": "F32",
    "float": "F32",
}

# config.json's torch_dtype for each output dtype.
TORCH_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def dtype_from_alias(alias: str) -> str | None:
    """Map a user's ``--dtype`` value to a safetensors dtype name (None for ``auto``).

    >>> dtype_from_alias("bf16")
    'BF16'
    """
    key = alias.strip().lower()
    if key not in DTYPE_ALIASES:
        raise ValueError(f"unknown dtype {alias!r}; expected one of auto, bf16, fp16, fp32")
    return DTYPE_ALIASES[key]
