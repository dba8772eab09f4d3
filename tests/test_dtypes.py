"""Every dtype safetensors 0.8 knows is read, validated as safetensors validates it, and copied
byte for byte where it is not merged (fp8 variants, E8M0, packed F4/F6, C64)."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner
from safetensors import safe_open

import safeblend
from safeblend.checkpoint import read_safetensors_header
from safeblend.cli import main
from safeblend.errors import CheckpointError
from tests.helpers import read_raw_safetensors, write_raw_safetensors

# Every dtype name in safetensors 0.8's Dtype enum, with its bits per element (its format spec).
SAFETENSORS_BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
    "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}
# Shapes whose bit count is a whole number of bytes for every dtype (F4: 2 per byte, F6: 4 per 3).
SHAPES = {"F4": [3, 2], "F6_E2M3": [2, 4], "F6_E3M2": [4, 2]}
NOT_MERGED = ["F4", "F6_E2M3", "F6_E3M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F8_E4M3", "F8_E5M2", "C64",
              "U8", "I64", "BOOL"]


def _raw(rng: np.random.Generator, dtype: str, shape: list[int]) -> bytes:
    nbytes = int(np.prod(shape)) * SAFETENSORS_BITS[dtype] // 8
    if dtype == "BOOL":
        return rng.integers(0, 2, nbytes, dtype=np.uint8).tobytes()
    return rng.integers(0, 256, nbytes, dtype=np.uint8).tobytes()


def _golden(path, seed: int) -> dict:
    """One file with a tensor of each not-merged dtype and a bf16 weight that is merged."""
    rng = np.random.default_rng(seed)
    tensors = {f"t.{d.lower()}": (d, SHAPES.get(d, [2, 3]), _raw(rng, d, SHAPES.get(d, [2, 3]))) for d in NOT_MERGED}
    tensors["w"] = ("BF16", [4, 4], rng.standard_normal(16).astype(ml_dtypes.bfloat16).tobytes())
    path.mkdir()
    write_raw_safetensors(path / "model.safetensors", tensors)
    return tensors


def test_every_safetensors_dtype_is_known_with_its_bits():
    from safeblend.dtypes import DTYPES

    assert {name: d.bits for name, d in DTYPES.items()} == SAFETENSORS_BITS


@pytest.mark.parametrize("dtype", sorted(SAFETENSORS_BITS))
def test_each_dtype_is_read_as_safetensors_reads_it(tmp_path, dtype):
    shape = SHAPES.get(dtype, [2, 3])
    raw = _raw(np.random.default_rng(0), dtype, shape)
    path = write_raw_safetensors(tmp_path / "x.safetensors", {"t": (dtype, shape, raw)})
    with safe_open(str(path), "numpy"):  # the reference implementation accepts the file
        pass
    info = read_safetensors_header(path).tensors["t"]
    assert (info.dtype.name, list(info.shape), info.nbytes) == (dtype, shape, len(raw))


@pytest.mark.parametrize("dtype, shape, nbytes", [
    ("F4", [3], 2), ("F4", [1, 3], 1), ("F6_E2M3", [3], 3), ("F6_E3M2", [2], 2), ("F6_E2M3", [5], 4),
])
def test_packed_shapes_that_end_mid_byte_are_refused_like_safetensors(tmp_path, dtype, shape, nbytes):
    path = write_raw_safetensors(tmp_path / "x.safetensors", {"t": (dtype, shape, bytes(nbytes))})
    with pytest.raises(Exception):
        with safe_open(str(path), "numpy"):
            pass
    with pytest.raises(CheckpointError, match="not a whole number of bytes"):
        read_safetensors_header(path)


@pytest.mark.parametrize("dtype, shape, nbytes", [("F4", [4], 1), ("F4", [4], 4), ("F6_E3M2", [4], 4),
                                                   ("C64", [2], 8), ("F8_E8M0", [3], 2)])
def test_wrong_byte_length_is_refused(tmp_path, dtype, shape, nbytes):
    path = write_raw_safetensors(tmp_path / "x.safetensors", {"t": (dtype, shape, bytes(nbytes))})
    with pytest.raises(CheckpointError, match="needs"):
        read_safetensors_header(path)


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden")
    base = _golden(root / "base", 1)
    ft = _golden(root / "ft", 2)
    return root, base, ft


def test_merge_copies_every_unmerged_dtype_byte_for_byte(golden, tmp_path):
    root, base, ft = golden
    messages = []
    safeblend.merge(root / "base", root / "ft", tmp_path / "out", weight=0.5, on_warning=messages.append)
    out = read_raw_safetensors(tmp_path / "out" / "model.safetensors")
    for name, (dtype, shape, raw) in base.items():
        if name == "w":
            continue
        assert out[name] == (dtype, shape, raw), name
    w = np.frombuffer(out["w"][2], ml_dtypes.bfloat16).astype(np.float64)
    a = np.frombuffer(base["w"][2], ml_dtypes.bfloat16).astype(np.float64)
    b = np.frombuffer(ft["w"][2], ml_dtypes.bfloat16).astype(np.float64)
    np.testing.assert_array_equal(w, (0.5 * a + 0.5 * b).astype(ml_dtypes.bfloat16).astype(np.float64))
    assert any("copied from the base" in m for m in messages)
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "numpy") as f:  # the library reads it
        assert set(f.keys()) == set(base)
        np.testing.assert_array_equal(f.get_tensor("t.c64"), np.frombuffer(base["t.c64"][2], np.complex64).reshape(2, 3))


def test_small_chunks_split_packed_and_fp8_tensors_on_byte_boundaries(golden, tmp_path):
    root, base, _ = golden
    safeblend.merge(root / "base", root / "ft", tmp_path / "out", weight=0.5, chunk_size=1, on_warning=lambda m: None)
    out = read_raw_safetensors(tmp_path / "out" / "model.safetensors")
    assert all(out[n] == base[n] for n in base if n != "w")


def test_cli_inspect_verify_diff_and_sweep_read_every_dtype(golden, tmp_path):
    root, base, _ = golden
    runner = CliRunner()
    result = runner.invoke(main, ["inspect", str(root / "base"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["dtypes"]["F4"] == {"tensors": 1, "bytes": 3}
    assert summary["dtypes"]["F6_E2M3"] == {"tensors": 1, "bytes": 6}
    assert summary["parameters"] == sum(int(np.prod(s)) for _, s, _ in base.values())
    result = runner.invoke(main, ["merge", str(root / "base"), str(root / "ft"), "-o", str(tmp_path / "m"), "--quiet"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["verify", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["diff", str(root / "base"), str(root / "ft"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert "t.f4" in json.dumps(report)
    result = runner.invoke(main, ["sweep", str(root / "base"), str(root / "ft"), "-o", str(tmp_path / "s"),
                                  "--weights", "0.2,0.8", "--quiet"])
    assert result.exit_code == 0, result.output
    for d in ("lambda-0.2", "lambda-0.8"):
        out = read_raw_safetensors(tmp_path / "s" / d / "model.safetensors")
        assert all(out[n] == base[n] for n in base if n != "w")
