"""The device pipeline (engine/execute_cuda.py): `--device cuda` against `--device cpu`.

Tests marked ``cuda`` need an NVIDIA GPU with torch and triton and are skipped, with the
reason, elsewhere. The stand-in tests run everywhere: the same CudaExecutor with synchronous
stand-ins for streams and events, pageable CPU buffers and the kernels under Triton's
interpreter, so the pipeline's ordering, buffer pools and copy path are tested in CI too.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import safeblend
import safeblend.api
from safeblend.execute_cuda import CudaExecutor
from safeblend.synthetic import PRESETS, write_pair
from safeblend.kernels import cuda_unavailable_reason
from tests.helpers import (NUMPY_DTYPES, assert_within_tolerance, load_checkpoint, random_tensor,
                           write_checkpoint)

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from tests.triton_env import import_triton_backend  # noqa: E402

tb = import_triton_backend()
CUDA_REASON = cuda_unavailable_reason() or ("TRITON_INTERPRET is set: the kernels run interpreted"
                                            if tb.INTERPRETED else None)


def gpu(test):
    """Mark a test as needing a CUDA GPU; skipped with the reason when there is none."""
    test = pytest.mark.skipif(CUDA_REASON is not None, reason=f"needs a CUDA GPU: {CUDA_REASON}")(test)
    return pytest.mark.cuda(test)


needs_interpreter = pytest.mark.skipif(
    not tb.INTERPRETED, reason="a GPU is present: the real pipeline is covered by the cuda tests")


def reference(base: np.ndarray, models: list[np.ndarray], weights: list[float]) -> np.ndarray:
    b = base.astype(np.float64)
    return b + sum(w * (m.astype(np.float64) - b) for m, w in zip(models, weights))


def assert_outputs_match(cuda_dir: Path, cpu_dir: Path, inputs: list[dict[str, np.ndarray]], weights) -> None:
    """Same tensors; every element equal to the CPU's or, where not, both within tolerance."""
    got, want = load_checkpoint(cuda_dir), load_checkpoint(cpu_dir)
    assert got.keys() == want.keys()
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype and g.shape == w.shape, name
        if g.dtype.kind != "f" and str(g.dtype) != "bfloat16":
            assert np.array_equal(g, w), name
            continue
        int_type = {2: np.int16, 4: np.int32, 8: np.int64}[g.dtype.itemsize]
        differ = g.view(int_type) != w.view(int_type)
        if differ.any():
            srcs = [x[name] for x in inputs]
            ref = reference(srcs[0], srcs[1:], weights)
            assert_within_tolerance(g, ref, srcs, f"cuda {name}")
            assert_within_tolerance(w, ref, srcs, f"cpu {name}")


# -- stand-ins: the pipeline on the CPU ------------------------------------------------------


class _SyncCuda:
    """Just enough of torch.cuda for CudaExecutor, synchronous (CPU work is never async)."""

    class Stream:
        def __init__(self, device=None) -> None:
            self.cuda_stream = id(self)

        def wait_event(self, event) -> None:
            pass

    class Event:
        def record(self, stream=None) -> None:
            pass

        def synchronize(self) -> None:
            pass

    @staticmethod
    def stream(stream):
        return contextlib.nullcontext()

    @staticmethod
    def reset_peak_memory_stats(device=None) -> None:
        pass

    @staticmethod
    def max_memory_allocated(device=None) -> int:
        return 0

    @staticmethod
    def get_device_name(device=None) -> str:
        return "cpu stand-in"

    @staticmethod
    def synchronize(device=None) -> None:
        pass


class StandInExecutor(CudaExecutor):
    """CudaExecutor on CPU tensors: the interpreter's kernels, pageable staging buffers."""

    reports: list[dict] = []

    def _cuda_api(self):
        return _SyncCuda

    def _run_device(self):
        return torch.device("cpu")

    def _pinned(self, nbytes: int):
        return torch.empty(nbytes, dtype=torch.uint8)

    def run(self, writer, progress=None):
        stats = super().run(writer, progress)
        StandInExecutor.reports.append(self.report)
        return stats


def _select_stand_in(device: str, merger=None):
    if device == "cuda":
        return tb.TritonBackend(), "cuda"
    from safeblend.kernels import cpu_backend

    return cpu_backend(), "cpu"


@pytest.fixture
def stand_in(monkeypatch):
    """Route device="cuda" through StandInExecutor with the interpreted Triton backend."""
    monkeypatch.setattr(safeblend.api, "_select_backend", _select_stand_in)
    monkeypatch.setattr(safeblend.api, "CudaExecutor", StandInExecutor)
    StandInExecutor.reports.clear()
    return StandInExecutor.reports


def _mixed_inputs(tmp_path: Path, n_models: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(n_models)
    shapes = {"embed.weight": (300, 64), "layer.0.q.weight": (64, 64), "layer.0.norm.weight": (64,),
              "one.weight": (1,), "odd.weight": (7, 13)}
    dtypes = ["bf16", "fp16", "fp32"]
    base = {n: random_tensor(rng, s, "bf16") for n, s in shapes.items()}
    base["position_ids"] = np.arange(96, dtype=np.int64)  # copied, never blended
    checkpoints = [base]
    for i in range(n_models):
        model = {n: (t.astype(np.float64) + random_tensor(rng, t.shape, "fp64", 0.05)).astype(
                     NUMPY_DTYPES[dtypes[i % 3]])
                 for n, t in base.items() if n != "position_ids"}
        model["position_ids"] = base["position_ids"]
        checkpoints.append(model)
    for i, ckpt in enumerate(checkpoints):
        write_checkpoint(tmp_path / f"in{i}", ckpt, shards=2 if i == 0 else 1)
    return checkpoints


@needs_interpreter
@pytest.mark.parametrize("n_models", [1, 3])
def test_stand_in_pipeline_matches_cpu_bit_for_bit(tmp_path, stand_in, n_models):
    _mixed_inputs(tmp_path, n_models)
    weights = [0.6] if n_models == 1 else [0.5, -0.25, 0.8]
    models = [tmp_path / f"in{i}" for i in range(1, n_models + 1)]
    kwargs = dict(weight=weights, chunk_size=4096, on_warning=lambda m: None)
    cuda = safeblend.merge(tmp_path / "in0", models, tmp_path / "cuda", device="cuda", **kwargs)
    cpu = safeblend.merge(tmp_path / "in0", models, tmp_path / "cpu", device="cpu", **kwargs)
    assert (cuda.device, cpu.device) == ("cuda", "cpu")
    assert (cuda.bytes_read, cuda.bytes_written) == (cpu.bytes_read, cpu.bytes_written)
    for shard in sorted(p.name for p in (tmp_path / "cpu").glob("*.safetensors")):
        assert (tmp_path / "cuda" / shard).read_bytes() == (tmp_path / "cpu" / shard).read_bytes(), shard
    report = stand_in[-1]
    assert report["merge_chunks"] > 10  # the embedding alone spans several chunks
    assert report["slot_bytes"] == 4096


@needs_interpreter
def test_stand_in_pipeline_failure_leaves_no_output(tmp_path, stand_in, monkeypatch):
    _mixed_inputs(tmp_path, 1)
    calls = []

    def failing(self, chunk, in_slot):
        calls.append(chunk)
        if len(calls) == 5:
            raise OSError("simulated read failure")
        return CudaExecutor._read(self, chunk, in_slot)

    monkeypatch.setattr(StandInExecutor, "_read", failing)
    with pytest.raises(OSError, match="simulated"):
        safeblend.merge(tmp_path / "in0", tmp_path / "in1", tmp_path / "out", device="cuda", chunk_size=4096)
    assert not (tmp_path / "out").exists()


def test_slot_size_is_bounded_by_the_pinned_budget():
    from safeblend import execute_cuda as ec

    assert ec.staging_slot_bytes(16 * 2**20, 2) == 16 * 2**20
    many = ec.staging_slot_bytes(16 * 2**20, 20)
    assert many % ec.SLOT_ALIGN == 0
    assert (ec.DEVICE_SLOTS + ec.READ_AHEAD) * 20 * many <= ec.PINNED_INPUT_BUDGET
    assert ec.staging_slot_bytes(4096, 2) == 4096  # never above the request


def test_device_cuda_without_gpu_is_a_clear_error(tmp_path, monkeypatch):
    linear = safeblend.methods.create_method("linear", 1, weight=0.5)
    monkeypatch.setattr("safeblend.kernels.cuda_unavailable_reason", lambda: "no NVIDIA GPU driver found")
    with pytest.raises(safeblend.errors.SpecError, match="--device cuda: no NVIDIA GPU driver found"):
        safeblend.api._select_backend("cuda", linear)
    assert safeblend.api._select_backend("auto", linear)[1] == "cpu"


def test_auto_runs_methods_with_reduce_passes_on_the_cpu(monkeypatch):
    """A GPU is present, but slerp's norms have no device version: auto picks the CPU."""
    monkeypatch.setattr("safeblend.kernels.cuda_unavailable_reason", lambda: None)
    slerp = safeblend.methods.create_method("slerp", 1, weight=0.5)
    assert safeblend.api._select_backend("auto", slerp)[1] == "cpu"


# -- on a GPU ---------------------------------------------------------------------------------


def _cli(*args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-c", "from safeblend.cli import main; main()", *args, "--json", "--quiet"]
    result = subprocess.run(command,
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def small_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    write_pair(root / "base", root / "ft", PRESETS["small"], dtype="BF16", shard_size=40 * 10**6)
    return root


@pytest.mark.parametrize("dtype", ["auto", "fp16", "fp32"])
@gpu
def test_cli_cuda_matches_cpu(small_pair, tmp_path, dtype):
    common = [str(small_pair / "base"), str(small_pair / "ft"), "--weight", "0.6", "--dtype", dtype]
    cuda = _cli("merge", *common, "-o", str(tmp_path / "cuda"), "--device", "cuda")
    cpu = _cli("merge", *common, "-o", str(tmp_path / "cpu"), "--device", "cpu")
    assert (cuda["device"], cpu["device"]) == ("cuda", "cpu")
    assert cuda["bytes_written"] == cpu["bytes_written"]
    inputs = [load_checkpoint(small_pair / "base"), load_checkpoint(small_pair / "ft")]
    assert_outputs_match(tmp_path / "cuda", tmp_path / "cpu", inputs, [0.6])
    # Host memory stays bounded with torch's CUDA context loaded (issue target: 1 GiB).
    assert cuda["peak_rss_bytes"] < 2**30, cuda["peak_rss_bytes"]


@gpu
def test_auto_picks_cuda(small_pair, tmp_path):
    result = safeblend.merge(small_pair / "base", small_pair / "ft", tmp_path / "out", device="auto")
    assert result.device == "cuda"


@gpu
@pytest.mark.parametrize("n_models", [3, 9])
def test_many_models_cuda_matches_cpu(tmp_path, n_models):
    inputs = _mixed_inputs(tmp_path, n_models)
    weights = [round(0.1 * i - 0.15, 3) for i in range(n_models)]
    models = [tmp_path / f"in{i}" for i in range(1, n_models + 1)]
    kwargs = dict(weight=weights, chunk_size=8192, on_warning=lambda m: None)
    safeblend.merge(tmp_path / "in0", models, tmp_path / "cuda", device="cuda", **kwargs)
    safeblend.merge(tmp_path / "in0", models, tmp_path / "cpu", device="cpu", **kwargs)
    assert_outputs_match(tmp_path / "cuda", tmp_path / "cpu", inputs, weights)


@gpu
def test_pinned_staging_streams_and_bounded_device_memory(tmp_path, monkeypatch):
    reports: list[dict] = []

    class Recording(CudaExecutor):
        def run(self, writer, progress=None):
            stats = super().run(writer, progress)
            reports.append(self.report)
            return stats

    monkeypatch.setattr(safeblend.api, "CudaExecutor", Recording)
    for preset in ("tiny", "small"):
        write_pair(tmp_path / preset / "base", tmp_path / preset / "ft", PRESETS[preset])
        safeblend.merge(tmp_path / preset / "base", tmp_path / preset / "ft", tmp_path / preset / "out",
                     device="cuda", chunk_size="1MiB")
    for report in reports:
        assert report["pinned"], "host staging buffers must be page-locked"
        assert len(set(report["streams"])) == 3 and 0 not in report["streams"], "copies need their own streams"
        # Device memory: the preallocated slots plus the weights tensor, not the model size.
        assert report["peak_device_bytes"] <= report["device_buffer_bytes"] + 2**20, report
    assert reports[0]["device_buffer_bytes"] == reports[1]["device_buffer_bytes"]
