"""The interface between the engine and a merge method."""

from __future__ import annotations

from typing import Any, ClassVar, Sequence


class MergeMethod:
    """One way of combining a base model with fine-tuned models, chunk by chunk.

    Subclasses set ``name`` and the accepted model counts, validate their parameters in
    ``__init__`` (raising SpecError) and implement ``merge_chunk``. ``recipe`` is what the
    output's metadata records.
    """

    name: ClassVar[str]
    min_models: ClassVar[int] = 1
    max_models: ClassVar[int | None] = None

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

    def merge_chunk(self, backend: Any, base: Any, models: Sequence[Any], out: Any) -> None:
        """Write the merged values of one chunk into ``out`` (rounded to its dtype)."""
        raise NotImplementedError

    def recipe(self) -> dict[str, Any]:
        """The parameters that define this merge, for metadata and the run summary."""
        raise NotImplementedError
