"""Where one merge's CPU goes: each pipeline stage's CPU time, in ns per merged element.

Runs ``safeblend merge ARGS`` in this process with the engine's stage functions wrapped in a
timer of the calling thread's CPU (``time.thread_time``: user + system of that thread only),
so the stages on the compute threads, the hasher and the writer are told apart; the rest of
the process's CPU (``getrusage``) is planning, Python between the stages, locks and start-up
after import. CPU time is far less noisy than wall time on a shared machine, though caches
shared with other tenants still inflate it (single-thread micro-benchmarks of the same numpy
calls run ~1.5-2x faster).

    python benchmarks/stage_cpu.py BASE FT -o OUT --weight 0.5 --device cpu

The element count is the base's (quantized weights counted as their dequantized elements).
"""

from __future__ import annotations

import resource
import sys
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import safeblend.checkpoint as checkpoint  # noqa: E402
import safeblend.execute as execute  # noqa: E402
import safeblend.journal as journal  # noqa: E402
import safeblend.output_checks as output_checks  # noqa: E402
import safeblend.quantized as quantized  # noqa: E402
import safeblend.writer as writer  # noqa: E402
from safeblend.cli import main  # noqa: E402
from safeblend.kernels import numpy_backend  # noqa: E402

STAGES = [  # (owner, attribute, label); a label starting with a space is part of the one above
    (quantized._DequantFile, "view", "dequantize views (fp8 decode + block scale)"),
    (checkpoint.SafetensorsFile, "view", "stored input views"),
    (numpy_backend.NumpyBackend, "weighted_delta_sum", "merge arithmetic (upcast, lerp, round)"),
    (quantized.Requantize, "quantize", "requantize (--dtype fp8: amax, divide, clip, encode)"),
    (quantized, "_encode_e4m3", "  of which fp32 -> e4m3 encode"),
    (output_checks, "_count_nonfinite", "non-finite count of the output"),
    (journal.Progress, "_feed", "SHA-256 of the output (hasher thread)"),
    (writer.ShardWriter, "_write", "pwrite of the output (writer thread)"),
    (execute, "release_inputs", "release consumed input pages (madvise)"),
    (checkpoint.SafetensorsFile, "prefetch", "prefetch (madvise WILLNEED)"),
]
_spent: Counter = Counter()
_lock = threading.Lock()


def _timed(function, label: str):
    def run(*args, **kwargs):
        start = time.thread_time()
        try:
            return function(*args, **kwargs)
        finally:
            with _lock:
                _spent[label] += time.thread_time() - start
    return run


def main_() -> None:
    args = sys.argv[1:]
    for owner, name, label in STAGES:
        setattr(owner, name, _timed(getattr(owner, name), label))
    before = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.perf_counter()
    try:
        main(["merge", *args, "--quiet"])
    except SystemExit as exc:
        if exc.code:
            raise
    wall = time.perf_counter() - wall
    after = resource.getrusage(resource.RUSAGE_SELF)
    base = quantized.open_checkpoint(args[0])
    elements = sum(t.numel for t in base.tensors.values())
    base.close()
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    total = user + system
    print(f"{elements / 1e9:.3f}G elements; process CPU {total:.2f} s (user {user:.2f}, sys {system:.2f}), "
          f"wall {wall:.2f} s")
    rows = [(label, _spent[label]) for _, _, label in STAGES if _spent[label] > 0]
    rows.append(("everything else", total - sum(s for label, s in rows if not label.startswith(" "))))
    for label, seconds in [*rows, ("total", total)]:
        print(f"{seconds / elements * 1e9:7.3f} ns/element  {seconds:6.2f} s  {label}")


if __name__ == "__main__":
    main_()
