"""``safeblend extract-lora BASE FT -o DIR --rank R``: a PEFT LoRA adapter approximating FT − BASE.

For each 2-D float tensor that fine-tuning changed, the task vector D = θ_ft − θ_base (m × n)
is approximated by a rank-R product with a randomized range finder (Halko, Martinsson and
Tropp, 2011), k = R + oversample columns and q power iterations:

    Y = D·Ω            Ω an n×k Gaussian (seeded per tensor)
    q times:  Q = orth(Y);  Z = orth(Dᵀ·Q);  Y = D·Z
    Q = orth(Y);  C = Qᵀ·D;  C = U_c·S·Vᵀ;  U = Q·U_c
    B = U_R·√S_R (m×R),  A = √S_R·V_Rᵀ (R×n),  lora_alpha = r (scaling 1)

Every product with D is accumulated over blocks of rows of D read from both models' memory
maps (a block is at most ``chunk_size`` bytes of fp32), so memory is O((m + n)·k) plus one
block — never a whole tensor. Each tensor takes 2q + 2 passes over its rows, in float64.

The retained energy of a tensor, ΣS_R² / ‖D‖²_F, is exact: ‖D − B·A‖²_F = ‖D‖²_F − ΣS_R²,
because B·A is D projected onto an orthonormal basis and truncated there. Embeddings
(``embed_tokens``, ``wte``, ``word_embeddings``, ``embed_in``) get PEFT's embedding LoRA
(lora_embedding_A/B, whose product is transposed); 1-D tensors (norms, biases) cannot be a
LoRA factor and are left as the base's, listed in the report with their share of the change.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import __version__
from .adapter_sweep import write_adapter_manifest
from .checkpoint import Checkpoint
from .errors import IncompatibleInputsError, SpecError
from .output_paths import check_output_name, check_output_not_input, check_replaceable, replace_output, reserve_staging
from .units import parse_size
from .writer import fsync_dir, write_text_durably

EMBEDDING_MODULES = ("embed_tokens", "wte", "word_embeddings", "embed_in")
REPORT_NAME = "safeblend_extract.json"
_PREFIX = "base_model.model."


@dataclass
class TensorExtract:
    """One tensor's approximation: its rank and the share of ‖D‖² the LoRA keeps."""

    name: str
    shape: list[int]
    rank: int
    delta_norm: float  # ‖D‖_F
    retained_energy: float  # ΣS_R² / ‖D‖²_F (1.0 for an unchanged tensor)
    kind: str  # "linear", "embedding", or "not representable" (1-D), "unchanged"


@dataclass
class ExtractReport:
    output: str
    rank: int
    oversample: int
    power_iterations: int
    tensors: list[TensorExtract] = field(default_factory=list)
    seconds: float = 0.0
    bytes_written: int = 0
    peak_rss_bytes: int = 0

    @property
    def retained_energy(self) -> float:
        """Over the whole model: 1 − Σ‖D − B·A‖² / Σ‖D‖² (1-D tensors count as not kept)."""
        total = sum(t.delta_norm ** 2 for t in self.tensors)
        kept = sum(t.delta_norm ** 2 * t.retained_energy for t in self.tensors if t.kind in ("linear", "embedding"))
        return kept / total if total > 0 else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "retained_energy": self.retained_energy}


def extract_lora(base: str | os.PathLike, ft: str | os.PathLike, out: str | os.PathLike, rank: int,
                 oversample: int = 8, power_iterations: int = 2, seed: int = 0,
                 chunk_size: int | str = "8MiB", dtype: str = "fp32", overwrite: bool = False,
                 on_tensor: Callable[[TensorExtract], None] | None = None) -> ExtractReport:
    """Write a PEFT LoRA adapter approximating FT − BASE to ``out``; returns the report."""
    import resource

    started = time.perf_counter()
    if rank < 1:
        raise SpecError(f"--rank {rank}: must be at least 1")
    if oversample < 0 or power_iterations < 0:
        raise SpecError("--oversample and --power-iterations must not be negative")
    if dtype not in ("fp32", "bf16", "fp16"):
        raise SpecError(f"--dtype {dtype}: expected fp32, bf16 or fp16")
    try:
        chunk_bytes = parse_size(chunk_size)
    except ValueError as exc:
        raise SpecError(str(exc)) from exc
    final = check_output_name(out)
    check_output_not_input(final, [base, ft])
    check_replaceable(final, overwrite)
    base_ckpt, ft_ckpt = Checkpoint.open(base), Checkpoint.open(ft)
    report = ExtractReport(str(final), rank, oversample, power_iterations)
    try:
        _check_pair(base_ckpt, ft_ckpt)
        staging = reserve_staging(final, "extract")
        try:
            targets = _extract_all(base_ckpt, ft_ckpt, staging, report, rank, oversample, power_iterations, seed,
                                   chunk_bytes, dtype, on_tensor)
            if not targets:
                raise IncompatibleInputsError(f"{ft}: no 2-D tensor differs from the base's, so there is nothing "
                                              "to extract")
            _write_config(staging, targets, rank, str(base))
            report.seconds = round(time.perf_counter() - started, 4)
            report.bytes_written = sum(p.stat().st_size for p in staging.iterdir())
            report.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            write_text_durably(staging / REPORT_NAME, json.dumps(report.to_dict(), indent=2) + "\n")
            # The manifest marks the adapter as safeblend's, so a later --overwrite may replace it.
            write_adapter_manifest(staging, len(targets), report.bytes_written)
            replace_output(staging, final, overwrite)  # only a previous safeblend output is replaced
            fsync_dir(final.parent)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    finally:
        base_ckpt.close()
        ft_ckpt.close()
    return report


def _extract_all(base: Checkpoint, ft: Checkpoint, staging: Path, report: ExtractReport, rank: int, oversample: int,
                 power_iterations: int, seed: int, chunk_bytes: int, dtype: str,
                 on_tensor: Callable[[TensorExtract], None] | None) -> dict[str, int]:
    """Approximate every tensor, writing factors to the adapter file as they come (an adapter
    of a large model at a high rank is larger than the memory a run may use); returns the
    targeted modules and their ranks."""
    targets: dict[str, int] = {}  # module -> its rank
    with _FactorFile(staging / "adapter_model.safetensors", dtype) as factors:
        for name, info in base.tensors.items():
            if not info.dtype.computable:
                continue
            rows = _Rows(base, ft, name, chunk_bytes)
            if len(info.shape) != 2:
                norm = rows.frobenius()
                entry = TensorExtract(name, list(info.shape), 0, norm, 0.0 if norm > 0 else 1.0,
                                      "not representable" if norm > 0 else "unchanged")
            else:
                entry, pair = _extract_tensor(rows, name, rank, oversample, power_iterations, seed)
                if pair is not None:
                    module = name.removesuffix(".weight")
                    left, right = pair
                    if entry.kind == "embedding":  # PEFT: Δ = (lora_embedding_B · lora_embedding_A)ᵀ
                        factors.add(f"{_PREFIX}{module}.lora_embedding_A", left.T)
                        factors.add(f"{_PREFIX}{module}.lora_embedding_B", right.T)
                    else:
                        factors.add(f"{_PREFIX}{module}.lora_A.weight", right)
                        factors.add(f"{_PREFIX}{module}.lora_B.weight", left)
                    targets[module] = entry.rank
            report.tensors.append(entry)
            if on_tensor:
                on_tensor(entry)
    return targets


class _FactorFile:
    """A safetensors file written tensor by tensor: data to a side file as it comes, then the
    header and the data copied behind it on close (the header needs every tensor's entry)."""

    def __init__(self, path: Path, dtype: str) -> None:
        from .dtypes import DTYPES

        self.path, self.data_path = path, path.with_name(path.name + ".data")
        self.dtype = {"fp32": "F32", "bf16": "BF16", "fp16": "F16"}[dtype]
        self.numpy = DTYPES[self.dtype].numpy
        self.entries: dict[str, Any] = {"__metadata__": {"format": "pt", "safeblend_version": __version__}}
        self.offset = 0

    def __enter__(self) -> "_FactorFile":
        self.data = open(self.data_path, "wb")
        return self

    def add(self, key: str, array: np.ndarray) -> None:
        raw = np.ascontiguousarray(array.astype(self.numpy)).tobytes()
        self.entries[key] = {"dtype": self.dtype, "shape": list(array.shape),
                             "data_offsets": [self.offset, self.offset + len(raw)]}
        self.data.write(raw)
        self.offset += len(raw)

    def __exit__(self, kind, value, traceback) -> None:
        self.data.close()
        if kind is None:
            header = json.dumps(self.entries, separators=(",", ":")).encode()
            header += b" " * (-len(header) % 8)
            with open(self.path, "wb") as out, open(self.data_path, "rb") as data:
                out.write(len(header).to_bytes(8, "little") + header)
                shutil.copyfileobj(data, out, 8 << 20)
                out.flush()
                os.fsync(out.fileno())
        self.data_path.unlink()


def _check_pair(base: Checkpoint, ft: Checkpoint) -> None:
    missing = [n for n in base.tensors if n not in ft.tensors]
    if missing:
        raise IncompatibleInputsError(f"{ft.path}: lacks {len(missing)} tensor(s) of the base, e.g. {missing[0]!r}")
    for name, info in base.tensors.items():
        if ft.tensors[name].shape != info.shape:
            raise IncompatibleInputsError(f"{ft.path}: tensor {name!r} has shape {list(ft.tensors[name].shape)}, "
                                          f"the base's is {list(info.shape)}")


class _Rows:
    """Blocks of rows of D = θ_ft − θ_base in float64, read through both memory maps."""

    def __init__(self, base: Checkpoint, ft: Checkpoint, name: str, chunk_bytes: int) -> None:
        self.a, self.b = base.tensors[name], ft.tensors[name]
        self.fa, self.fb = base.file_of(self.a), ft.file_of(self.b)
        self.shape = self.a.shape
        cols = self.shape[1] if len(self.shape) == 2 else self.a.numel
        self.rows = self.shape[0] if len(self.shape) == 2 else 1
        self.cols = cols
        self.block = max(1, chunk_bytes // (8 * cols))

    def __iter__(self):
        for r0 in range(0, self.rows, self.block):
            r1 = min(self.rows, r0 + self.block)
            first, count = r0 * self.cols, (r1 - r0) * self.cols
            d = self.fb.view(self.b, first, count).astype(np.float64)
            d -= self.fa.view(self.a, first, count)
            # The block is a copy: drop its input pages from the resident set, as a merge does.
            for f, info in ((self.fa, self.a), (self.fb, self.b)):
                size = info.dtype.itemsize
                f.release(info.start + first * size, count * size)
            yield r0, r1, d.reshape(r1 - r0, self.cols)

    def frobenius(self) -> float:
        return float(np.sqrt(sum(float(np.einsum("ij,ij->", d, d)) for _, _, d in self)))


# Rows of an m×k panel orthonormalised at once (float64 temporaries of this many bytes at most).
_PANEL_BYTES = 8 << 20


def _orth(x: np.ndarray) -> np.ndarray:
    """An orthonormal basis of the columns of ``x`` (m×k), in ``x``'s dtype.

    numpy's QR computes in float64 and copies its input, so an fp32 m×k array (m a
    vocabulary) would cost several times its size. A tall x is factored as a tall-skinny QR
    instead: Householder QR of row panels of at least k rows (float64, one panel at a time),
    then of the stacked k×k R factors; Q = diag(Q_panel)·Q_stack, formed in place. It is as
    orthonormal as one QR, and holds x, the result and one panel.
    """
    m, k = x.shape
    rows = max(k, _PANEL_BYTES // (8 * max(k, 1)))
    if m <= 2 * rows:
        return np.linalg.qr(x.astype(np.float64))[0].astype(x.dtype)
    edges = list(range(0, m - rows, rows)) + [m]  # the last panel takes the remainder (≥ rows)
    q = np.empty_like(x)
    factors = []
    for r0, r1 in zip(edges[:-1], edges[1:]):
        panel_q, panel_r = np.linalg.qr(x[r0:r1].astype(np.float64))
        q[r0:r1] = panel_q
        factors.append(panel_r)
    stack_q = np.linalg.qr(np.concatenate(factors))[0]  # (panels·k)×k
    for i, (r0, r1) in enumerate(zip(edges[:-1], edges[1:])):
        q[r0:r1] = q[r0:r1].astype(np.float64) @ stack_q[i * k:(i + 1) * k]
    return q


def _extract_tensor(rows: _Rows, name: str, rank: int, oversample: int, power_iterations: int,
                    seed: int) -> tuple[TensorExtract, tuple[np.ndarray, np.ndarray] | None]:
    """The rank-R factors (left m×R, right R×n) of one tensor's D, and its report entry."""
    m, n = rows.rows, rows.cols
    kind = "embedding" if name.removesuffix(".weight").rsplit(".", 1)[-1] in EMBEDDING_MODULES else "linear"
    k = min(rank + oversample, m, n)
    # A generator per tensor, keyed by the seed and the name: the same input gives the same
    # adapter whatever the order or the set of tensors.
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    omega = rng.standard_normal((n, k))
    # The m×k arrays (Y and its basis Q) are the largest held — an embedding's m is the
    # vocabulary — so they are fp32: a range finder needs no more, and the sums that make the
    # factors (Dᵀ·Q, Qᵀ·D) are float64.
    y = np.empty((m, k), np.float32)
    norm2 = 0.0
    for r0, r1, d in rows:  # pass 1: Y = D·Ω, and ‖D‖²
        y[r0:r1] = d @ omega
        norm2 += float(np.einsum("ij,ij->", d, d))
    del omega
    if norm2 == 0.0:
        return TensorExtract(name, [m, n], 0, 0.0, 1.0, "unchanged"), None
    for _ in range(power_iterations):  # two passes each: Z = Dᵀ·Q, then Y = D·orth(Z)
        q = _orth(y)
        z = np.zeros((n, k))
        for r0, r1, d in rows:
            z += d.T @ q[r0:r1]
        del q
        z = _orth(z)
        for r0, r1, d in rows:
            y[r0:r1] = d @ z
    q = _orth(y)
    del y
    c = np.zeros((q.shape[1], n))
    for r0, r1, d in rows:  # last pass: C = Qᵀ·D
        c += q[r0:r1].T @ d
    u_c, s, vt = np.linalg.svd(c, full_matrices=False)
    r = min(rank, len(s))
    root = np.sqrt(s[:r])
    left = q @ (u_c[:, :r] * root).astype(np.float32)  # m×r
    right = root[:, None] * vt[:r]  # r×n
    retained = float(np.sum(s[:r] ** 2) / norm2)
    return TensorExtract(name, [m, n], r, float(np.sqrt(norm2)), min(retained, 1.0), kind), (left, right)


def _write_config(directory: Path, targets: dict[str, int], rank: int, base: str) -> None:
    """adapter_config.json; a tensor of smaller rank than R (a dimension below R) gets its rank
    in rank_pattern and alpha_pattern, so every scaling is 1."""
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
              "bias": "none", "fan_in_fan_out": False, "target_modules": sorted(targets),
              "base_model_name_or_path": base, "inference_mode": True,
              "rank_pattern": {m: r for m, r in targets.items() if r != rank},
              "alpha_pattern": {m: r for m, r in targets.items() if r != rank}}
    write_text_durably(directory / "adapter_config.json", json.dumps(config, indent=2) + "\n")
