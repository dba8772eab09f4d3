"""PEFT LoRA adapters as fine-tuned inputs, materialised lazily, one chunk at a time.

A LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``, as PEFT's
``save_pretrained`` writes it) describes a fine-tuned model without storing it:

    θ_ft = W + s·B·A      for each targeted weight W (s = alpha/r, or alpha/√r with rsLoRA)
    θ_ft = T              for each full tensor T the adapter stores (modules_to_save, biases)
    θ_ft = W              for every other tensor of the base

``open_model`` turns such a directory into a ``LoraCheckpoint``: a ``Checkpoint`` with the
base's tensor names and shapes, whose targeted tensors live in a virtual file (``_DeltaFile``)
that computes ``W + s·B·A`` for just the requested element range when the executor takes a
view. The planner and both executors use it unchanged: they call the same
``view``/``byte_view``/``prefetch``/``release`` methods they call on a real file. Memory is the
factors of a few modules (A and B are small: r·(in + out) values) plus per-thread block
buffers — never a whole delta.

Targeted tensors are presented as F32: W + s·B·A is formed in fp32 or float64 (see
_EXACT_OUTPUTS) and rounded once to fp32, what a materialised fp32 fine-tune would hold, and
the merge method then works on it like on any fp32 input. Untargeted tensors are the base's
own ``TensorInfo`` (so the planner copies them from the base: every method returns the base
where θ_ft = θ_base); stored full tensors are the adapter's bytes, in whatever float dtype it
holds them. On the GPU path the same virtual file is read through ``byte_view``, so the delta
is computed on the host.

Opened with ``low_rank=True`` (for a method that declares ``takes_low_rank``: the linear
family on the CPU), a view of a targeted tensor whose W is the base's own tensor is a
``LowRankChunk`` instead of fp32 values: the method has w·s·B·A written straight into its own
accumulator (``LowRankChunk.product_into``), so θ_ft is never formed, stored and read back,
and W is read once, as the base.

Orientation follows the shapes: B·A when the base weight is (out, in), (B·A)ᵀ when it is
(in, out) (GPT-2's Conv1D); only a square weight needs the config's ``fan_in_fan_out``.
Embedding LoRA is always (B·A)ᵀ, as PEFT computes it.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import json
import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .checkpoint import (
    ADAPTER_CONFIG_NAME,
    Checkpoint,
    SafetensorsFile,
    TensorInfo,
    lora_reference,
    peft_adapter_dir,
    read_safetensors_header,
)
from .dtypes import DTYPES
from .errors import CheckpointError, IncompatibleInputsError, SpecError
from .layouts import canonical, canonical_lookup
from .module_patterns import ModulePattern, PatternError
from .quirks import tied_heads
from .quantized import open_checkpoint

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_F32 = DTYPES["F32"]
# Where the merged tensor is fp32 (or fp64), the low-rank product is accumulated in float64 and
# W + s·B·A rounded once to fp32, so the merge sees θ_ft exactly as a materialised fp32
# fine-tune would hold it; fp32 accumulation (PEFT's) leaves errors of several fp32 ulps where
# W and s·B·A nearly cancel, which an fp32 output would show. Where the merged tensor is bf16
# or fp16, those errors are ~2¹⁰× below the output's rounding, so the product is fp32.
# Measured here (2048×2048, r=16, one thread): 830 Melem/s with fp32 products, 400 with
# float64; on a TinyLlama-1.1B bf16 merge with a rank-16 adapter, 3.6 s vs 4.8 s (plain
# two-checkpoint merge: 3.5–3.7 s).
_EXACT_OUTPUTS = ("F32", "F64")
# Multiply-adds per matmul call (rows × cols × r). Small calls keep OpenBLAS on the calling
# thread: measured here, a 128×2048×16 sgemm ran 20× slower with OpenBLAS's own threads
# (fighting the compute threads for 2 cores) than 16×2048×16 calls; blocks also stay in L2.
# Measured here with one thread (r=16, fp32): 0.44-0.50 ns per output element for calls of 8-24
# rows of 2048 columns, 0.36-0.40 for 4-11 rows of 5632, 0.6-0.8 from 32 rows of 2048 up; one
# stacked numpy matmul over a run of such blocks (see _product) is ~10% faster than a loop.
_BLOCK_MULS = 1 << 19
# Modules whose factors stay loaded: more than the tensors the compute threads touch at once.
_FACTOR_CACHE = 4
_FLOAT32_MAX = 3.4028234663852886e38  # LoRA products run in float32 (or float64)
# Config fields of LoRA variants whose merge is not W + s·B·A (or that change the model's shape).
_UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA (use_dora) rescales each merged weight by a learned magnitude",
    "use_qalora": "QA-LoRA (use_qalora) pools the input before its A factor",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) only applies after an invocation sequence",
    "arrow_config": "Arrow routing (arrow_config) mixes several LoRA experts per token",
    "layer_replication": "layer_replication changes the model's layer stack",
    "target_parameters": "LoRA on bare parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "kasa_config": "KaSA (kasa_config)",
    "velora_config": "VeLoRA (velora_config)",
}
_FACTOR_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_[AB])\.(?:(?P<adapter>[^.]+)\.)?(?P<param>weight|bias)$")
_EMBEDDING_KEY = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<part>[AB])(?:\.(?P<adapter>[^.]+))?$")
_virtual_ids = itertools.count(1)


# -- the adapter's configuration ---------------------------------------------------------------


@dataclass(frozen=True)
class AdapterConfig:
    """The parts of ``adapter_config.json`` that decide the merged weights."""

    path: Path
    r: int
    alpha: float
    use_rslora: bool
    fan_in_fan_out: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    ensure_weight_tying: bool = False  # modules_to_save copies of tied embeddings stay tied

    def rank(self, module: str) -> int:
        """r for one module (per ``rank_pattern``)."""
        key = _pattern_key(self.rank_pattern, module)
        return self.rank_pattern[key] if key else self.r

    def scaling(self, module: str, rank: int) -> float:
        """s for one module: alpha/r, or alpha/√r with rsLoRA (alpha per ``alpha_pattern``)."""
        key = _pattern_key(self.alpha_pattern, module)
        alpha = float(self.alpha_pattern[key]) if key else self.alpha
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    """The first pattern that names ``module`` (PEFT's rule: the pattern matches a dotted
    suffix), matched in bounded time (safeblend.module_patterns)."""
    for key in patterns:
        if _compiled_pattern(key).matches(module):
            return key
    return None


@functools.lru_cache(maxsize=1024)
def _compiled_pattern(key: str) -> ModulePattern:
    return ModulePattern(key)


def read_adapter_config(directory: Path) -> AdapterConfig:
    """Parse and validate ``adapter_config.json``; CheckpointError names what is unsupported."""
    path = directory / ADAPTER_CONFIG_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: cannot read adapter config ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: must be a JSON object")
    peft_type = data.get("peft_type")
    if str(peft_type).upper() != "LORA":
        raise CheckpointError(f"{path}: peft_type {peft_type!r} is not supported; safeblend merges LoRA "
                              "adapters (peft_type LORA) only")
    for name, what in _UNSUPPORTED_FIELDS.items():
        if data.get(name):
            raise CheckpointError(f"{path}: {what} is not supported; merge it with PEFT's merge_and_unload "
                                  "and give safeblend the merged model")
    bias = data.get("bias", "none")
    if bias not in ("none", "all", "lora_only"):
        raise CheckpointError(f"{path}: bias {bias!r} is not supported (expected none, all or lora_only)")
    try:
        r = int(data.get("r", 8))
        alpha = float(data.get("lora_alpha", 8))
        rank_pattern = {str(k): int(v) for k, v in (data.get("rank_pattern") or {}).items()}
        alpha_pattern = {str(k): float(v) for k, v in (data.get("alpha_pattern") or {}).items()}
    except (TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path}: r, lora_alpha, rank_pattern or alpha_pattern is malformed ({exc})") from exc
    if r <= 0 or any(v <= 0 for v in rank_pattern.values()):
        raise CheckpointError(f"{path}: ranks must be positive")
    for key in [*rank_pattern, *alpha_pattern]:
        try:
            _compiled_pattern(key)
        except PatternError as exc:
            raise CheckpointError(f"{path}: rank_pattern/alpha_pattern: {exc}") from None
    for what, value in [("lora_alpha", alpha), *((f"alpha_pattern[{k!r}]", v) for k, v in alpha_pattern.items())]:
        # A merge weight like any other: NaN, inf or beyond float32 (where products run) is refused.
        if not math.isfinite(value) or abs(value) > _FLOAT32_MAX:
            raise SpecError(f"{path}: {what} is {value!r}, not a finite number within float32's range")
    return AdapterConfig(path, r, alpha, bool(data.get("use_rslora")), bool(data.get("fan_in_fan_out")),
                         rank_pattern, alpha_pattern, bool(data.get("ensure_weight_tying")))


# -- what each base tensor becomes ---------------------------------------------------------------


@dataclass
class _Delta:
    """θ_ft = W + left @ right for one base tensor (left is (rows, r) with s folded in, right
    is (r, cols)); for a LoRA bias (``lora_B.bias``) ``right`` is None and left is s·b."""

    module: str
    w: TensorInfo  # where W comes from: the base, or a replacement stored in the adapter
    a: TensorInfo | None  # lora_A (r, in) or lora_embedding_A (r, num_embeddings)
    b: TensorInfo  # lora_B (out, r), lora_embedding_B (dim, r) or the lora_B bias (out,)
    scaling: float
    transposed: bool  # delta = (B·A)ᵀ: GPT-2 Conv1D (fan_in_fan_out) and embeddings
    virtual: TensorInfo | None = None
    product: type = np.float64  # the dtype W + s·B·A is formed in (see _EXACT_OUTPUTS)
    low_rank: bool = False  # views are LowRankChunks (W is the base's own tensor; see module doc)

    @property
    def block(self) -> int:
        """Elements per matmul call (see _BLOCK_MULS); a LoRA bias has no matmul."""
        return max(1, _BLOCK_MULS // self.a.shape[0]) if self.a is not None else _BLOCK_MULS


@dataclass
class _Factors:
    """One module's factors in its delta's product dtype, s folded into ``left``."""

    left: np.ndarray
    right: np.ndarray | None


@dataclass(frozen=True)
class LowRankChunk:
    """Elements [first, first + count) of θ_ft = W + s·B·A, where W is the base's own tensor,
    left unformed: a merge method that takes it (``MergeMethod.takes_low_rank``) adds the
    low-rank term to its own accumulator instead of reading θ_ft and subtracting W again."""

    file: "_DeltaFile"
    delta: _Delta
    first: int
    count: int

    @property
    def precision(self) -> type:
        """The dtype the product is formed in: float64 where the merged tensor is fp32/fp64."""
        return self.delta.product

    def pieces(self, size: int) -> Iterator[tuple[int, int]]:
        """(lo, hi) ranges covering this chunk, each a part of one row or a run of whole rows, at
        most ``size`` elements: ``product_into`` on such a piece runs whole-row matmuls, not the
        slow single-row ones that a piece starting mid-row needs."""
        for pos, rows, c0, c1 in _segments(self.first, self.count, self.delta.w.shape[-1], size):
            lo = pos - self.first
            yield lo, lo + rows * (c1 - c0)

    def product_into(self, acc: np.ndarray, lo: int, weight: float, accumulate: bool) -> None:
        """``acc = weight·s·B·A`` (``acc +=`` with ``accumulate``) over this chunk's elements
        [lo, lo + len(acc))."""
        self.file.product_into(self.delta, acc, self.first + lo, weight, accumulate)


class _DeltaFile:
    """A virtual safetensors file holding θ_ft = W + s·B·A for every targeted tensor, in F32.

    Each tensor has a virtual byte range (``TensorInfo.start``/``nbytes``) so that the byte
    ranges the executors pass to ``prefetch``/``release``/``byte_view`` identify the tensor.
    A view is computed into a per-thread buffer and stays valid until the same thread takes
    its next view of this file — the executors consume each view before the next. A view of a
    ``low_rank`` delta is a ``LowRankChunk`` and reads nothing until its ``product_into``.
    """

    def __init__(self, path: Path, deltas: list[_Delta], files: dict[Path, SafetensorsFile]) -> None:
        self.path = path
        self.metadata: dict[str, str] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._deltas: dict[str, _Delta] = {}
        cursor = 0
        for d in deltas:
            info = TensorInfo(d.w.name, _F32, d.w.shape, path, cursor, d.w.numel * _F32.itemsize)
            d.virtual = info
            self.tensors[info.name] = info
            self._deltas[info.name] = d
            cursor += info.nbytes
        self.size = cursor
        self._starts = [d.virtual.start for d in deltas]
        self._order = deltas
        self._files = files
        self._local = threading.local()
        self._lock = threading.Lock()
        self._factors: OrderedDict[str, _Factors] = OrderedDict()

    # The interface of SafetensorsFile that the executors use.

    def view(self, info: TensorInfo, first: int, count: int) -> np.ndarray | LowRankChunk:
        """θ_ft over elements [first, first + count) of a targeted tensor: fp32 values, or a
        LowRankChunk for a ``low_rank`` delta."""
        d = self._deltas[info.name]
        if d.low_rank:
            return LowRankChunk(self, d, first, count)
        return self._materialise(d, first, count)

    def byte_view(self, start: int, length: int) -> memoryview:
        """The bytes of a virtual range (the GPU path copies these into pinned memory)."""
        if length == 0:
            return memoryview(b"")
        d, first, count = self._locate(start, length)
        return memoryview(self._materialise(d, first, count).view(np.uint8))

    def prefetch(self, start: int, length: int) -> None:
        if length > 0:
            d, first, count = self._locate(start, length)
            if not d.low_rank:  # a LowRankChunk reads none of W: the base's own view does
                self._files[d.w.file].prefetch(*d.w.byte_range(first, count))

    def stored_bytes(self, start: int, length: int) -> int:
        """Bytes read from the files for a virtual range: W's (except for a low-rank delta,
        whose W the base's own view reads), plus the factors' for the range opening a tensor."""
        if length == 0:
            return 0
        d, first, count = self._locate(start, length)
        read = 0 if d.low_rank else count * d.w.dtype.itemsize
        if first == 0:
            read += d.b.nbytes + (d.a.nbytes if d.a is not None else 0)
        return read

    def release(self, start: int, length: int) -> None:
        if length > 0:
            d, first, count = self._locate(start, length)
            if not d.low_rank:
                self._files[d.w.file].release(*d.w.byte_range(first, count))

    def product_into(self, d: _Delta, acc: np.ndarray, first: int, weight: float, accumulate: bool) -> None:
        """``acc = weight·s·B·A`` (``acc +=`` with ``accumulate``) over elements
        [first, first + len(acc)) of ``d``'s tensor."""
        factors = self._load(d)
        count = acc.shape[0]
        direct = not accumulate and acc.dtype == d.product  # the matmuls write into acc itself
        target = acc if direct else self._block_buffers(count, d.product)[0][:count]
        with np.errstate(all="ignore"):  # inf/NaN propagate as in the materialised θ_ft
            for pos, rows, c0, c1 in _segments(first, count, d.w.shape[-1], count):
                lo = pos - first
                _product(factors, pos, rows, c0, c1, weight, target[lo : lo + rows * (c1 - c0)], d.block)
            if accumulate:
                np.add(acc, target, out=acc)
            elif not direct:
                np.copyto(acc, target)

    # Helpers.

    def _materialise(self, d: _Delta, first: int, count: int) -> np.ndarray:
        """θ_ft = W + s·B·A over elements [first, first + count), rounded once to fp32 into
        this thread's view buffer."""
        factors = self._load(d)
        block = min(d.block, count)
        out = self._out_buffer(count)
        product, theta = self._block_buffers(block, d.product)
        direct = product.dtype == out.dtype  # an fp32 product goes straight into the view
        w = self._files[d.w.file].view(d.w, first, count)
        with np.errstate(all="ignore"):  # inf/NaN in W propagate as they would in PEFT
            for pos, rows, c0, c1 in _segments(first, count, d.w.shape[-1], block):
                lo, n = pos - first, rows * (c1 - c0)
                target = out[lo : lo + n] if direct else product[:n]
                _product(factors, pos, rows, c0, c1, 1.0, target, block)
                np.copyto(theta[:n], w[lo : lo + n], casting="unsafe")
                np.add(target, theta[:n], out=target)
                if not direct:
                    np.copyto(out[lo : lo + n], target, casting="unsafe")  # the one rounding
        return out

    def close(self) -> None:
        with self._lock:
            self._factors.clear()
        self._local = threading.local()

    def _locate(self, start: int, length: int) -> tuple[_Delta, int, int]:
        d = self._order[bisect.bisect_right(self._starts, start) - 1]
        first = (start - d.virtual.start) // _F32.itemsize
        return d, first, length // _F32.itemsize

    def _out_buffer(self, count: int) -> np.ndarray:
        """This thread's view buffer: ``count`` fp32 values."""
        local = self._local
        if getattr(local, "count", 0) < count:
            local.out = np.empty(count, dtype=np.float32)
            local.count = count
        return local.out[:count]

    def _block_buffers(self, block: int, dtype: type) -> tuple[np.ndarray, np.ndarray]:
        """This thread's two ``dtype`` block buffers (product, θ) of at least ``block`` elements."""
        blocks = self._local.__dict__.setdefault("blocks", {})
        if blocks.get(dtype, (0,))[0] < block:
            blocks[dtype] = (block, np.empty(block, dtype=dtype), np.empty(block, dtype=dtype))
        _, product, theta = blocks[dtype]
        return product, theta

    def _load(self, d: _Delta) -> _Factors:
        """One module's factors, scaled and oriented; a few modules stay cached."""
        with self._lock:
            factors = self._factors.get(d.module + d.w.name)
            if factors is not None:
                self._factors.move_to_end(d.module + d.w.name)
                return factors
            b = self._read(d.b, d.product)
            if d.a is None:
                factors = _Factors(b * d.scaling, None)
            else:
                a = self._read(d.a, d.product)
                if d.transposed:  # delta = (B·A)ᵀ = Aᵀ·Bᵀ
                    left, right = a.T * d.scaling, b.T
                else:
                    left, right = b * d.scaling, a
                factors = _Factors(np.ascontiguousarray(left), np.ascontiguousarray(right))
            self._factors[d.module + d.w.name] = factors
            while len(self._factors) > _FACTOR_CACHE:
                self._factors.popitem(last=False)
            return factors

    def _read(self, info: TensorInfo, dtype: type) -> np.ndarray:
        f = self._files[info.file]
        values = np.array(f.view(info, 0, info.numel), dtype=dtype).reshape(info.shape)
        f.release(info.start, info.nbytes)
        return values


def _product(factors: _Factors, pos: int, rows: int, c0: int, c1: int, weight: float, out: np.ndarray,
             block: int) -> None:
    """``out = weight·left·right`` over one piece from ``_segments``, in matmuls of at most
    ``block`` elements (whole rows); the weight is folded into the r-wide left factor."""
    left = factors.left
    if factors.right is None:  # a LoRA bias: s·b over the same elements
        np.multiply(left[pos : pos + out.shape[0]], left.dtype.type(weight), out=out)
        return
    width, rank = c1 - c0, left.shape[1]
    r0 = pos // factors.right.shape[1]
    rows_left = left[r0 : r0 + rows]
    if weight != 1.0:
        rows_left = rows_left * left.dtype.type(weight)
    right = factors.right[:, c0:c1]
    step = max(1, min(rows, block // width))
    whole = rows - rows % step
    # One stacked matmul for all full steps: numpy runs one BLAS call per step of rows (an
    # output block that stays in cache) without coming back to Python in between.
    np.matmul(rows_left[:whole].reshape(-1, step, rank), right, out=out[: whole * width].reshape(-1, step, width))
    if whole < rows:
        np.matmul(rows_left[whole:], right, out=out[whole * width :].reshape(rows - whole, width))


def _segments(first: int, count: int, cols: int, block: int):
    """Cut elements [first, first + count) of a row-major (·, cols) matrix into pieces of at
    most ``block`` elements, each a part of one row or a run of whole rows.

    Yields (first element, rows, first column, end column).
    """
    pos, end = first, first + count
    while pos < end:
        c = pos % cols
        if c or end - pos < cols or cols > block:
            n = min(cols - c, end - pos, block)
            yield pos, 1, c, c + n
        else:
            rows = min((end - pos) // cols, max(1, block // cols))
            n = rows * cols
            yield pos, rows, 0, cols
        pos += n


# -- opening an adapter --------------------------------------------------------------------------


@dataclass
class LoraCheckpoint(Checkpoint):
    """A PEFT LoRA adapter seen as the full fine-tuned model it describes (see module doc)."""

    base: Checkpoint | None = None
    adapter_file: SafetensorsFile | None = None
    delta_file: _DeltaFile | None = None
    targeted: list[str] = field(default_factory=list)
    owns_base: bool = False  # a MODEL+ADAPTER reference: MODEL was opened for it, and closes with it

    def file_of(self, info: TensorInfo) -> SafetensorsFile:
        for f in (*self.files, *(self.base.files if self.base else ())):
            if f.path == info.file:
                return f
        raise KeyError(info.file)

    def close(self) -> None:
        for f in self.files:  # not the base's (unless owned): their owner closes them
            f.close()
        if self.owns_base and self.base is not None:
            self.base.close()  # closing a file twice is harmless


def open_model(path: str | Path, base: Checkpoint, out_dtype: str | None = "F64",
               low_rank: bool = False) -> Checkpoint:
    """Open a fine-tuned model: a full checkpoint, a PEFT LoRA adapter applied to ``base``, or
    mergekit's ``MODEL+ADAPTER`` reference (the adapter applied to MODEL, opened here).

    ``out_dtype`` is what the merged tensors are rounded to (a safetensors dtype name, None for
    the base's per tensor); it sets the precision of LoRA products (see _EXACT_OUTPUTS). The
    default forms every product in float64. ``low_rank`` makes views of targeted tensors
    ``LowRankChunk``s where W is the base's own tensor: only for a consumer that takes them
    (``MergeMethod.takes_low_rank`` on the CPU executor).
    """
    reference = lora_reference(path)
    if reference is not None:  # MODEL+ADAPTER: the adapter applied to MODEL, not to the base
        adapter = peft_adapter_dir(reference[1])
        if adapter is None:
            raise CheckpointError(f"{path}: {reference[1]} is not a PEFT adapter directory (adapter_config.json)")
        model = open_checkpoint(reference[0])
        try:
            merged = open_adapter(adapter, model, out_dtype)  # W is MODEL's tensor: never low-rank terms
        except BaseException:
            model.close()
            raise
        merged.files = [*merged.files, *model.files]  # MODEL's untouched tensors are read through these
        merged.owns_base = True
        return merged
    directory = peft_adapter_dir(Path(path))
    if directory is None:
        return open_checkpoint(path)  # dequantized where its config declares a quantization
    return open_adapter(directory, base, out_dtype, low_rank)


def open_adapter(directory: Path, base: Checkpoint, out_dtype: str | None = "F64",
                 low_rank: bool = False) -> LoraCheckpoint:
    """A LoRA adapter directory as a lazily materialised fine-tuned checkpoint of ``base``
    (``out_dtype`` and ``low_rank`` as in ``open_model``).

    Raises CheckpointError for an unsupported adapter (not LoRA, DoRA and other variants,
    convolution LoRA, no safetensors weights) and IncompatibleInputsError when the adapter
    does not fit the base (a module the base lacks, shapes that disagree).
    """
    config = read_adapter_config(directory)
    weights = directory / ADAPTER_WEIGHTS_NAME
    if not weights.is_file():
        found = [p.name for p in directory.glob("adapter_model*")]
        hint = f" (found {', '.join(found)}: only safetensors adapters are read)" if found else ""
        raise CheckpointError(f"{directory}: no {ADAPTER_WEIGHTS_NAME}{hint}")
    adapter = read_safetensors_header(weights)
    factors, replacements = _classify(adapter, config)
    files = {f.path: f for f in base.files}
    files[adapter.path] = adapter
    deltas: list[_Delta] = []
    tensors = dict(base.tensors)
    layout = canonical_lookup(base.tensors)  # names in another transformers layout (safeblend.layouts)
    heads = tied_heads(base)  # LM heads the base ties to its input embedding (and so does not store)
    layout.update({canonical(head): embed for head, embed in heads.items()})
    lora_weights = {f"{module}.weight" for module, kind in factors if kind != "bias"}
    for name, info in replacements.items():
        target = _base_name(name, base, adapter.path, info.name, layout)  # a tied head names its embedding
        head = next((h for h, e in heads.items() if e == target), None)
        if head is not None and name not in lora_weights and not config.ensure_weight_tying:
            # A modules_to_save copy of one of two tied tensors: PEFT's merge unties them, the
            # other keeping the base's values; the reconciler then stores the head and unties the
            # config (safeblend.quirks).
            _check_replacement(info, base.tensors[target], adapter.path)
            if canonical(name) == canonical(head):
                tensors[head] = replace(info, name=head)
            else:
                tensors[target], tensors[head] = replace(info, name=target), base.tensors[target]
            continue
        _check_replacement(info, base.tensors[target], adapter.path)
        tensors[target] = replace(info, name=target)
    for module, parts in factors.items():
        d = _make_delta(module, parts, config, base, tensors, adapter.path, layout)
        if any(other.w.name == d.w.name for other in deltas):
            raise CheckpointError(f"{adapter.path}: modules {module!r} and "
                                  f"{next(o.module for o in deltas if o.w.name == d.w.name)!r} both change the base's "
                                  f"{d.w.name!r} (tied embeddings); merge this adapter with PEFT first")
        d.product = np.float64 if (out_dtype or base.tensors[d.w.name].auto_dtype.name) in _EXACT_OUTPUTS else np.float32
        # Only where W is the base's own tensor is θ_ft − θ_base the low-rank term alone.
        d.low_rank = low_rank and d.w == base.tensors[d.w.name]
        deltas.append(d)
    virtual = _DeltaFile(Path(f"{weights}#lora-{next(_virtual_ids)}"), deltas, files)
    for d in deltas:
        tensors[d.w.name] = d.virtual
    if adapter.tensors:
        adapter.byte_view(0, 0)  # map it now, not racing in the compute threads
    return LoraCheckpoint(path=directory, files=[virtual, adapter], tensors=tensors, model_dir=None, base=base,
                          adapter_file=adapter, delta_file=virtual, targeted=[d.w.name for d in deltas])


def _classify(adapter: SafetensorsFile, config: AdapterConfig) -> tuple[dict, dict[str, TensorInfo]]:
    """Split the adapter's tensors into LoRA factors by (module, param) and full tensors by
    the base name they replace (PEFT's wrapper segments removed)."""
    factors: dict[tuple[str, str], dict[str, TensorInfo]] = {}
    replacements: dict[str, TensorInfo] = {}
    adapter_names: set[str] = set()
    for key, info in adapter.tensors.items():
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        if "lora_magnitude_vector" in name:
            raise CheckpointError(f"{adapter.path}: {key!r} is a DoRA magnitude vector; DoRA adapters are not "
                                  "supported")
        match = _FACTOR_KEY.match(name)
        if match:
            kind = "bias" if match["param"] == "bias" else "linear"
            if kind == "bias" and match["part"] == "lora_A":
                raise CheckpointError(f"{adapter.path}: {key!r}: a lora_A bias is not part of PEFT's LoRA")
            part = "B" if match["part"] == "lora_B" else "A"
        else:
            match = _EMBEDDING_KEY.match(name)
            if match:
                kind, part = "embedding", match["part"]
        if match:
            if match["adapter"]:
                adapter_names.add(match["adapter"])
            slot = factors.setdefault((match["module"], kind), {})
            if part in slot:
                raise CheckpointError(f"{adapter.path}: module {match['module']!r} has two lora_{part} tensors "
                                      f"({slot[part].name!r}, {key!r})")
            slot[part] = info
            continue
        if ".lora_" in name or name.startswith("lora_"):
            raise CheckpointError(f"{adapter.path}: tensor {key!r} is not a LoRA factor safetensors knows how to "
                                  "merge (expected lora_A/lora_B or lora_embedding_A/B)")
        if ".original_module." in name:
            continue  # the frozen original beside a modules_to_save copy: the base already has it
        name = re.sub(r"\.modules_to_save\.[^.]+(?=\.)", "", name)
        replacements[name.replace(".base_layer.", ".")] = info
    if len(adapter_names) > 1:
        raise CheckpointError(f"{adapter.path}: holds several adapters ({', '.join(sorted(adapter_names))}); "
                              "save one adapter per directory")
    by_module: dict[tuple[str, str], dict[str, TensorInfo]] = {}
    for (module, kind), parts in factors.items():
        if kind == "bias":
            by_module[(module, "bias")] = parts
            continue
        missing = {"A", "B"} - set(parts)
        if missing:
            label = "lora_embedding_" if kind == "embedding" else "lora_"
            raise CheckpointError(f"{adapter.path}: module {module!r} has no {label}{missing.pop()} tensor")
        by_module[(module, kind)] = parts
    return by_module, replacements


def _base_name(name: str, base: Checkpoint, adapter: Path, key: str, layout: dict[str, str]) -> str:
    """The base tensor an adapter name refers to: the same name, one differing only in the
    model-class prefix (``model.``, ``transformer.``) that some savers drop or add, or the same
    weight in the layout the base was saved in (``layout``: safeblend.layouts.canonical_lookup of
    the base's names; e.g. PEFT's ``model.language_model.layers…`` for a Llava base's
    ``language_model.model.layers…``)."""
    if name in base.tensors:
        return name
    head, _, tail = name.partition(".")
    if tail in base.tensors:
        return tail
    candidates = [n for n in base.tensors if n.endswith("." + name)]
    if len(candidates) == 1:
        return candidates[0]
    if canonical(name) in layout:
        return layout[canonical(name)]
    raise IncompatibleInputsError(f"{adapter}: {key!r} refers to tensor {name!r}, which the base {base.path} "
                                  "does not have (was the adapter trained on another model?)")


def _check_replacement(info: TensorInfo, target: TensorInfo, adapter: Path) -> None:
    if info.shape != target.shape:
        raise IncompatibleInputsError(
            f"{adapter}: {info.name!r} has shape {list(info.shape)} but the base's {target.name!r} is "
            f"{list(target.shape)} (resized vocabularies are not supported)")
    if target.dtype.is_float != info.dtype.is_float:
        raise IncompatibleInputsError(f"{adapter}: {info.name!r} is {info.dtype.name} but the base's "
                                      f"{target.name!r} is {target.dtype.name}")


def _make_delta(key: tuple[str, str], parts: dict[str, TensorInfo], config: AdapterConfig, base: Checkpoint,
                tensors: dict[str, TensorInfo], adapter: Path, layout: dict[str, str]) -> _Delta:
    """Check one module's factors against the base tensor they change and orient the product."""
    module, kind = key
    param = "bias" if kind == "bias" else "weight"
    target = _base_name(f"{module}.{param}", base, adapter, parts["B"].name, layout)
    w = tensors[target]  # the base's, or a replacement the adapter stores (embedding base_layer)
    where = f"{adapter}: module {module!r}"
    if not w.dtype.is_float:
        raise IncompatibleInputsError(f"{where}: the base's {target!r} is {w.dtype.name}, not a float tensor")
    for part, info in parts.items():
        if not info.dtype.is_float:
            raise CheckpointError(f"{where}: {info.name!r} is {info.dtype.name}; LoRA factors must be float")
    if kind == "bias":
        rank_b = parts["B"]
        if rank_b.shape != w.shape:
            raise IncompatibleInputsError(f"{where}: lora_B bias has shape {list(rank_b.shape)} but the base's "
                                          f"{target!r} is {list(w.shape)}")
        rank = config.rank(module)
        return _Delta(module, w, None, rank_b, config.scaling(module, rank), False)
    a, b = parts["A"], parts["B"]
    if len(a.shape) != 2 or len(b.shape) != 2:
        raise CheckpointError(f"{where}: factors of shape {list(a.shape)} and {list(b.shape)}; only LoRA on "
                              "linear and embedding layers is supported (not convolutions)")
    rank = a.shape[0]
    if b.shape[1] != rank:
        raise CheckpointError(f"{where}: lora_A has rank {rank} but lora_B has {b.shape[1]} columns")
    if rank != config.rank(module):
        raise CheckpointError(f"{where}: its factors have rank {rank} but {config.path.name} gives rank "
                              f"{config.rank(module)} (r / rank_pattern)")
    if len(w.shape) != 2:
        raise IncompatibleInputsError(f"{where}: the base's {target!r} has shape {list(w.shape)}, not a matrix")
    straight = w.shape == (b.shape[0], a.shape[1])
    flipped = w.shape == (a.shape[1], b.shape[0])
    if kind == "embedding":
        straight = False  # PEFT's embedding delta is always (B·A)ᵀ
    elif straight and flipped:
        straight = not config.fan_in_fan_out  # square: only the config can tell
    if not (straight or flipped):
        expected = (a.shape[1], b.shape[0]) if kind == "embedding" else (b.shape[0], a.shape[1])
        raise IncompatibleInputsError(
            f"{where}: B·A is {expected[0]}×{expected[1]} (lora_B {list(b.shape)}, lora_A {list(a.shape)}) but the "
            f"base's {target!r} is {list(w.shape)}")
    return _Delta(module, w, a, b, config.scaling(module, rank), transposed=not straight)
