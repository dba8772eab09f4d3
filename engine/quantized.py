"""Quantized checkpoints read as float models, dequantized one chunk at a time.

The largest open models ship quantized, and their fine-tunes are usually saved in bf16. A
checkpoint whose ``config.json`` carries a ``quantization_config`` is opened here as a
``QuantizedCheckpoint``: each quantized weight is presented as the F32 tensor its
dequantization gives, under the weight's own name and shape, and the scale tensors are hidden.
The planner, the merge methods, their reduce passes, LoRA adapters and both executors then see
a float model and read it with the same ``view``/``byte_view``/``prefetch``/``release`` calls
as a real file (the pattern of safeblend.lora's virtual file); a view dequantizes just the
requested element range. Nothing is guessed from a dtype: a checkpoint without a
quantization config is read as stored (fp8 tensors are then copied from the base), and a
``quant_method`` not listed here is an error naming it.

Formats (``quant_method``):

* ``fp8`` (DeepSeek-V3/R1, Qwen3-FP8, transformers' FineGrainedFP8): each F8_E4M3 weight
  ``W`` of shape (…, rows, cols) has ``W_scale_inv`` (F32, or F8_E8M0 with ``scale_fmt:
  ue8m0``) of shape (…, ⌈rows/bm⌉, ⌈cols/bn⌉) for ``weight_block_size: [bm, bn]`` (a scalar
  per tensor without it); W[i, j] = fp8[i, j] × scale_inv[i // bm, j // bn].
* ``compressed-tensors`` (``format: float-quantized``, 8-bit float weights): ``W`` beside
  ``W_scale`` per tensor ([] or [1]), per channel ([rows, 1]) or per block
  (``block_structure``); the same product. ``input_scale`` (and kv-cache ``k_scale``/``v_scale``)
  quantize activations, not weights, and are dropped.
* ``mxfp4`` (gpt-oss): ``P_blocks`` (U8, (E, R, G, 16): 32 E2M1 values per block, two per
  byte, low nibble first) beside ``P_scales`` (U8 holding E8M0, (E, R, G)); the weight
  ``P`` is value × 2^(scale − 127), laid out (E, G·32, R) — transposed, as transformers
  dequantizes it into gpt-oss's bf16 layout.

Dequantization is exact: an fp8 or fp4 value and an E8M0 scale are exact in fp32, and the
product with an F32 scale is rounded once, in fp32 — what the reference dequantizers compute
before they round to bf16. By default dequantized weights are written in bf16 and the output's
``config.json`` loses its ``quantization_config`` (``--dtype`` picks another float dtype);
``--dtype fp8`` writes an fp8 block-quantized base's format back instead, each merged weight
quantized again with fresh block scales (``Requantize``, ``requantized_tensors``).
Memory: a view reads only its own elements' quantized values and a tensor's scales (a few KiB
to MiB, a few tensors' worth cached), never a whole dequantized tensor.
"""

from __future__ import annotations

import bisect
import itertools
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import cache
from math import ceil, prod
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from .checkpoint import Checkpoint, SafetensorsFile, TensorInfo
from .dtypes import DTYPES, DType
from .errors import CheckpointError, SpecError

QUANT_METHODS = ("fp8", "compressed-tensors", "mxfp4")
_F32, _BF16 = DTYPES["F32"], DTYPES["BF16"]
_FP8_WEIGHTS = ("F8_E4M3", "F8_E5M2")
_SCALE_DTYPES = ("F32", "BF16", "F16", "F8_E8M0")
# Scales kept after use: more than the tensors the compute threads touch at once.
_SCALE_CACHE = 8
# MXFP4: each byte holds two E2M1 values, the low nibble first.
_E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)
_MX_BLOCK = 32  # values per MXFP4 block (16 bytes)
_MX_TILE = 256  # stored rows dequantized and transposed at a time
# E8M0 exponent e (stored as U8 or F8_E8M0) as the fp32 scale 2^(e − 127), exact (255 is NaN).
_E8M0 = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e8m0fnu).astype(np.float32)
# Each byte's two values (low nibble first) as one uint64 holding two fp32: one lookup per byte.
_E2M1_PAIRS = (_E2M1.view(np.uint32).astype(np.uint64)[np.arange(256) & 0x0F]
               | (_E2M1.view(np.uint32).astype(np.uint64)[np.arange(256) >> 4] << np.uint64(32)))
_virtual_ids = itertools.count(1)
# Pairs of fp8 codes looked up at a time (their intp indices: 256 KiB per compute thread).
# Measured here, decoding and scaling every weight of the DeepSeek-V3-shaped benchmark, one
# thread: 1.48-1.53 ns per value at 2^15, 1.60-1.79 at 2^16, 1.50-1.93 at 2^13.
_DECODE_PAIRS = 1 << 15
_decode_local = threading.local()


@dataclass(frozen=True)
class DequantizedInfo(TensorInfo):
    """A quantized weight seen as the F32 tensor its dequantization gives (in a virtual file)."""

    @property
    def auto_dtype(self) -> DType:
        """``--dtype auto`` writes dequantized weights in bf16, as the reference dequantizers do."""
        return _BF16


@dataclass
class _Scaled:
    """An 8-bit float weight with a grid of scales: W[i, j] = q[i, j] × scale[i // bm, j // bn]
    over each (rows, cols) matrix of a weight shaped (lead…, rows, cols)."""

    weight: TensorInfo
    scale: TensorInfo
    rows: int
    cols: int
    bm: int  # rows per scale entry
    bn: int  # columns per scale entry
    grid_rows: int  # scale rows per matrix
    grid_cols: int
    per_matrix: bool  # the scale has the weight's leading dimensions (else one grid for all)
    kind: str = "block"  # or "tensor", "channel": the layout the config named
    virtual: DequantizedInfo | None = None

    @property
    def name(self) -> str:
        return self.weight.name

    @property
    def virtual_shape(self) -> tuple[int, ...]:
        return self.weight.shape

    def scale_rows(self, r0: int, n: int) -> np.ndarray:
        """The scale-grid row (in the scale flattened to (·, grid_cols)) of flat rows r0…r0+n."""
        flat = np.arange(r0, r0 + n)
        row = (flat % self.rows) // self.bm
        return row + (flat // self.rows) * self.grid_rows if self.per_matrix else row

    def sources(self, first: int, count: int) -> list[tuple[Path, int, int]]:
        """The stored byte ranges (file, start, length) elements [first, first + count) are
        read from (the scales, read once per tensor, aside)."""
        return [(self.weight.file, self.weight.start + first, count)]

    def dequantize(self, file: SafetensorsFile, scales: np.ndarray, first: int, count: int, out: np.ndarray) -> None:
        """Elements [first, first + count) of the dequantized weight into ``out`` (fp32)."""
        _decode_fp8(self.weight.dtype.name, file.byte_view(self.weight.start + first, count), out)
        for lo, r0, rows, c0, c1 in _pieces(first, count, self.cols):
            block = out[lo : lo + rows * (c1 - c0)].reshape(rows, c1 - c0)
            srows = self.scale_rows(r0, rows)
            if self.grid_cols == 1:  # one scale per row (per channel, per tensor, or bn ≥ cols)
                np.multiply(block, scales[srows, 0][:, None], out=block)
                continue
            columns = np.arange(c0, c1) // self.bn
            edges = [0, *(np.flatnonzero(np.diff(srows)) + 1), rows]
            for a, b in zip(edges[:-1], edges[1:]):  # rows sharing one row of scales
                np.multiply(block[a:b], scales[srows[a], columns], out=block[a:b])


@dataclass
class _Mxfp4:
    """gpt-oss's MXFP4 experts: ``blocks`` (E, R, G, 16) U8 and ``scales`` (E, R, G) E8M0 give
    the weight (E, G·32, R): W[e, c, r] = fp4(blocks[e, r, c // 32], c % 32) × 2^(scales[e, r, c // 32] − 127)."""

    weight: TensorInfo  # the blocks
    scale: TensorInfo
    name: str  # the weight's name: the blocks' without "_blocks"
    experts: int
    rows: int  # R: the stored rows, the dequantized weight's last dimension
    groups: int  # G
    virtual: DequantizedInfo | None = None

    @property
    def virtual_shape(self) -> tuple[int, ...]:
        return self.experts, self.groups * _MX_BLOCK, self.rows

    def sources(self, first: int, count: int) -> list[tuple[Path, int, int]]:
        """The stored byte ranges (file, start, length) elements [first, first + count) are
        read from: the blocks and scales of every expert they touch (the weight is stored
        transposed, so a chunk reads some groups of every stored row of its experts)."""
        width = self.groups * _MX_BLOCK
        e0, e1 = first // (width * self.rows), (first + count - 1) // (width * self.rows)
        per_expert = self.rows * self.groups
        return [(self.weight.file, self.weight.start + e0 * per_expert * 16, (e1 - e0 + 1) * per_expert * 16),
                (self.scale.file, self.scale.start + e0 * per_expert, (e1 - e0 + 1) * per_expert)]

    def dequantize(self, file: SafetensorsFile, scales: np.ndarray, first: int, count: int, out: np.ndarray) -> None:
        """Elements [first, first + count) of the dequantized (E, G·32, R) weight into ``out``."""
        # Only the experts the chunk touches (``sources``): a streamed input (safeblend.remote)
        # fetches what a view spans, where a map only maps it.
        _, start, length = self.sources(first, count)[0]
        e0 = (start - self.weight.start) // (self.rows * self.groups * 16)
        blocks = np.frombuffer(file.byte_view(start, length), dtype=np.uint8).reshape(-1, self.rows, self.groups, 16)
        for lo, r0, rows, c0, c1 in _pieces(first, count, self.rows):
            # Output rows r0…r0+rows are (expert, column c) pairs; columns c0…c1 are stored rows.
            target = out[lo : lo + rows * (c1 - c0)].reshape(rows, c1 - c0)
            for e, k0, k1, at in _expert_runs(r0, rows, self.groups * _MX_BLOCK):
                g0, g1 = k0 // _MX_BLOCK, (k1 - 1) // _MX_BLOCK + 1
                v0, v1 = k0 - g0 * _MX_BLOCK, k1 - g0 * _MX_BLOCK  # the wanted values among the groups'
                # Tiles of stored rows keep the transposing copy in cache (6× faster measured here).
                for t0 in range(c0, c1, _MX_TILE):
                    t1 = min(t0 + _MX_TILE, c1)
                    codes = blocks[e - e0, t0:t1, g0:g1]  # (stored rows, groups, 16 bytes)
                    values = np.take(_E2M1_PAIRS, codes, mode="clip").view(np.float32)  # (rows, groups, 32)
                    np.multiply(values, _E8M0[scales[e, t0:t1, g0:g1]][..., None], out=values)
                    values = values.reshape(t1 - t0, (g1 - g0) * _MX_BLOCK)
                    target[at : at + k1 - k0, t0 - c0 : t1 - c0] = values[:, v0:v1].T


@cache
def _fp8_tables(name: str) -> tuple[np.ndarray, np.ndarray]:
    """The fp32 value (exact) of each 8-bit code, and of each pair of codes read as a
    little-endian uint16 (two fp32 values packed in a uint64)."""
    single = np.arange(256, dtype=np.uint8).view(DTYPES[name].numpy).astype(np.float32)
    bits = single.view(np.uint32).astype(np.uint64)
    pair = np.arange(65536)
    return single, bits[pair & 0xFF] | (bits[pair >> 8] << np.uint64(32))


def _decode_fp8(name: str, raw: memoryview, out: np.ndarray) -> None:
    """fp8 codes to fp32 by table lookup, two codes per lookup (measured here: ~1000 Melem/s
    against ~300 for ml_dtypes' cast; ``mode="clip"`` spares numpy's buffered bounds check).

    ``np.take`` wants intp indices: given anything else it makes an intp copy of them, a fresh
    allocation the size of the chunk (8 MiB of new pages for a 2M-value chunk, each zeroed by
    the kernel). The pairs are widened here instead, a piece at a time, into this thread's
    reused index buffer."""
    single, pairs = _fp8_tables(name)
    codes = np.frombuffer(raw, dtype=np.uint8)
    even = codes.shape[0] - codes.shape[0] % 2
    words, values = codes[:even].view(np.uint16), out[:even].view(np.uint64)
    index = _decode_index()
    for lo in range(0, words.shape[0], index.shape[0]):
        hi = min(words.shape[0], lo + index.shape[0])
        np.copyto(index[: hi - lo], words[lo:hi], casting="unsafe")
        np.take(pairs, index[: hi - lo], out=values[lo:hi], mode="clip")
    if even < codes.shape[0]:
        out[even] = single[codes[even]]


def _decode_index() -> np.ndarray:
    """This thread's intp buffer for ``_decode_fp8``'s lookups."""
    index = getattr(_decode_local, "index", None)
    if index is None or index.shape[0] != _DECODE_PAIRS:
        index = _decode_local.index = np.empty(_DECODE_PAIRS, np.intp)
    return index


def _pieces(first: int, count: int, cols: int):
    """Cut elements [first, first + count) of a row-major (·, cols) array into a partial first
    row, a run of whole rows and a partial last row. Yields (offset in the range, first row,
    rows, first column, end column)."""
    pos, end = first, first + count
    while pos < end:
        r, c = divmod(pos, cols)
        if c or end - pos < cols:
            n = min(cols - c, end - pos)
            yield pos - first, r, 1, c, c + n
        else:
            rows = (end - pos) // cols
            n = rows * cols
            yield pos - first, r, rows, 0, cols
        pos += n


def _expert_runs(r0: int, rows: int, width: int):
    """Split flat rows r0…r0+rows of an (E, width, ·) weight by expert: (expert, first column,
    end column, offset among the rows)."""
    at = 0
    while at < rows:
        e, k = divmod(r0 + at, width)
        n = min(width - k, rows - at)
        yield e, k, k + n, at
        at += n


class _DequantFile:
    """A virtual safetensors file holding every quantized weight of a checkpoint, dequantized,
    in F32. Each tensor has a virtual byte range, so the ranges the executors pass to
    ``prefetch``/``release``/``byte_view`` identify it. A ``view`` is computed into the calling
    thread's buffer for that tensor and stays valid until the thread views that tensor again
    (the executors consume each view first) or two other tensors of this file; ``byte_view``
    returns a fresh buffer (the writer thread holds it)."""

    def __init__(self, path: Path, entries: list, files: dict[Path, SafetensorsFile]) -> None:
        self.path = path
        self.metadata: dict[str, str] = {}
        self.tensors: dict[str, TensorInfo] = {}
        cursor = 0
        for q in entries:
            shape = q.virtual_shape
            q.virtual = DequantizedInfo(q.name, _F32, shape, path, cursor, prod(shape) * 4)
            self.tensors[q.name] = q.virtual
            cursor += q.virtual.nbytes
        self.size = cursor
        self._entries = entries
        self._starts = [q.virtual.start for q in entries]
        self._files = files
        self._local = threading.local()
        self._lock = threading.Lock()
        self._scales: OrderedDict[str, np.ndarray] = OrderedDict()

    def view(self, info: TensorInfo, first: int, count: int) -> np.ndarray:
        """Dequantized fp32 values of elements [first, first + count) of ``info``."""
        q, first = self._locate_info(info, first)
        return self._dequantize(q, first, count, self._buffer(q, count))

    def byte_view(self, start: int, length: int) -> memoryview:
        if length == 0:
            return memoryview(b"")
        q, first, count = self._locate(start, length)
        return memoryview(self._dequantize(q, first, count, np.empty(count, np.float32)).view(np.uint8))

    def prefetch(self, start: int, length: int) -> None:
        if length > 0:
            q, first, count = self._locate(start, length)
            for path, begin, size in q.sources(first, count):
                self._files[path].prefetch(begin, size)

    def release(self, start: int, length: int) -> None:
        if length > 0:
            q, first, count = self._locate(start, length)
            for path, begin, size in q.sources(first, count):
                self._files[path].release(begin, size)

    def stored_bytes(self, start: int, length: int) -> int:
        """Bytes read from the files for a virtual range: its quantized values (and MXFP4
        scales), plus an fp8 weight's scales for the range opening the tensor."""
        if length == 0:
            return 0
        q, first, count = self._locate(start, length)
        read = sum(size for _, _, size in q.sources(first, count))
        return read + (q.scale.nbytes if first == 0 and isinstance(q, _Scaled) else 0)

    def close(self) -> None:
        with self._lock:
            self._scales.clear()
        self._local = threading.local()

    def entry(self, info: TensorInfo):
        """The quantized weight whose dequantized tensor ``info`` is."""
        q = self._entries[bisect.bisect_right(self._starts, info.start) - 1]
        return q if q.virtual == info else None

    # Helpers.

    def _dequantize(self, q, first: int, count: int, out: np.ndarray) -> np.ndarray:
        with np.errstate(all="ignore"):  # inf/NaN codes propagate as the reference dequantizers' do
            q.dequantize(self._files[q.weight.file], self._scale_table(q), first, count, out)
        return out

    def _locate(self, start: int, length: int):
        q = self._entries[bisect.bisect_right(self._starts, start) - 1]
        return q, (start - q.virtual.start) // 4, length // 4

    def _locate_info(self, info: TensorInfo, first: int):
        """The entry ``info`` lies in, and ``first`` counted from that entry's first element
        (``info`` may be a part of a tensor, as a resized vocabulary's tail is)."""
        q, offset, _ = self._locate(info.start, 0)
        return q, offset + first

    def _buffer(self, q, count: int) -> np.ndarray:
        """This thread's view buffer for ``q`` (two tensors' are kept). A LoRA adapter on this
        model re-views the range the base's view of the same chunk holds: the same values.

        A tensor viewed for the first time takes over the buffer of the tensor viewed least
        recently (its view is no longer valid): fresh memory costs a page fault per page, and
        zeroing it was 7% of an fp8-base merge's CPU when each tensor had a buffer of its own."""
        buffers = self._local.__dict__.setdefault("buffers", OrderedDict())
        buffer = buffers.pop(q.name, None)
        if buffer is None and len(buffers) >= 2:
            buffer = buffers.popitem(last=False)[1]
        if buffer is None or buffer.shape[0] < count:
            buffer = np.empty(count, np.float32)
        buffers[q.name] = buffer
        return buffer[:count]

    def _scale_table(self, q) -> np.ndarray:
        """``q``'s scales: fp32 (·, grid_cols) for fp8, read once and cached; for MXFP4 the
        stored E8M0 exponents (E, R, G) themselves, mapped, not copied (gpt-oss-120b's are
        66 MB a tensor), each tile's decoded as it is used."""
        if isinstance(q, _Mxfp4):
            raw = self._files[q.scale.file].byte_view(q.scale.start, q.scale.nbytes)
            return np.frombuffer(raw, dtype=np.uint8).reshape(q.scale.shape)
        with self._lock:
            table = self._scales.get(q.name)
            if table is not None:
                self._scales.move_to_end(q.name)
                return table
            f = self._files[q.scale.file]
            raw = np.frombuffer(f.byte_view(q.scale.start, q.scale.nbytes), dtype=q.scale.dtype.numpy)
            table = raw.astype(np.float32).reshape(-1, q.grid_cols)
            f.release(q.scale.start, q.scale.nbytes)
            self._scales[q.name] = table
            while len(self._scales) > _SCALE_CACHE:
                self._scales.popitem(last=False)
            return table


# -- reading the quantization config -------------------------------------------------------------


@dataclass
class QuantizedCheckpoint(Checkpoint):
    """A quantized checkpoint seen as the float model it encodes (see module doc)."""

    quant_method: str = ""
    dequantized: list[str] | None = None  # names of the weights presented dequantized
    dequant_file: _DequantFile | None = None
    dropped: dict[str, TensorInfo] | None = None  # activation scales: of no use to a float model

    def close(self) -> None:
        for f in self.files:
            f.close()


def open_checkpoint(path) -> Checkpoint:
    """Open a checkpoint; one whose config.json has a ``quantization_config`` opens as a
    ``QuantizedCheckpoint`` (CheckpointError for an unsupported or inconsistent one)."""
    ckpt = Checkpoint.open(path)
    try:
        return dequantized_view(ckpt)
    except BaseException:
        ckpt.close()
        raise


def quantization_config(ckpt: Checkpoint) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint's ``config.json`` and its ``quantization_config``, if it has one."""
    config = ckpt.model_dir / "config.json" if ckpt.model_dir is not None else None
    if config is None or not config.is_file():
        return None
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{config}: cannot read config JSON ({exc})") from exc
    qc = data.get("quantization_config") if isinstance(data, dict) else None
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise CheckpointError(f"{config}: quantization_config must be a JSON object")
    return config, qc


def dequantized_view(ckpt: Checkpoint) -> Checkpoint:
    """``ckpt`` itself, or, where its config declares a quantization, the float model it encodes."""
    found = quantization_config(ckpt)
    if found is None:
        return ckpt
    config, qc = found
    method = qc.get("quant_method")
    if method == "fp8":
        entries, dropped = _fp8_entries(ckpt, config, qc)
    elif method == "compressed-tensors":
        entries, dropped = _compressed_tensors_entries(ckpt, config, qc)
    elif method == "mxfp4":
        entries, dropped = _mxfp4_entries(ckpt, config)
    else:
        raise CheckpointError(f"{config}: quant_method {method!r} is not supported (safeblend dequantizes "
                              f"{', '.join(QUANT_METHODS)}); dequantize the model first")
    files = {f.path: f for f in ckpt.files}
    virtual = _DequantFile(Path(f"{ckpt.path}#dequantized-{next(_virtual_ids)}"), entries, files)
    by_stored = {q.weight.name: q for q in entries}
    hidden = {q.scale.name for q in entries} | dropped
    tensors: dict[str, TensorInfo] = {}
    for name, info in ckpt.tensors.items():  # the checkpoint's order, weights where they were stored
        if name in by_stored:
            tensors[by_stored[name].name] = by_stored[name].virtual
        elif name not in hidden:
            tensors[name] = info
    return QuantizedCheckpoint(path=ckpt.path, files=[virtual, *ckpt.files], tensors=tensors,
                               model_dir=ckpt.model_dir, quant_method=method,
                               dequantized=[q.name for q in entries], dequant_file=virtual,
                               dropped={n: ckpt.tensors[n] for n in ckpt.tensors if n in dropped})


def _block_size(config: Path, value: Any, key: str) -> tuple[int, int]:
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise CheckpointError(f"{config}: {key} must be two positive integers, got {value!r}")
    return value[0], value[1]


def _scaled(config: Path, weight: TensorInfo, scale: TensorInfo, layouts: list[tuple[str, Any]]) -> _Scaled:
    """Check a weight and its scale against the layouts the config allows (first that fits)."""
    where = f"{weight.file}: tensor {weight.name!r}"
    if weight.dtype.name not in _FP8_WEIGHTS:
        raise CheckpointError(f"{where}: has a scale tensor {scale.name!r} but is {weight.dtype.name}, not an 8-bit "
                              "float weight")
    if scale.dtype.name not in _SCALE_DTYPES:
        raise CheckpointError(f"{scale.file}: scale tensor {scale.name!r} is {scale.dtype.name}; expected one of "
                              f"{', '.join(_SCALE_DTYPES)}")
    if len(weight.shape) < 2:
        raise CheckpointError(f"{where}: a quantized weight must be a matrix, got shape {list(weight.shape)}")
    *lead, rows, cols = weight.shape
    expected = []
    for kind, block in layouts:
        if kind == "tensor":
            if scale.numel == 1:
                return _Scaled(weight, scale, rows, cols, rows, cols, 1, 1, False, "tensor")
            expected.append("[] or [1]")
        elif kind == "channel":
            if scale.shape in ((rows, 1), (rows,)) and not lead:
                return _Scaled(weight, scale, rows, cols, 1, cols, rows, 1, False, "channel")
            expected.append(str([rows, 1]))
        else:
            bm, bn = block
            grid = [*lead, ceil(rows / bm), ceil(cols / bn)]
            if list(scale.shape) == grid:
                return _Scaled(weight, scale, rows, cols, bm, bn, grid[-2], grid[-1], bool(lead))
            expected.append(f"{grid} (blocks of {bm}×{bn})")
    raise CheckpointError(f"{scale.file}: scale tensor {scale.name!r} has shape {list(scale.shape)} but weight "
                          f"{weight.name!r} of shape {list(weight.shape)} needs {' or '.join(expected)}")


def _pair_scales(ckpt: Checkpoint, config: Path, suffix: str, layouts: list, dropped: set[str]) -> list[_Scaled]:
    """Pair every ``<weight><suffix>`` scale with its weight; every 8-bit float weight needs one."""
    entries = []
    for name, scale in ckpt.tensors.items():
        if name.endswith(suffix) and name not in dropped:
            weight = ckpt.tensors.get(name[: -len(suffix)])
            if weight is None:
                raise CheckpointError(f"{scale.file}: scale tensor {name!r} has no weight "
                                      f"{name[: -len(suffix)]!r} beside it")
            entries.append(_scaled(config, weight, scale, layouts))
    paired = {q.weight.name for q in entries}
    for name, info in ckpt.tensors.items():
        if info.dtype.name in _FP8_WEIGHTS and name not in paired and name not in dropped:
            raise CheckpointError(f"{info.file}: tensor {name!r} is {info.dtype.name} but has no scale tensor "
                                  f"{name + suffix!r} ({config.name} declares {layouts[0][0]}-scaled fp8 weights)")
    return entries


def _fp8_entries(ckpt: Checkpoint, config: Path, qc: dict[str, Any]) -> tuple[list, set[str]]:
    """``quant_method: fp8``: ``W_scale_inv`` per block (``weight_block_size``) or per tensor."""
    block = qc.get("weight_block_size")
    layouts = [("block", _block_size(config, block, "quantization_config.weight_block_size"))] if block is not None \
        else [("tensor", None)]
    # Static activation scales quantize inputs at run time; a dequantized model has no use for them.
    dropped = {n for n in ckpt.tensors if n.endswith(".activation_scale")}
    return _pair_scales(ckpt, config, "_scale_inv", layouts, dropped), dropped


def _compressed_tensors_entries(ckpt: Checkpoint, config: Path, qc: dict[str, Any]) -> tuple[list, set[str]]:
    """``quant_method: compressed-tensors`` with 8-bit float weights: ``W_scale`` per tensor,
    channel or block, as the config's groups declare."""
    fmt = qc.get("format")
    if fmt not in ("float-quantized", "naive-quantized"):
        raise CheckpointError(f"{config}: compressed-tensors format {fmt!r} is not supported (safeblend "
                              "dequantizes float-quantized 8-bit float weights)")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise CheckpointError(f"{config}: compressed-tensors quantization_config has no config_groups")
    layouts = []
    for key, group in groups.items():
        weights = group.get("weights") if isinstance(group, dict) else None
        if not isinstance(weights, dict):
            raise CheckpointError(f"{config}: config_groups.{key} has no weights scheme")
        if weights.get("type") != "float" or weights.get("num_bits") != 8 or weights.get("symmetric") is False:
            raise CheckpointError(f"{config}: config_groups.{key}: weights of type {weights.get('type')!r} with "
                                  f"{weights.get('num_bits')!r} bits are not supported (safeblend dequantizes "
                                  "symmetric 8-bit float weights)")
        strategy = weights.get("strategy")
        if strategy == "block":
            layouts.append(("block", _block_size(config, weights.get("block_structure"),
                                                 f"config_groups.{key}.weights.block_structure")))
        elif strategy in ("tensor", "channel"):
            layouts.append((strategy, None))
        else:
            raise CheckpointError(f"{config}: config_groups.{key}: weight strategy {strategy!r} is not supported "
                                  "(tensor, channel or block)")
    for name, info in ckpt.tensors.items():
        if name.endswith(".weight_zero_point"):
            raise CheckpointError(f"{info.file}: tensor {name!r}: asymmetric (zero-point) weights are not supported")
    dropped = {n for n in ckpt.tensors if n.endswith((".input_scale", ".output_scale", ".k_scale", ".v_scale"))}
    return _pair_scales(ckpt, config, "_scale", layouts, dropped), dropped


def _mxfp4_entries(ckpt: Checkpoint, config: Path) -> tuple[list, set[str]]:
    """``quant_method: mxfp4``: every ``P_blocks`` with its ``P_scales`` becomes ``P``."""
    entries = []
    for name, blocks in ckpt.tensors.items():
        if not name.endswith("_blocks"):
            continue
        stem = name[: -len("_blocks")]
        scale = ckpt.tensors.get(stem + "_scales")
        where = f"{blocks.file}: tensor {name!r}"
        if scale is None:
            raise CheckpointError(f"{where}: has no scale tensor {stem + '_scales'!r} beside it")
        if blocks.dtype.name != "U8" or len(blocks.shape) != 4 or blocks.shape[-1] != 16:
            raise CheckpointError(f"{where}: MXFP4 blocks must be U8 of shape [experts, rows, groups, 16], got "
                                  f"{blocks.dtype.name} {list(blocks.shape)}")
        if scale.dtype.name not in ("U8", "F8_E8M0") or scale.shape != blocks.shape[:3]:
            raise CheckpointError(f"{scale.file}: scale tensor {scale.name!r} is {scale.dtype.name} "
                                  f"{list(scale.shape)} but blocks {name!r} need U8 or F8_E8M0 "
                                  f"{list(blocks.shape[:3])}")
        if stem in ckpt.tensors:
            raise CheckpointError(f"{where}: the checkpoint also stores {stem!r} unquantized")
        experts, rows, groups, _ = blocks.shape
        entries.append(_Mxfp4(blocks, scale, stem, experts, rows, groups))
    for name, info in ckpt.tensors.items():
        if name.endswith("_scales") and name[: -len("_scales")] + "_blocks" not in ckpt.tensors:
            raise CheckpointError(f"{info.file}: scale tensor {name!r} has no blocks "
                                  f"{name[: -len('_scales')] + '_blocks'!r} beside it")
    return entries, set()


def output_config_changes(base: Checkpoint, out_dtype: str | None = None) -> dict[str, Any]:
    """config.json keys a merge output changes when its base was dequantized: its
    ``quantization_config`` goes (None deletes a key), since every weight is now float —
    unless the output is written in the base's fp8 format (``--dtype fp8``)."""
    return {"quantization_config": None} if isinstance(base, QuantizedCheckpoint) and out_dtype != FP8_OUTPUT else {}


# -- fp8 output: fresh block scales (--dtype fp8) ------------------------------------------------

FP8_OUTPUT = "F8_E4M3"  # what --dtype fp8 maps to
_ENCODE_BLOCK = 1 << 16  # values encoded at a time (their temporaries stay in cache)
_F8 = DTYPES["F8_E4M3"]
_E4M3_MAX = np.float32(448.0)
_SMALLEST_NORMAL = np.finfo(np.float32).tiny


@dataclass
class Requantize:
    """An fp8 output weight written with fresh block scales, or (``derived``) its scale tensor,
    whose bytes the weight's chunks write (each chunk covers whole block rows; see ``quantize``).

    The reference quantizer, per (bm × bn) block of the merged fp32 values x: s = fp32(amax|x|
    / 448) (1 for an all-zero block), q = fp8_e4m3fn(clip(fp32(x / s), ±448)), rounded to
    nearest even; ``W_scale_inv`` holds s, so q × s is what a reader dequantizes.
    """

    rows: int
    cols: int
    bm: int
    bn: int
    grid_rows: int
    grid_cols: int
    per_matrix: bool
    derived: bool = False
    scale: Any = None  # the weight's scale tensor (a planned OutputTensor)

    @property
    def unit(self) -> int:
        """Elements per chunk step: whole block rows (whole matrices where a matrix's last
        block row is partial and several matrices are stacked)."""
        if self.per_matrix and self.rows % self.bm:
            return self.rows * self.cols
        return self.bm * self.cols

    def step(self, step: int) -> int:
        """The executor's chunk step rounded to whole block rows."""
        return max(1, step // self.unit) * self.unit

    def quantize(self, weight: Any, merged: np.ndarray, first: int, skip: frozenset[str]) -> list[tuple[Any, int, memoryview]]:
        """fp8 codes of a chunk of ``weight``'s merged values (whole block rows from ``first``)
        and its rows of scales: [(output tensor, byte offset in it, bytes)], the scales left out
        where a resumed merge kept them."""
        nrows = merged.shape[0] // self.cols
        r0 = first // self.cols
        values = merged.reshape(nrows, self.cols)  # scaled in place: the merge is not needed after
        flat = np.arange(r0, r0 + nrows)
        srows = (flat % self.rows) // self.bm + ((flat // self.rows) * self.grid_rows if self.per_matrix else 0)
        edges = [0, *(np.flatnonzero(np.diff(srows)) + 1), nrows]
        grid = np.empty((len(edges) - 1, self.grid_cols), np.float32)
        starts = np.arange(0, self.cols, self.bn)
        with np.errstate(all="ignore"):  # NaN/inf propagate into the block's scale and codes
            for k, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
                rows = values[a:b]
                amax = np.maximum.reduceat(np.maximum(rows.max(axis=0), -rows.min(axis=0)), starts)
                s = amax / _E4M3_MAX
                s[amax == 0] = 1.0
                grid[k] = s
                np.divide(rows, np.repeat(s, self.bn)[: self.cols], out=rows)
                # Where s is a normal float it is amax/448 within half an ulp, so |x/s| ≤ 448·(1 +
                # 2⁻²³), and everything below 464 (the midpoint to the NaN code above 448) encodes
                # as 448 would: the clip changes nothing then (a pass saved). A subnormal, zero or
                # NaN scale needs it.
                if not (s >= _SMALLEST_NORMAL).all():
                    np.clip(rows, -_E4M3_MAX, _E4M3_MAX, out=rows)
        codes = _encode_e4m3(merged)
        out = [(weight, first, memoryview(codes))]
        if self.scale.name not in skip:
            out.append((self.scale, int(srows[0]) * self.grid_cols * 4, memoryview(grid.reshape(-1).view(np.uint8))))
        return out


@cache
def _e4m3_table() -> np.ndarray:
    """fp8_e4m3fn code of every fp32, indexed by its top 16 bits and whether its low 16 are
    nonzero: rounding to 3 mantissa bits reads the round bit and the bits above it (all in the
    top half, subnormal results included) and only whether any bit below is set."""
    top = np.arange(1 << 16, dtype=np.uint32) << 16
    representatives = np.stack([top, top | 1], axis=1).reshape(-1)
    with np.errstate(all="ignore"):
        return representatives.view(np.float32).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)


def _encode_e4m3(values: np.ndarray) -> np.ndarray:
    """fp32 to fp8_e4m3fn codes, rounded to nearest even exactly as ml_dtypes' cast rounds
    (by table, in cache-sized pieces: ~265 M values/s here against ~150 for the cast)."""
    table, codes = _e4m3_table(), np.empty(values.shape[0], np.uint8)
    for lo in range(0, values.shape[0], _ENCODE_BLOCK):
        bits = values[lo : lo + _ENCODE_BLOCK].view(np.uint32)
        index = bits >> 15
        index &= 0x1FFFE
        index |= (bits & 0xFFFF) != 0
        np.take(table, index, out=codes[lo : lo + _ENCODE_BLOCK], mode="clip")
    return codes


def requantized_tensors(tensors: list, base: Checkpoint, out_dtype: str | None) -> list:
    """The planned output tensors for ``--dtype fp8``: each weight the base stores in fp8 blocks
    is written in fp8 with its ``W_scale_inv`` — copied as stored where every fine-tune leaves
    it unchanged, else merged in fp32 and quantized with fresh scales (its scale tensor placed
    before it, filled by its chunks) — every other tensor in the base's dtype, and the base's
    static activation scales as stored. Any other ``out_dtype`` leaves the list as it is."""
    if out_dtype != FP8_OUTPUT:
        return tensors
    from .plan import OutputTensor  # here: plan imports this module

    if not isinstance(base, QuantizedCheckpoint) or base.quant_method != "fp8":
        method = base.quant_method if isinstance(base, QuantizedCheckpoint) else "none"
        raise SpecError(f"{base.path}: --dtype fp8 writes the base's fp8 block format, but the base is not an fp8 "
                        f"block-quantized checkpoint (quant_method: {method})")
    result = []
    for t in tensors:
        q = base.dequant_file.entry(t.base) if t.base.file == base.dequant_file.path else None
        if q is None:  # stored unquantized by the base: kept in the base's own dtype
            t.dtype = t.base.auto_dtype if t.dtype == _F8 else t.dtype
            result.append(t)
            continue
        if q.kind != "block":
            raise SpecError(f"{base.path}: --dtype fp8 writes block scales; this base's weights have one scale per "
                            "tensor (no weight_block_size)")
        if q.weight.dtype != _F8:
            raise SpecError(f"{q.weight.file}: --dtype fp8 writes F8_E4M3 weights; the base stores "
                            f"{q.weight.dtype.name} ({q.weight.name!r})")
        if q.scale.dtype.name != "F32":
            raise SpecError(f"{q.scale.file}: --dtype fp8 writes F32 block scales; the base stores "
                            f"{q.scale.dtype.name} ({q.scale.name!r})")
        if t.action == "copy" and t.tail is None:  # unchanged by every fine-tune: the stored bytes
            result.append(OutputTensor(q.weight.name, q.weight.shape, _F8, q.weight, [], "copy"))
            result.append(OutputTensor(q.scale.name, q.scale.shape, q.scale.dtype, q.scale, [], "copy"))
            continue
        scale = OutputTensor(q.scale.name, q.scale.shape, _F32, q.scale, [], "copy")
        layout = (q.rows, q.cols, q.bm, q.bn, q.grid_rows, q.grid_cols, q.per_matrix)
        scale.requant = Requantize(*layout, derived=True)
        t.dtype, t.requant = _F8, Requantize(*layout, scale=scale)
        result += [scale, t]
    # Static activation scales belong to the format the output keeps: copied as stored.
    return result + [OutputTensor(n, i.shape, i.dtype, i, [], "copy") for n, i in base.dropped.items()]
