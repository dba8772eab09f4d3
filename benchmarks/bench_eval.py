"""What `safeblend sweep --eval` adds over the sweep plus the evaluation commands' own time.

Generates a Llama-shaped bf16 pair (``--preset``, default tiny), then alternates, run after
run (page cache warm, every command through ``bash -c``):

* sweep: ``safeblend sweep BASE FT -o OUT --weights W -q --overwrite``;
* evals: the evaluation command run directly on each of the sweep's models, one after another
         (its own time: a Python interpreter printing a JSON line);
* all:   ``safeblend sweep ... --eval CMD -q --overwrite`` (report.json, report.csv and
         tradeoff.png written), and the same with ``--no-plot``.

Overhead per λ = (all − sweep − evals) / number of weights; target < 1 s.

    python benchmarks/bench_eval.py --runs 5
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from measure import quantiles, safeblend_command, timed_cpu
from safeblend.lambda_sweep import output_name, parse_weights
from safeblend.synthetic import PRESETS, write_pair

EVAL_CODE = "import json, sys; print(json.dumps({'score': float(sys.argv[2]), 'model_len': len(sys.argv[1])}))"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--weights", default="0.1:0.9:0.1")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-eval-"))
    shape = PRESETS[args.preset] if args.layers is None else replace(PRESETS[args.preset], num_hidden_layers=args.layers)
    base, ft, out = work / "base", work / "ft", work / "sweep"
    if not (base / "config.json").exists():
        write_pair(base, ft, shape, dtype="BF16")
    points = parse_weights(args.weights)
    tool = shlex.quote(safeblend_command())
    python = shlex.quote(sys.executable)
    eval_cmd = f"{python} -c {shlex.quote(EVAL_CODE)} {{model}} {{weight}}"
    sweep = f"{tool} sweep {base} {ft} -o {out} --weights {args.weights} -q --overwrite"
    with_eval = f"{sweep} --eval {shlex.quote(eval_cmd)}"
    direct = " && ".join(f"{python} -c {shlex.quote(EVAL_CODE)} {out / output_name(w)} {w!r} > /dev/null"
                         for w in points)
    timings: dict[str, list[float]] = {"sweep": [], "evals": [], "all": [], "all --no-plot": []}
    timed_cpu(sweep)  # warm the page cache and byte-compiled modules
    for _ in range(args.runs):
        timings["sweep"].append(timed_cpu(sweep)[0])
        timings["evals"].append(timed_cpu(direct)[0])
        timings["all"].append(timed_cpu(with_eval)[0])
        timings["all --no-plot"].append(timed_cpu(with_eval + " --no-plot")[0])
    medians = {name: quantiles(values)[0] for name, values in timings.items()}
    print(f"{shape.parameters / 1e6:.1f}M parameters, {len(points)} weights, {args.runs} runs (median, p20-p80):")
    for name, values in timings.items():
        median, p20, p80 = quantiles(values)
        print(f"  {name:<14} {median:6.3f} s  ({p20:.3f}-{p80:.3f})")
    for name in ("all", "all --no-plot"):
        overhead = medians[name] - medians["sweep"] - medians["evals"]
        print(f"  overhead ({name}): {overhead:.3f} s total, {overhead / len(points):.3f} s per λ")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
