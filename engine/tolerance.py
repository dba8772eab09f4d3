"""The acceptance rule for merged values (README, "How it works": numerics), shared by the demo and tests.

An element passes when it is within one ulp of the output dtype of the float64 reference, or,
where the inputs nearly cancel and the result is tiny, within fp32 rounding of the inputs'
magnitude: ``|out − ref| ≤ 2⁻²² · max|inputs at that element|``.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

_MANTISSA_BITS = {np.dtype(np.float64): 52, np.dtype(np.float32): 23, np.dtype(np.float16): 10,
                  np.dtype(ml_dtypes.bfloat16): 7}


def ulp(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """One unit in the last place of ``dtype`` at each value (float64 result)."""
    info = ml_dtypes.finfo(dtype) if dtype == np.dtype(ml_dtypes.bfloat16) else np.finfo(dtype)
    magnitude = np.maximum(np.abs(values.astype(np.float64)), float(info.tiny))
    exponent = np.floor(np.log2(magnitude))
    return np.exp2(exponent - _MANTISSA_BITS[np.dtype(dtype)])


def out_of_tolerance(out: np.ndarray, reference: np.ndarray, inputs_absmax: np.ndarray) -> np.ndarray:
    """Boolean mask of the elements of ``out`` that fail the rule against a float64 ``reference``.

    NaN must match NaN and infinities must match exactly.
    """
    got = out.astype(np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    nan_ok = np.isnan(got) & np.isnan(ref)
    inf_ok = np.isinf(got) & (got == ref)
    rounded = ref.astype(out.dtype).astype(np.float64)  # ulp of the bigger neighbour covers binade edges
    step = np.maximum(ulp(ref, out.dtype), ulp(rounded, out.dtype))
    with np.errstate(invalid="ignore"):
        err = np.abs(got - ref)
        ok = (err <= step) | (err <= 2.0**-22 * inputs_absmax)
    return ~(ok | nan_ok | inf_ok)
