"""The Python entry point: ``safeblend.merge(base, models, out, ...)``."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import warnings
from contextlib import ExitStack, closing
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from . import __version__
from .checkpoint import Checkpoint, check_inputs_unchanged, ensure_descriptors
from .dtypes import dtype_from_alias
from .errors import SpecError
from .execute import DEFAULT_CHUNK_BYTES, Executor
from .execute_cuda import CudaExecutor, runs_on_gpu
from .hub import resolve_inputs
from .lora import open_model
from .methods import MergeMethod, create_method
from .model_files import copy_model_files, copy_tokenizer_files, set_chat_template
from .output_checks import OutputWatch
from .output_paths import check_output_not_input
from .plan import make_plan
from .quantized import open_checkpoint
from .units import fit_chunk_size, parse_size
from .journal import MergeSession
from .writer import write_index


@dataclass
class MergeResult:
    """What a merge did; ``--json`` prints exactly ``to_dict()``."""

    output: str
    method: str
    params: dict[str, Any]
    dtype: str
    device: str
    tensors: int
    shards: int
    bytes_read: int
    bytes_written: int
    seconds: float
    throughput_bytes_per_s: float
    peak_rss_bytes: int
    warnings: list[str] = field(default_factory=list)
    # The merge changed nothing (safeblend.output_checks); None where not checked (sweep outputs).
    output_equals_base: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def merge(
    base: str | os.PathLike | None,
    models: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    method: str = "linear",
    weight: Any = None,
    *,
    dtype: str = "auto",
    device: str = "auto",
    shard_size: int | str = "5GB",
    chunk_size: int | str = DEFAULT_CHUNK_BYTES,
    overwrite: bool = False,
    resume: bool = False,
    allow_missing: str | None = None,
    stream: bool = False,
    progress: bool = False,
    on_warning: Callable[[str], None] | None = None,
    chat_template: str | None = None,
    tokenizer_from: str | os.PathLike | None = None,
    **method_params: Any,
) -> MergeResult:
    """Merge fine-tuned checkpoints into a base checkpoint, streaming, and write OUT.

    Args:
        base: the pre-fine-tuning model (directory, ``.safetensors`` file or Hub repo id
            ``org/name[@revision]``); None takes it from the adapters' ``base_model_name_or_path``
            when every model is a PEFT adapter.
        models: one or more fine-tuned models of the same architecture (paths or repo ids).
        out: output directory; appears only once complete.
        method: a registered method name (see ``safeblend.methods.method_names()``).
        weight: λ, the fine-tuned model's weight (one value, or one per model); None takes the
            method's default (0.5 for linear, 1 for task arithmetic, TIES and DARE).
        dtype: output dtype for float tensors: ``auto`` (the base's, per tensor), bf16, fp16, fp32.
        device: ``cpu``, ``cuda`` or ``auto``.
        shard_size: largest output shard, bytes or a string such as ``"5GB"``.
        chunk_size: largest chunk processed at once; bounds memory.
        overwrite: replace an existing OUT.
        resume: finish the partial output an interrupted merge into OUT left beside it
            (``.OUT.safeblend-partial``), keeping its journaled tensors (``safeblend.journal``).
        allow_missing: ``"take"`` copies tensors that only some inputs have from the base, else
            from the first model that has them; None (default) refuses such inputs.
        stream: read Hub repos that are not in the cache by range requests instead of
            downloading them (``safeblend.remote``); URLs are always streamed.
        progress: show a progress bar on stderr.
        on_warning: called with each warning (default: ``warnings.warn``).
        chat_template: Jinja text that replaces the chat template copied from the base (a
            recipe's ``chat_template``; ``safeblend.model_files.set_chat_template``).
        tokenizer_from: a model directory whose tokenizer files replace the base's (a recipe's
            ``tokenizer_source`` naming a model of the base's vocabulary).
        **method_params: the method's other parameters, e.g. ``density``, ``lambda_``,
            ``normalize``, ``consensus``, ``rescale``, ``seed`` (see ``safeblend.methods``); any
            of them may vary by tensor (``safeblend.methods.params``).

    Returns:
        A MergeResult with the run's figures.

    Example:
        >>> safeblend.merge("base/", "finetune/", "merged/", weight=0.6)  # doctest: +SKIP
    """
    started = time.perf_counter()
    warn = on_warning or (lambda message: warnings.warn(message, stacklevel=3))
    model_paths = [models] if isinstance(models, (str, os.PathLike)) else list(models)
    try:
        out_dtype = dtype_from_alias(dtype)
        shard_bytes = parse_size(shard_size)
        chunk_bytes = parse_size(chunk_size)
    except ValueError as exc:
        raise SpecError(str(exc)) from exc
    merger = create_method(method, len(model_paths), weight=weight, **method_params)
    if out_dtype == "F8_E4M3":  # fp8 output is quantized by the CPU executor (safeblend.quantized)
        if device == "cuda":
            raise SpecError("--dtype fp8 runs on the CPU; leave out --device cuda")
        device = "cpu"
    backend, device_name = _select_backend(device, merger)
    base, model_paths = resolve_inputs(base, model_paths, warn, progress, stream)  # Hub ids, URLs, adapters' own base
    _check_output_not_input(out, [base, *model_paths])

    with ExitStack() as opened:  # every checkpoint opened is closed, however this ends
        base_ckpt = opened.enter_context(closing(open_checkpoint(base)))  # quantized: safeblend.quantized
        # LoRA adapter directories open as lazily materialised fine-tunes (safeblend.lora); as
        # low-rank terms where the method adds them itself (the linear family, on the CPU).
        low_rank = device_name == "cpu" and merger.takes_low_rank
        model_ckpts = [opened.enter_context(closing(open_model(p, base_ckpt, out_dtype, low_rank)))
                       for p in model_paths]
        metadata = output_metadata(merger, base, model_paths, out_dtype)
        merge_plan = make_plan(base_ckpt, model_ckpts, out_dtype, shard_bytes, metadata, allow_missing=allow_missing)
        for message in [*merger.warnings, *merge_plan.warnings]:
            warn(message)
        chunk_bytes = fit_chunk_size(chunk_bytes, merge_plan)  # capped at the largest tensor; fits in memory
        ensure_descriptors(len(merge_plan.shards))  # open-file limit (safeblend.checkpoint)

        # Staging beside OUT, locked and journaled; with resume, plan.skip lists the kept tensors.
        session = MergeSession.start(out, overwrite=overwrite, resume=resume, plan=merge_plan,
                                     inputs=[base, *model_paths],
                                     settings={"chunk_bytes": chunk_bytes, "device": device_name})
        for message in session.messages:
            warn(message)
        output, staging, writer = session.output, session.staging, session.writer
        watch = OutputWatch(merge_plan, base_ckpt)  # non-finite values, output equal to the base
        try:
            writer.open()
            with _progress_bar(merge_plan.total_size, enabled=progress) as bar:
                bar.update(session.kept_bytes)
                executor = CudaExecutor if device_name == "cuda" else Executor
                stats = executor(merge_plan, base_ckpt, model_ckpts, merger, backend, chunk_bytes).run(
                    watch.wrap(writer), bar.update)
            writer.close()
            write_index(staging, merge_plan, metadata)
            copy_model_files(base_ckpt.model_dir, staging, out_dtype, warn)  # regular files only
            if tokenizer_from is not None:
                copy_tokenizer_files(tokenizer_from, staging)
            if chat_template is not None:
                set_chat_template(staging, chat_template)
            check_inputs_unchanged([base_ckpt, *model_ckpts])  # size, mtime, inode, lease
            session.commit()  # hashes, manifest, checkpoint quirks' config, then the atomic rename
            for message in watch.messages():
                warn(message)
        except BaseException as exc:
            session.fail(exc)  # an interrupt keeps the partial output for --resume
            raise

    seconds = time.perf_counter() - started
    written = writer.bytes_written
    return MergeResult(
        output=str(output.final),
        method=merger.name,
        params=merger.recipe(),
        dtype=out_dtype or "auto",
        device=device_name,
        tensors=len(merge_plan.tensors),
        shards=len(merge_plan.shards),
        bytes_read=stats.bytes_read,
        bytes_written=written,
        seconds=round(seconds, 4),
        throughput_bytes_per_s=round((stats.bytes_read + written) / max(seconds, 1e-9), 1),
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        warnings=[*merger.warnings, *merge_plan.warnings, *watch.messages()],
        output_equals_base=watch.equals_base,
    )


def output_metadata(merger: MergeMethod, base: str | os.PathLike, model_paths: Sequence[str | os.PathLike],
                    out_dtype: str | None) -> dict[str, str]:
    """The strings every output shard header records: version and merge recipe (also used by sweep)."""
    recipe = {
        **merger.recipe(),
        "base": str(base),
        "models": [str(p) for p in model_paths],
        "dtype": out_dtype or "auto",
    }
    return {"safeblend_version": __version__, "safeblend_recipe": json.dumps(recipe, sort_keys=True)}


def _select_backend(device: str, merger):
    """The compute backend for ``--device``, and the device name the summary reports."""
    from safeblend.kernels import cpu_backend, cuda_unavailable_reason

    if device not in ("auto", "cpu", "cuda"):
        raise SpecError(f"unknown device {device!r}; expected auto, cpu or cuda")
    if device == "cpu":
        return cpu_backend(), "cpu"
    reason = cuda_unavailable_reason()
    if device == "auto" and reason is None and not runs_on_gpu(merger):
        return cpu_backend(), "cpu"  # the method needs host-side reduce passes
    if reason is None:
        from safeblend.kernels.triton_backend import TritonBackend  # imports torch and triton

        return TritonBackend(), "cuda"
    if device == "cuda":
        raise SpecError(f"--device cuda: {reason}")
    return cpu_backend(), "cpu"


def _check_output_not_input(out: str | os.PathLike, inputs: list) -> None:
    check_output_not_input(out, inputs)  # real paths and (device, inode): safeblend.output_paths


class _NullBar:
    def update(self, n: int) -> None:
        pass

    def __enter__(self) -> "_NullBar":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return _NullBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="merging",
                file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
