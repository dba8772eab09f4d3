"""The Python entry point ``safeblend.merge(base, models, out, ...)``, and the one skeleton every
run that writes checkpoints shares (``write_outputs``; ``safeblend.sweep`` is its other user)."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import warnings
from contextlib import ExitStack, closing, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from . import __version__
from .abort import Abort
from .checkpoint import Checkpoint, check_inputs_unchanged, ensure_descriptors
from .dtypes import dtype_from_alias
from .errors import SpecError
from .execute import DEFAULT_CHUNK_BYTES, ExecutionStats, Executor
from .execute_cuda import CudaExecutor
from .hub import resolve_inputs
from .lora import open_model
from .methods import MergeMethod, create_method
from .model_files import copy_tokenizer_files, set_chat_template, write_model_files
from .output_checks import OutputWatch
from .output_paths import check_output_not_input
from .plan import MergePlan, make_plan
from .quantized import open_checkpoint
from .remote import spool_bytes, spool_in
from .session import MergeInterrupted, MergeSession
from .sweep_resume import finished_output
from .units import fit_chunk_size, parse_size
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
    vocabulary: Any = None,
    slices: Any = None,
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
            (``.OUT.safeblend-partial``), keeping its journaled tensors (``safeblend.session``).
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
        vocabulary: a changed vocabulary (a recipe's ``tokenizer_source`` or ``tokenizer``
            block, ``safeblend.vocab_union.VocabularyPlan``): every model's embedding and LM
            head rows permuted to it, and its tokenizer files and ``vocab_size`` written.
        slices: a ``safeblend.slices.SliceLayout`` (a recipe's ``slices``): the output's layers
            taken from ranges of the models' layers; ``base`` is then the model whose config the
            output takes and ``models`` every other model the layout reads.
        **method_params: the method's other parameters, e.g. ``density``, ``lambda_``,
            ``normalize``, ``consensus``, ``rescale``, ``seed`` (see ``safeblend.methods``); any
            of them may vary by tensor (``safeblend.methods.params``).

    Returns:
        A MergeResult with the run's figures.

    Example:
        >>> safeblend.merge("base/", "finetune/", "merged/", weight=0.6)  # doctest: +SKIP
    """
    started = time.perf_counter()
    # stacklevel: the warning points at the caller of merge (through write_outputs).
    warn = on_warning or (lambda message: warnings.warn(message, stacklevel=4))
    model_paths = [models] if isinstance(models, (str, os.PathLike)) else list(models)
    options = parse_options(dtype, shard_size, chunk_size)
    n_models = slices.n_models if slices is not None else len(model_paths)
    merger = create_method(method, n_models, weight=weight, **method_params)
    if options.out_dtype == "F8_E4M3":  # fp8 output is quantized by the CPU executor (safeblend.quantized)
        if device == "cuda":
            raise SpecError("--dtype fp8 runs on the CPU; leave out --device cuda")
        device = "cpu"
    backend, device_name = _select_backend(device, merger)
    given = [str(base), *map(str, model_paths)]
    base, model_paths = resolve_inputs(base, model_paths, warn, progress, stream)  # Hub ids, URLs, an adapter's base
    if slices is not None:
        slices = slices.with_paths(dict(zip(given, map(str, [base, *model_paths]))))
    check_output_not_input(out, [base, *model_paths])  # real paths and (device, inode)

    def execute(plans, mergers, base_ckpt, model_ckpts, writers, kept, chunk_bytes, update) -> ExecutionStats:
        executor = CudaExecutor if device_name == "cuda" else Executor
        return executor(plans[0], base_ckpt, model_ckpts, merger, backend, chunk_bytes,
                        kept=kept).run(writers[0], update)

    def finish_files(staging: Path) -> None:  # a recipe's tokenizer_source and chat_template
        if vocabulary is not None:
            vocabulary.write_files(staging)
        if tokenizer_from is not None:
            copy_tokenizer_files(tokenizer_from, staging)
        if chat_template is not None:
            set_chat_template(staging, chat_template)

    # LoRA adapter directories open as lazily materialised fine-tunes (safeblend.lora); as
    # low-rank terms where the method adds them itself (the linear family, on the CPU).
    results, _ = write_outputs(base, model_paths, [Path(out)], [merger], options, execute, device=device_name,
                               low_rank=device_name == "cpu" and merger.takes_low_rank, overwrite=overwrite,
                               resume=resume, allow_missing=allow_missing,
                               progress="merging" if progress else None, warn=warn, started=started,
                               watch_output=True, finish_files=finish_files, slices=slices,
                               wrap_inputs=vocabulary.wrap if vocabulary is not None else None)
    return results[0]


def _reduces(method: MergeMethod) -> bool:
    """Whether a method may run reduce passes (it defines them; some configurations run none)."""
    return type(method).reduce_passes is not MergeMethod.reduce_passes


@dataclass(frozen=True)
class Options:
    """The options every run parses the same way."""

    out_dtype: str | None  # safetensors name, or None to keep the base's per tensor
    shard_bytes: int
    chunk_bytes: int


def parse_options(dtype: str, shard_size: int | str, chunk_size: int | str) -> Options:
    """``dtype``, ``shard_size`` and ``chunk_size`` as given to merge or sweep; SpecError if bad."""
    try:
        return Options(dtype_from_alias(dtype), parse_size(shard_size), parse_size(chunk_size))
    except ValueError as exc:
        raise SpecError(str(exc)) from exc


def open_inputs(stack: ExitStack, base: str | os.PathLike, model_paths: Sequence[str | os.PathLike],
                out_dtype: str | None, low_rank: bool = False,
                slices: Any = None) -> tuple[Checkpoint, list[Checkpoint]]:
    """Open BASE and the fine-tuned models (LoRA adapters as lazy fine-tunes, safeblend.lora),
    each closed by ``stack`` however the run ends. With ``slices`` (a SliceLayout), the models
    it reads, seen as one checkpoint per operand (``SliceLayout.assemble``)."""
    if slices is not None:
        opened = {str(p): stack.enter_context(closing(open_checkpoint(p))) for p in dict.fromkeys([base, *model_paths])}
        views = slices.assemble(opened)
        return views[0], views[1:]
    base_ckpt = stack.enter_context(closing(open_checkpoint(base)))  # quantized: safeblend.quantized
    models = [stack.enter_context(closing(open_model(p, base_ckpt, out_dtype, low_rank))) for p in model_paths]
    return base_ckpt, models


def write_outputs(
    base: str | os.PathLike, model_paths: Sequence[str | os.PathLike], finals: list[Path],
    mergers: list[MergeMethod], options: Options, execute: Callable[..., ExecutionStats], *, device: str,
    low_rank: bool, overwrite: bool, resume: bool, allow_missing: str | None, progress: str | None,
    warn: Callable[[str], None], started: float, watch_output: bool = False, keep_finished: bool = False,
    before_staging: Callable[[list[MergePlan]], None] | None = None,
    after_staging: Callable[[list[MergeSession]], list[str]] | None = None,
    finish_files: Callable[[Path], None] | None = None, slices: Any = None,
    wrap_inputs: Callable[[Checkpoint, list[Checkpoint]], tuple[Checkpoint, list[Checkpoint]]] | None = None,
) -> tuple[list[MergeResult], list[str]]:
    """The one merge skeleton, for one output (merge) or several (sweep): open the inputs, plan
    each output, stage it (``MergeSession``), run ``execute(plans, mergers, base, models, writers,
    kept, chunk_bytes, progress)`` once for all, then finish and commit each. Returns one
    MergeResult per output and the warnings given.

    On failure every output not yet committed is removed, but an interrupt keeps them for
    ``--resume``; the first failure of any thread is the one raised (safeblend.abort).
    ``watch_output`` checks the merged values of a single output (safeblend.output_checks).
    ``keep_finished`` (a sweep's): with ``resume``, outputs an interrupted run committed are
    kept as they are. ``after_staging`` returns the messages to show once every output is
    staged (default: the sessions' own). ``finish_files`` may change an output's non-weight files
    once written (a recipe's tokenizer and chat template); ``wrap_inputs`` may replace the opened
    checkpoints by views of them (a recipe's changed vocabulary, safeblend.vocab_union)."""
    with ExitStack() as stack:  # every input opened is closed, however this ends
        base_ckpt, model_ckpts = open_inputs(stack, base, model_paths, options.out_dtype, low_rank, slices)
        if wrap_inputs is not None:
            base_ckpt, model_ckpts = wrap_inputs(base_ckpt, model_ckpts)
        metadatas = [output_metadata(m, base, model_paths, options.out_dtype, slices) for m in mergers]
        plans = [make_plan(base_ckpt, model_ckpts, options.out_dtype, options.shard_bytes, md,
                           allow_missing=allow_missing, must_compute=m.must_compute)
                 for m, md in zip(mergers, metadatas)]
        if slices is not None:  # the output's layer count (safeblend.slices)
            for plan in plans:
                plan.config.update(slices.config_changes())
        messages = list(dict.fromkeys(msg for m, p in zip(mergers, plans) for msg in [*m.warnings, *p.warnings]))
        for message in messages:
            warn(message)
        chunk_bytes = fit_chunk_size(options.chunk_bytes, plans[0], buffers=7 + len(plans))  # fits in memory
        ensure_descriptors(sum(len(p.shards) for p in plans))  # open-file limit (safeblend.checkpoint)
        todo = [k for k in range(len(plans)) if not (resume and keep_finished and finished_output(finals[k],
                                                                                                   metadatas[k]))]
        for k in sorted(set(range(len(plans))) - set(todo)):
            warn(f"--resume: {finals[k].name} was completed by the interrupted sweep; kept")
        abort = Abort()  # one failure slot for every thread of every output
        sessions: list[MergeSession] = []
        done = 0  # outputs committed
        stats, writers = ExecutionStats(), []
        try:
            if before_staging is not None and todo:
                before_staging([plans[k] for k in todo])
            for k in todo:
                # Staging beside OUT, locked and journaled; with resume, ``kept`` lists what is in place.
                sessions.append(MergeSession.start(finals[k], overwrite=overwrite, resume=resume, plan=plans[k],
                                                   inputs=[base, *model_paths], abort=abort,
                                                   settings={"chunk_bytes": chunk_bytes, "device": device}))
            staged = after_staging(sessions) if after_staging is not None and sessions else \
                list(dict.fromkeys(m for s in sessions for m in s.messages))
            for message in staged:
                warn(message)
            writers = [session.writer for session in sessions]
            kept = frozenset(sessions[0].kept) if sessions else frozenset()
            compare_base = slices is None and not mergers[0].copies_by_design  # a slice view is no base
            watch = OutputWatch(plans[0], base_ckpt, kept, compare_base) if watch_output else None
            for writer in writers:
                writer.open()
            if sessions:
                # Streamed inputs spool tensors that reduce passes read several times (safeblend.remote)
                # beside the outputs, so the space for both is checked here.
                spooled = spool_bytes([base_ckpt, *model_ckpts]) if any(map(_reduces, mergers)) else 0
                if spooled:
                    sessions[0].output.check_space(spooled + (0 if resume else sum(plans[k].output_bytes for k in todo)))
                with progress_bar(plans[0].total_size, progress) as bar, spool_in([base_ckpt, *model_ckpts], sessions[0].staging):
                    bar.update(sessions[0].kept_bytes)
                    stats = execute([plans[k] for k in todo], [mergers[k] for k in todo], base_ckpt, model_ckpts,
                                    [watch.wrap(writers[0])] if watch else writers, kept, chunk_bytes, bar.update)
            for writer in writers:
                writer.close()
            for n, (session, k) in enumerate(zip(sessions, todo)):
                write_index(session.staging, plans[k], metadatas[k])
                # Regular files only; a skipped one is said once.
                write_model_files(plans[k], base_ckpt.model_dir, session.staging, options.out_dtype,
                                  warn if n == 0 else None)
                if finish_files is not None:
                    finish_files(session.staging)
            check_inputs_unchanged([base_ckpt, *model_ckpts])  # size, mtime, inode, lease: last, before commit
            for session in sessions:
                session.commit()  # hashes, manifest, then the atomic rename
                done += 1
            checks = watch.messages() if watch else []
            for message in checks:
                warn(message)
        except BaseException as exc:
            failure, interrupted = abort.first(exc), None
            for session in sessions[done:]:  # an interrupt keeps the partial outputs for --resume
                try:
                    session.fail(failure)
                except MergeInterrupted as stop:
                    interrupted = interrupted or stop
            if interrupted is not None and keep_finished:  # a sweep's partial outputs, all in one place
                raise MergeInterrupted(f"the partial outputs are kept in {finals[0].parent}; rerun the same command "
                                       "with --resume to finish them") from exc
            if interrupted is not None:
                raise interrupted
            if failure is exc:
                raise
            raise failure from None

    seconds = time.perf_counter() - started
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    written = dict(zip(todo, (w.bytes_written for w in writers)))  # 0 for an output kept as it was
    results = [
        MergeResult(
            output=str(Path(os.path.abspath(final))), method=m.name, params=m.recipe(),
            dtype=options.out_dtype or "auto", device=device, tensors=len(p.tensors), shards=len(p.shards),
            bytes_read=stats.bytes_read, bytes_written=written.get(k, 0), seconds=round(seconds, 4),
            throughput_bytes_per_s=round((stats.bytes_read + written.get(k, 0)) / max(seconds, 1e-9), 1),
            peak_rss_bytes=rss, warnings=[*m.warnings, *p.warnings, *checks],
            output_equals_base=watch.equals_base if watch and watch.compared else None,
        )
        for k, (final, m, p) in enumerate(zip(finals, mergers, plans))
    ]
    return results, messages


def output_metadata(merger: MergeMethod, base: str | os.PathLike, model_paths: Sequence[str | os.PathLike],
                    out_dtype: str | None, slices: Any = None) -> dict[str, str]:
    """The strings every output shard header records: version and merge recipe (also used by sweep)."""
    recipe = {
        **merger.recipe(),
        "base": str(base),
        "models": [str(p) for p in model_paths],
        "dtype": out_dtype or "auto",
        **({"slices": slices.describe()} if slices is not None else {}),
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
    if device == "auto" and reason is None and not merger.runs_on_gpu():
        return cpu_backend(), "cpu"  # the method needs host-side reduce passes
    if reason is None:
        from safeblend.kernels.triton_backend import TritonBackend  # imports torch and triton

        return TritonBackend(), "cuda"
    if device == "cuda":
        raise SpecError(f"--device cuda: {reason}")
    return cpu_backend(), "cpu"


class _NoBar:
    def update(self, n: int) -> None:
        pass


def progress_bar(total: int, label: str | None):
    """A tqdm bar in bytes on stderr titled ``label``, or a no-op when ``label`` is None (tqdm
    not even imported: it costs RSS); a context manager. merge, sweep and diff show theirs with it."""
    if label is None:
        return nullcontext(_NoBar())
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=label, file=sys.stderr,
                dynamic_ncols=True, smoothing=0.1)
