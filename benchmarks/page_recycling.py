"""Why the merge drops its written output from the page cache as it goes.

Writes the same bytes into a new file three ways and prints the write throughput and system
time of each:

* ``cache``:  plain ``pwrite``; the output stays in the page cache (what ``cp`` does);
* ``lagged``: ``pwrite``, then ``fdatasync`` + ``POSIX_FADV_DONTNEED`` of what lies more than
  ``--lag`` behind the write position (a slow reader between write and drop);
* ``recycle``: the same with no lag (what safeblend.journal does behind its hasher).

On a VM whose free memory is handed back to the host, the first touch of a page the guest has
not used recently costs a host fault, so writing into fresh page cache is several times slower
than writing into pages just dropped. Each mode runs after deleting the previous file and
waiting ``--settle`` seconds, so the freed pages have gone cold again, as between two merges.

    python benchmarks/page_recycling.py --size 2GiB --runs 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from safeblend.units import parse_size  # noqa: E402

CHUNK = 8 * 2**20
SYNC_EVERY = 4  # chunks between fdatasync + drop


def write_file(path: Path, total: int, mode: str, lag: int) -> tuple[float, float]:
    """Write ``total`` bytes to ``path`` in ``mode``; returns (wall s, system CPU s), fsync included."""
    buffer = np.random.default_rng(0).integers(0, 255, CHUNK, dtype=np.uint8)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    started, cpu = time.perf_counter(), os.times()
    dropped = 0
    try:
        for i in range(total // CHUNK):
            os.pwrite(fd, buffer, i * CHUNK)
            if mode == "cache" or i % SYNC_EVERY != SYNC_EVERY - 1:
                continue
            os.fdatasync(fd)
            end = (i + 1) * CHUNK - (lag if mode == "lagged" else 0)
            if end > dropped:
                os.posix_fadvise(fd, dropped, end - dropped, os.POSIX_FADV_DONTNEED)
                dropped = end
        os.fdatasync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - started, os.times().system - cpu.system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="2GiB", help="bytes written per run")
    parser.add_argument("--lag", default="512MiB", help="distance between write and drop in 'lagged'")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--settle", type=float, default=4.0, help="seconds between delete and next run")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir on /tmp)")
    args = parser.parse_args()
    total, lag = parse_size(args.size), parse_size(args.lag)
    modes = ("cache", "lagged", "recycle")
    results: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "out.bin"
        for run in range(args.runs):
            for mode in modes if run % 2 == 0 else reversed(modes):
                path.unlink(missing_ok=True)
                time.sleep(args.settle)
                results[mode].append(write_file(path, total, mode, lag))
                wall, system = results[mode][-1]
                print(f"run {run + 1} {mode}: {wall:.2f} s, sys {system:.2f} s", file=sys.stderr)
    print(f"\n{total / 2**30:.1f} GiB written per run, fsynced, {args.runs} runs, lag {lag / 2**20:.0f} MiB")
    print(f"{'mode':<8} {'median s':>9} {'GiB/s':>6} {'sys s':>6}")
    for mode in modes:
        wall = statistics.median(w for w, _ in results[mode])
        system = statistics.median(s for _, s in results[mode])
        print(f"{mode:<8} {wall:>9.2f} {total / 2**30 / wall:>6.2f} {system:>6.2f}")


if __name__ == "__main__":
    main()
