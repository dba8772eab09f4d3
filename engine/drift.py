"""Drift report: where fine-tuning moved the model, from one streaming pass over both inputs.

Per tensor, with a = θ_base, b = θ_ft and Δ = b − a flattened, four float64 sums are gathered
chunk by chunk — ⟨a,a⟩, ⟨b,b⟩, ⟨a,b⟩, ⟨Δ,Δ⟩ — plus max |Δ|. From them:

    relative change  ‖Δ‖ / ‖a‖          cosine  ⟨a,b⟩ / (‖a‖·‖b‖)          max |Δ|

The same sums added over a group of tensors give the group's figures (the group treated as
one long vector), per layer index (``layers.N.``), per module type (q/k/v/o, gate/up/down,
norms, embeddings/lm_head, other) and per (layer, module) for the plot. Tensors that are not
float (integer buffers, masks) are compared exactly and reported by how many elements differ.

Precision: fp32/fp64 inputs are summed in float64 throughout (relative error ~1e-15). Inputs
of ≤16 bits (bf16, fp16) are upcast to fp32, where their products and differences are exact,
and summed in fp32 runs of 2,048 products whose results are added in float64: relative error
≤ 1e-6 on relative change and cosine (measured ≤ 2e-7 on 1M-element bf16/fp16 tensors against
a float64 reference; ≤ 6e-7 with 16K-product runs, 5e-6 with 64K), ~2× less CPU than float64.
A block whose fp32 sums are not finite (overflow of extreme bf16 values, inf/NaN inputs) or
too small to trust (underflow) is recomputed in float64. max |Δ| is exact on both paths.

Memory is a few block-sized scratch buffers per thread; consumed input pages are released as
in a merge.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .abort import Abort
from .api import open_inputs, progress_bar
from .checkpoint import SafetensorsFile, TensorInfo
from .chunks import chunk_elements, element_steps
from .errors import IncompatibleInputsError, SafeblendError, SpecError
from .execute import DEFAULT_CHUNK_BYTES, DEFAULT_WORKERS, run_in_order
from .hub import resolve_inputs
from .methods._blocks import scratch
from .quirks import matched_pairs
from .units import parse_size

# Scratch per thread: float64 blocks of 64K elements keep both operands (512 KiB each) in L2;
# fp32 blocks of 256K (1 MiB each) halve the per-block call overhead, measured 25% faster here.
BLOCK = 1 << 16
NARROW_BLOCK = 1 << 18
# fp32 sums run over 2,048 products each: measured ≤ 6e-7 relative error on the figures at 16K
# products per run, ≤ 2e-7 at 4K, while 64K-product runs reach 5e-6 (module docstring).
RUN = 1 << 11
# Below this an fp32 block sum may have lost products to underflow (each ≤ 2^-150): float64.
_TINY = 2.0**-100
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
# First match wins; norms first, so Qwen3/Gemma's q_norm and k_norm count as norms.
_MODULE_PATTERNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("norm", ("norm", ".ln_", "ln_f")),
    ("embed", ("embed_tokens", "word_embeddings", "wte", "wpe", "lm_head", "embed_out")),
    ("q", ("q_proj", ".query.")),
    ("k", ("k_proj", ".key.")),
    ("v", ("v_proj", ".value.")),
    ("o", ("o_proj", "out_proj")),
    ("gate", ("gate_proj", ".w1.")),
    ("up", ("up_proj", ".w3.")),
    ("down", ("down_proj", ".w2.")),
)
MODULES = ("q", "k", "v", "o", "gate", "up", "down", "norm", "embed", "other")
MODULE_LABELS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj",
                 "up": "up_proj", "down": "down_proj", "norm": "norms", "embed": "embeddings/lm_head",
                 "other": "other"}


def layer_of(name: str) -> int | None:
    """The layer index in a tensor name (``model.layers.12.mlp...`` → 12), or None."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def module_of(name: str) -> str:
    """The module type of a tensor name: one of ``MODULES``."""
    for module, patterns in _MODULE_PATTERNS:
        if any(p in name for p in patterns):
            return module
    return "other"


@dataclass
class Sums:
    """float64 sums over a set of elements; the figures follow from them."""

    numel: int = 0
    aa: float = 0.0  # ‖base‖²
    bb: float = 0.0  # ‖ft‖²
    ab: float = 0.0  # ⟨base, ft⟩
    dd: float = 0.0  # ‖Δ‖²
    max_abs: float = 0.0  # max |Δ|

    def add(self, other: "Sums") -> None:
        self.numel += other.numel
        self.aa += other.aa
        self.bb += other.bb
        self.ab += other.ab
        self.dd += other.dd
        # NaN must win, as np.max would let it; max() would drop it depending on order.
        self.max_abs = math.nan if math.isnan(other.max_abs) else max(self.max_abs, other.max_abs)

    @property
    def rel_change(self) -> float:
        """‖Δ‖/‖base‖ (inf when the base is zero and Δ is not; 0 when both are)."""
        if self.aa == 0.0:
            return 0.0 if self.dd == 0.0 else math.inf
        return math.sqrt(self.dd) / math.sqrt(self.aa)

    @property
    def cosine(self) -> float:
        """cos(base, ft); NaN when either is all zeros."""
        denominator = math.sqrt(self.aa) * math.sqrt(self.bb)
        return self.ab / denominator if denominator > 0.0 else math.nan

    def figures(self) -> dict[str, Any]:
        return {"rel_change": _finite(self.rel_change), "cosine": _finite(self.cosine),
                "max_abs_delta": _finite(self.max_abs), "norm_base": _finite(math.sqrt(self.aa)),
                "norm_delta": _finite(math.sqrt(self.dd))}


def _finite(x: float) -> float | None:
    """JSON has no NaN or infinity: they become null."""
    return x if math.isfinite(x) else None


@dataclass
class TensorDrift:
    """One tensor's figures; ``changed`` (elements that differ) only for non-float tensors."""

    name: str
    layer: int | None
    module: str
    shape: tuple[int, ...]
    dtype: str
    sums: Sums
    is_float: bool = True
    changed: int = 0

    def to_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {"name": self.name, "layer": self.layer, "module": self.module,
                               "shape": list(self.shape), "dtype": self.dtype, "numel": self.sums.numel}
        if self.is_float:
            row.update(self.sums.figures())
        else:
            row["changed_elements"] = self.changed
        return row


@dataclass
class DriftReport:
    """Everything ``diff`` measured; the groupings are computed from the tensors' sums."""

    base: str
    ft: str
    tensors: list[TensorDrift]
    bytes_read: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def _group(self, key: Callable[[TensorDrift], Any]) -> dict[Any, Sums]:
        groups: dict[Any, Sums] = {}
        for t in self.tensors:
            if t.is_float and (k := key(t)) is not None:
                groups.setdefault(k, Sums()).add(t.sums)
        return groups

    def overall(self) -> Sums:
        return self._group(lambda t: "all").get("all", Sums())

    def by_layer(self) -> dict[int, Sums]:
        return dict(sorted(self._group(lambda t: t.layer).items()))

    def by_module(self) -> dict[str, Sums]:
        groups = self._group(lambda t: t.module)
        return {m: groups[m] for m in MODULES if m in groups}

    def by_layer_module(self) -> dict[str, dict[int, Sums]]:
        """module → layer → sums, for tensors inside the layer stack."""
        groups = self._group(lambda t: None if t.layer is None else (t.module, t.layer))
        series: dict[str, dict[int, Sums]] = {}
        for (module, layer), sums in sorted(groups.items(), key=lambda kv: (MODULES.index(kv[0][0]), kv[0][1])):
            series.setdefault(module, {})[layer] = sums
        return series

    def to_dict(self) -> dict[str, Any]:
        """The JSON ``--json`` prints."""
        return {
            "base": self.base,
            "ft": self.ft,
            "overall": {"tensors": sum(t.is_float for t in self.tensors), **self.overall().figures()},
            "by_module": {m: {"numel": s.numel, **s.figures()} for m, s in self.by_module().items()},
            "by_layer": [{"layer": k, "numel": s.numel, **s.figures()} for k, s in self.by_layer().items()],
            "by_layer_module": {m: {str(k): _finite(s.rel_change) for k, s in layers.items()}
                                for m, layers in self.by_layer_module().items()},
            "tensors": [t.to_dict() for t in self.tensors],
            "bytes_read": self.bytes_read,
            "seconds": round(self.seconds, 4),
            "throughput_bytes_per_s": round(self.bytes_read / max(self.seconds, 1e-9), 1),
            "warnings": self.warnings,
        }


def diff(
    base: str | os.PathLike | None,
    ft: str | os.PathLike,
    *,
    chunk_size: int | str = DEFAULT_CHUNK_BYTES,
    workers: int = DEFAULT_WORKERS,
    progress: bool = False,
    stream: bool = False,
) -> DriftReport:
    """Measure how far FT moved from BASE, tensor by tensor, in one streaming read.

    Args:
        base: the model before fine-tuning (directory, ``.safetensors`` file or Hub repo id); None
            takes it from FT when FT is a PEFT adapter (``base_model_name_or_path``).
        ft: the fine-tuned model; same tensor names and shapes (dtypes may differ).
        chunk_size: largest chunk read at once per input.
        workers: threads measuring chunks in parallel.
        progress: show a progress bar (input bytes) on stderr.
        stream: read Hub repos that are not in the cache by range requests instead of
            downloading them, as for ``safeblend.merge``; URLs are always streamed.

    Returns:
        A DriftReport; ``format_report`` renders it, ``plot_drift`` draws it.

    Example:
        >>> report = safeblend.diff("base/", "finetune/")  # doctest: +SKIP
        >>> report.by_module()["q"].rel_change          # doctest: +SKIP
    """
    started = time.perf_counter()
    try:
        chunk_bytes = parse_size(chunk_size)
    except ValueError as exc:
        raise SpecError(str(exc)) from exc
    notes: list[str] = []
    base, (ft,) = resolve_inputs(base, [ft], notes.append, progress, stream)  # Hub ids, URLs, an adapter's base
    with ExitStack() as stack:  # both inputs closed however this ends
        # A LoRA adapter directory is base + s·B·A (safeblend.lora), formed in float64.
        base_ckpt, (ft_ckpt,) = open_inputs(stack, base, [ft], out_dtype="F64")
        pairs = matched_pairs(base_ckpt, ft_ckpt, notes.append)  # as a merge matches them (safeblend.quirks)
        report = DriftReport(str(base), str(ft), [])
        files = {f.path: f for ckpt in (base_ckpt, ft_ckpt) for f in ckpt.files}
        report.tensors = [_new_entry(a, b) for a, b in pairs]
        pairs = [_addressable(a, b) for a, b in pairs]
        with progress_bar(base_ckpt.nbytes + ft_ckpt.nbytes, "diff" if progress else None) as bar:
            report.bytes_read = _measure_all(pairs, report.tensors, files, chunk_bytes, max(1, workers), bar.update)
        report.warnings = notes + [f"{t.name}: {t.changed} of {t.sums.numel} elements differ (a {t.dtype} tensor)"
                           for t in report.tensors if not t.is_float and t.changed]
    report.seconds = time.perf_counter() - started
    return report


def _addressable(a: TensorInfo, b: TensorInfo) -> tuple[TensorInfo, TensorInfo]:
    """Packed sub-byte tensors (F4, F6_*) are compared as their bytes."""
    if not (a.dtype.packed or b.dtype.packed):
        return a, b
    if a.dtype != b.dtype:
        raise IncompatibleInputsError(f"tensor {a.name!r} is {a.dtype.name} in the base but {b.dtype.name} in the "
                                      "fine-tuned model; packed sub-byte tensors are compared only in one dtype")
    return a.as_bytes(), b.as_bytes()


def _new_entry(a: TensorInfo, b: TensorInfo) -> TensorDrift:
    is_float = a.dtype.is_float and b.dtype.is_float and not (a.dtype.packed or b.dtype.packed)
    dtype = a.dtype.name if a.dtype == b.dtype else f"{a.dtype.name}/{b.dtype.name}"
    return TensorDrift(a.name, layer_of(a.name), module_of(a.name), a.shape, dtype, Sums(numel=a.numel), is_float)


def _chunks(pairs: list[tuple[TensorInfo, TensorInfo]], chunk_bytes: int) -> Iterator[tuple[int, int, int]]:
    """(tensor index, first, count) of every chunk, cut as a merge's (safeblend.chunks)."""
    for i, (a, b) in enumerate(pairs):
        for first, count in element_steps(a.numel, chunk_elements(chunk_bytes, a.dtype.itemsize, b.dtype.itemsize)):
            yield i, first, count


def _measure_all(pairs: list[tuple[TensorInfo, TensorInfo]], entries: list[TensorDrift],
                 files: dict[Path, SafetensorsFile], chunk_bytes: int, workers: int,
                 progress: Callable[[int], None] | None) -> int:
    """Measure every chunk on ``workers`` threads; fold results in chunk order (deterministic sums)."""
    read = 0

    def prefetch(chunk: tuple[int, int, int]) -> None:  # readahead while earlier chunks are measured
        index, first, count = chunk
        for info in pairs[index]:
            files[info.file].prefetch(*info.byte_range(first, count))

    def measure(chunk: tuple[int, int, int]) -> tuple[Sums, int, int]:
        index, first, count = chunk
        return _measure(*pairs[index], files, first, count, entries[index].is_float)

    def collect(chunk: tuple[int, int, int], result: tuple[Sums, int, int]) -> None:
        nonlocal read
        partial, changed, nbytes = result
        entry = entries[chunk[0]]
        if entry.is_float:
            entry.sums.add(partial)  # a chunk's Sums has numel 0: the entry's stays the tensor's
        entry.changed += changed
        read += nbytes
        if progress is not None:
            progress(nbytes)

    run_in_order(_chunks(pairs, chunk_bytes), measure, collect, workers, 2 * workers, Abort(), before=prefetch)
    return read


def _run_sums() -> np.ndarray:
    """This thread's fp32 run sums: 4 rows (aa, bb, ab, dd) × runs per block."""
    runs = -(-NARROW_BLOCK // RUN)
    return scratch("drift-runs", 1, np.float32, 4 * runs)[0][: 4 * runs].reshape(4, runs)


def _measure(a: TensorInfo, b: TensorInfo, files: dict[Path, SafetensorsFile], first: int, count: int,
             is_float: bool) -> tuple[Sums, int, int]:
    """One chunk's sums (or, for non-float tensors, its count of differing elements) and bytes read."""
    fa, fb = files[a.file], files[b.file]
    va, vb = fa.view(a, first, count), fb.view(b, first, count)
    sums, changed = Sums(), 0
    if is_float:
        narrow = va.dtype.itemsize <= 2 and vb.dtype.itemsize <= 2
        step = NARROW_BLOCK if narrow else BLOCK
        with np.errstate(all="ignore"):
            for lo in range(0, count, step):
                x, y = va[lo : lo + step], vb[lo : lo + step]
                block = _block_fp32(x, y, sums.max_abs) if narrow else None
                if block is None:
                    block = Sums()
                    for at in range(0, len(x), BLOCK):
                        block.add(_block_fp64(x[at : at + BLOCK], y[at : at + BLOCK]))
                sums.add(block)
    elif a.dtype == b.dtype:
        changed = int(np.count_nonzero(va != vb))
    else:
        changed = count
    del va, vb
    for info, f in ((a, fa), (b, fb)):
        f.release(*info.byte_range(first, count))
    return sums, changed, count * (a.dtype.itemsize + b.dtype.itemsize)


def _block_fp64(va: np.ndarray, vb: np.ndarray) -> Sums:
    """A block's sums in float64 throughout (any input dtype; handles inf and NaN)."""
    x64, y64 = scratch("drift", 2, np.float64, BLOCK)  # this thread's operand buffers
    x, y = x64[: len(va)], y64[: len(va)]
    np.copyto(x, va, casting="unsafe")
    np.copyto(y, vb, casting="unsafe")
    s = Sums(aa=float(np.dot(x, x)), bb=float(np.dot(y, y)), ab=float(np.dot(x, y)))
    np.subtract(y, x, out=y)
    s.dd = float(np.dot(y, y))
    # max and -min instead of max(abs()): no temporary, one read each.
    peak = max(float(y.max()), -float(y.min()))
    s.max_abs = math.nan if math.isnan(peak) else peak
    return s


def _block_fp32(va: np.ndarray, vb: np.ndarray, running_max: float) -> Sums | None:
    """A block of ≤16-bit floats summed in fp32 runs of RUN products, the runs added in float64.

    Products of two ≤16-bit floats and their differences are exact in fp32, so the only error
    is each run's fp32 summation. None (recompute in float64) when a sum is not finite
    (overflow, inf/NaN inputs) or so small that products may have underflowed. max |Δ| stays
    exact: if this block can raise ``running_max``, its largest fp32 |Δ| elements (among which
    rounding, being monotonic, keeps the exact largest) are recomputed in float64.
    """
    (x32, y32), runs = scratch("drift", 2, np.float32, NARROW_BLOCK), _run_sums()
    n = len(va)
    x, y = x32[:n], y32[:n]
    np.copyto(x, va, casting="unsafe")
    np.copyto(y, vb, casting="unsafe")
    _run_dots(x, x, runs[0])
    _run_dots(y, y, runs[1])
    _run_dots(x, y, runs[2])
    np.subtract(y, x, out=y)  # y is Δ from here
    _run_dots(y, y, runs[3])
    aa, bb, ab, dd = (float(v) for v in runs[:, : -(-n // RUN)].sum(axis=1, dtype=np.float64))
    peak = max(float(y.max()), -float(y.min()))
    if not all(map(math.isfinite, (aa, bb, ab, dd, peak))) or min(aa, bb) < _TINY or 0.0 < dd < _TINY:
        return None
    if peak > 0.0 and peak >= np.float32(running_max):
        np.abs(y, out=y)
        where = np.flatnonzero(y == peak)
        peak = float(np.max(np.abs(vb[where].astype(np.float64) - va[where].astype(np.float64))))
    return Sums(aa=aa, bb=bb, ab=ab, dd=dd, max_abs=peak)


def _run_dots(u: np.ndarray, v: np.ndarray, out: np.ndarray) -> None:
    """out[i] = ⟨u, v⟩ over the i-th run of RUN elements (the last may be shorter), in fp32."""
    full = len(u) // RUN
    if full:
        _vecdot(u[: full * RUN].reshape(full, RUN), v[: full * RUN].reshape(full, RUN), out[:full])
    if len(u) > full * RUN:
        out[full] = np.dot(u[full * RUN :], v[full * RUN :])


def _vecdot(u: np.ndarray, v: np.ndarray, out: np.ndarray) -> None:
    """Row-wise dot products of two (rows, RUN) arrays into ``out`` (BLAS sdot per row)."""
    if hasattr(np, "vecdot"):  # numpy >= 2.0
        np.vecdot(u, v, out=out)
    else:
        np.matmul(u[:, None, :], v[:, :, None], out=out.reshape(-1, 1, 1))


def _pct(x: float) -> str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf"
    return f"{100 * x:.3f}%"


def _num(x: float, spec: str) -> str:
    return format(x, spec) if math.isfinite(x) else str(x)


def format_report(report: DriftReport, top: int = 10) -> str:
    """The terminal table: overall figures, per module type, per layer (with each module's
    relative change), and the ``top`` tensors that moved most."""
    lines: list[str] = []
    overall = report.overall()
    n_float = sum(t.is_float for t in report.tensors)
    lines.append(f"Drift of {report.ft} from {report.base}: {n_float} float tensors, "
                 f"{_count(overall.numel)} parameters")
    lines.append(f"overall  ‖Δ‖/‖base‖ {_pct(overall.rel_change)}   cosine {_num(overall.cosine, '.6f')}   "
                 f"max|Δ| {_num(overall.max_abs, '.4g')}")
    lines.append("")
    lines.append(f"{'module':<20} {'params':>12} {'‖Δ‖/‖base‖':>11} {'cosine':>10} {'max|Δ|':>10}")
    for module, s in report.by_module().items():
        lines.append(f"{MODULE_LABELS[module]:<20} {s.numel:>12,} {_pct(s.rel_change):>11} "
                     f"{_num(s.cosine, '.6f'):>10} {_num(s.max_abs, '.4g'):>10}")
    layers = report.by_layer()
    if layers:
        series = report.by_layer_module()
        modules = [m for m in MODULES if m in series]
        lines.append("")
        lines.append(f"{'layer':>5} {'‖Δ‖/‖base‖':>11} {'cosine':>10} {'max|Δ|':>10}  "
                     + " ".join(f"{m:>8}" for m in modules))
        for layer, s in layers.items():
            cells = " ".join(f"{_pct(series[m][layer].rel_change) if layer in series[m] else '-':>8}"
                             for m in modules)
            lines.append(f"{layer:>5} {_pct(s.rel_change):>11} {_num(s.cosine, '.6f'):>10} "
                         f"{_num(s.max_abs, '.4g'):>10}  {cells}")
    ranked = sorted((t for t in report.tensors if t.is_float), key=lambda t: _sort_key(t.sums.rel_change),
                    reverse=True)[:top]
    if ranked:
        lines.append("")
        lines.append(f"top {len(ranked)} tensors by ‖Δ‖/‖base‖")
        width = max(len(t.name) for t in ranked)
        for t in ranked:
            lines.append(f"  {t.name:<{width}} {_pct(t.sums.rel_change):>11} cosine {_num(t.sums.cosine, '.6f')} "
                         f"max|Δ| {_num(t.sums.max_abs, '.4g')}")
    others = [t for t in report.tensors if not t.is_float]
    if others:
        lines.append("")
        lines.append("non-float tensors: " + ", ".join(
            f"{t.name} ({'identical' if not t.changed else f'{t.changed} elements differ'})" for t in others))
    return "\n".join(lines)


def _count(n: int) -> str:
    """``1.10 B``, ``25.3 M``, ``211 k``: parameter counts for people."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return str(n)


def _sort_key(x: float) -> float:
    return -1.0 if math.isnan(x) else x


def require_matplotlib() -> None:
    """SafeblendError with the fix when matplotlib is missing (checked before a long pass)."""
    if importlib.util.find_spec("matplotlib") is None:
        raise SafeblendError("--plot needs matplotlib, which is not installed: pip install 'safeblend[plot]'")


def plot_series(report: DriftReport) -> dict[str, tuple[list[int], list[float]]]:
    """What ``plot_drift`` draws: per module type, (layers, relative change in %)."""
    series = {}
    for module, layers in report.by_layer_module().items():
        xs = list(layers)
        series[MODULE_LABELS[module]] = (xs, [100 * layers[x].rel_change for x in xs])
    return series


def plot_drift(report: DriftReport, path: str | os.PathLike, dpi: int = 120) -> dict[str, tuple[list[int], list[float]]]:
    """Draw relative change per layer, one line per module type, to a PNG; returns the series.

    Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend change).
    """
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    series = plot_series(report)
    if not series:
        raise SpecError("--plot: no tensor name has a layer index (layers.N.), so there is nothing to draw "
                        "per layer; use the table or --json")
    figure = Figure(figsize=(9, 5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for label, (xs, ys) in series.items():
        axes.plot(xs, ys, marker="o", markersize=3, linewidth=1.5, label=label)
    all_layers = report.by_layer()
    axes.plot(list(all_layers), [100 * s.rel_change for s in all_layers.values()], color="black",
              linestyle="--", linewidth=1.2, label="all modules")
    axes.set_xlabel("layer")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
    axes.set_ylabel("relative change ‖Δ‖ / ‖base‖ (%)")
    axes.set_title(f"Where fine-tuning moved the model\n{_short(report.ft)} vs {_short(report.base)}")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small", ncols=2)
    figure.savefig(os.fspath(path), dpi=dpi, format="png")
    return series


def _short(path: str) -> str:
    p = Path(path)
    return p.name or str(p)
