"""Property tests of the safetensors header parser and the index reader.

Whatever the bytes — random, mutated from a valid file, huge declared lengths, deep JSON,
wrong types, overlapping offsets — opening must either succeed with a consistent result or
raise CheckpointError; never another exception, never hang, never allocate beyond a small
bound. Examples are derandomized (reproducible in CI): 10,200 generated inputs in total
(3,000 structured, 2,500 mutated, 2,500 random, 400 deep, 800 overlapping, 1,000 indexes).
Inputs that found bugs live in tests/fuzz_corpus/ and are replayed by ``test_corpus``.
"""

from __future__ import annotations

import json
import struct
import tempfile
import time
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safeblend.checkpoint import INDEX_NAME, Checkpoint, read_safetensors_header
from safeblend.dtypes import DTYPES
from safeblend.errors import CheckpointError

CORPUS = Path(__file__).parent / "fuzz_corpus"
_COMMON = dict(deadline=None, derandomize=True, database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, **_COMMON)
# tmpfs when there is one: thousands of small rewrites of one file are slow on a disk filesystem.
_SCRATCH = Path(tempfile.mkdtemp(prefix="safeblend-fuzz-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))


def _file(data: bytes, name: str = "x.safetensors") -> Path:
    path = _SCRATCH / name
    path.write_bytes(data)
    return path


def _parse(data: bytes) -> None:
    """Parse ``data`` as a safetensors file: a consistent result or CheckpointError, quickly."""
    started = time.perf_counter()
    try:
        parsed = read_safetensors_header(_file(data))
    except CheckpointError as exc:
        assert str(exc)
    else:  # accepted: its ranges tile the data region exactly
        ends = sorted((t.start, t.start + t.nbytes) for t in parsed.tensors.values())
        cursor = 8 + struct.unpack("<Q", data[:8])[0]
        for lo, hi in ends:
            assert lo == cursor
            cursor = hi
        assert cursor == len(data)
    assert time.perf_counter() - started < 2.0, "parser took over 2 s"


def _with_prefix(body: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(body)) + body + data


# -- strategies ------------------------------------------------------------------------------

_ints = st.one_of(st.integers(0, 64), st.integers(-5, -1), st.integers(2**31, 2**70), st.booleans(),
                  st.floats(allow_nan=False, allow_infinity=False), st.just(None), st.text(max_size=3))
_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8))
_json = st.recursive(_json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                     max_leaves=6)


@st.composite
def _entries(draw) -> dict:
    """Mostly-plausible tensor entries: right keys, sometimes wrong types or values."""
    entry: dict = {}
    if draw(st.booleans()) or draw(st.booleans()):
        entry["dtype"] = draw(st.one_of(st.sampled_from(sorted(DTYPES)), st.text(max_size=5), _ints))
    if draw(st.integers(0, 5)):
        entry["shape"] = draw(st.one_of(st.lists(st.integers(0, 9), max_size=4), st.lists(_ints, max_size=4), _ints))
    if draw(st.integers(0, 5)):
        entry["data_offsets"] = draw(st.one_of(st.lists(st.integers(0, 600), min_size=2, max_size=2),
                                               st.lists(_ints, max_size=3), _ints))
    if draw(st.integers(0, 8)) == 0:
        entry.update(draw(st.dictionaries(st.text(max_size=5), _json, max_size=2)))
    return entry if draw(st.integers(0, 12)) else draw(_json)


@st.composite
def _headers(draw) -> bytes:
    """A file: JSON header of random entries (+ maybe metadata), a data region of some length."""
    header = draw(st.dictionaries(st.text(min_size=1, max_size=8), _entries(), max_size=5))
    if draw(st.integers(0, 3)) == 0:
        header["__metadata__"] = draw(st.one_of(st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2),
                                                _json))
    body = json.dumps(header).encode()
    declared = draw(st.one_of(st.just(len(body)), st.just(len(body)), st.integers(0, 2**64 - 1),
                              st.integers(max(0, len(body) - 3), len(body) + 3)))
    data = b"\0" * draw(st.integers(0, 700))
    return struct.pack("<Q", declared) + body + data


@st.composite
def _valid_files(draw) -> bytes:
    """A valid file: contiguous tensors of real dtypes and shapes."""
    names = draw(st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=4, unique=True))
    header, cursor = {}, 0
    for name in names:
        dtype = draw(st.sampled_from(sorted(DTYPES)))
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        n = DTYPES[dtype].bits
        for d in shape:
            n *= d
        if n % 8:  # packed F4/F6: four more elements end on a byte boundary
            shape, n = [*shape, 4], n * 4
        n //= 8
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [cursor, cursor + n]}
        cursor += n
    return _with_prefix(json.dumps(header).encode(), b"\1" * cursor)


# -- properties ------------------------------------------------------------------------------


@fuzz(3000)
@given(_headers())
def test_structured_headers(data):
    _parse(data)


@fuzz(2500)
@given(_valid_files(), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4),
       st.one_of(st.none(), st.integers(0, 10**6)))
def test_mutated_valid_files(data, flips, cut):
    mutated = bytearray(data)
    for position, value in flips:
        mutated[position % len(mutated)] = value
    if cut is not None:
        mutated = mutated[: cut % (len(mutated) + 1)]
    _parse(bytes(mutated))


@fuzz(2500)
@given(st.binary(max_size=300), st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_random_bytes(body, declared):
    _parse((struct.pack("<Q", declared) + body) if declared is not None else body)


@fuzz(400)
@given(st.integers(1, 60000), st.sampled_from(["[", "{\"a\":", "[{\"b\":"]))
def test_deep_nesting(depth, opener):
    _parse(_with_prefix(opener.encode() * depth))


@fuzz(800)
@given(st.lists(st.tuples(st.integers(0, 64), st.integers(0, 64)), min_size=2, max_size=5))
def test_overlapping_offsets(ranges):
    header = {f"t{i}": {"dtype": "U8", "shape": [max(0, hi - lo)], "data_offsets": [lo, max(lo, hi)]}
              for i, (lo, hi) in enumerate(ranges)}
    end = max(max(lo, hi) for lo, hi in ranges)
    _parse(_with_prefix(json.dumps(header).encode(), b"\0" * end))


@fuzz(1000)
@given(st.one_of(_json, st.dictionaries(st.sampled_from(["weight_map", "metadata"]),
                                        st.one_of(_json, st.dictionaries(st.text(max_size=6), st.one_of(
                                            st.sampled_from(["model.safetensors", "other.safetensors", "../x",
                                                             "a/b.safetensors", "", ".", "x\0.safetensors",
                                                             "pytorch_model.bin"]),
                                            _json), max_size=4)), max_size=2)),
       st.booleans())
def test_index_reader(index, raw_garbage):
    root = _SCRATCH / "indexed"
    root.mkdir(exist_ok=True)
    (root / "model.safetensors").write_bytes(
        _with_prefix(json.dumps({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}).encode(), b"\0"))
    text = json.dumps(index) if not raw_garbage else json.dumps(index)[:-1]
    (root / INDEX_NAME).write_text(text)
    try:
        ckpt = Checkpoint.open(root)
    except CheckpointError:
        return
    assert set(ckpt.tensors) <= {"a"}
    ckpt.close()


def test_memory_stays_bounded_on_hostile_headers():
    """Huge declared lengths, huge shapes and deep nesting allocate at most a few MB."""
    cases = [struct.pack("<Q", 2**64 - 1) + b"{}", struct.pack("<Q", 99_999_999) + b"{}",
             _with_prefix(json.dumps({"a": {"dtype": "F32", "shape": [2**62] * 2000, "data_offsets": [0, 4]}}).encode(),
                          b"\0" * 4),
             _with_prefix(b"[" * 200_000)]
    for data in cases:
        path = _file(data)
        tracemalloc.start()
        try:
            read_safetensors_header(path)
        except CheckpointError:
            pass
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 8 * len(data) + 4 * 2**20, f"{peak} bytes for a {len(data)}-byte file"


@pytest.mark.parametrize("case", sorted(p.name for p in CORPUS.iterdir()), ids=str)
def test_corpus(case, tmp_path):
    """Every input that once found a bug still gives CheckpointError (or parses), quickly."""
    data = (CORPUS / case).read_bytes()
    started = time.perf_counter()
    if case.endswith(".index.json"):
        (tmp_path / "model.safetensors").write_bytes(
            _with_prefix(json.dumps({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}).encode(), b"\0"))
        (tmp_path / INDEX_NAME).write_bytes(data)
        with pytest.raises(CheckpointError):
            Checkpoint.open(tmp_path)
    elif case.startswith("lone-surrogate"):
        read_safetensors_header(_file(data))  # odd but valid
    else:
        with pytest.raises(CheckpointError):
            read_safetensors_header(_file(data))
    assert time.perf_counter() - started < 1.0
