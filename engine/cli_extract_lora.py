"""The ``safeblend extract-lora`` command (engine/extract_lora.py does the work)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .execute import DEFAULT_CHUNK_BYTES
from .units import format_size


@click.command("extract-lora")
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("ft", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="Adapter directory to write (appears only when complete).")
@click.option("--rank", required=True, type=click.IntRange(1), help="LoRA rank R.")
@click.option("--oversample", default=8, show_default=True, type=click.IntRange(0),
              help="Extra random directions of the range finder.")
@click.option("--power-iterations", default=2, show_default=True, type=click.IntRange(0),
              help="Power iterations (two passes over each tensor each).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0), help="Random seed.")
@click.option("--dtype", default="fp32", show_default=True, type=click.Choice(["fp32", "bf16", "fp16"]),
              help="dtype of the LoRA factors.")
@click.option("--chunk-size", default=DEFAULT_CHUNK_BYTES, help="Largest block of a tensor read at once (default 8 MiB).")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the report (retained energy per tensor) as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No summary.")
def extract_lora(base, ft, out, rank, oversample, power_iterations, seed, dtype, chunk_size, overwrite, as_json,
                 quiet) -> None:
    """Write a PEFT LoRA adapter of rank R approximating FT − BASE (a randomized SVD per
    tensor, read in blocks); report the energy of the change each tensor keeps."""
    from .extract_lora import extract_lora as run

    report = run(base, ft, out, rank, oversample=oversample, power_iterations=power_iterations, seed=seed,
                 chunk_size=chunk_size, dtype=dtype, overwrite=overwrite)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    elif not quiet:
        lowest = sorted((t for t in report.tensors if t.kind in ("linear", "embedding")),
                        key=lambda t: t.retained_energy)[:3]
        skipped = [t for t in report.tensors if t.kind == "not representable"]
        click.echo(f"Extracted a rank-{rank} LoRA into {report.output}: {format_size(report.bytes_written)}, "
                   f"{100 * report.retained_energy:.2f}% of the change's energy kept, {report.seconds:.1f} s, "
                   f"peak RSS {format_size(report.peak_rss_bytes)}", err=True)
        for t in lowest:
            click.echo(f"  least kept: {t.name} {100 * t.retained_energy:.2f}%", err=True)
        if skipped:
            click.echo(f"  {len(skipped)} changed 1-D tensor(s) (norms, biases) cannot be LoRA factors and stay "
                       f"the base's, e.g. {skipped[0].name}", err=True)
