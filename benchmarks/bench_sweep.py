"""safeblend sweep against nine separate merges, and safeblend diff against `cat`.

Sweep: generates a Llama-shaped bf16 pair (TinyLlama-1.1B shapes with ``--layers`` layers;
2 by default, ~0.22B parameters, 0.44 GB per model), warms the page cache, then alternates,
run after run:

* merges: ``safeblend merge BASE FT -o OUT/lambda-W --weight W`` once per weight, as a user
          would run them (nine processes for 0.1:0.9:0.1);
* sweep:  ``safeblend sweep BASE FT -o OUT --weights 0.1:0.9:0.1`` (one process, one read).

Both write the same bytes durably (every merge fsyncs its output), so the comparison is what
one read pass and one process save. Target: sweep <= 0.7 x merges.

Diff: ``cat`` of both models' shards to /dev/null against ``safeblend diff BASE FT --json``
on the same warm files (``--diff-layers``, default 22: the full 1.1B pair, 4.4 GB of inputs,
so that interpreter start-up does not dominate). Reports input GB/s of each, end to end and
(for diff) the engine's own figure without start-up. Target: diff >= 0.8 x cat.

    python benchmarks/bench_sweep.py --runs 3
    python benchmarks/bench_sweep.py --runs 3 --diff-pair BASE_DIR FT_DIR   # reuse a pair
    python benchmarks/bench_sweep.py --skip-sweep --cold          # diff vs cat reading from disk
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from safeblend.synthetic import PRESETS, write_pair
from measure import quantiles, safeblend_command, timed, timed_cpu
from safeblend.lambda_sweep import parse_weights


def ensure_pair(workdir: Path, preset: str, layers: int) -> tuple[Path, Path]:
    shape = replace(PRESETS[preset], num_hidden_layers=layers)
    tag = f"{preset}-L{layers}"
    base, ft = workdir / f"{tag}-base", workdir / f"{tag}-ft"
    if not (base / "config.json").exists() or not (ft / "config.json").exists():
        print(f"generating {shape.parameters / 1e9:.2f}B-parameter pair in {workdir} ...", file=sys.stderr)
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(ft, ignore_errors=True)
        write_pair(base, ft, shape, dtype="BF16")
    return base, ft


def shards(*dirs: Path) -> list[Path]:
    return [p for d in dirs for p in sorted(d.glob("*.safetensors"))]


def bench_sweep(base: Path, ft: Path, weights: str, runs: int, out: Path) -> dict[str, list[tuple[float, int]]]:
    points = parse_weights(weights)
    inputs = " ".join(map(str, shards(base, ft)))
    merges = " && ".join(
        f"{safeblend_command()} merge {base} {ft} -o {out}/merges/lambda-{w!r} --weight {w!r} --device cpu --quiet"
        for w in points)
    sweep = f"{safeblend_command()} sweep {base} {ft} -o {out}/sweep --weights {weights} --quiet"
    results: dict[str, list[tuple[float, int]]] = {"merges": [], "sweep": []}
    for run in range(runs):
        for name in (["merges", "sweep"] if run % 2 == 0 else ["sweep", "merges"]):
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            subprocess.run(f"cat {inputs} > /dev/null && sync", shell=True, check=True)  # warm, nothing dirty
            results[name].append(timed(merges if name == "merges" else sweep))
            print(f"run {run + 1} {name}: {results[name][-1][0]:.2f} s", file=sys.stderr)
    shutil.rmtree(out, ignore_errors=True)
    return results


def evict(paths: list[Path]) -> None:
    """Drop these files (only) from the page cache, so the next read comes from the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def bench_diff(base: Path, ft: Path, runs: int, scratch: Path,
               cold: bool) -> tuple[dict[str, list[float]], dict[str, list[float]], list[float]]:
    files = shards(base, ft)
    inputs = " ".join(map(str, files))
    cat = f"cat {inputs} > /dev/null"
    report = scratch / "diff.json"
    diff = f"{safeblend_command()} diff {base} {ft} --json > {report}"
    subprocess.run(cat, shell=True, check=True)  # warm the page cache
    results: dict[str, list[float]] = {"cat": [], "diff": []}
    cpu: dict[str, list[float]] = {"cat": [], "diff": []}
    engine_rates = []
    for run in range(runs):
        for name in (["cat", "diff"] if run % 2 == 0 else ["diff", "cat"]):
            if cold:
                evict(files)
            wall, seconds = timed_cpu(cat if name == "cat" else diff)
            results[name].append(wall)
            cpu[name].append(seconds)
            if name == "diff":
                engine_rates.append(json.loads(report.read_text())["throughput_bytes_per_s"])
            print(f"run {run + 1} {name}: {results[name][-1]:.2f} s", file=sys.stderr)
    report.unlink(missing_ok=True)
    return results, cpu, engine_rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tinyllama-1.1b", choices=sorted(PRESETS))
    parser.add_argument("--layers", type=int, default=2, help="layers of the swept pair")
    parser.add_argument("--weights", default="0.1:0.9:0.1")
    parser.add_argument("--diff-layers", type=int, default=22, help="layers of the pair diff reads")
    parser.add_argument("--diff-pair", nargs=2, type=Path, metavar=("BASE", "FT"), help="reuse this pair for diff")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("benchmarks/out/sweep"))
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--skip-diff", action="store_true")
    parser.add_argument("--cold", action="store_true",
                        help="diff: evict the inputs from the page cache before each command (disk-bound reads)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    lines = []

    if not args.skip_sweep:
        base, ft = ensure_pair(args.workdir, args.preset, args.layers)
        model_bytes = sum(p.stat().st_size for p in shards(base))
        points = parse_weights(args.weights)
        results = bench_sweep(base, ft, args.weights, args.runs, args.workdir / "outputs")
        lines.append(f"sweep: {args.preset} with {args.layers} layers, {model_bytes / 1e9:.2f} GB per model, "
                     f"{len(points)} weights ({args.weights}), {args.runs} runs, warm page cache, outputs fsynced")
        lines.append(f"{'what':<28} {'median s':>9} {'p20 s':>7} {'p80 s':>7} {'written GB/s':>13} {'peak RSS MiB':>13}")
        medians = {}
        for name, rows in results.items():
            med, p20, p80 = quantiles([w for w, _ in rows])
            medians[name] = med
            label = f"{len(points)} separate merges" if name == "merges" else f"sweep ({len(points)} outputs)"
            rss = statistics.median(r for _, r in rows)
            lines.append(f"{label:<28} {med:>9.2f} {p20:>7.2f} {p80:>7.2f} "
                         f"{len(points) * model_bytes / med / 1e9:>13.2f} {rss / 2**20:>13.0f}")
        ratio = medians["sweep"] / medians["merges"]
        lines.append(f"sweep / merges wall time: {ratio:.2f}x (target <= 0.70x: {'met' if ratio <= 0.7 else 'NOT met'})")

    if not args.skip_diff:
        base, ft = args.diff_pair or ensure_pair(args.workdir, args.preset, args.diff_layers)
        in_bytes = sum(p.stat().st_size for p in shards(base, ft))
        results, cpu, engine_rates = bench_diff(base, ft, args.runs, args.workdir, args.cold)
        lines.append("")
        cache = "inputs evicted from the page cache before each command" if args.cold else "warm page cache"
        lines.append(f"diff: {base.name} vs {ft.name}, {in_bytes / 1e9:.2f} GB of inputs, {args.runs} runs, {cache}")
        lines.append(f"{'what':<28} {'median s':>9} {'p20 s':>7} {'p80 s':>7} {'input GB/s':>11} {'CPU s':>7}")
        medians = {}
        for name, rows in results.items():
            med, p20, p80 = quantiles(rows)
            medians[name] = med
            lines.append(f"{name:<28} {med:>9.2f} {p20:>7.2f} {p80:>7.2f} {in_bytes / med / 1e9:>11.2f} "
                         f"{statistics.median(cpu[name]):>7.2f}")
        engine_rate = statistics.median(engine_rates)
        ratio = medians["cat"] / medians["diff"]
        lines.append(f"diff engine-reported (no interpreter start-up): {engine_rate / 1e9:.2f} GB/s")
        lines.append(f"diff / cat throughput: {ratio:.2f}x end to end, {engine_rate / (in_bytes / medians['cat']):.2f}x "
                     f"engine-reported (target >= 0.80x: {'met' if ratio >= 0.8 else 'NOT met'} end to end)")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
