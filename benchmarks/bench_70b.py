"""The 70B case: Llama-3-70B's real tensor list, with as many full-size layers as the disk allows.

A Llama-3-70B pair is 2 × 141 GB in bf16, and the merged output another 141 GB — more than
this machine's disk. This script writes the real 70B tensor list and shapes
(``safeblend.synthetic.PRESETS['llama-3-70b']``: hidden 8192, intermediate 28672, vocabulary
128256, 64 heads with 8 KV heads) with the embedding and lm_head at full size (128256 × 8192,
2.1 GB each in bf16) and a reduced number of full-size decoder layers (~1.71 GB each in bf16),
sharded at 5 GB as Hugging Face does, then times, alternating run by run:

* ``safeblend merge BASE FT -o OUT --weight 0.6 --device cpu`` (linear, output fdatasynced);
* the floor: ``cat`` both inputs to /dev/null, ``cp`` the base's shards, ``sync`` them.

The pair is larger than RAM as soon as there are a few layers, so reads are largely cold — as
they would be for a real 70B merge. From the measured seconds per byte moved (inputs read +
output written) it projects the full 80-layer model's time on this machine, and the disk
bandwidth a given time would need. Measured figures and projections are printed apart.

The generator here streams each tensor in blocks (the library writer would hold a 2.1 GB
embedding plus float32 temporaries in memory); values are bf16 Gaussians, the "fine-tune" the
base plus a 5 % perturbation, as in safeblend.synthetic.

    python benchmarks/bench_70b.py                     # layers chosen from free disk (≤ 8)
    python benchmarks/bench_70b.py --layers 4 --runs 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

from compare import machine_description, resolve_commit, safeblend_command, safeblend_version
from measure import quantiles, timed  # noqa: E402
from safeblend.synthetic import PRESETS, LlamaShape  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)
SHARD_BYTES = 5 * 10**9
BLOCK = 1 << 24  # elements generated and written at a time
TARGET_MINUTES = (10, 20, 30, 60)


def layer_bytes(shape: LlamaShape) -> int:
    one = replace(shape, num_hidden_layers=1).parameters - replace(shape, num_hidden_layers=0).parameters
    return one * 2


def choose_layers(shape: LlamaShape, workdir: Path, reserve: float, cap: int) -> int:
    """As many layers as let base + fine-tune + output fit in free disk minus ``reserve`` bytes."""
    free = shutil.disk_usage(workdir).free
    fixed = replace(shape, num_hidden_layers=0).parameters * 2
    per_model = (free - reserve) / 3
    layers = int((per_model - fixed) // layer_bytes(shape))
    if layers < 1:
        sys.exit(f"not enough disk: {free / 1e9:.1f} GB free, need ≥ {3 * (fixed + layer_bytes(shape)) / 1e9 + reserve / 1e9:.1f} GB")
    return min(layers, cap)


def _header(tensors: dict[str, tuple[int, ...]]) -> tuple[bytes, int]:
    meta: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dims in tensors.items():
        n = int(np.prod(dims)) * 2
        meta[name] = {"dtype": "BF16", "shape": list(dims), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offset


def write_pair_streaming(base_dir: Path, ft_dir: Path, shape: LlamaShape, seed: int = 0) -> None:
    """Base and fine-tune as 5 GB-sharded HF directories, written block by block."""
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal(BLOCK + 4096, dtype=np.float32)  # reused at random offsets: cheap, varied
    groups: list[dict[str, tuple[int, ...]]] = [{}]
    filled = 0
    for name, dims in shape.tensors().items():
        n = int(np.prod(dims)) * 2
        if groups[-1] and filled + n > SHARD_BYTES:
            groups.append({})
            filled = 0
        groups[-1][name] = dims
        filled += n
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map = {}
    for d in (base_dir, ft_dir):
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(shape.config("bfloat16"), indent=2))
    for fname, group in zip(names, groups):
        header, _ = _header(group)
        with open(base_dir / fname, "wb") as fb, open(ft_dir / fname, "wb") as ff:
            fb.write(header)
            ff.write(header)
            for name, dims in group.items():
                weight_map[name] = fname
                is_norm = name.endswith("norm.weight")
                remaining = int(np.prod(dims))
                while remaining:
                    k = min(BLOCK, remaining)
                    i, j = rng.integers(0, 4096, size=2)
                    base32 = pool[i:i + k] * (0.1 if is_norm else 0.02) + (1.0 if is_norm else 0.0)
                    ft32 = base32 + pool[j:j + k][::-1] * (0.005 if is_norm else 0.001)
                    fb.write(base32.astype(BF16).tobytes())
                    ff.write(ft32.astype(BF16).tobytes())
                    remaining -= k
    total = shape.parameters * 2
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    for d in (base_dir, ft_dir):
        (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=None, help="full-size decoder layers (default: what disk allows)")
    p.add_argument("--max-layers", type=int, default=8)
    p.add_argument("--reserve-gb", type=float, default=15.0, help="disk left free for others (GB)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--no-floor", action="store_true")
    p.add_argument("--safeblend-commit", default=None, help="run a snapshot of this commit (see compare.py)")
    p.add_argument("--workdir", type=Path, default=REPO / "benchmarks/out/bench70b")
    p.add_argument("--keep", action="store_true", help="keep the generated pair")
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args()

    full = PRESETS["llama-3-70b"]
    args.workdir.mkdir(parents=True, exist_ok=True)
    base, ft = args.workdir / "base", args.workdir / "ft"
    out, floor_out = args.workdir / "merged", args.workdir / "floor"
    marker = args.workdir / "complete.json"
    if marker.exists() and (args.layers is None or json.loads(marker.read_text())["layers"] == args.layers):
        layers = json.loads(marker.read_text())["layers"]
    else:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(ft, ignore_errors=True)
        marker.unlink(missing_ok=True)
        layers = args.layers or choose_layers(full, args.workdir, args.reserve_gb * 1e9, args.max_layers)
        shape = replace(full, num_hidden_layers=layers)
        print(f"generating a Llama-3-70B-shaped pair with {layers} of 80 layers "
              f"({shape.parameters / 1e9:.2f}B parameters, {shape.parameters * 2 / 1e9:.1f} GB each) ...", file=sys.stderr)
        started = time.perf_counter()
        write_pair_streaming(base, ft, shape)
        subprocess.run(["sync"], check=True)
        marker.write_text(json.dumps({"layers": layers}))
        print(f"  done in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    shape = replace(full, num_hidden_layers=layers)
    model_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    in_files = sorted(base.glob("*.safetensors")) + sorted(ft.glob("*.safetensors"))
    moved = 2 * model_bytes + model_bytes

    sb = safeblend_command(args.safeblend_commit, REPO / "benchmarks/out")
    merge_cmd = (f"{sb} merge {base} {ft} -o {out} --weight 0.6 --device cpu --shard-size 5GB --overwrite --quiet "
                 f"--json > {args.workdir}/last.json")
    floor_cmd = (f"mkdir -p {floor_out} && cat {' '.join(map(str, in_files))} > /dev/null && "
                 f"cp {' '.join(str(f) for f in sorted(base.glob('*.safetensors')))} {floor_out}/ && "
                 f"sync {floor_out}/* {floor_out}")
    contestants = {"safeblend linear": merge_cmd} if args.no_floor else {"safeblend linear": merge_cmd, "floor": floor_cmd}
    results: dict[str, list[tuple[float, int]]] = {k: [] for k in contestants}
    for run_no in range(args.runs):
        order = list(contestants) if run_no % 2 == 0 else list(contestants)[::-1]
        for name in order:
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(floor_out, ignore_errors=True)
            results[name].append(timed(contestants[name]))
            w, r = results[name][-1]
            print(f"run {run_no + 1}/{args.runs} {name:<17} {w:7.1f} s {r / 2**20:7.0f} MiB", file=sys.stderr)
    engine_json = json.loads((args.workdir / "last.json").read_text()) if (args.workdir / "last.json").exists() else {}
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(floor_out, ignore_errors=True)

    rows = {}
    for name, rs in results.items():
        med, p20, p80 = quantiles([w for w, _ in rs])
        rows[name] = {"median_s": med, "p20_s": p20, "p80_s": p80, "gb_per_s": moved / med / 1e9,
                      "peak_rss_bytes": int(statistics.median(r for _, r in rs)), "walls": [w for w, _ in rs],
                      "rss": [r for _, r in rs]}
    merge = rows["safeblend linear"]
    s_per_byte = merge["median_s"] / moved
    full_model = full.parameters * 2
    full_moved = 3 * full_model
    projection = {
        "full_model_bytes": full_model, "full_moved_bytes": full_moved,
        "projected_s": s_per_byte * full_moved,
        "floor_projected_s": rows["floor"]["median_s"] / moved * full_moved if "floor" in rows else None,
        "bandwidth_for_minutes": {m: {"read_gb_s": 2 * full_model / (m * 60) / 1e9,
                                      "write_gb_s": full_model / (m * 60) / 1e9,
                                      "total_gb_s": full_moved / (m * 60) / 1e9} for m in TARGET_MINUTES},
    }
    result = {"layers": layers, "parameters": shape.parameters, "model_bytes": model_bytes, "moved_bytes": moved,
              "runs": args.runs, "rows": rows, "engine_json": engine_json, "projection": projection,
              "machine": machine_description(), "safeblend": safeblend_version(sb),
              "safeblend_commit": resolve_commit(args.safeblend_commit) if args.safeblend_commit else None, "when": time.strftime("%Y-%m-%d %H:%M:%S %Z")}

    print(f"\nMEASURED — Llama-3-70B tensor list with {layers} of 80 layers: {shape.parameters / 1e9:.2f}B parameters, "
          f"{model_bytes / 1e9:.1f} GB per model in bf16 ({len(list(base.glob('*.safetensors')))} shards), "
          f"{moved / 1e9:.1f} GB moved per merge (2 inputs read + output written, fdatasynced); "
          f"median of {args.runs}, alternating order; inputs larger than the page cache can hold")
    print(f"machine: {result['machine']}")
    print("| what | median s | p20–p80 s | GB/s moved | peak RSS MiB |\n|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['median_s']:.1f} | {r['p20_s']:.1f}–{r['p80_s']:.1f} | {r['gb_per_s']:.2f} | "
              f"{r['peak_rss_bytes'] / 2**20:.0f} |")
    if "floor" in rows:
        print(f"safeblend / floor wall time: {merge['median_s'] / rows['floor']['median_s']:.2f}×")
    print(f"\nPROJECTED — full Llama-3-70B ({full.parameters / 1e9:.1f}B parameters, {full_model / 1e9:.0f} GB per model, "
          f"{full_moved / 1e9:.0f} GB moved), at the measured {s_per_byte * 1e9:.2f} s per GB moved "
          f"({1 / s_per_byte / 1e9:.2f} GB/s): {projection['projected_s'] / 60:.0f} min on this machine"
          + (f" (the floor's rate: {projection['floor_projected_s'] / 60:.0f} min)" if projection["floor_projected_s"] else ""))
    print("disk bandwidth a full 70B merge needs, sustained (2 × 141 GB read, 141 GB written durably):")
    for m, bw in projection["bandwidth_for_minutes"].items():
        print(f"  in {m:>2} min: read {bw['read_gb_s']:.2f} GB/s + write {bw['write_gb_s']:.2f} GB/s "
              f"({bw['total_gb_s']:.2f} GB/s in all)")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(ft, ignore_errors=True)
        marker.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
