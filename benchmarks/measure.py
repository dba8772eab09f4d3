"""Timing helpers shared by the benchmark scripts: one command under ``/usr/bin/time``,
and medians with p20/p80 of repeated runs."""

from __future__ import annotations

import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def safeblend_command() -> str:
    """This Python's ``safeblend`` console script, so timings skip version-manager shims
    (pyenv's adds ~50 ms a call, which the floor's ``cat``/``cp`` do not pay); else PATH's.
    The engine's modules are byte-compiled first (``byte_compile_engine``)."""
    byte_compile_engine()
    beside = Path(sys.executable).parent / "safeblend"
    return str(beside) if beside.exists() else (shutil.which("safeblend") or "safeblend")


def byte_compile_engine() -> None:
    """Write the .pyc files of safeblend and safeblend.kernels, as ``pip install`` does.

    An editable checkout gets them from the first run, unless PYTHONDONTWRITEBYTECODE is set
    (as on this project's build machine): then every command recompiles engine/ (~40 ms
    measured here), a cost no installed copy pays.
    """
    import compileall

    import safeblend
    import safeblend.kernels

    for package in (safeblend, safeblend.kernels):
        compileall.compile_dir(str(Path(package.__file__).parent), quiet=1)


def _run(prefix: list[str], cmd: str | list[str], env: dict[str, str] | None) -> tuple[float, str]:
    argv = [*prefix, "bash", "-c", cmd] if isinstance(cmd, str) else [*prefix, *cmd]
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        shown = cmd if isinstance(cmd, str) else " ".join(cmd)
        sys.exit(f"command failed ({proc.returncode}): {shown}\n{proc.stderr[-3000:]}")
    return wall, proc.stderr


def timed(cmd: str | list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of a command; a string runs through ``bash -c``."""
    wall, report = _run(["/usr/bin/time", "-v"], cmd, env)
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", report).group(1))
    return wall, rss_kb * 1024


def timed_cpu(cmd: str | list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system of every process) of a command."""
    wall, report = _run(["/usr/bin/time", "-f", "%U %S"], cmd, env)
    user, system = map(float, report.strip().splitlines()[-1].split())
    return wall, user + system


def add_warm_memory_option(parser) -> None:
    """``--warm-memory SIZE`` (0, the default, warms nothing), parsed to bytes."""
    from safeblend.units import parse_size

    parser.add_argument("--warm-memory", type=lambda text: 0 if text.strip() == "0" else parse_size(text),
                        default=0, metavar="SIZE",
                        help="fresh memory to touch and free before each timed command, e.g. 3GiB")


def warm_free_memory(nbytes: int) -> None:
    """Touch ``nbytes`` of fresh memory and free it again, just before a timed command.

    On a VM whose idle free memory goes back to the host, the first touch of a page costs a
    host fault; a command that allocates (page cache for its writes) then pays for memory it
    happened to get cold, which varies run to run by several seconds per 2 GB
    (benchmarks/page_recycling.py). Freed just before the command, these pages are what the
    kernel hands out next, so both contestants start from the same warm memory.
    """
    import numpy as np

    if nbytes <= 0:
        return
    block = np.ones(nbytes, dtype=np.uint8)  # written, so every page is backed
    del block


def quantiles(values: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80) of repeated measurements."""
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return statistics.median(ordered), pick(0.2), pick(0.8)
