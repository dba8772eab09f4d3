"""Shared test helpers: small checkpoints written by the safetensors library, and the
tolerance check that reports where a result goes wrong."""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np
from safetensors.numpy import load_file, save_file

from safeblend.tolerance import out_of_tolerance

NUMPY_DTYPES = {"bf16": ml_dtypes.bfloat16, "fp16": np.float16, "fp32": np.float32, "fp64": np.float64}


def random_tensor(rng: np.random.Generator, shape: tuple[int, ...], dtype: str, scale: float = 1.0) -> np.ndarray:
    """Normal random values of ``shape`` in ``dtype`` (a key of NUMPY_DTYPES or a numpy dtype)."""
    values = rng.standard_normal(shape) * scale
    return values.astype(NUMPY_DTYPES.get(dtype, dtype))


def write_checkpoint(directory: Path, tensors: dict[str, np.ndarray], shards: int = 1,
                     config: dict | None = None) -> Path:
    """Write ``tensors`` as a Hugging Face model directory with ``shards`` files (+ index)."""
    directory.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    groups = [names[i::shards] for i in range(shards)] if shards > 1 else [names]
    weight_map = {}
    for i, group in enumerate(groups):
        filename = "model.safetensors" if shards == 1 else f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: np.ascontiguousarray(tensors[n]) for n in group}, str(directory / filename),
                  metadata={"format": "pt"})
        weight_map.update({n: filename for n in group})
    if shards > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    return directory


def load_checkpoint(directory: Path) -> dict[str, np.ndarray]:
    """Every tensor of a directory, read with the safetensors library's own loader."""
    tensors: dict[str, np.ndarray] = {}
    for f in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def assert_within_tolerance(out: np.ndarray, reference: np.ndarray, inputs: list[np.ndarray], what: str = "") -> None:
    """Fail with the mismatch count and the first bad indices when ``out`` breaks the
    tolerance rule (safeblend.tolerance) against the float64 ``reference``."""
    assert out.shape == reference.shape, f"{what}: shape {out.shape} != {reference.shape}"
    absmax = np.max([np.abs(np.asarray(x, dtype=np.float64)) for x in inputs], axis=0)
    bad = out_of_tolerance(out, reference, absmax)
    if bad.any():
        idx = np.argwhere(bad)[:5]
        details = ", ".join(
            f"{tuple(int(i) for i in ix)}: got {float(out[tuple(ix)])!r} want {float(reference[tuple(ix)])!r}"
            for ix in idx
        )
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} elements out of tolerance; first {details}")


def write_raw_safetensors(path: Path, tensors: dict[str, tuple[str, list[int], bytes]],
                          metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file by hand: ``{name: (dtype, shape, raw bytes)}``, in order.

    For dtypes the safetensors numpy API cannot save (fp8, packed F4/F6, E8M0); the layout
    is the format's own (8-byte length, JSON header padded with spaces, data).
    """
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    cursor, data = 0, []
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [cursor, cursor + len(raw)]}
        cursor += len(raw)
        data.append(raw)
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    path.write_bytes(len(body).to_bytes(8, "little") + body + b"".join(data))
    return path


def read_raw_safetensors(path: Path) -> dict[str, tuple[str, list[int], bytes]]:
    """The inverse of ``write_raw_safetensors``: every tensor's dtype, shape and raw bytes."""
    blob = path.read_bytes()
    length = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + length])
    header.pop("__metadata__", None)
    data = blob[8 + length :]
    return {name: (e["dtype"], e["shape"], data[e["data_offsets"][0] : e["data_offsets"][1]])
            for name, e in header.items()}


def ref_slerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """mergekit's SLERP of two whole tensors, in float64: norms at or below 1e-8 are not divided
    out (a zero tensor counts as orthogonal), and normalised vectors (anti)parallel within
    0.9995 are interpolated linearly."""
    va, vb = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    na, nb = np.linalg.norm(va), np.linalg.norm(vb)
    dot = float(np.sum((va / na if na > 1e-8 else va) * (vb / nb if nb > 1e-8 else vb)))
    if abs(dot) > 0.9995:
        out = (1 - t) * va + t * vb
    else:
        theta = math.acos(dot)
        out = (math.sin(theta - theta * t) * va + math.sin(theta * t) * vb) / math.sin(theta)
    return out.reshape(np.shape(a))


def interrupt_collect(monkeypatch, after: int) -> Callable[[], None]:
    """Make the executor's ``after``-th chunk collection raise KeyboardInterrupt, 0.3 s late so
    the journals catch up, as they would while a user reaches for Ctrl-C. Returns a function
    that puts the real collection back (for the resumed run)."""
    from safeblend import execute

    original, calls = execute.Executor._collect, []

    def interrupt_later(*args, **kwargs):
        calls.append(1)
        if len(calls) == after:
            time.sleep(0.3)
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(execute.Executor, "_collect", staticmethod(interrupt_later))
    return lambda: monkeypatch.setattr(execute.Executor, "_collect", staticmethod(original))


def run_bounded(work: Callable[[], object], timeout_s: float, hung: str) -> list[BaseException]:
    """Run ``work`` in a thread and return what it raised (nothing: an empty list); fail with
    ``hung`` rather than hang the suite if it is not done within ``timeout_s``."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as exc:  # noqa: BLE001
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=timeout_s)
    assert not thread.is_alive(), hung
    return raised
