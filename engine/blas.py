"""Keeping OpenBLAS's own threads out of the engine's way.

The engine runs its own compute threads, one per core; numpy's BLAS calls (np.dot in reduce
passes and diff, matmul for LoRA deltas) would otherwise start a thread pool of their own and
fight those threads for the same cores.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Run with OpenBLAS limited to one thread, then restore its setting (best effort).

    np.dot calls OpenBLAS, whose own threads fight our compute threads for the cores: measured
    here on a busy 2-core machine, a 0.9 GB diff took 54 s with OpenBLAS's default threads and
    1.0 s with one (OPENBLAS_NUM_THREADS=1). Without a recognisable OpenBLAS, nothing changes.
    """
    setter, getter = _openblas_threads_api()
    if setter is None or getter is None:
        yield
        return
    before = getter()
    setter(1)
    try:
        yield
    finally:
        setter(before)


def _openblas_threads_api() -> tuple[Callable[[int], None] | None, Callable[[], int] | None]:
    """OpenBLAS's set/get_num_threads from the library numpy loaded (names vary by build)."""
    import ctypes

    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as handle:
            paths = sorted({line.split()[-1] for line in handle if "openblas" in line.lower() and "/" in line})
    except OSError:
        return None, None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (("scipy_openblas", "64_"), ("scipy_openblas", ""), ("openblas", "64_"), ("openblas", "")):
            setter = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
            getter = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
            if setter is not None and getter is not None:
                setter.argtypes, setter.restype, getter.restype = [ctypes.c_int], None, ctypes.c_int
                return setter, getter
    return None, None
