"""`safeblend sweep BASE LORA --as-adapters` on an 8B-shaped LoRA: seconds and bytes.

The base is Llama-3-8B's tensor list in bf16 (8.0B parameters, 16 GB) as one *sparse*
safetensors file: a real header, data never written (the file occupies no disk). An adapter
sweep reads only the base's headers (and the base tensors that a modules_to_save copy
replaces; this adapter has none), so the sparse base times it exactly. The adapter is rank
``--rank`` (default 16) on all seven linear modules of every layer, bf16 factors, random.

    python benchmarks/bench_adapter_sweep.py --runs 3

Targets: nine λ in < 5 s, and < 1/100 of the bytes of nine merged models.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from measure import quantiles, safeblend_command, timed
from safeblend.dtypes import DTYPES
from safeblend.synthetic import LlamaShape

LLAMA3_8B = LlamaShape(4096, 14336, 32, 128256, 32, 8)
MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def sparse_base(directory: Path, shape: LlamaShape) -> int:
    """A bf16 model.safetensors with every tensor's header and no written data; returns its data bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dims in shape.tensors().items():
        nbytes = int(np.prod(dims)) * 2
        header[name] = {"dtype": "BF16", "shape": list(dims), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(directory / "model.safetensors", "wb") as handle:
        handle.write(len(text).to_bytes(8, "little") + text)
        handle.truncate(8 + len(text) + offset)
    (directory / "config.json").write_text(json.dumps(shape.config("bfloat16")))
    return offset


def lora_adapter(directory: Path, shape: LlamaShape, rank: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shapes = shape.tensors()
    tensors = {}
    for n in range(shape.num_hidden_layers):
        for module in MODULES:
            out_features, in_features = shapes[f"model.layers.{n}.{module}.weight"]
            key = f"base_model.model.model.layers.{n}.{module}"
            tensors[f"{key}.lora_A.weight"] = (0.01 * rng.standard_normal((rank, in_features), np.float32)).astype(
                DTYPES["BF16"].numpy)
            tensors[f"{key}.lora_B.weight"] = (0.01 * rng.standard_normal((out_features, rank), np.float32)).astype(
                DTYPES["BF16"].numpy)
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "bias": "none",
        "target_modules": sorted({m.split(".")[1] for m in MODULES})}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--weights", default="0.1:0.9:0.1")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-adapters-"))
    try:
        model_bytes = sparse_base(work / "base", LLAMA3_8B)
        lora_adapter(work / "lora", LLAMA3_8B, args.rank)
        out = work / "sweep"
        command = (f"{shlex.quote(safeblend_command())} sweep {work / 'base'} {work / 'lora'} -o {out} "
                   f"--weights {args.weights} --as-adapters -q --overwrite")
        timed(command)  # warm
        walls, rss = [], []
        for _ in range(args.runs):
            wall, peak = timed(command)
            walls.append(wall)
            rss.append(peak)
        outputs = sorted(out.glob("lambda-*"))
        written = sum(f.stat().st_size for d in outputs for f in d.iterdir())
        median, p20, p80 = quantiles(walls)
        merged = len(outputs) * model_bytes
        print(f"Llama-3-8B shapes ({LLAMA3_8B.parameters / 1e9:.2f}B parameters), rank {args.rank} on "
              f"{len(MODULES)} modules x {LLAMA3_8B.num_hidden_layers} layers, {len(outputs)} weights, "
              f"{args.runs} runs")
        print(f"  wall {median:.2f} s (p20-p80 {p20:.2f}-{p80:.2f}), peak RSS {max(rss) / 2**20:.0f} MiB")
        print(f"  adapters {written / 1e6:.1f} MB against nine merged models {merged / 1e9:.1f} GB: "
              f"1/{merged / written:.0f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
