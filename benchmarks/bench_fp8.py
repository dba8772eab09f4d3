"""An fp8 DeepSeek-V3-shaped base merged with a bf16 fine-tune: wall time against the file-copy
floor of the same bytes, peak RSS, and a projection to the full 671B model.

DeepSeek-V3 ships fp8 with 128×128 block scales (``W_scale_inv``, F32, ⌈rows/128⌉ × ⌈cols/128⌉);
its fine-tunes are saved in bf16. This script writes the real tensor names and shapes (hidden
7168, 128 heads with MLA projections, dense MLP 18432 for the first layers, then 256 routed
experts of 2048 plus one shared expert and a router per layer) for a few layers, with only
``--experts`` of the 256 routed experts per MoE layer (the disk does not hold one full MoE
layer pair: 11 GB of fp8 experts plus 23 GB in bf16). The embedding and lm_head are left out
unless ``--embed``. Values: random fp8 codes (no NaN codes) with random positive scales; the
fine-tune random bf16 Gaussians (timing does not depend on values).

Timed, alternating run by run:

* ``safeblend merge BASE FT -o OUT --weight 0.5 --device cpu`` (output bf16, fdatasynced);
* the floor: ``cat`` both inputs to /dev/null, ``cp`` the fine-tune's shards (the output's
  size: bf16), ``sync`` them.

    python benchmarks/bench_fp8.py --dense-layers 1 --moe-layers 1 --experts 8 --runs 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from math import ceil, prod
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

from measure import add_warm_memory_option, quantiles, safeblend_command, timed, warm_free_memory  # noqa: E402

HIDDEN, VOCAB, HEADS = 7168, 129280, 128
Q_RANK, KV_RANK, NOPE, ROPE, V_DIM = 1536, 512, 128, 64, 128
DENSE, MOE, EXPERTS, LAYERS, FIRST_DENSE = 18432, 2048, 256, 61, 3
BLOCK = 1 << 24  # elements generated at a time


def attention(prefix: str) -> dict[str, tuple[tuple[int, ...], bool]]:
    """One layer's attention and norms: name → (shape, quantized)."""
    a = f"{prefix}.self_attn"
    return {
        f"{prefix}.input_layernorm.weight": ((HIDDEN,), False),
        f"{a}.q_a_proj.weight": ((Q_RANK, HIDDEN), True),
        f"{a}.q_a_layernorm.weight": ((Q_RANK,), False),
        f"{a}.q_b_proj.weight": ((HEADS * (NOPE + ROPE), Q_RANK), True),
        f"{a}.kv_a_proj_with_mqa.weight": ((KV_RANK + ROPE, HIDDEN), True),
        f"{a}.kv_a_layernorm.weight": ((KV_RANK,), False),
        f"{a}.kv_b_proj.weight": ((HEADS * (NOPE + V_DIM), KV_RANK), True),
        f"{a}.o_proj.weight": ((HIDDEN, HEADS * V_DIM), True),
        f"{prefix}.post_attention_layernorm.weight": ((HIDDEN,), False),
    }


def mlp(prefix: str, inner: int) -> dict[str, tuple[tuple[int, ...], bool]]:
    return {f"{prefix}.gate_proj.weight": ((inner, HIDDEN), True), f"{prefix}.up_proj.weight": ((inner, HIDDEN), True),
            f"{prefix}.down_proj.weight": ((HIDDEN, inner), True)}


def layer(i: int, experts: int) -> dict[str, tuple[tuple[int, ...], bool]]:
    p = f"model.layers.{i}"
    tensors = attention(p)
    if i < FIRST_DENSE:
        return {**tensors, **mlp(f"{p}.mlp", DENSE)}
    tensors[f"{p}.mlp.gate.weight"] = ((EXPERTS, HIDDEN), False)
    tensors[f"{p}.mlp.gate.e_score_correction_bias"] = ((EXPERTS,), False)  # F32 in the real model
    for e in range(experts):
        tensors.update(mlp(f"{p}.mlp.experts.{e}", MOE))
    return {**tensors, **mlp(f"{p}.mlp.shared_experts", MOE)}


def model_tensors(dense: int, moe: int, experts: int, embed: bool) -> dict[str, tuple[tuple[int, ...], bool]]:
    tensors = {"model.embed_tokens.weight": ((VOCAB, HIDDEN), False)} if embed else {}
    for i in [*range(dense), *range(FIRST_DENSE, FIRST_DENSE + moe)]:
        tensors.update(layer(i, experts))
    tensors["model.norm.weight"] = ((HIDDEN,), False)
    if embed:
        tensors["lm_head.weight"] = ((VOCAB, HIDDEN), False)
    return tensors


def stored(name: str, shape: tuple[int, ...], quantized: bool, fp8: bool) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The tensors one weight is stored as: fp8 + scale grid, or bf16 (F32 for the router bias)."""
    if fp8 and quantized:
        return {name: ("F8_E4M3", shape), name + "_scale_inv": ("F32", (ceil(shape[0] / 128), ceil(shape[1] / 128)))}
    return {name: ("F32" if name.endswith("correction_bias") else "BF16", shape)}


SIZES = {"F8_E4M3": 1, "BF16": 2, "F32": 4}


def write_model(directory: Path, tensors: dict, fp8: bool, seed: int, shard_bytes: int = 5 * 10**9) -> None:
    """Stream a model to ~5 GB shards plus an index, generating each tensor in blocks."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    entries = {n: e for name, (shape, q) in tensors.items() for n, e in stored(name, shape, q, fp8).items()}
    shards, current, filled = [], [], 0
    for name, (dtype, shape) in entries.items():
        nbytes = prod(shape) * SIZES[dtype]
        if current and filled + nbytes > shard_bytes:
            shards.append(current)
            current, filled = [], 0
        current.append(name)
        filled += nbytes
    shards.append(current)
    weight_map = {}
    for k, names in enumerate(shards):
        filename = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, cursor = {"__metadata__": {"format": "pt"}}, 0
        for n in names:
            dtype, shape = entries[n]
            size = prod(shape) * SIZES[dtype]
            header[n] = {"dtype": dtype, "shape": list(shape), "data_offsets": [cursor, cursor + size]}
            cursor += size
            weight_map[n] = filename
        body = json.dumps(header).encode()
        body += b" " * (-len(body) % 8)
        with open(directory / filename, "wb") as f:
            f.write(len(body).to_bytes(8, "little") + body)
            for n in names:
                dtype, shape = entries[n]
                for first in range(0, prod(shape), BLOCK):
                    count = min(BLOCK, prod(shape) - first)
                    if dtype == "F8_E4M3":  # codes 0..0x7E with a random sign: no NaN
                        block = rng.integers(0, 0x7F, count, dtype=np.uint8) | (rng.integers(0, 2, count, np.uint8) << 7)
                    elif n.endswith("_scale_inv"):
                        block = (rng.random(count, np.float32) * 1e-3 + 1e-4).astype(np.float32)
                    else:
                        block = (rng.standard_normal(count, np.float32) * 0.02).astype(
                            ml_dtypes.bfloat16 if dtype == "BF16" else np.float32)
                    f.write(block.tobytes())
    total = sum(prod(s) * SIZES[d] for d, s in entries.values())
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = {"model_type": "deepseek_v3", "torch_dtype": "bfloat16", "hidden_size": HIDDEN}
    if fp8:
        config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                         "weight_block_size": [128, 128]}
    (directory / "config.json").write_text(json.dumps(config))


def bytes_of(tensors: dict, fp8: bool) -> int:
    return sum(prod(s) * SIZES[d] for name, (shape, q) in tensors.items() for d, s in stored(name, shape, q, fp8).values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dense-layers", type=int, default=1)
    p.add_argument("--moe-layers", type=int, default=1)
    p.add_argument("--experts", type=int, default=8, help="routed experts kept per MoE layer (of 256)")
    p.add_argument("--embed", action="store_true", help="include the full-size embedding and lm_head")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=REPO / "benchmarks/out/bench_fp8")
    p.add_argument("--keep", action="store_true")
    add_warm_memory_option(p)
    args = p.parse_args()

    tensors = model_tensors(args.dense_layers, args.moe_layers, args.experts, args.embed)
    base, ft, out, floor_out = (args.workdir / n for n in ("base", "ft", "merged", "floor"))
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    print(f"generating {sum(prod(s) for s, _ in tensors.values()) / 1e9:.2f}B parameters ...", file=sys.stderr)
    write_model(base, tensors, fp8=True, seed=0)
    write_model(ft, tensors, fp8=False, seed=1)
    subprocess.run(["sync"], check=True)
    base_bytes, ft_bytes = bytes_of(tensors, True), bytes_of(tensors, False)
    moved = base_bytes + 2 * ft_bytes  # read both, write a bf16 output

    sb = safeblend_command()
    merge_cmd = f"{sb} merge {base} {ft} -o {out} --weight 0.5 --device cpu --overwrite --quiet --json > {args.workdir}/last.json"
    in_files = sorted(base.glob("*.safetensors")) + sorted(ft.glob("*.safetensors"))
    floor_cmd = (f"mkdir -p {floor_out} && cat {' '.join(map(str, in_files))} > /dev/null && "
                 f"cp {' '.join(str(f) for f in sorted(ft.glob('*.safetensors')))} {floor_out}/ && "
                 f"sync {floor_out}/* {floor_out}")
    contestants = {"safeblend fp8+bf16": merge_cmd, "floor": floor_cmd}
    subprocess.run(["cat", *map(str, in_files)], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    results: dict[str, list[tuple[float, int]]] = {k: [] for k in contestants}
    for run in range(args.runs):
        for name in (list(contestants) if run % 2 == 0 else list(contestants)[::-1]):
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(floor_out, ignore_errors=True)
            warm_free_memory(args.warm_memory)
            results[name].append(timed(contestants[name]))
            w, r = results[name][-1]
            print(f"run {run + 1}/{args.runs} {name:<19} {w:6.2f} s {r / 2**20:6.0f} MiB", file=sys.stderr)
    rows = {name: (quantiles([w for w, _ in rs]), statistics.median(r for _, r in rs)) for name, rs in results.items()}
    merge_s, floor_s = rows["safeblend fp8+bf16"][0][0], rows["floor"][0][0]
    full = model_tensors(FIRST_DENSE, LAYERS - FIRST_DENSE, EXPERTS, True)
    full_moved = bytes_of(full, True) + 2 * bytes_of(full, False)
    print(f"\nbase {base_bytes / 1e9:.2f} GB fp8, fine-tune {ft_bytes / 1e9:.2f} GB bf16, {moved / 1e9:.2f} GB moved")
    for name, ((med, p20, p80), rss) in rows.items():
        print(f"{name:<19} median {med:6.2f} s (p20 {p20:.2f}, p80 {p80:.2f})  {moved / med / 1e9:5.2f} GB/s  "
              f"peak RSS {rss / 2**20:.0f} MiB")
    print(f"safeblend / floor: {merge_s / floor_s:.2f}x")
    print(f"projected, not measured: the full model ({sum(prod(s) for s, _ in full.values()) / 1e9:.0f}B parameters, "
          f"{bytes_of(full, True) / 1e9:.0f} GB fp8 + {bytes_of(full, False) / 1e9:.0f} GB bf16 in, "
          f"{bytes_of(full, False) / 1e9:.0f} GB out) at this rate: {merge_s / moved * full_moved / 60:.0f} min "
          f"(the floor's rate: {floor_s / moved * full_moved / 60:.0f} min)")
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
