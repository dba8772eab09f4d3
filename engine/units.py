"""Byte sizes with units: parsing ``5GB`` / ``512MiB`` and printing them back; fitting
``--chunk-size`` to the model and the machine."""

from __future__ import annotations

import re
from typing import Any

from .errors import SpecError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Parse a byte size such as ``5GB`` (decimal, as Hugging Face shards) or ``512MiB``.

    >>> parse_size("5GB"), parse_size("1MiB"), parse_size(4096)
    (5000000000, 1048576, 4096)
    """
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE.match(text)
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(f"cannot read {text!r} as a size; use e.g. 5GB, 500MB or 2GiB")
        value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return value


def format_size(n: float) -> str:
    """Human-readable bytes with decimal units: ``format_size(2.5e9) == '2.50 GB'``."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def largest_operand(plan: Any) -> int:
    """Bytes of the largest operand any chunk of ``plan`` can hold: its largest tensor, counted
    at the widest dtype among the tensor's output and inputs (as the executor cuts chunks)."""
    largest = 0
    for tensor in plan.tensors:
        for t in tensor.pieces():
            widest = max([t.dtype.itemsize, t.base.dtype.itemsize, *(m.dtype.itemsize for m in t.models)])
            largest = max(largest, t.numel * widest)
    return largest


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes; None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def fit_chunk_size(requested: int, plan: Any, buffers: int = 8) -> int:
    """``--chunk-size`` capped at what the largest tensor needs (4 KiB multiple): chunks, and so
    the output, are the same, and the buffer pool is no larger than the model calls for.
    SpecError when the pool (``buffers`` chunks) would still not fit in available memory."""
    needed = max(4096, -(-largest_operand(plan) // 4096) * 4096)
    chunk = min(requested, needed)
    free = available_memory()
    if free is not None and chunk * buffers > free:
        raise SpecError(f"--chunk-size {format_size(requested)}: a merge holds about {buffers} chunks at once "
                        f"({format_size(chunk * buffers)}), more than the {format_size(free)} of memory available; "
                        "give a smaller chunk size (default 8 MiB)")
    return chunk
