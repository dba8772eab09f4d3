"""Every merge method's wall time relative to ``linear`` and its peak RSS, on generated models.

Generates a Llama-shaped bf16 base and two "fine-tunes" of it (base + small noise) whose
largest tensors are 128256×4096 embeddings (Llama-3-8B's vocabulary and width; one layer by
default, so the embeddings dominate), warms the page cache, then runs every method through the
CLI under ``/usr/bin/time -v`` (peak RSS) on the CPU. Every registered method runs, each
compared with ``linear`` on the same inputs (wall time and peak RSS as ratios): one fine-tune
for the methods that take one (slerp, nearswap, arcee-fusion, passthrough), two for the
others. ``--small`` also measures a model 4× smaller, to show that peak RSS does not grow
with the model; ``--only-tiny`` a 55M-parameter pair (16000×1024 embeddings, two layers) that
a shared machine measures in minutes. A method whose parameter has no CLI flag (nearswap's t)
runs from a generated recipe.

    python benchmarks/bench_methods.py                 # 128256×4096 embeddings, ~2.5 GB per model
    python benchmarks/bench_methods.py --small --runs 3
    python benchmarks/bench_methods.py --only-tiny --keep
    python benchmarks/bench_methods.py --sizes tinyllama-1.1b    # the 22-layer TinyLlama shapes
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import ml_dtypes  # noqa: F401  (bf16 for safetensors.numpy)
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from safeblend.synthetic import PRESETS, LlamaShape, write_pair
from measure import safeblend_command, timed

SHAPES = {
    "embed-128256x4096": LlamaShape(4096, 14336, 1, 128256, 32, 8),
    "embed-32064x4096": LlamaShape(4096, 3584, 1, 32064, 32, 8),  # ~4× smaller
    "embed-16000x1024": LlamaShape(1024, 2816, 2, 16000, 16, 4),  # 55M parameters, 110 MB per model
    "tinyllama-1.1b": PRESETS["tinyllama-1.1b"],  # 1.10B parameters, 2.2 GB per model
}
# (method, fine-tunes, extra CLI arguments, or a dict: the recipe's merge-wide parameters)
RUNS: list[tuple[str, int, list[str] | dict]] = [
    ("linear", 1, ["--weight", "0.6"]),
    ("slerp", 1, ["--weight", "0.6"]),
    ("nearswap", 1, {"t": 0.001}),
    ("arcee-fusion", 1, []),
    ("passthrough", 1, []),
    ("linear", 2, ["--weight", "0.5"]),
    ("task-arithmetic", 2, ["--weight", "0.5", "--lambda", "0.8"]),
    ("ties", 2, ["--weight", "0.5", "--density", "0.3"]),
    ("dare-linear", 2, ["--weight", "0.5", "--density", "0.3"]),
    ("dare-ties", 2, ["--weight", "0.5", "--density", "0.3"]),
    ("breadcrumbs", 2, ["--weight", "0.5", "--density", "0.3"]),
    ("breadcrumbs-ties", 2, ["--weight", "0.5", "--density", "0.3"]),
    ("della", 2, ["--weight", "0.5", "--density", "0.3"]),
    ("della-linear", 2, ["--weight", "0.5", "--density", "0.3"]),
    ("sce", 2, []),
    ("model-stock", 2, []),
    ("multislerp", 2, []),
    ("nuslerp", 2, ["--weight", "0.4", "--weight", "0.6"]),
    ("karcher", 2, []),
    ("ram", 2, []),
    ("ramplus-tl", 2, []),
]
def write_second_finetune(base: Path, out: Path, seed: int = 1, scale: float = 0.05) -> None:
    """Another fine-tune of ``base``: each tensor plus its own noise, one shard at a time."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for item in base.iterdir():
        if item.suffix != ".safetensors":
            shutil.copy(item, out / item.name)
            continue
        tensors = {}
        with safe_open(str(item), framework="numpy") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                values = t.astype(np.float32)
                noise = rng.standard_normal(values.shape, dtype=np.float32)
                noise *= scale * float(np.std(values.ravel()[:4096]) or 1.0)
                values += noise
                tensors[name] = values.astype(t.dtype)
                del values, noise
        save_file(tensors, str(out / item.name), metadata={"format": "pt"})


def ensure_inputs(workdir: Path, tag: str, shape: LlamaShape) -> list[Path]:
    base, ft1, ft2 = (workdir / f"{tag}-{k}" for k in ("base", "ft1", "ft2"))
    if not all((d / "config.json").exists() for d in (base, ft1, ft2)):
        print(f"generating {tag}: {shape.parameters / 1e9:.2f}B parameters x 3 ...", file=sys.stderr)
        for d in (base, ft1, ft2):
            shutil.rmtree(d, ignore_errors=True)
        write_pair(base, ft1, shape, dtype="BF16")
        write_second_finetune(base, ft2)
    return [base, ft1, ft2]


def bench_size(workdir: Path, tag: str, shape: LlamaShape, runs: int, methods: set[str] | None) -> list[dict]:
    base, ft1, ft2 = ensure_inputs(workdir, tag, shape)
    files = [p for d in (base, ft1, ft2) for p in sorted(d.glob("*.safetensors"))]
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)  # warm the cache
    model_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    out = workdir / "merged"
    rows = []
    for method, n_ft, extra in RUNS:
        if methods and method not in methods and method != "linear":
            continue
        inputs = [base, ft1, ft2][: 1 + n_ft]
        if isinstance(extra, dict):  # a parameter without a CLI flag: a recipe
            recipe = workdir / f"{method}.yml"
            recipe.write_text(json.dumps({"merge_method": method, "base_model": str(base), "parameters": extra,
                                          "models": [{"model": str(p)} for p in inputs[1:]]}))
            cmd = [safeblend_command(), "merge", "--config", str(recipe), "-o", str(out),
                   "--device", "cpu", "--overwrite", "--json"]
        else:
            cmd = [safeblend_command(), "merge", *map(str, inputs), "-o", str(out), "--method", method, *extra,
                   "--device", "cpu", "--overwrite", "--json"]
        samples = [timed(cmd) for _ in range(runs)]
        wall = statistics.median(w for w, _ in samples)
        rss = max(r for _, r in samples)
        rows.append({"size": tag, "method": method, "fine_tunes": n_ft, "wall_s": wall, "peak_rss": rss,
                     "model_bytes": model_bytes})
        print(f"{tag} {method} ({n_ft} ft): {wall:.2f} s, {rss / 2**20:.0f} MiB", file=sys.stderr)
    shutil.rmtree(out, ignore_errors=True)
    return rows


def print_table(rows: list[dict]) -> None:
    linear = {(r["size"], r["fine_tunes"]): r for r in rows if r["method"] == "linear"}
    print("| size | method | fine-tunes | wall s (median) | wall vs linear | peak RSS MiB | RSS vs linear |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        ref = linear[(r["size"], r["fine_tunes"])]
        print(f"| {r['size']} ({r['model_bytes'] / 1e9:.2f} GB/model) | {r['method']} | {r['fine_tunes']} | "
              f"{r['wall_s']:.2f} | {r['wall_s'] / ref['wall_s']:.2f}x | {r['peak_rss'] / 2**20:.0f} | "
              f"{r['peak_rss'] / ref['peak_rss']:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--small", action="store_true", help="also measure a model 4x smaller")
    parser.add_argument("--only-small", action="store_true", help="measure only the smaller model")
    parser.add_argument("--only-tiny", action="store_true", help="measure only the 55M-parameter pair")
    parser.add_argument("--sizes", nargs="+", choices=sorted(SHAPES), help="measure exactly these shapes")
    parser.add_argument("--methods", nargs="*", help="only these methods (linear always runs)")
    parser.add_argument("--workdir", type=Path, default=Path("benchmarks/out/methods"))
    parser.add_argument("--keep", action="store_true", help="keep the generated models for the next run")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    sizes = args.sizes if args.sizes else ["embed-16000x1024"] if args.only_tiny else ["embed-32064x4096"] if args.only_small else (
        ["embed-128256x4096", "embed-32064x4096"] if args.small else ["embed-128256x4096"])
    rows = []
    for tag in sizes:
        rows += bench_size(args.workdir, tag, SHAPES[tag], args.runs, set(args.methods or []))
        if not args.keep:
            for d in args.workdir.glob(f"{tag}-*"):
                shutil.rmtree(d, ignore_errors=True)
    print(f"\nbf16 inputs, warm page cache, output fsynced, CPU, {args.runs} run(s) per row")
    print_table(rows)
    (args.workdir / "last.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
