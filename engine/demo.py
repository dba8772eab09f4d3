"""``safeblend demo``: generate a pair, merge it, and check the result against float64."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import numpy as np
from safetensors.numpy import load_file

from .api import merge
from .tolerance import out_of_tolerance
from .synthetic import PRESETS, write_pair
from .units import format_size


def run_demo(directory: Path, weight: float, size: str, echo: Callable[[str], None]) -> None:
    """Write base/ and finetune/ under ``directory``, merge into merged/, verify every element."""
    base, ft, out = directory / "base", directory / "finetune", directory / "merged"
    for d in (base, ft):
        if d.exists():
            shutil.rmtree(d)
    shape = PRESETS[size]
    echo(f"Generating a {shape.parameters / 1e6:.1f}M-parameter Llama-shaped pair (bf16) in {directory} ...")
    write_pair(base, ft, shape, dtype="BF16", shard_size=20_000_000)
    echo(f"Merging: safeblend merge {base} {ft} -o {out} --weight {weight} --overwrite")
    result = merge(base, ft, out, weight=weight, overwrite=True, progress=True, shard_size="20MB",
                   on_warning=lambda m: echo(f"Warning: {m}"))
    echo(f"  {result.tensors} tensors, {result.shards} shards, {format_size(result.bytes_written)} "
         f"in {result.seconds:.2f} s, peak RSS {format_size(result.peak_rss_bytes)}")
    worst = _check_against_float64(base, ft, out, weight)
    echo(f"Checked every element against a float64 reference: max |error| = {worst:.3g} "
         f"(within 1 bf16 ulp everywhere); output in {out}")


def _check_against_float64(base: Path, ft: Path, out: Path, weight: float) -> float:
    """Largest error of the merged output against (1 − λ)·base + λ·ft computed in float64."""
    worst = 0.0
    merged = {}
    for f in sorted(out.glob("*.safetensors")):
        merged.update(load_file(str(f)))
    for f in sorted(base.glob("*.safetensors")):
        base_tensors, ft_tensors = load_file(str(f)), load_file(str(ft / f.name))
        for name, b in base_tensors.items():
            b64, f64 = b.astype(np.float64), ft_tensors[name].astype(np.float64)
            ref = b64 + weight * (f64 - b64)
            bad = out_of_tolerance(merged[name], ref, np.maximum(np.abs(b64), np.abs(f64)))
            if bad.any():
                raise AssertionError(f"demo check failed: {name} has {int(bad.sum())} elements out of tolerance")
            worst = max(worst, float(np.abs(merged[name].astype(np.float64) - ref).max()))
    return worst
