"""safeblend merge against the floor: the same bytes read and written by plain file copies.

Generates a Llama-shaped bf16 pair (TinyLlama-1.1B shapes by default; ``--layers`` cuts the
layer count to change the size), warms the page cache, then alternates, run after run:

* floor:  ``cat`` both inputs to /dev/null, ``cp`` the base's shards to an output directory,
          ``sync`` those files (the merge flushes its output to disk too, so the floor does);
* merge:  ``safeblend merge BASE FT -o OUT --weight 0.6`` (CPU).

Each command runs under ``/usr/bin/time -v`` for its peak RSS. Prints medians (and p20/p80)
of wall time, throughput and RSS, and the merge/floor ratio. With ``--warm-memory SIZE`` that
much fresh memory is touched and freed before each command (measure.warm_free_memory), so
neither side pays this VM's host faults on cold free memory.

    python benchmarks/bench_merge.py --runs 3                    # 1.1B pair
    python benchmarks/bench_merge.py --runs 3 --layers 2         # ~0.22B pair
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from safeblend.synthetic import PRESETS, write_pair
from measure import add_warm_memory_option, quantiles, safeblend_command, timed, warm_free_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tinyllama-1.1b", choices=sorted(PRESETS))
    parser.add_argument("--layers", type=int, default=None, help="override the number of layers")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("benchmarks/out/merge"))
    parser.add_argument("--keep", action="store_true", help="keep the generated pair for the next run")
    add_warm_memory_option(parser)
    args = parser.parse_args()

    shape = PRESETS[args.preset]
    if args.layers is not None:
        shape = replace(shape, num_hidden_layers=args.layers)
    tag = f"{args.preset}-L{shape.num_hidden_layers}"
    base, ft = args.workdir / f"{tag}-base", args.workdir / f"{tag}-ft"
    out, floor_out = args.workdir / "merged", args.workdir / "floor"
    if not (base / "config.json").exists() or not (ft / "config.json").exists():
        print(f"generating {shape.parameters / 1e9:.2f}B-parameter pair in {args.workdir} ...", file=sys.stderr)
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(ft, ignore_errors=True)
        write_pair(base, ft, shape, dtype="BF16")
    inputs = sorted(base.glob("*.safetensors")) + sorted(ft.glob("*.safetensors"))
    in_bytes = sum(p.stat().st_size for p in inputs)
    model_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    subprocess.run(["cat", *map(str, inputs)], stdout=subprocess.DEVNULL, check=True)  # warm the cache

    shards = " ".join(str(p) for p in sorted(base.glob("*.safetensors")))
    all_inputs = " ".join(map(str, inputs))
    floor_cmd = (f"rm -rf {floor_out} && mkdir -p {floor_out} && cat {all_inputs} > /dev/null && "
                 f"cp {shards} {floor_out}/ && sync {floor_out}/* {floor_out}")
    merge_cmd = (f"{safeblend_command()} merge {base} {ft} -o {out} --weight 0.6 --device cpu --overwrite --json "
                 f"> {args.workdir}/last.json")
    results: dict[str, list[tuple[float, int]]] = {"floor": [], "merge": []}
    for run in range(args.runs):
        order = ["floor", "merge"] if run % 2 == 0 else ["merge", "floor"]
        for name in order:
            warm_free_memory(args.warm_memory)
            results[name].append(timed(floor_cmd if name == "floor" else merge_cmd))
            print(f"run {run + 1} {name}: {results[name][-1][0]:.2f} s, "
                  f"{results[name][-1][1] / 2**20:.0f} MiB", file=sys.stderr)
    summary = json.loads((args.workdir / "last.json").read_text())

    moved = in_bytes + model_bytes
    print(f"\n{tag}: {shape.parameters / 1e9:.2f}B parameters, inputs {in_bytes / 1e9:.2f} GB, "
          f"output {model_bytes / 1e9:.2f} GB, {args.runs} runs, warm page cache, output fsynced, "
          f"memory warmed before each command: {args.warm_memory / 2**30:.1f} GiB")
    print(f"{'what':<8} {'median s':>9} {'p20 s':>7} {'p80 s':>7} {'GB/s':>6} {'peak RSS MiB':>13}")
    medians = {}
    for name, rows in results.items():
        med, p20, p80 = quantiles([w for w, _ in rows])
        rss = statistics.median(r for _, r in rows)
        medians[name] = med
        print(f"{name:<8} {med:>9.2f} {p20:>7.2f} {p80:>7.2f} {moved / med / 1e9:>6.2f} {rss / 2**20:>13.0f}")
    print(f"merge / floor wall time: {medians['merge'] / medians['floor']:.2f}x   "
          f"(engine reported peak RSS {summary['peak_rss_bytes'] / 2**20:.0f} MiB)")
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(floor_out, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(ft, ignore_errors=True)


if __name__ == "__main__":
    main()
