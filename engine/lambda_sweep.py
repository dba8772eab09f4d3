"""λ sweeps in one pass: ``safeblend.sweep(base, ft, out, "0.1:0.9:0.1")``.

The paper's recipe (Farn et al., 2024) picks λ by merging at several weights and evaluating each
model. Nine separate merges read both inputs nine times; a sweep reads every input chunk
once and computes every weight's output from it, so each output is exactly the checkpoint
``merge`` writes at that weight (its own recipe metadata, config and tokenizer files, index),
each built in its own staging directory and renamed into place when complete.

The skeleton, planner and writer are the merge's (safeblend.api.write_outputs): one MergePlan
per weight (same shard layout; only the headers' recipe, hence data offsets, differ), one
ShardWriter per output. Execution is the merge's Executor with the per-chunk step replaced
(``SweepExecutor._process``): views of the inputs are taken once and fed to one method
instance per weight, each writing into a pooled buffer that goes to its output's writer.
Reduce passes (SLERP's norms) run once per tensor for all weights together. Memory is the
engine's buffer pool plus one chunk buffer per extra output.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from decimal import Decimal, InvalidOperation
from functools import partial
from math import isfinite
from pathlib import Path
from typing import Any, Callable, Sequence

from safeblend.kernels import cpu_backend

from .api import MergeResult, parse_options, write_outputs
from .checkpoint import Checkpoint
from .chunks import Chunk, release_inputs
from .hub import resolve_inputs
from .errors import OutputError, SpecError
from .execute import DEFAULT_CHUNK_BYTES, DEFAULT_WORKERS, BufferPool, ExecutionStats, Executor
from .methods import create_method
from .methods.base import ChunkContext, MergeMethod, TensorContext
from .output_paths import check_output_not_input
from .plan import MergePlan
from .session import MergeSession
from .sweep_resume import keep_common
from .writer import OutputDir, ShardWriter, WriteDone, placed

# Methods whose swept parameter is one scalar, the ``weight`` keyword (λ; SLERP's t).
SWEEPABLE = ("linear", "task-arithmetic", "slerp")
# More points than this is almost surely a typo in a range (a step of 0.001 for 0.01).
MAX_POINTS = 1000
DIR_PREFIX = "lambda-"


@dataclass
class SweepResult:
    """What a sweep did: one merge-like summary per output plus totals; ``--json`` prints ``to_dict()``.

    Each output's ``bytes_read`` and ``seconds`` are those of the shared pass (every output
    is computed from the same reads and completes at the end of the pass).
    """

    output: str
    method: str
    weights: list[float]
    outputs: list[MergeResult]
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    throughput_bytes_per_s: float
    peak_rss_bytes: int
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_weights(text: str) -> list[float]:
    """Weights from a list ``"0.2,0.5,0.8"`` or an inclusive range ``"start:stop:step"``.

    Ranges are computed in decimal, so ``0.1:0.9:0.1`` gives exactly 0.1, 0.2, …, 0.9 (never
    0.30000000000000004), and include ``stop`` when it is within rounding of a step.

    >>> parse_weights("0.1:0.5:0.2"), parse_weights("0.2, 0.8")
    ([0.1, 0.3, 0.5], [0.2, 0.8])
    """
    text = text.strip()
    if ":" in text:
        parts = text.split(":")
        if len(parts) != 3:
            raise SpecError(f"weights {text!r}: a range is start:stop:step, e.g. 0.1:0.9:0.1")
        start, stop, step = (_decimal(p, text) for p in parts)
        if step <= 0:
            raise SpecError(f"weights {text!r}: the step must be positive, got {parts[2].strip()}")
        if stop < start:
            raise SpecError(f"weights {text!r}: stop {parts[1].strip()} is below start {parts[0].strip()}")
        # A relative slack of 1e-9 step keeps a stop that is a rounding hair short of the grid.
        try:
            count = int((stop - start) / step + Decimal("1e-9")) + 1
        except ArithmeticError:  # decimal.Overflow: a step so small the count has no size
            raise SpecError(f"weights {text!r}: the step is too small (more than {MAX_POINTS} points)") from None
        if count > MAX_POINTS:
            raise SpecError(f"weights {text!r}: {count} points, more than {MAX_POINTS}; check the step")
        values = [float(start + i * step) for i in range(count)]
    else:
        values = [float(_decimal(p, text)) for p in text.split(",")]
    return check_weights(values)


def _decimal(part: str, whole: str) -> Decimal:
    try:
        value = Decimal(part.strip())
    except InvalidOperation:
        raise SpecError(f"weights {whole!r}: {part.strip()!r} is not a number") from None
    if not value.is_finite():
        raise SpecError(f"weights {whole!r}: {part.strip()!r} is not a finite number")
    return value


def check_weights(weights: Sequence[float]) -> list[float]:
    """Validate a list of sweep weights: at least one, finite, no two with the same directory."""
    values = [float(w) for w in weights]
    if not values:
        raise SpecError("no weights to sweep; give a list like 0.2,0.5,0.8 or a range like 0.1:0.9:0.1")
    if len(values) > MAX_POINTS:
        raise SpecError(f"{len(values)} weights, more than {MAX_POINTS}")
    seen: set[str] = set()
    for w in values:
        if not isfinite(w):
            raise SpecError(f"weight {w} is not a finite number")
        label = weight_label(w)
        if label in seen:
            raise SpecError(f"weight {label} is given twice")
        seen.add(label)
    return values


def weight_label(weight: float) -> str:
    """The shortest text that reads back as ``weight``: ``0.1``, ``0.3``, ``1.0``."""
    return repr(float(weight))


def output_name(weight: float) -> str:
    """The directory a weight's checkpoint goes to inside the sweep directory: ``lambda-0.1``."""
    return DIR_PREFIX + weight_label(weight)


def check_sweepable(method: str) -> None:
    """SpecError unless ``method`` has a single scalar parameter to sweep."""
    if method not in SWEEPABLE:
        raise SpecError(
            f"method {method!r} cannot be swept: sweep varies one scalar weight, which exists for "
            f"{', '.join(SWEEPABLE)} (λ; t for slerp); run merge once per setting for {method}"
        )


def sweep(
    base: str | os.PathLike | None,
    models: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    weights: str | Sequence[float],
    method: str = "linear",
    *,
    dtype: str = "auto",
    shard_size: int | str = "5GB",
    chunk_size: int | str = DEFAULT_CHUNK_BYTES,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = False,
    on_warning: Callable[[str], None] | None = None,
    workers: int = DEFAULT_WORKERS,
    evaluate: Any = None,
    as_adapters: bool = False,
    stream: bool = False,
    **method_params: Any,
) -> SweepResult | Any:
    """Merge at every weight in one read pass; write ``OUT/lambda-<w>/`` for each weight.

    Args:
        base: the pre-fine-tuning model (directory, ``.safetensors`` file or Hub repo id); None
            takes it from the adapters, as for ``safeblend.merge``.
        models: the fine-tuned model(s); each gets the swept weight.
        out: the sweep directory (created if needed; other contents are left alone).
        weights: ``"0.1:0.9:0.1"``, ``"0.2,0.5,0.8"`` or a sequence of floats.
        method: linear, task-arithmetic (the weight λ) or slerp (t).
        dtype, shard_size, chunk_size, overwrite, progress, on_warning: as for ``safeblend.merge``;
            ``overwrite`` replaces existing ``lambda-*`` outputs of the same weights.
        resume: finish the partial outputs an interrupted sweep left (as ``merge --resume``:
            tensors every output journaled are kept); outputs it completed are kept as they are.
        workers: compute threads.
        evaluate: evaluate every output once written (``safeblend.evaluate``): a callable
            ``(model, weight) -> metrics``, a command string, a list of these, or an ``EvalPlan``
            (jobs, keep rule, plot). Then the return value is the evaluation's ``SweepReport``.
        as_adapters: write each weight as a PEFT LoRA adapter (linear, task-arithmetic; FT a LoRA
            adapter), not a model: ``safeblend.adapter_sweep``.
        stream: read Hub repos that are not in the cache by range requests instead of
            downloading them, as for ``safeblend.merge``; URLs are always streamed.
        **method_params: the method's other parameters (e.g. ``normalize``, ``lambda_``).

    Returns:
        A SweepResult: one MergeResult per weight, in the given order, and the totals
        (with ``evaluate``: the SweepReport, which holds it under ``sweep``).

    Example:
        >>> safeblend.sweep("base/", "finetune/", "sweep/", "0.1:0.9:0.1")  # doctest: +SKIP
    """
    started = time.perf_counter()
    # stacklevel: the warning points at the caller of sweep (through write_outputs).
    warn = on_warning or (lambda message: warnings.warn(message, stacklevel=4))
    model_paths = [models] if isinstance(models, (str, os.PathLike)) else list(models)
    points = parse_weights(weights) if isinstance(weights, str) else check_weights(weights)
    check_sweepable(method)
    if "weight" in method_params:
        raise SpecError("sweep sets the weight itself; give the weights to sweep, not weight=")
    options = parse_options(dtype, shard_size, chunk_size)
    if options.out_dtype == "F8_E4M3":
        raise SpecError("sweep does not write fp8 (--dtype fp8); merge each weight with safeblend merge")
    if evaluate is not None:
        from .evaluate import as_plan

        evaluate = as_plan(evaluate)  # commands and keep rule checked before the pass
    mergers = [create_method(method, len(model_paths), weight=w, **method_params) for w in points]
    base, model_paths = resolve_inputs(base, model_paths, warn, progress, stream)  # Hub ids, URLs, adapters' own base
    check_output_not_input(out, [base, *model_paths])  # real paths and (device, inode)
    root = Path(os.path.abspath(out))
    if as_adapters:
        from .adapter_sweep import sweep_as_adapters

        if resume:
            raise SpecError("--resume does not apply to --as-adapters: an adapter sweep takes seconds; rerun it")
        result = sweep_as_adapters(base, model_paths, root, points, mergers, options.out_dtype, overwrite, started)
        return result if evaluate is None else _evaluated(result, evaluate)

    def execute(plans, mergers, base_ckpt, model_ckpts, writers, kept, chunk_bytes, update) -> ExecutionStats:
        executor = SweepExecutor(plans, base_ckpt, model_ckpts, mergers, cpu_backend(), chunk_bytes, workers, kept)
        return executor.run(_Outputs(writers), update)

    def staged(sessions: list[MergeSession]) -> list[str]:
        """The sessions' messages once; with --resume, every output keeps what all of them kept."""
        messages = list(dict.fromkeys(m for s in sessions for m in s.messages if "--resume: kept" not in m))
        return [*messages, keep_common(sessions)] if resume else messages

    # Each output is staged as a merge's (its settings are merge's own, so each partial
    # fingerprints as `merge --weight W` would, and resumes like one: safeblend.sweep_resume).
    # LoRA adapters open as low-rank terms where merge takes them so too (the linear family),
    # so each output has merge's bytes, not a materialised θ_ft's rounding.
    results, messages = write_outputs(
        base, model_paths, [root / output_name(w) for w in points], mergers, options, execute, device="cpu",
        low_rank=all(m.takes_low_rank for m in mergers), overwrite=overwrite, resume=resume, keep_finished=True,
        allow_missing=None, progress=f"sweeping ×{len(points)}" if progress else None, warn=warn, started=started,
        before_staging=lambda plans: _make_sweep_dir(root / output_name(points[0]), overwrite, plans, resume),
        after_staging=staged)
    first = results[0]
    written = sum(r.bytes_written for r in results)
    result = SweepResult(
        output=str(root), method=first.method, weights=points, outputs=results, tensors=first.tensors,
        bytes_read=first.bytes_read, bytes_written=written, seconds=first.seconds,
        throughput_bytes_per_s=round((first.bytes_read + written) / max(first.seconds, 1e-9), 1),
        peak_rss_bytes=first.peak_rss_bytes, warnings=messages,
    )
    return result if evaluate is None else _evaluated(result, evaluate)


def _evaluated(result: SweepResult, evaluate: Any) -> Any:
    """The evaluation's SweepReport of a finished sweep (``safeblend.evaluate``)."""
    from .evaluate import evaluate_result

    return evaluate_result(result, evaluate)


def _make_sweep_dir(first: Path, overwrite: bool, plans: list[MergePlan], resume: bool) -> None:
    """Create the sweep directory (``first``'s parent) and check there is room for every output at once."""
    root = first.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{root}: cannot create the sweep directory: {exc.strerror or exc}") from exc
    if not resume:  # resumed outputs are partly written: each session checks what it still needs
        OutputDir(first, overwrite).check_space(sum(p.output_bytes for p in plans))


class _Outputs:
    """Every output's ShardWriter, passed through ``Executor.run`` in place of its one writer.

    Offsets handed in are the first plan's; each output's shard headers differ only in their
    recipe, so its offsets are the first plan's shifted by its header's extra length.
    """

    def __init__(self, writers: list[ShardWriter]) -> None:
        self.writers = writers
        self.depth = writers[0].depth  # what run() reads to size the buffer pool
        self.abort = writers[0].abort  # one for every output's threads (safeblend.api.write_outputs)
        first = writers[0].plan
        for w in writers[1:]:
            _check_same_layout(first, w.plan)
        self.shifts = [[len(s.header) - len(s0.header) for s, s0 in zip(w.plan.shards, first.shards)]
                       for w in writers]

    def offset_in(self, k: int, shard: int, offset: int) -> int:
        """Where the first plan's ``offset`` in ``shard`` lies in output ``k``."""
        return offset + self.shifts[k][shard]

    def submit_to(self, k: int, shard: int, offset: int, data: memoryview, done: WriteDone | None) -> None:
        """Queue output ``k``'s bytes at the first plan's ``offset``."""
        self.writers[k].submit(shard, self.offset_in(k, shard, offset), data, done)

    def submit(self, shard: int, offset: int, data: memoryview, done: WriteDone | None = None) -> None:
        """The same bytes to every output (copied tensors); ``done`` runs once all have them."""
        each = _countdown(len(self.writers), done) if done is not None else None
        for k in range(len(self.writers)):
            self.submit_to(k, shard, offset, data, each)


def _check_same_layout(a: MergePlan, b: MergePlan) -> None:
    """Plans for different weights must place every tensor alike (only headers may differ)."""
    same = len(a.shards) == len(b.shards) and all(
        (x.name, x.shard, x.offset - len(a.shards[x.shard].header), x.dtype)
        == (y.name, y.shard, y.offset - len(b.shards[y.shard].header), y.dtype)
        for x, y in zip(a.tensors, b.tensors)
    )
    if not same or len(a.tensors) != len(b.tensors):
        raise RuntimeError("sweep: the plans for different weights lay the output out differently")


class _Fanout(MergeMethod):
    """Several instances of one method seen as one, so that ``TensorStates`` runs a tensor's
    reduce passes once for all of them: each chunk's views are read once and folded into
    every instance's state. ``prepare`` returns the list of per-instance states."""

    name = "sweep"

    def __init__(self, methods: list[MergeMethod]) -> None:  # no n_models check: a wrapper
        self.methods = methods
        self.n_models = methods[0].n_models
        self.warnings = []

    def prepare(self, tensor: TensorContext) -> list[Any]:
        return [m.prepare(tensor) for m in self.methods]

    def reduce_passes(self, state: list[Any]) -> int:
        return max(m.reduce_passes(s) for m, s in zip(self.methods, state))

    def accumulate(self, state: list[Any], pass_index: int, base: Any, models: Sequence[Any],
                   chunk: ChunkContext) -> None:
        for m, s in zip(self.methods, state):
            if pass_index < m.reduce_passes(s):
                m.accumulate(s, pass_index, base, models, chunk)

    def end_pass(self, state: list[Any], pass_index: int) -> None:
        for m, s in zip(self.methods, state):
            if pass_index < m.reduce_passes(s):
                m.end_pass(s, pass_index)


class SweepExecutor(Executor):
    """The merge's CPU executor with K outputs: per chunk, one read and K computed writes.

    Only the merge step of a chunk and the buffer pool's size differ from ``Executor``;
    chunking, prefetching, compute threads, reduce passes and copied tensors (sent to every
    output by ``_Outputs.submit``) are the merge's own code.
    """

    def __init__(self, plans: list[MergePlan], base: Checkpoint, models: list[Checkpoint],
                 methods: list[MergeMethod], backend, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 workers: int = DEFAULT_WORKERS, kept: frozenset[str] = frozenset()) -> None:
        super().__init__(plans[0], base, models, _Fanout(methods), backend, chunk_bytes, workers, kept)
        self.methods = methods

    def _buffer_pool(self, writer: _Outputs) -> BufferPool:
        # The merge's pool plus one buffer per extra output. A chunk takes one buffer per
        # output, so fewer chunks are in flight than in a merge (Executor.run: with 9 outputs
        # and 16 buffers, two): the oldest chunk always finds a buffer.
        extra = len(self.methods) - 1
        return BufferPool(writer.depth + 2 * self.workers + extra, self.chunk_bytes, writer.abort)

    def _buffers_per_chunk(self) -> int:
        return len(self.methods)

    def _process(self, chunk: Chunk, writer: _Outputs, pool: BufferPool) -> int:
        """Read one chunk's inputs once, compute and queue every output's chunk; returns bytes read."""
        t = chunk.tensor
        if t.action != "merge":
            return super()._process(chunk, writer, pool)  # identical bytes for every output
        sources = [(info, self._file(info)) for info in self._sources(t)]
        views = [f.view(info, chunk.first, chunk.count) for info, f in sources]
        context, states, read = self._states.get(t)
        where = ChunkContext(context, chunk.first)
        offset, nbytes = chunk.out_range
        for k, (method, state) in enumerate(zip(self.methods, states)):
            buffer = pool.acquire()
            out_bytes = placed(buffer, writer.offset_in(k, t.shard, offset), nbytes)
            method.merge_chunk(self.backend, views[0], views[1:], out_bytes.view(t.dtype.numpy), where, state)
            writer.submit_to(k, t.shard, offset, out_bytes, partial(pool.release, buffer))
        del views
        return read + release_inputs(sources, chunk.first, chunk.count)


def _countdown(count: int, action: Callable[[], None]) -> Callable[[], None]:
    """A callback that runs ``action`` on its ``count``-th call (from any thread)."""
    lock = threading.Lock()
    left = [count]

    def done() -> None:
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            action()

    return done
