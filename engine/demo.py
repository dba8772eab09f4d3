"""``safeblend demo``: generate a pair, merge it, and check the result against float64."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
from safetensors.numpy import load_file

from .api import merge
from .errors import OutputError
from .output_paths import printable
from .tolerance import out_of_tolerance
from .synthetic import PRESETS, write_pair
from .units import format_size


# Marks a directory as a demo safeblend made, listing the files it wrote into base/ and
# finetune/: a later demo replaces those files and nothing else.
MARKER_NAME = ".safeblend-demo"
_PARTS = ("base", "finetune", "merged")


def run_demo(directory: Path, weight: float, size: str, echo: Callable[[str], None]) -> None:
    """Write base/ and finetune/ under ``directory``, merge into merged/, verify every element."""
    base, ft, out = directory / "base", directory / "finetune", directory / "merged"
    _clear_previous_demo(directory)
    shape = PRESETS[size]
    echo(f"Generating a {shape.parameters / 1e6:.1f}M-parameter Llama-shaped pair (bf16) in {directory} ...")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MARKER_NAME).write_text(json.dumps({"safeblend_demo": 1, "files": {}}) + "\n")
    write_pair(base, ft, shape, dtype="BF16", shard_size=20_000_000)
    written = {d.name: sorted(p.name for p in d.iterdir()) for d in (base, ft)}
    (directory / MARKER_NAME).write_text(json.dumps({"safeblend_demo": 1, "files": written}) + "\n")
    echo(f"Merging: safeblend merge {base} {ft} -o {out} --weight {weight} --overwrite")
    result = merge(base, ft, out, weight=weight, overwrite=True, progress=True, shard_size="20MB",
                   on_warning=lambda m: echo(f"Warning: {m}"))
    echo(f"  {result.tensors} tensors, {result.shards} shards, {format_size(result.bytes_written)} "
         f"in {result.seconds:.2f} s, peak RSS {format_size(result.peak_rss_bytes)}")
    worst = _check_against_float64(base, ft, out, weight)
    echo(f"Checked every element against a float64 reference: max |error| = {worst:.3g} "
         f"(within 1 bf16 ulp everywhere); output in {out}")


def _clear_previous_demo(directory: Path) -> None:
    """Remove the model pair of a previous demo in ``directory`` — only the files the demo's
    marker lists. A directory holding base/, finetune/ or merged/ that no demo made, or with
    files added to them, is refused; merged/ itself is replaced by the merge's own rules."""
    present = [p for p in _PARTS if os.path.lexists(directory / p)]
    if not present:
        return
    try:
        marker = json.loads((directory / MARKER_NAME).read_text(encoding="utf-8"))
        listed = {k: set(v) for k, v in marker["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise OutputError(f"{directory}: holds {', '.join(present)} but is not a safeblend demo (no "
                          f"{MARKER_NAME}); choose a new directory for the demo") from None
    for part in ("base", "finetune"):
        d = directory / part
        if not os.path.lexists(d):
            continue
        if d.is_symlink() or not d.is_dir():
            raise OutputError(f"{d}: is not a directory the demo made; choose a new directory for the demo")
        foreign = sorted(n for n in os.listdir(d) if n not in listed.get(part, set()) or not (d / n).is_file()
                         or (d / n).is_symlink())
        if foreign:
            raise OutputError(f"{d}: holds {printable(foreign[0])}, which the demo did not write; move it away "
                              "or choose a new directory for the demo")
    for part in ("base", "finetune"):
        d = directory / part
        if d.is_dir():
            for name in os.listdir(d):
                (d / name).unlink()
            d.rmdir()


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
