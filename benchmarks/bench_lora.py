"""A streaming LoRA merge against PEFT's merge_and_unload + save_pretrained.

Generates a Llama-shaped bf16 base (TinyLlama-1.1B shapes by default) and its perturbed twin
with ``safeblend.synthetic.write_pair``, plus a rank-16 LoRA adapter on every linear layer of
every block (q, k, v, o, gate, up, down), written by hand in PEFT's format (fp32 factors,
``base_model.model.`` keys, adapter_config.json). Then alternates, run after run, each under
``/usr/bin/time -v``:

* lora:   ``safeblend merge BASE ADAPTER -o OUT --weight 1.0``  (θ = W + s·B·A, streamed)
* plain:  ``safeblend merge BASE FT -o OUT --weight 0.6``       (two full checkpoints)
* peft:   ``PeftModel.from_pretrained(base).merge_and_unload().save_pretrained(OUT)``, then
          ``sync`` of the written files (safeblend's output is flushed to disk, so is PEFT's)

and prints medians (p20/p80) of wall time, CPU time (user + system of the command and its
children) and peak RSS as a markdown table. On a shared machine CPU time is the steadier
figure: wall time also counts waiting for cores that other processes hold.

    python benchmarks/bench_lora.py --runs 3
    python benchmarks/bench_lora.py --runs 3 --layers 2     # ~0.26B, quick
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import quantiles, timed  # noqa: E402

from safeblend.synthetic import PRESETS, LlamaShape, write_pair  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)
"""


def write_adapter(directory: Path, shape: LlamaShape, rank: int = 16, alpha: float = 32.0, seed: int = 1) -> int:
    """A PEFT-format LoRA adapter on every linear layer of ``shape``; returns its parameter count."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    for name, dims in shape.tensors().items():
        module = name.removesuffix(".weight")
        if not module.endswith(TARGETS):
            continue
        out_features, in_features = dims
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((rank, in_features), dtype=np.float32)
                                           / np.sqrt(in_features)).astype(np.float32)
        tensors[f"{key}.lora_B.weight"] = 0.002 * rng.standard_normal((out_features, rank), dtype=np.float32)
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
              "target_modules": list(TARGETS), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "use_rslora": False, "use_dora": False, "modules_to_save": None, "rank_pattern": {},
              "alpha_pattern": {}, "inference_mode": True, "base_model_name_or_path": None}
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return sum(t.size for t in tensors.values())


def cpu_seconds() -> float:
    """User + system seconds of every waited-for child process so far (``/usr/bin/time`` and
    what it ran included)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tinyllama-1.1b", choices=sorted(PRESETS))
    parser.add_argument("--layers", type=int, default=None, help="override the number of layers")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("benchmarks/out/lora"))
    parser.add_argument("--skip", nargs="*", default=[], choices=["lora", "plain", "peft"])
    args = parser.parse_args()

    shape = PRESETS[args.preset]
    if args.layers is not None:
        shape = replace(shape, num_hidden_layers=args.layers)
    work = args.workdir / f"{args.preset}-L{shape.num_hidden_layers}"
    base, ft, adapter, out = work / "base", work / "ft", work / "adapter", work / "out"
    if not (base / "config.json").exists():
        print(f"generating {shape.parameters / 1e9:.2f}B bf16 pair in {work}", file=sys.stderr)
        write_pair(base, ft, shape, dtype="BF16")
    if not (adapter / "adapter_config.json").exists():
        count = write_adapter(adapter, shape)
        print(f"adapter: rank 16 on {len(TARGETS)} linear layers per block, {count / 1e6:.1f}M params",
              file=sys.stderr)
    script = work / "peft_merge.py"
    script.write_text(PEFT_SCRIPT)
    commands = {
        "lora": f"python -m safeblend.cli merge {base} {adapter} -o {out} --weight 1.0 --device cpu -q --overwrite",
        "plain": f"python -m safeblend.cli merge {base} {ft} -o {out} --weight 0.6 --device cpu -q --overwrite",
        "peft": f"rm -rf {out} && HF_HUB_OFFLINE=1 python {script} {base} {adapter} {out} && sync {out}/*",
    }
    commands = {k: v for k, v in commands.items() if k not in args.skip}
    timed(f"cat {base}/* {ft}/*.safetensors {adapter}/* > /dev/null")  # warm the page cache
    results: dict[str, list[tuple[float, float, int]]] = {k: [] for k in commands}
    for run in range(args.runs):
        for name, cmd in commands.items():
            shutil.rmtree(out, ignore_errors=True)
            cpu_before = cpu_seconds()
            wall, rss = timed(cmd)
            cpu = cpu_seconds() - cpu_before
            results[name].append((wall, cpu, rss))
            print(f"run {run + 1} {name}: {wall:.2f} s wall, {cpu:.2f} s CPU, peak RSS {rss / 2**20:.0f} MiB",
                  file=sys.stderr)
        if "lora" in results and "plain" in results:
            (lw, lc, _), (pw, pc, _) = results["lora"][-1], results["plain"][-1]
            print(f"run {run + 1} lora/plain: {lw / pw:.2f} wall, {lc / pc:.2f} CPU", file=sys.stderr)
    shutil.rmtree(out, ignore_errors=True)
    print("| what | model | runs | wall s, median (p20–p80) | CPU s, median (p20–p80) | "
          "peak RSS MiB, median (p20–p80) |")
    print("|---|---|---|---|---|---|")
    label = f"{args.preset}, {shape.num_hidden_layers} layers, {shape.parameters / 1e9:.2f}B bf16"
    for name, rows in results.items():
        w = quantiles([r[0] for r in rows])
        c = quantiles([r[1] for r in rows])
        m = quantiles([r[2] / 2**20 for r in rows])
        print(f"| {name} | {label} | {len(rows)} | {w[0]:.1f} ({w[1]:.1f}–{w[2]:.1f}) | "
              f"{c[0]:.1f} ({c[1]:.1f}–{c[2]:.1f}) | {m[0]:.0f} ({m[1]:.0f}–{m[2]:.0f}) |")


if __name__ == "__main__":
    main()
