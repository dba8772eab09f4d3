"""The interface between the engine and a merge method.

A method is built once per merge from its parameters (``__init__``). For every output tensor
the engine then calls ``prepare`` (per-tensor state: parameters resolved for that tensor's
name and layer), runs the method's reduce passes, if it has any, over the tensor's chunks
(``accumulate`` per chunk, ``end_pass`` after each pass), and finally calls ``merge_chunk``
per chunk. Whole-tensor statistics (norms, dot products, magnitude thresholds) are therefore
gathered chunk by chunk; no method ever holds a whole tensor. A method without reduce passes
(``linear``) pays for none: ``prepare`` is called once per tensor and that is all.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence


@dataclass(frozen=True)
class TensorContext:
    """The output tensor a method is working on.

    ``position`` is the tensor's place in the layer stack, for parameters that vary across
    layers (see ``safeblend.methods.params.layer_positions``). ``shape`` is the output tensor's
    shape, for methods that work row by row (a row is the last dimension; the merged elements
    are the first ``numel``, which a resized vocabulary may leave short of the whole shape).
    """

    name: str
    numel: int
    position: float = 0.0
    shape: tuple[int, ...] = ()

    @property
    def row_length(self) -> int:
        """Elements per row: the last dimension (the whole tensor for a scalar or unknown shape)."""
        return int(self.shape[-1]) if self.shape and self.shape[-1] > 0 else max(self.numel, 1)


@dataclass(frozen=True)
class ChunkContext:
    """Elements [first, first + len(chunk)) of ``tensor``, flattened in row-major order."""

    tensor: TensorContext
    first: int


class MergeMethod:
    """One way of combining a base model with fine-tuned models, chunk by chunk.

    Subclasses set ``name`` and the accepted model counts, validate their parameters in
    ``__init__`` (raising SpecError) and implement ``merge_chunk``; methods that need
    whole-tensor statistics also implement ``reduce_passes``, ``accumulate`` and ``end_pass``.
    ``recipe`` is what the output's metadata records.

    A method with ``takes_low_rank`` accepts, on the CPU, ``safeblend.lora.LowRankChunk`` objects
    among ``models`` in ``merge_chunk`` (a LoRA fine-tune W + s·B·A, W being the base's tensor,
    left unformed); every other method only ever sees arrays.

    ``copies_by_design`` methods (passthrough) give the base's own values on purpose, so an
    output equal to the base is no sign of a merge that did nothing (safeblend.output_checks).
    """

    name: ClassVar[str]
    min_models: ClassVar[int] = 1
    max_models: ClassVar[int | None] = None
    takes_low_rank: ClassVar[bool] = False
    copies_by_design: ClassVar[bool] = False

    def __init__(self, n_models: int) -> None:
        from ..errors import SpecError

        if n_models < self.min_models or (self.max_models is not None and n_models > self.max_models):
            most = "" if self.max_models is None else f" and at most {self.max_models}"
            raise SpecError(
                f"method {self.name!r} needs at least {self.min_models}{most} fine-tuned model(s), "
                f"got {n_models}"
            )
        self.n_models = n_models
        self.warnings: list[str] = []

    @classmethod
    def parameter_names(cls) -> list[str]:
        """The keyword parameters ``__init__`` accepts (besides ``n_models``)."""
        signature = inspect.signature(cls.__init__)
        return [p for p in signature.parameters if p not in ("self", "n_models")]

    def prepare(self, tensor: TensorContext) -> Any:
        """Per-tensor state handed to ``accumulate`` and ``merge_chunk``; called once per tensor."""
        return None

    def must_compute(self, name: str, position: float) -> bool:
        """Whether tensor ``name`` is computed even where every input holds the base's own
        bytes, which the plan otherwise copies (``safeblend.plan``): a method that changes such a
        tensor (passthrough's ``scale``) says so."""
        return False

    def attach_reader(self, state: Any, reader: Any) -> None:
        """Called once per tensor after ``prepare``, on the CPU. ``reader(first, count)`` returns
        views of [base, *models] for elements [first, first + count) of the tensor, for methods
        whose work on a chunk needs elements outside it (della: whole rows); others ignore it."""

    def reduce_passes(self, state: Any) -> int:
        """How many reduce passes over the tensor's chunks precede ``merge_chunk``."""
        return 0

    def runs_on_gpu(self) -> bool:
        """Whether the GPU pipeline (safeblend.execute_cuda) can run this merge. Reduce passes
        fold chunks on the host and have no device version, so a method with them runs on the
        CPU unless it overrides this (dare-linear with its default rescale needs none)."""
        return type(self).reduce_passes is MergeMethod.reduce_passes

    def accumulate(self, state: Any, pass_index: int, base: Any, models: Sequence[Any], chunk: ChunkContext) -> None:
        """Fold one chunk of the inputs into the tensor's statistics (reduce pass ``pass_index``).

        May be called from several threads at once for different chunks of the same pass:
        compute per chunk, then fold into ``state`` under a lock. Keep floating-point partial
        sums per chunk (keyed by ``chunk.first``) and add them in order in ``end_pass``, so
        the result does not depend on thread timing.
        """
        raise NotImplementedError

    def end_pass(self, state: Any, pass_index: int) -> None:
        """Called after every chunk has been seen by reduce pass ``pass_index``."""

    def merge_chunk(
        self,
        backend: Any,
        base: Any,
        models: Sequence[Any],
        out: Any,
        chunk: ChunkContext | None = None,
        state: Any = None,
    ) -> None:
        """Write the merged values of one chunk into ``out`` (rounded to its dtype).

        ``chunk`` and ``state`` come from the engine; a method whose parameters are the same
        for every tensor and that has no reduce passes may be called without them.
        """
        raise NotImplementedError

    def recipe(self) -> dict[str, Any]:
        """The parameters that define this merge, for metadata and the run summary."""
        raise NotImplementedError
