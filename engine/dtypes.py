"""The safetensors dtype names, their sizes and numpy equivalents, and the user-facing aliases.

Every dtype safetensors 0.8 knows is read. Most are whole bytes per element; F4 (4 bits) and
the F6 formats (6 bits) are packed with no padding, so a tensor's byte length is numel × bits
/ 8 and safetensors refuses a tensor whose bit count is not a whole number of bytes. Only F64,
F32, F16 and BF16 are computed on; every other dtype is copied byte for byte (quantized
weights are dequantized first, by safeblend.quantized, from their checkpoint's config).
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy; safetensors.numpy needs it too)
import numpy as np


@dataclass(frozen=True)
class DType:
    """One safetensors dtype: its header name, bits per element and numpy type.

    ``numpy`` is None for the packed sub-byte dtypes (F4, F6_*): numpy has no packed array,
    so their tensors are only ever moved as bytes.
    """

    name: str
    bits: int
    numpy: np.dtype | None
    is_float: bool

    @property
    def packed(self) -> bool:
        """Whether several elements share a byte (F4, F6_E2M3, F6_E3M2)."""
        return self.bits % 8 != 0

    @property
    def itemsize(self) -> int:
        """Bytes per element; a packed dtype has none (its tensors are handled as bytes)."""
        if self.packed:
            raise TypeError(f"{self.name} packs {self.bits}-bit elements; address its tensors by byte")
        return self.bits // 8

    def nbytes(self, numel: int) -> int:
        """Bytes ``numel`` elements take, packed without padding (ValueError if not whole)."""
        bits = numel * self.bits
        if bits % 8:
            raise ValueError(f"{numel} elements of {self.name} are {bits} bits, not a whole number of bytes")
        return bits // 8

    @property
    def computable(self) -> bool:
        """Whether merges do arithmetic on this dtype (others are copied from the base)."""
        return self.name in COMPUTE_DTYPES


def _dt(name: str, bits: int, numpy_type, is_float: bool) -> DType:
    return DType(name, bits, np.dtype(numpy_type) if numpy_type is not None else None, is_float)


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        _dt("F64", 64, np.float64, True),
        _dt("F32", 32, np.float32, True),
        _dt("F16", 16, np.float16, True),
        _dt("BF16", 16, ml_dtypes.bfloat16, True),
        _dt("F8_E4M3", 8, ml_dtypes.float8_e4m3fn, True),
        _dt("F8_E5M2", 8, ml_dtypes.float8_e5m2, True),
        _dt("F8_E4M3FNUZ", 8, ml_dtypes.float8_e4m3fnuz, True),
        _dt("F8_E5M2FNUZ", 8, ml_dtypes.float8_e5m2fnuz, True),
        _dt("F8_E8M0", 8, ml_dtypes.float8_e8m0fnu, True),  # power-of-two scales (MX formats)
        _dt("F6_E2M3", 6, None, True),
        _dt("F6_E3M2", 6, None, True),
        _dt("F4", 4, None, True),  # E2M1, two per byte
        _dt("C64", 64, np.complex64, False),  # not a real float: copied like integers
        _dt("I64", 64, np.int64, False),
        _dt("I32", 32, np.int32, False),
        _dt("I16", 16, np.int16, False),
        _dt("I8", 8, np.int8, False),
        _dt("U64", 64, np.uint64, False),
        _dt("U32", 32, np.uint32, False),
        _dt("U16", 16, np.uint16, False),
        _dt("U8", 8, np.uint8, False),
        _dt("BOOL", 8, np.bool_, False),
    )
}

# The float dtypes merges compute on; fp8 and narrower are stored but copied from the base,
# never blended (unless a quantization config says how to dequantize them: safeblend.quantized).
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
    "fp8": "F8_E4M3",  # the base's fp8 block format (safeblend.quantized): only for an fp8 base
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
        raise ValueError(f"unknown dtype {alias!r}; expected one of auto, bf16, fp16, fp32, fp8")
    return DTYPE_ALIASES[key]
