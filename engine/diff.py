"""Drift report: where fine-tuning moved the model, from one streaming pass over both inputs.

Per tensor, with a = θ_base, b = θ_ft and Δ = b − a flattened, four float64 sums are gathered
chunk by chunk — ⟨a,a⟩, ⟨b,b⟩, ⟨a,b⟩, ⟨Δ,Δ⟩ — plus max |Δ|. From them:

    relative change  ‖Δ‖ / ‖a‖          cosine  ⟨a,b⟩ / (‖a‖·‖b‖)          max |Δ|

The same sums added over a group of tensors give the group's figures (the group treated as
one long vector), per layer index (``layers.N.``), per module type (q/k/v/o, gate/up/down,
norms, embeddings/lm_head, other) and per (layer, module) for the plot. Tensors that are not
float (integer buffers, masks) are compared exactly and reported by how many elements differ.

Memory is a few chunk-sized scratch buffers; consumed input pages are released as in a merge.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .blas import single_threaded_blas
from .checkpoint import Checkpoint, SafetensorsFile, TensorInfo
from .errors import SafeblendError, SpecError
from .execute import DEFAULT_CHUNK_BYTES, DEFAULT_WORKERS
from .lora import open_model
from .plan import check_compatible
from .units import parse_size

# float64 scratch per thread: 64K elements (512 KiB each) keeps both operands in L2. Measured
# here: 1.5 ns/element for cast + subtract + four dots + max, ~2.7 GB/s of bf16 pairs per core.
BLOCK = 1 << 16
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
    base: str | os.PathLike,
    ft: str | os.PathLike,
    *,
    chunk_size: int | str = DEFAULT_CHUNK_BYTES,
    workers: int = DEFAULT_WORKERS,
    progress: bool = False,
) -> DriftReport:
    """Measure how far FT moved from BASE, tensor by tensor, in one streaming read.

    Args:
        base: the model before fine-tuning (directory or ``.safetensors`` file).
        ft: the fine-tuned model; same tensor names and shapes (dtypes may differ).
        chunk_size: largest chunk read at once per input.
        workers: threads measuring chunks in parallel.
        progress: show a progress bar (input bytes) on stderr.

    Returns:
        A DriftReport; ``format_report`` renders it, ``plot_drift`` draws it.

    Example:
        >>> report = engine.diff("base/", "finetune/")  # doctest: +SKIP
        >>> report.by_module()["q"].rel_change          # doctest: +SKIP
    """
    started = time.perf_counter()
    try:
        chunk_bytes = parse_size(chunk_size)
    except ValueError as exc:
        raise SpecError(str(exc)) from exc
    base_ckpt = Checkpoint.open(base)
    try:
        ft_ckpt = open_model(ft, base_ckpt)  # a LoRA adapter directory is base + s·B·A (engine.lora)
    except BaseException:
        base_ckpt.close()
        raise
    try:
        check_compatible(base_ckpt, [ft_ckpt])
        report = DriftReport(str(base), str(ft), [])
        files = {f.path: f for ckpt in (base_ckpt, ft_ckpt) for f in ckpt.files}
        pairs = [(info, ft_ckpt.tensors[name]) for name, info in base_ckpt.tensors.items()]
        report.tensors = [_new_entry(a, b) for a, b in pairs]
        with _progress_bar(base_ckpt.nbytes + ft_ckpt.nbytes, progress) as bar:
            report.bytes_read = _measure_all(pairs, report.tensors, files, chunk_bytes, max(1, workers), bar.update)
        report.warnings = [f"{t.name}: {t.changed} of {t.sums.numel} elements differ (a {t.dtype} tensor)"
                           for t in report.tensors if not t.is_float and t.changed]
    finally:
        base_ckpt.close()
        ft_ckpt.close()
    report.seconds = time.perf_counter() - started
    return report


def _new_entry(a: TensorInfo, b: TensorInfo) -> TensorDrift:
    is_float = a.dtype.is_float and b.dtype.is_float
    dtype = a.dtype.name if a.dtype == b.dtype else f"{a.dtype.name}/{b.dtype.name}"
    return TensorDrift(a.name, layer_of(a.name), module_of(a.name), a.shape, dtype, Sums(numel=a.numel), is_float)


@dataclass(frozen=True)
class _Chunk:
    index: int  # which tensor
    first: int
    count: int


def _chunks(pairs: list[tuple[TensorInfo, TensorInfo]], chunk_bytes: int) -> Iterator[_Chunk]:
    for i, (a, b) in enumerate(pairs):
        step = max(1, chunk_bytes // max(a.dtype.itemsize, b.dtype.itemsize))
        for first in range(0, a.numel, step):
            yield _Chunk(i, first, min(step, a.numel - first))


def _measure_all(pairs: list[tuple[TensorInfo, TensorInfo]], entries: list[TensorDrift],
                 files: dict[Path, SafetensorsFile], chunk_bytes: int, workers: int,
                 progress: Callable[[int], None] | None) -> int:
    """Measure every chunk on ``workers`` threads; fold results in chunk order (deterministic sums)."""
    read = 0
    pending: deque[tuple[_Chunk, Future]] = deque()

    def collect() -> None:
        nonlocal read
        chunk, future = pending.popleft()
        partial, changed, nbytes = future.result()
        entry = entries[chunk.index]
        if entry.is_float:
            entry.sums.add(partial)  # a chunk's Sums has numel 0: the entry's stays the tensor's
        entry.changed += changed
        read += nbytes
        if progress is not None:
            progress(nbytes)

    with ThreadPoolExecutor(workers, thread_name_prefix="safeblend-diff") as pool, single_threaded_blas():
        try:
            for chunk in _chunks(pairs, chunk_bytes):
                a, b = pairs[chunk.index]
                for info in (a, b):  # readahead while earlier chunks are measured
                    size = info.dtype.itemsize
                    files[info.file].prefetch(info.start + chunk.first * size, chunk.count * size)
                pending.append((chunk, pool.submit(_measure, a, b, files, chunk.first, chunk.count,
                                                   entries[chunk.index].is_float)))
                if len(pending) >= 2 * workers:
                    collect()
            while pending:
                collect()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return read


_local = threading.local()


def _scratch() -> tuple[np.ndarray, np.ndarray]:
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = (np.empty(BLOCK, np.float64), np.empty(BLOCK, np.float64))
    return buffers


def _measure(a: TensorInfo, b: TensorInfo, files: dict[Path, SafetensorsFile], first: int, count: int,
             is_float: bool) -> tuple[Sums, int, int]:
    """One chunk's sums (or, for non-float tensors, its count of differing elements) and bytes read."""
    fa, fb = files[a.file], files[b.file]
    va, vb = fa.view(a, first, count), fb.view(b, first, count)
    sums, changed = Sums(), 0
    if is_float:
        x64, y64 = _scratch()
        with np.errstate(all="ignore"):
            for lo in range(0, count, BLOCK):
                hi = min(count, lo + BLOCK)
                x, y = x64[: hi - lo], y64[: hi - lo]
                np.copyto(x, va[lo:hi], casting="unsafe")
                np.copyto(y, vb[lo:hi], casting="unsafe")
                sums.aa += float(np.dot(x, x))
                sums.bb += float(np.dot(y, y))
                sums.ab += float(np.dot(x, y))
                np.subtract(y, x, out=y)
                sums.dd += float(np.dot(y, y))
                # max and -min instead of max(abs()): no temporary, one read each.
                peak = max(float(y.max()), -float(y.min()))
                sums.max_abs = math.nan if math.isnan(peak) else max(sums.max_abs, peak)
    elif a.dtype == b.dtype:
        changed = int(np.count_nonzero(va != vb))
    else:
        changed = count
    del va, vb
    for info, f in ((a, fa), (b, fb)):
        size = info.dtype.itemsize
        f.release(info.start + first * size, count * size)
    return sums, changed, count * (a.dtype.itemsize + b.dtype.itemsize)


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


def _progress_bar(total: int, enabled: bool):
    """A tqdm bar on stderr in input bytes, or a no-op."""
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="diff", file=sys.stderr,
                dynamic_ncols=True, smoothing=0.1)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def __enter__(self) -> "_NoBar":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

