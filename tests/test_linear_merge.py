"""The linear merge, end to end through safeblend.merge, against a float64 reference."""

from __future__ import annotations

import itertools
import json

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

import safeblend
from tests.helpers import NUMPY_DTYPES, assert_within_tolerance, load_checkpoint, random_tensor, write_checkpoint

DTYPES = ["bf16", "fp16", "fp32"]
# Shapes include the awkward ones: one element, odd counts, a non-power-of-two matrix, and
# sizes around the numpy backend's 65536-element block.
SHAPES = [(1,), (7,), (3, 5), (65536,), (65537,), (129, 513)]


def reference(base: np.ndarray, ft: np.ndarray, weight: float, out_dtype) -> np.ndarray:
    """θ_base + λ·(θ_ft − θ_base) in float64 on upcast inputs, rounded to the output dtype."""
    b, f = base.astype(np.float64), ft.astype(np.float64)
    return (b + weight * (f - b)).astype(out_dtype).astype(np.float64)


def _pair(tmp_path, base_dtype, ft_dtype, shapes, shards=1, seed=0):
    rng = np.random.default_rng(seed)
    base = {f"layer.{i}.weight": random_tensor(rng, s, base_dtype) for i, s in enumerate(shapes)}
    ft = {n: (t.astype(np.float64) + random_tensor(rng, t.shape, "fp64", 0.1)).astype(NUMPY_DTYPES[ft_dtype])
          for n, t in base.items()}
    write_checkpoint(tmp_path / "base", base, shards=shards)
    write_checkpoint(tmp_path / "ft", ft, shards=shards)
    return base, ft


@pytest.mark.parametrize("base_dtype,ft_dtype", list(itertools.product(DTYPES, DTYPES)))
@pytest.mark.parametrize("out_dtype", ["auto", "bf16", "fp32"])
def test_every_dtype_combination_matches_float64(tmp_path, base_dtype, ft_dtype, out_dtype):
    base, ft = _pair(tmp_path, base_dtype, ft_dtype, SHAPES)
    safeblend.merge(tmp_path / "base", tmp_path / "ft", tmp_path / "out", weight=0.6, dtype=out_dtype,
                 chunk_size=4096)
    merged = load_checkpoint(tmp_path / "out")
    for name, b in base.items():
        want_dtype = b.dtype if out_dtype == "auto" else NUMPY_DTYPES[out_dtype]
        assert merged[name].dtype == want_dtype
        assert merged[name].shape == b.shape
        ref = reference(b, ft[name], 0.6, want_dtype)
        assert_within_tolerance(merged[name], ref, [b, ft[name]], name)


@pytest.mark.parametrize("weight", [0.0, 1.0, 0.1, 0.9, -0.5, 1.7])
def test_weights_including_extrapolation(tmp_path, weight):
    base, ft = _pair(tmp_path, "bf16", "bf16", [(33, 77)])
    safeblend.merge(tmp_path / "base", tmp_path / "ft", tmp_path / "out", weight=weight, on_warning=lambda m: None)
    out = load_checkpoint(tmp_path / "out")["layer.0.weight"]
    b, f = base["layer.0.weight"], ft["layer.0.weight"]
    assert_within_tolerance(out, reference(b, f, weight, b.dtype), [b, f])
    if weight in (0.0, 1.0):  # the endpoints reproduce an input exactly
        assert np.array_equal(out.view(np.uint16), (b if weight == 0.0 else f).view(np.uint16))


def test_weight_outside_unit_interval_warns(tmp_path):
    _pair(tmp_path, "fp32", "fp32", [(4,)])
    seen = []
    result = safeblend.merge(tmp_path / "base", tmp_path / "ft", tmp_path / "out", weight=1.5, on_warning=seen.append)
    assert any("outside [0, 1]" in m for m in seen)
    assert result.warnings == seen


@pytest.mark.parametrize("chunk_size", [2, 4096, 65536 * 4 + 6, 16 * 2**20])
def test_chunk_size_does_not_change_the_bytes(tmp_path, chunk_size):
    _pair(tmp_path, "bf16", "fp32", [(257, 131), (1000,)])
    safeblend.merge(tmp_path / "base", tmp_path / "ft", tmp_path / "whole", weight=0.3)
    safeblend.merge(tmp_path / "base", tmp_path / "ft", tmp_path / "chunked", weight=0.3, chunk_size=chunk_size)
    whole = (tmp_path / "whole" / "model.safetensors").read_bytes()
    assert (tmp_path / "chunked" / "model.safetensors").read_bytes() == whole


def test_nan_and_inf_follow_the_formula(tmp_path):
    specials = np.array([np.nan, np.inf, -np.inf, 1.0, 0.0, 3e38], dtype=np.float32)
    base, ft = (a.ravel() for a in np.meshgrid(specials, specials))
    write_checkpoint(tmp_path / "base", {"w": base.astype(ml_dtypes.bfloat16)})
    write_checkpoint(tmp_path / "ft", {"w": ft})
    safeblend.merge(tmp_path / "base", tmp_path / "ft", tmp_path / "out", weight=0.5, dtype="bf16")
    out = load_checkpoint(tmp_path / "out")["w"]
    with np.errstate(invalid="ignore", over="ignore"):
        ref = reference(base.astype(ml_dtypes.bfloat16), ft, 0.5, ml_dtypes.bfloat16)
    assert np.array_equal(np.isnan(out.astype(np.float64)), np.isnan(ref))
    finite_or_inf = ~np.isnan(ref)
    assert np.array_equal(out.astype(np.float64)[finite_or_inf], ref[finite_or_inf])


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.int8, np.uint8, np.bool_])
def test_integer_and_bool_tensors_are_copied_from_the_base(tmp_path, dtype):
    rng = np.random.default_rng(1)
    values = rng.integers(0, 2 if dtype is np.bool_ else 100, size=(17, 3)).astype(dtype)
    write_checkpoint(tmp_path / "base", {"buf": values, "w": np.ones(3, np.float32)})
    write_checkpoint(tmp_path / "ft", {"buf": (values == 0).astype(dtype), "w": np.zeros(3, np.float32)})
    safeblend.merge(tmp_path / "base", tmp_path / "ft", tmp_path / "out", weight=0.5, dtype="bf16")
    out = load_checkpoint(tmp_path / "out")
    assert out["buf"].dtype == dtype and np.array_equal(out["buf"], values)
    assert out["w"].dtype == ml_dtypes.bfloat16


@pytest.mark.parametrize("in_shards", [1, 3])
def test_sharded_output_has_hf_names_index_and_metadata(tmp_path, in_shards):
    base, ft = _pair(tmp_path, "bf16", "bf16", [(64, 64)] * 6, shards=in_shards)
    result = safeblend.merge(tmp_path / "base", tmp_path / "ft", tmp_path / "out", weight=0.25, shard_size=3 * 8192)
    out = tmp_path / "out"
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert files == [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    assert result.shards == 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(b.nbytes for b in base.values())
    assert set(index["weight_map"]) == set(base)
    for f in files:
        with safe_open(str(out / f), framework="numpy") as handle:
            meta = handle.metadata()
            assert set(handle.keys()) == {n for n, s in index["weight_map"].items() if s == f}
        assert meta["format"] == "pt"
        recipe = json.loads(meta["safeblend_recipe"])
        assert recipe["method"] == "linear" and recipe["weights"] == [0.25]
    merged = load_checkpoint(out)
    for name, b in base.items():
        assert_within_tolerance(merged[name], reference(b, ft[name], 0.25, b.dtype), [b, ft[name]], name)


def test_single_file_inputs_and_companion_files(tmp_path):
    rng = np.random.default_rng(3)
    tensors = {"a": random_tensor(rng, (5, 5), "fp16")}
    write_checkpoint(tmp_path / "base", tensors, config={"model_type": "llama", "torch_dtype": "float16"})
    (tmp_path / "base" / "tokenizer.json").write_text("{}")
    (tmp_path / "base" / "generation_config.json").write_text('{"do_sample": false}')
    (tmp_path / "base" / "notes.bin").write_text("not copied")
    write_checkpoint(tmp_path / "ft", tensors)
    safeblend.merge(tmp_path / "base", tmp_path / "ft" / "model.safetensors", tmp_path / "out", dtype="bf16")
    out = tmp_path / "out"
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (out / "tokenizer.json").read_text() == "{}"
    assert (out / "generation_config.json").exists() and not (out / "notes.bin").exists()


def test_result_reports_the_run(tmp_path):
    base, _ = _pair(tmp_path, "bf16", "bf16", [(100, 10)])
    r = safeblend.merge(tmp_path / "base", tmp_path / "ft", tmp_path / "out", weight=0.6, device="cpu")
    assert r.method == "linear" and r.device == "cpu" and r.tensors == 1 and r.shards == 1
    assert r.bytes_read == 2 * base["layer.0.weight"].nbytes
    assert r.bytes_written == (tmp_path / "out" / "model.safetensors").stat().st_size
    assert r.peak_rss_bytes > 0 and r.seconds > 0
    assert json.loads(json.dumps(r.to_dict()))["output"] == str(tmp_path / "out")


def _mapped_input_rss(directory) -> int:
    """Resident bytes of this process's memory maps of files under ``directory``."""
    total, current = 0, ""
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:
                current = fields[5] if len(fields) >= 6 else ""
            elif fields[0] == "Rss:" and current.startswith(str(directory)):
                total += int(fields[1]) * 1024
    return total


def test_consumed_input_pages_leave_the_process(tmp_path, monkeypatch):
    """After the chunk loop, no input page is still mapped into the process: RSS cannot grow
    with the model, whatever the number of chunk boundaries (here ~500 per input)."""
    from safeblend import execute

    _pair(tmp_path, "bf16", "bf16", [(1024, 4096), (4096,), (777, 1000)])
    seen: list[int] = []
    original = execute.Executor.run

    def run_then_measure(self, *args, **kwargs):
        stats = original(self, *args, **kwargs)
        seen.append(_mapped_input_rss(tmp_path))
        return stats

    monkeypatch.setattr(execute.Executor, "run", run_then_measure)
    safeblend.merge(tmp_path / "base", tmp_path / "ft", tmp_path / "out", weight=0.5, chunk_size=16384)
    assert seen == [0]
