"""Every bad input gives one clear line naming the file, a non-zero exit and nothing at OUT."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from click.testing import CliRunner

from safeblend.checkpoint import Checkpoint, read_safetensors_header
from safeblend.cli import main
from safeblend.errors import CheckpointError
from tests.helpers import write_checkpoint


def _raw_safetensors(path, header: dict | bytes, data: bytes = b"", declared_len: int | None = None):
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(body) if declared_len is None else declared_len
    path.write_bytes(struct.pack("<Q", length) + body + data)
    return path


@pytest.fixture
def good_pair(tmp_path):
    tensors = {"a": np.ones((4, 4), np.float32), "b": np.zeros(3, np.float32)}
    write_checkpoint(tmp_path / "base", tensors)
    write_checkpoint(tmp_path / "ft", tensors)
    return tmp_path


def _break_missing_path(tmp):
    return tmp / "nope", "no such file or directory"


def _break_empty_dir(tmp):
    (tmp / "empty").mkdir()
    return tmp / "empty", "no .safetensors files"


def _break_bin_only(tmp):
    (tmp / "pt").mkdir()
    (tmp / "pt" / "pytorch_model.bin").write_bytes(b"x")
    return tmp / "pt", "only safetensors is read"


def _break_index_missing_shard(tmp):
    d = write_checkpoint(tmp / "sharded", {"a": np.ones((4, 4), np.float32), "b": np.zeros(3, np.float32)}, shards=2)
    (d / "model-00002-of-00002.safetensors").unlink()
    return d, "names shard 'model-00002-of-00002.safetensors', which does not exist"


def _break_truncated(tmp):
    d = write_checkpoint(tmp / "trunc", {"a": np.ones((4, 4), np.float32), "b": np.zeros(3, np.float32)})
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-5])
    return d, "truncated"


def _break_corrupt_json(tmp):
    (tmp / "bad").mkdir()
    _raw_safetensors(tmp / "bad" / "model.safetensors", b'{"a": {"dtype": "F32", ')
    return tmp / "bad", "header is not valid JSON"


def _break_header_beyond_file(tmp):
    (tmp / "long").mkdir()
    _raw_safetensors(tmp / "long" / "model.safetensors", b"{}", declared_len=4096)
    return tmp / "long", "runs past the end"


def _break_duplicate_across_shards(tmp):
    d = tmp / "dup"
    d.mkdir()
    from safetensors.numpy import save_file

    save_file({"a": np.ones((4, 4), np.float32)}, str(d / "one.safetensors"))
    save_file({"a": np.ones((4, 4), np.float32), "b": np.zeros(3, np.float32)}, str(d / "two.safetensors"))
    return d, "stored twice"


def _break_names(tmp):
    return write_checkpoint(tmp / "names", {"a": np.ones((4, 4), np.float32), "c": np.zeros(3, np.float32)}), \
        "tensor names differ"


def _break_shapes(tmp):
    return write_checkpoint(tmp / "shapes", {"a": np.ones((4, 5), np.float32), "b": np.zeros(3, np.float32)}), \
        "has shape [4, 5] but the base's is [4, 4]"


BAD_FT = [_break_missing_path, _break_empty_dir, _break_bin_only, _break_index_missing_shard, _break_truncated,
          _break_corrupt_json, _break_header_beyond_file, _break_duplicate_across_shards, _break_names, _break_shapes]


@pytest.mark.parametrize("breaker", BAD_FT, ids=lambda f: f.__name__[7:])
def test_bad_fine_tuned_input_is_one_clear_line(good_pair, breaker):
    bad, message = breaker(good_pair)
    out = good_pair / "out"
    result = CliRunner().invoke(main, ["merge", str(good_pair / "base"), str(bad), "-o", str(out), "-q"])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert message in lines[0] and str(bad.name) in lines[0]
    assert "Traceback" not in result.output
    assert not out.exists()
    assert not list(good_pair.glob(".out*")), "no partial output left beside OUT"


def test_existing_output_is_refused_and_untouched(good_pair):
    out = good_pair / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["merge", str(good_pair / "base"), str(good_pair / "ft"), "-o", str(out), "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "already exists" in result.output and "--overwrite" in result.output
    assert (out / "keep.txt").read_text() == "mine"
    result = CliRunner().invoke(main, args + ["--overwrite"])  # not safeblend's output: still refused
    assert result.exit_code == 1 and "not a previous safeblend output" in result.output
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    result = CliRunner().invoke(main, args + ["--overwrite"])  # an empty directory may be replaced
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").exists()


def test_output_inside_an_input_is_refused(good_pair):
    result = CliRunner().invoke(main, ["merge", str(good_pair / "base"), str(good_pair / "ft"),
                                       "-o", str(good_pair / "base" / "merged")])
    assert result.exit_code == 2 and "must not be, contain or lie inside an input" in result.output


@pytest.mark.parametrize("args,message", [
    (["--shard-size", "5XB"], "cannot read '5XB' as a size"),
    (["--dtype", "int8"], "Invalid value for '--dtype'"),
    (["--method", "nope"], "Invalid value for '--method'"),
    (["--device", "tpu"], "Invalid value for '--device'"),
])
def test_usage_errors_exit_2(good_pair, args, message):
    result = CliRunner().invoke(main, ["merge", str(good_pair / "base"), str(good_pair / "ft"),
                                       "-o", str(good_pair / "out"), *args])
    assert result.exit_code == 2 and message in result.output
    assert not (good_pair / "out").exists()


def test_debug_shows_the_traceback(good_pair):
    result = CliRunner().invoke(main, ["merge", str(good_pair / "base"), str(good_pair / "nope"),
                                       "-o", str(good_pair / "out"), "--debug"])
    assert result.exit_code != 0 and isinstance(result.exception, CheckpointError)


# Header validation, one failure mode per case, straight at the parser.
HEADERS = [
    ({"a": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "unknown dtype 'F33'"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "needs 8"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "non-negative integers"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4, "data_offsets must be"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}, b"\0" * 8, "overlaps"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "leaves a gap"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 9, "not described by the header"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 2, "truncated"),
    ({"a": [1, 2]}, b"", "entry must be an object"),
    ({"__metadata__": {"k": 1}}, b"", "__metadata__ must map strings to strings"),
    (b"[1, 2]", b"", "header must be a JSON object"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
     b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4, "appears twice"),
    (b"\xff\xfe", b"", "not valid JSON"),
]


@pytest.mark.parametrize("header,data,message", HEADERS, ids=[h[2] for h in HEADERS])
def test_header_validation(tmp_path, header, data, message):
    path = _raw_safetensors(tmp_path / "x.safetensors", header, data)
    with pytest.raises(CheckpointError, match=message) as info:
        read_safetensors_header(path)
    assert str(path) in str(info.value)


def test_too_short_file(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"\1\2")
    with pytest.raises(CheckpointError, match="too short"):
        Checkpoint.open(tmp_path / "x.safetensors")


def test_index_listing_a_tensor_not_in_its_shard(tmp_path):
    d = write_checkpoint(tmp_path / "m", {"a": np.ones(2, np.float32), "b": np.ones(2, np.float32)}, shards=2)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["a"] = "model-00002-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="'a' is listed in model-00002-of-00002.safetensors but not stored"):
        Checkpoint.open(d)


def test_several_files_without_index_are_one_model(tmp_path):
    from safetensors.numpy import save_file

    (tmp_path / "m").mkdir()
    save_file({"a": np.ones(2, np.float32)}, str(tmp_path / "m" / "part1.safetensors"))
    save_file({"b": np.ones(3, np.float16)}, str(tmp_path / "m" / "part2.safetensors"))
    ckpt = Checkpoint.open(tmp_path / "m")
    assert list(ckpt.tensors) == ["a", "b"] and ckpt.tensors["b"].shape == (3,)
