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
    (pyenv's adds ~50 ms a call, which the floor's ``cat``/``cp`` do not pay); else PATH's."""
    beside = Path(sys.executable).parent / "safeblend"
    return str(beside) if beside.exists() else (shutil.which("safeblend") or "safeblend")


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


def quantiles(values: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80) of repeated measurements."""
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return statistics.median(ordered), pick(0.2), pick(0.8)
