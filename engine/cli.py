"""The ``safeblend`` command line: merge, inspect, demo.

Engine exceptions are translated here and only here: user mistakes exit 2 (click's usage
errors), runtime failures exit 1 with a one-line ``Error: ...``; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from functools import partial
from pathlib import Path

import click

from . import __version__
from .cli_sweep_eval import eval_options
from .errors import SafeblendError, SpecError
from .execute import DEFAULT_CHUNK_BYTES
from .methods import method_names
from .output_paths import printable
from .units import format_size, parse_size


class SizeType(click.ParamType):
    """A byte size with units: ``5GB``, ``500MB``, ``2GiB``."""

    name = "size"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class OutputPath(click.Path):
    """A path that must be named: click would read an empty one (an unset variable) as ``.``."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            self.fail("the output path is empty (an unset variable?); name the output directory", param, ctx)
        return super().convert(value, param, ctx)


# A model argument: a local path, a Hub repo id or a URL, kept as typed (a Path would fold the
# "//" of https://, s3:// and hf:// URLs, which are read remotely: safeblend.remote).
_MODEL = click.Path(path_type=str)


class _Group(click.Group):
    """Routes engine errors to one-line messages unless --debug was given."""

    def invoke(self, ctx: click.Context):
        previous = _sigterm_as_interrupt()
        try:
            return super().invoke(ctx)
        except SpecError as exc:
            if ctx.meta.get("debug"):
                raise
            raise click.UsageError(printable(str(exc)), ctx) from None
        except SafeblendError as exc:
            if ctx.meta.get("debug"):
                raise
            raise click.ClickException(printable(str(exc))) from None
        except KeyboardInterrupt as exc:
            if ctx.meta.get("debug"):
                raise
            # A merge's MergeInterrupted says where its partial output is and how to --resume.
            click.echo(f"Interrupted: {exc}" if str(exc) else "Interrupted: nothing was written to the output.",
                       err=True)
            sys.exit(130)
        except OSError as exc:
            if ctx.meta.get("debug"):
                raise
            where = f"{exc.filename}: " if exc.filename else ""
            raise click.ClickException(printable(f"{where}{exc.strerror or exc}")) from None
        finally:
            if previous is not None:
                import signal

                signal.signal(signal.SIGTERM, previous)


def _sigterm_as_interrupt():
    """SIGTERM stops a merge like Ctrl-C (partial output kept for --resume); returns the old handler."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)


def _debug_option(f):
    def remember(ctx, _param, value):
        ctx.meta["debug"] = ctx.meta.get("debug") or value

    return click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=remember,
                        help="Show full tracebacks on errors.")(f)


# Options several commands share, declared once; each command gives its own help text.
_dtype_option = partial(click.option, "--dtype", default="auto", show_default=True,
                        type=click.Choice(["auto", "bf16", "fp16", "fp32"], case_sensitive=False))
_shard_size_option = click.option("--shard-size", default="5GB", show_default=True, type=SizeType(),
                                  help="Largest output shard.")
_chunk_size_option = partial(click.option, "--chunk-size", default=DEFAULT_CHUNK_BYTES, type=SizeType())
_json_option = partial(click.option, "--json", "as_json", is_flag=True)
_quiet_option = partial(click.option, "-q", "--quiet", is_flag=True)
_output_option = partial(click.option, "-o", "--output", "out", required=True, type=OutputPath(path_type=Path))
_method_option = partial(click.option, "--method", default="linear", show_default=True,
                         type=click.Choice(method_names()))
_lambda_option = partial(click.option, "--lambda", "lambda_", type=float)
_normalize_option = partial(click.option, "--normalize/--no-normalize", default=None)
_overwrite_option = partial(click.option, "--overwrite", is_flag=True)
_stream_option = click.option("--stream", is_flag=True, help="Read Hub repos that are not in the cache by range "
                              "requests, without downloading them (URLs are always streamed).")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="safeblend")
@_debug_option
def main() -> None:
    """Merge LLM checkpoints with memory that does not grow with the model."""


def _warn(message: str) -> None:
    click.echo(f"Warning: {printable(message)}", err=True)


@main.command()
@click.argument("base", required=False, type=_MODEL)
@click.argument("models", nargs=-1, type=_MODEL)
@_output_option(help="Output model directory (created; appears only when complete).")
@click.option("--config", "config", type=click.Path(path_type=Path, dir_okay=False),
              help="A mergekit-style YAML recipe; BASE, MODELS, the method and its parameters come from it.")
@_method_option(help="Merge method.")
@click.option("--weight", "weights", multiple=True, type=float,
              help="λ, the fine-tuned model's weight (slerp: t); repeat once per model for several. "
                   "Default 0.5 for linear and slerp, 1 for the others.")
@click.option("--density", "densities", multiple=True, type=float,
              help="Fraction of each task vector kept (ties, dare-*); repeat once per model for several.")
@_lambda_option(help="Scale of the merged task vector "
              "(task-arithmetic, ties, dare-*; default 1).")
@_normalize_option(help="Divide by the sum of the weights (default: on for ties, off otherwise).")
@click.option("--consensus", type=click.Choice(["sum", "count"]),
              help="Sign election (ties, dare-ties): sign of the summed weighted deltas (default) or of "
                   "the count of signs.")
@click.option("--rescale", type=click.Choice(["density", "l1", "none"]),
              help="DARE: scale kept entries by 1/density (default), to preserve the L1 norm, or not at all.")
@click.option("--seed", type=click.IntRange(0, 2**64 - 1), help="DARE's random seed (default 0).")
@_dtype_option(type=click.Choice(["auto", "bf16", "fp16", "fp32", "fp8"], case_sensitive=False),
               help="Output dtype of float tensors; auto keeps the base's per tensor (or the recipe's); fp8 "
                    "writes an fp8 base's block format.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
              help="Where to compute; auto uses a GPU when torch, triton and CUDA are present.")
@_shard_size_option
@_chunk_size_option(help="Largest chunk held in memory at once (default 8 MiB).")
@_overwrite_option(help="Replace OUTPUT if it exists (and discard a stale partial output of an interrupted merge).")
@click.option("--resume", is_flag=True, help="Finish the partial output an interrupted merge into OUTPUT left "
              "beside it (.OUTPUT.safeblend-partial), keeping the tensors it completed.")
@click.option("--allow-missing", type=click.Choice(["take"]),
              help="Tensors that only some inputs have: copy each from the input that has it (default: error).")
@_stream_option
@_json_option(help="Print the run summary as JSON on stdout.")
@_quiet_option(help="No progress bar or summary line.")
@_debug_option
@click.pass_context
def merge(ctx, base, models, out, config, method, weights, densities, lambda_, normalize, consensus, rescale,
          seed, dtype, device, shard_size, chunk_size, overwrite, resume, allow_missing, stream, as_json,
          quiet) -> None:
    """Merge fine-tuned MODELS into BASE: θ = θ_base + λ·(θ_ft − θ_base).

    BASE is the model before fine-tuning (e.g. the aligned instruct model), each of MODELS a
    fine-tuned one. Each may be a model directory, a single .safetensors file, a PEFT adapter
    directory or a Hugging Face Hub repo id (org/name or org/name@revision; a local path wins).
    A lone PEFT adapter is merged onto the base its adapter_config.json names. With
    --config RECIPE, the inputs, method and parameters come from a mergekit-style YAML recipe.
    """
    from .api import merge as run_merge

    options = dict(dtype=dtype.lower(), device=device, shard_size=shard_size, chunk_size=chunk_size,
                   overwrite=overwrite, progress=not quiet and not as_json, on_warning=_warn,
                   resume=resume, allow_missing=allow_missing, stream=stream)
    if config is not None:
        from .recipe import merge_recipe

        if base is not None:
            raise click.UsageError("with --config, BASE and MODELS come from the recipe; do not give them", ctx)
        for name in ("method", "weights", "densities", "lambda_", "normalize", "consensus", "rescale"):
            if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT:
                flag = {"weights": "weight", "densities": "density", "lambda_": "lambda"}.get(name, name)
                raise click.UsageError(f"--{flag} cannot be combined with --config: set it in the recipe", ctx)
        if ctx.get_parameter_source("dtype") == click.core.ParameterSource.DEFAULT:
            del options["dtype"]  # the recipe's dtype/out_dtype, else the base's
        if seed is not None:
            options["seed"] = seed
        result = merge_recipe(config, out, **options)
    else:
        if base is None:
            raise click.UsageError("give BASE and at least one fine-tuned MODEL, or --config RECIPE", ctx)
        if not models:  # one input: a PEFT adapter, merged onto the base it names
            base, models = None, (base,)
        params = dict(normalize=normalize, lambda_=lambda_, consensus=consensus, rescale=rescale, seed=seed,
                      weight=_one_or_many(weights), density=_one_or_many(densities))
        result = run_merge(base, list(models), out, method=method, **params, **options)
    _print_summary(result, as_json, quiet)


def _print_summary(result, as_json: bool, quiet: bool) -> None:
    """A merge's or a sweep's result: JSON on stdout, or a summary on stderr (nothing if quiet)."""
    from .lambda_sweep import SweepResult, output_name

    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    if quiet:
        return
    size, rate = format_size(result.bytes_written), format_size(result.throughput_bytes_per_s)
    timing = f"in {result.seconds:.1f} s ({rate}/s), peak RSS {format_size(result.peak_rss_bytes)}"
    if not isinstance(result, SweepResult):
        click.echo(f"Merged {result.tensors} tensors ({_describe(result.params)}) on {result.device} into "
                   f"{printable(result.output)}: {result.shards} shard(s), {size} written {timing}", err=True)
        return
    click.echo(f"Swept {len(result.weights)} weights ({result.method}) over {result.tensors} tensors into "
               f"{printable(result.output)}: read {format_size(result.bytes_read)} once, wrote {size} {timing}",
               err=True)
    for w, r in zip(result.weights, result.outputs):
        click.echo(f"  {output_name(w)}  {r.shards} shard(s), {format_size(r.bytes_written)}", err=True)


def _one_or_many(values: tuple[float, ...]) -> float | list[float] | None:
    """A repeated option's values: None when absent, the value when given once, else the list."""
    if not values:
        return None
    return values[0] if len(values) == 1 else list(values)


def _describe(params: dict) -> str:
    """``linear, weights [0.6], normalize False`` — the method and its parameters, for humans."""
    parts = [str(params.get("method"))]
    parts += [f"{k} {json.dumps(v, ensure_ascii=False)}" for k, v in params.items() if k != "method"]
    return ", ".join(parts)


@main.command()
@click.argument("checkpoint", type=_MODEL)
@_json_option(help="Print the summary as JSON.")
@_debug_option
def inspect(checkpoint, as_json) -> None:
    """Summarise CHECKPOINT: tensors, parameters, dtypes, shards, bytes."""
    from .checkpoint import Checkpoint
    from .hub import resolve_inputs

    ckpt = Checkpoint.open(resolve_inputs(checkpoint, [])[0])  # a local path or a Hub repo id
    tensors = ckpt.tensors.values()
    by_dtype: Counter = Counter()
    for t in tensors:
        by_dtype[t.dtype.name] += t.nbytes
    summary = {
        "path": str(ckpt.path),
        "tensors": len(ckpt.tensors),
        "parameters": sum(t.numel for t in tensors),
        "bytes": ckpt.nbytes,
        "dtypes": {name: {"tensors": sum(t.dtype.name == name for t in tensors), "bytes": n}
                   for name, n in sorted(by_dtype.items())},
        "shards": [{"file": f.path.name, "tensors": len(f.tensors), "bytes": f.size} for f in ckpt.files],
        "largest_tensor": max(tensors, key=lambda t: t.nbytes).name if ckpt.tensors else None,
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(printable(summary["path"]))
    click.echo(f"  tensors     {summary['tensors']}")
    click.echo(f"  parameters  {summary['parameters']:,} ({summary['parameters'] / 1e9:.3f} B)")
    click.echo(f"  bytes       {format_size(summary['bytes'])}")
    for name, d in summary["dtypes"].items():
        click.echo(f"  {name:<11} {d['tensors']} tensors, {format_size(d['bytes'])}")
    click.echo(f"  shards      {len(summary['shards'])}")
    for s in summary["shards"]:
        click.echo(f"    {printable(s['file'])}  {s['tensors']} tensors, {format_size(s['bytes'])}")
    if summary["largest_tensor"]:
        largest = ckpt.tensors[summary["largest_tensor"]]
        click.echo(f"  largest     {printable(largest.name)} {list(largest.shape)} {largest.dtype.name}")


@main.command()
@click.argument("output", type=click.Path(path_type=Path))
@_json_option(help="Print the report as JSON on stdout.")
@_debug_option
def verify(output, as_json) -> None:
    """Re-read a merged OUTPUT and check every shard against safeblend.json (size, SHA-256),
    the headers, the index and the other files; exit 1 naming each mismatch."""
    from .manifest import verify as verify_checkpoint

    report = verify_checkpoint(output)
    if as_json:
        click.echo(json.dumps({"path": report.path, "ok": report.ok, "shards": report.shards,
                               "bytes_checked": report.bytes_checked, "problems": report.problems}, indent=2))
    if not report.ok:
        if not as_json:
            for problem in report.problems:
                click.echo(f"  {problem}", err=True)
        raise click.ClickException(f"{printable(output)}: verification failed: {len(report.problems)} problem(s)")
    if not as_json:
        click.echo(f"OK: {printable(output)}: {report.shards} shard(s), {format_size(report.bytes_checked)} match "
                   "safeblend.json, headers and index", err=True)


@main.command()
@click.argument("directory", default="safeblend-demo", type=OutputPath(path_type=Path))
@click.option("--weight", default=0.6, show_default=True, type=float, help="λ for the demo merge.")
@click.option("--size", default="small", show_default=True, type=click.Choice(["tiny", "small"]),
              help="How big a model pair to generate.")
@_debug_option
def demo(directory, weight, size) -> None:
    """Generate a small Llama-shaped base/fine-tune pair in DIRECTORY, merge it, check it."""
    from .demo import run_demo

    run_demo(directory, weight, size, echo=lambda m: click.echo(m, err=True))


@main.command()
@click.argument("base", required=False, type=_MODEL)
@click.argument("models", nargs=-1, type=_MODEL)
@_output_option(required=False,
                help="Sweep directory: each weight's model goes to OUTPUT/lambda-<w>/, complete or not at all.")
@click.option("--weights", help="Weights to sweep: a list (0.2,0.5,0.8) or an inclusive range "
              "start:stop:step (0.1:0.9:0.1).")
@_method_option(help="Merge method; the swept weight is λ (linear, task-arithmetic) or t (slerp).")
@_lambda_option(help="task-arithmetic's scale of the task vector (default 1).")
@_normalize_option(help="Divide by the sum of the weights (default off).")
@_dtype_option(help="Output dtype of float tensors; auto keeps the base's per tensor.")
@_shard_size_option
@_chunk_size_option(help="Largest chunk held in memory at once, per output (default 8 MiB).")
@_overwrite_option(help="Replace existing outputs of the same weights.")
@click.option("--resume", is_flag=True, help="Finish the partial outputs an interrupted sweep into OUTPUT left, "
              "keeping the tensors they completed (as merge --resume).")
@click.option("--as-adapters", is_flag=True, help="FT is a LoRA adapter: write each weight as a PEFT adapter "
              "(the adapter scaled), not a full model (linear, task-arithmetic).")
@_stream_option
@_json_option(help="Print every output's summary and the totals as JSON.")
@_quiet_option(help="No progress bar or summary.")
@eval_options
@_debug_option
@click.pass_context
def sweep(ctx, base, models, out, weights, method, lambda_, normalize, dtype, shard_size, chunk_size, overwrite,
          resume, as_adapters, stream, as_json, quiet, **eval_opts) -> None:
    """Merge BASE with MODELS at every weight in one read pass: OUTPUT/lambda-0.1/, ...

    Each output is exactly what `safeblend merge --weight W` writes. Inputs are given as for
    merge (paths or Hub repo ids; a lone adapter brings its own base). Only methods with one
    scalar weight sweep: linear, task-arithmetic, slerp. With --eval, each model is then
    evaluated, OUTPUT/report.json, report.csv and tradeoff.png written, and --keep picks one.
    """
    from .cli_sweep_eval import eval_plan, finish
    from .evaluate import evaluate_directory
    from .lambda_sweep import parse_weights
    from .lambda_sweep import sweep as run_sweep

    plan = eval_plan(ctx, eval_opts, as_json, quiet)
    if eval_opts["eval_only"] is not None:
        if base is not None or out is not None:
            raise click.UsageError("--eval-only DIR evaluates DIR's models: give no BASE, MODELS or -o", ctx)
        only = parse_weights(weights) if weights else None
        return finish(evaluate_directory(eval_opts["eval_only"], plan, only), as_json, quiet)
    if base is None or out is None or weights is None:
        raise click.UsageError("give BASE and at least one fine-tuned MODEL (or a lone adapter), -o DIR and "
                               "--weights (or --eval-only DIR)", ctx)
    if not models:  # one input: a PEFT adapter, merged onto the base it names
        base, models = None, (base,)
    result = run_sweep(base, list(models), out, parse_weights(weights), method=method, lambda_=lambda_,
                       normalize=normalize, dtype=dtype.lower(), shard_size=shard_size, chunk_size=chunk_size,
                       overwrite=overwrite, resume=resume, progress=not quiet and not as_json, on_warning=_warn,
                       evaluate=plan, as_adapters=as_adapters, stream=stream)
    if plan is not None:
        return finish(result, as_json, quiet)
    _print_summary(result, as_json, quiet)


@main.command()
@click.argument("base", type=_MODEL)
@click.argument("ft", required=False, type=_MODEL)
@_json_option(help="Print every figure as JSON on stdout instead of the table.")
@click.option("--plot", type=click.Path(path_type=Path, dir_okay=False),
              help="Also draw relative change per layer, one line per module type, to this PNG (needs matplotlib).")
@click.option("--top", default=10, show_default=True, type=click.IntRange(0),
              help="How many of the most-changed tensors the table lists.")
@_chunk_size_option(help="Largest chunk read at once per input (default 8 MiB).")
@_stream_option
@_quiet_option(help="No progress bar.")
@_debug_option
def diff(base, ft, as_json, plot, top, chunk_size, stream, quiet) -> None:
    """Report where fine-tuning moved FT away from BASE: per tensor, layer and module type.

    BASE and FT are given as for merge; a lone adapter (FT) is measured against the base it names.
    Figures: relative change ‖Δ‖/‖base‖, cosine(base, ft) and max |Δ|, from one streaming read.
    """
    from .drift import diff as run_diff
    from .drift import format_report, plot_drift, require_matplotlib

    if plot is not None:
        require_matplotlib()  # fail before reading the models, not after
    if ft is None:  # one input: a PEFT adapter, against the base it names
        base, ft = None, base
    report = run_diff(base, ft, chunk_size=chunk_size, progress=not quiet and not as_json, stream=stream)
    if plot is not None:
        plot_drift(report, plot)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo("\n".join(printable(line) for line in format_report(report, top=top).split("\n")))
        if plot is not None:
            click.echo(f"Plot written to {printable(plot)}", err=True)
    for message in report.warnings:
        _warn(message)


from .cli_extract_lora import extract_lora  # noqa: E402  (the command lives beside its engine module)

main.add_command(extract_lora)

if __name__ == "__main__":
    main()
