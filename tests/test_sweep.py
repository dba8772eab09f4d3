"""safeblend sweep: every output is the merge at its weight, byte for byte, from one read pass."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

import safeblend
from safeblend.checkpoint import SafetensorsFile, read_safetensors_header
from safeblend.cli import main
from safeblend.errors import OutputError, SpecError
from safeblend.abort import Abort
from safeblend.execute import BufferPool
from safeblend.lambda_sweep import SWEEPABLE, SweepExecutor, output_name, parse_weights
from safeblend.lambda_sweep import sweep as run_sweep
from tests.helpers import load_checkpoint, random_tensor, write_checkpoint

CHUNK = 4096  # bytes: several chunks per tensor, and tensors that end mid-chunk


def _pair(tmp_path: Path, seed: int = 0) -> tuple[Path, Path]:
    """A Llama-ish pair: bf16, fp16 and fp32 tensors, an int buffer, odd sizes, two input shards,
    a config and a tokenizer file to carry over."""
    rng = np.random.default_rng(seed)
    base = {
        "model.embed_tokens.weight": random_tensor(rng, (97, 33), "bf16"),
        "model.layers.0.self_attn.q_proj.weight": random_tensor(rng, (33, 33), "bf16"),
        "model.layers.0.mlp.up_proj.weight": random_tensor(rng, (71, 33), "fp16"),
        "model.layers.1.self_attn.q_proj.weight": random_tensor(rng, (33, 33), "bf16"),
        "model.layers.1.input_layernorm.weight": random_tensor(rng, (33,), "fp32"),
        "model.norm.weight": random_tensor(rng, (1,), "fp32"),
        "rotary.inv_freq_steps": np.arange(7, dtype=np.int64),
    }
    ft = {k: (v.astype(np.float64) + 0.1 * rng.standard_normal(v.shape)).astype(v.dtype)
          if v.dtype != np.int64 else v for k, v in base.items()}
    write_checkpoint(tmp_path / "base", base, shards=2, config={"model_type": "llama", "torch_dtype": "bfloat16"})
    (tmp_path / "base" / "tokenizer.json").write_text('{"version": "1.0"}')
    write_checkpoint(tmp_path / "ft", ft)
    return tmp_path / "base", tmp_path / "ft"


def _assert_same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{a.name}/{name} differs from the merge's"


@pytest.mark.parametrize("method", SWEEPABLE)
def test_every_output_equals_the_merge_at_its_weight_byte_for_byte(tmp_path, method):
    base, ft = _pair(tmp_path)
    weights = [0.1, 0.35, 0.9] if method != "task-arithmetic" else [0.5, 1.0, 1.5]
    result = run_sweep(base, ft, tmp_path / "sweep", weights, method=method, chunk_size=CHUNK, shard_size=6000)
    assert [Path(r.output).name for r in result.outputs] == [output_name(w) for w in weights]
    for w, r in zip(weights, result.outputs):
        single = safeblend.merge(base, ft, tmp_path / f"merge-{w}", method=method, weight=w, chunk_size=CHUNK,
                              shard_size=6000)
        _assert_same_files(Path(r.output), Path(single.output))
        assert r.shards == single.shards > 1  # several shards: the index and per-shard offsets are tested
        assert r.params == single.params and r.bytes_read == single.bytes_read
    assert (Path(result.outputs[0].output) / "tokenizer.json").exists()
    assert not list((tmp_path / "sweep").glob(".*"))  # no staging left behind


def test_recipe_metadata_is_each_outputs_own(tmp_path):
    base, ft = _pair(tmp_path)
    run_sweep(base, ft, tmp_path / "s", "0.2,0.6", chunk_size=CHUNK)
    for w in (0.2, 0.6):
        files = sorted((tmp_path / "s" / output_name(w)).glob("*.safetensors"))
        recipe = json.loads(read_safetensors_header(files[0]).metadata["safeblend_recipe"])
        assert recipe["weights"] == [w] and recipe["method"] == "linear"


def _count_views(monkeypatch) -> dict[Path, list[tuple[int, int]]]:
    """Record every byte range the engine takes from each input file (views and byte views)."""
    seen: dict[Path, list[tuple[int, int]]] = {}
    view, byte_view = SafetensorsFile.view, SafetensorsFile.byte_view

    def counting_view(self, info, first, count):
        size = info.dtype.itemsize
        seen.setdefault(self.path, []).append((info.start + first * size, count * size))
        return view(self, info, first, count)

    def counting_byte_view(self, start, length):
        if length:
            seen.setdefault(self.path, []).append((start, length))
        return byte_view(self, start, length)

    monkeypatch.setattr(SafetensorsFile, "view", counting_view)
    monkeypatch.setattr(SafetensorsFile, "byte_view", counting_byte_view)
    return seen


def test_the_inputs_are_read_once(tmp_path, monkeypatch):
    base, ft = _pair(tmp_path)
    seen = _count_views(monkeypatch)
    result = run_sweep(base, ft, tmp_path / "s", "0.1:0.9:0.1", chunk_size=CHUNK)
    assert len(result.outputs) == 9
    inputs = sorted([*base.glob("*.safetensors"), *ft.glob("*.safetensors")])
    viewed = 0
    for path in inputs:
        ranges = sorted(seen.pop(path.resolve(), None) or seen.pop(path))
        end = 0
        for start, length in ranges:  # no byte is taken twice
            assert start >= end, f"{path.name}: bytes from {start} read again"
            end = start + length
        viewed += sum(n for _, n in ranges)
    assert not seen
    data = sum(p.stat().st_size - 8 - int.from_bytes(p.read_bytes()[:8], "little") for p in inputs)
    # Every tensor byte once, except the fine-tune's int buffer: copied from the base, as in a merge.
    assert viewed == result.bytes_read == data - 7 * 8
    assert result.bytes_written == sum(r.bytes_written for r in result.outputs)


def test_slerp_reads_what_one_merge_reads_whatever_the_number_of_weights(tmp_path, monkeypatch):
    base, ft = _pair(tmp_path)
    one = safeblend.merge(base, ft, tmp_path / "m", method="slerp", weight=0.3, chunk_size=CHUNK)
    seen = _count_views(monkeypatch)
    many = run_sweep(base, ft, tmp_path / "s", "0.1:0.9:0.2", method="slerp", chunk_size=CHUNK)
    assert many.bytes_read == one.bytes_read  # reduce pass + map pass, shared by all five
    assert sum(n for ranges in seen.values() for _, n in ranges) == one.bytes_read


def test_memory_is_the_merge_pool_plus_one_chunk_per_extra_output(tmp_path):
    base, ft = _pair(tmp_path)
    sizes = []
    original = SweepExecutor._buffer_pool

    def spy(self, writer):
        pool = original(self, writer)
        sizes.append((pool._free.qsize(), writer.depth, self.workers))
        return pool

    SweepExecutor._buffer_pool = spy
    try:
        run_sweep(base, ft, tmp_path / "s", [0.2, 0.4, 0.6, 0.8], chunk_size=CHUNK, workers=2)
    finally:
        SweepExecutor._buffer_pool = original
    (count, depth, workers), = sizes
    assert count == depth + 2 * workers + 3


@pytest.mark.parametrize("text, expected", [
    ("0.1:0.9:0.1", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]),
    ("0.7:0.9:0.1", [0.7, 0.8, 0.9]),          # in floats (0.9 - 0.7) / 0.1 = 1.9999999999999996
    ("0:1:0.25", [0.0, 0.25, 0.5, 0.75, 1.0]),
    ("0:1:0.3", [0.0, 0.3, 0.6, 0.9]),          # stop not on the grid: not included
    ("0.1:0.9:0.2", [0.1, 0.3, 0.5, 0.7, 0.9]),
    ("0.5:0.5:0.1", [0.5]),
    ("0.2,0.5,0.8", [0.2, 0.5, 0.8]),
    (" 0.2 , 0.5 ", [0.2, 0.5]),
    ("0.6", [0.6]),
    ("-0.5,1.5", [-0.5, 1.5]),
])
def test_weight_lists_and_ranges(text, expected):
    assert parse_weights(text) == expected


def test_directory_names_are_the_shortest_round_trip():
    names = [output_name(w) for w in parse_weights("0.1:0.9:0.1")]
    assert names == [f"lambda-0.{i}" for i in range(1, 10)]
    assert output_name(1) == "lambda-1.0" and output_name(0.05) == "lambda-0.05"
    assert output_name(0.1 + 0.2) == "lambda-0.30000000000000004"  # what the user asked, not rounded away


@pytest.mark.parametrize("text, message", [
    ("0.1:0.9", "start:stop:step"),
    ("0.1:0.9:0", "step must be positive"),
    ("0.1:0.9:-0.1", "step must be positive"),
    ("0.9:0.1:0.1", "below start"),
    ("a,0.5", "'a' is not a number"),
    ("0.5,,0.6", "'' is not a number"),
    ("0.2,0.2", "given twice"),
    ("nan", "not a finite number"),
    ("0:1:0.0001", "more than 1000"),
])
def test_bad_weights(text, message):
    with pytest.raises(SpecError, match=message):
        parse_weights(text)


@pytest.mark.parametrize("method", ["ties", "dare-linear", "model-stock"])
def test_methods_without_a_single_weight_are_refused_clearly(tmp_path, method):
    base, ft = _pair(tmp_path)
    with pytest.raises(SpecError, match=r"cannot be swept.*linear, task-arithmetic, slerp"):
        run_sweep(base, ft, tmp_path / "s", "0.2,0.4", method=method)
    assert not (tmp_path / "s").exists()


def test_existing_output_needs_overwrite_and_nothing_is_half_done(tmp_path):
    base, ft = _pair(tmp_path)
    (tmp_path / "s" / "lambda-0.4").mkdir(parents=True)
    (tmp_path / "s" / "lambda-0.4" / "mine.txt").write_text("keep")
    with pytest.raises(OutputError, match="lambda-0.4: output already exists"):
        run_sweep(base, ft, tmp_path / "s", "0.2,0.4", chunk_size=CHUNK)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["lambda-0.4"]  # 0.2's staging removed
    assert (tmp_path / "s" / "lambda-0.4" / "mine.txt").read_text() == "keep"
    with pytest.raises(OutputError, match="not a previous safeblend output"):  # not safeblend's: kept
        run_sweep(base, ft, tmp_path / "s", "0.2,0.4", chunk_size=CHUNK, overwrite=True)
    assert (tmp_path / "s" / "lambda-0.4" / "mine.txt").read_text() == "keep"
    (tmp_path / "s" / "lambda-0.4" / "mine.txt").unlink()
    run_sweep(base, ft, tmp_path / "s", "0.2,0.4", chunk_size=CHUNK, overwrite=True)
    run_sweep(base, ft, tmp_path / "s", "0.2,0.4", chunk_size=CHUNK, overwrite=True)  # its own: replaced
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["lambda-0.2", "lambda-0.4"]


def test_a_failure_mid_pass_leaves_no_output(tmp_path, monkeypatch):
    base, ft = _pair(tmp_path)
    from safeblend.methods.linear import Linear

    calls = []
    original = Linear.merge_chunk

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            raise RuntimeError("disk on fire")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Linear, "merge_chunk", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        run_sweep(base, ft, tmp_path / "s", "0.2,0.4,0.6", chunk_size=CHUNK)
    assert list((tmp_path / "s").iterdir()) == []


def test_output_inside_an_input_is_refused(tmp_path):
    base, ft = _pair(tmp_path)
    with pytest.raises(SpecError, match="must not be, contain or lie inside an input"):
        run_sweep(base, ft, base / "sweep", "0.5")


def test_weight_keyword_is_refused(tmp_path):
    base, ft = _pair(tmp_path)
    with pytest.raises(SpecError, match="not weight="):
        run_sweep(base, ft, tmp_path / "s", "0.5", weight=0.3)


def test_lora_adapter_sweeps_like_it_merges(tmp_path):
    base, _ = _pair(tmp_path)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}))
    rng = np.random.default_rng(3)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj."
    save_file({prefix + "lora_A.weight": rng.standard_normal((2, 33)).astype(np.float32),
               prefix + "lora_B.weight": rng.standard_normal((33, 2)).astype(np.float32)},
              str(adapter / "adapter_model.safetensors"))
    result = run_sweep(base, adapter, tmp_path / "s", "0.3,0.7", chunk_size=CHUNK)
    for w, r in zip((0.3, 0.7), result.outputs):
        single = safeblend.merge(base, adapter, tmp_path / f"m{w}", weight=w, chunk_size=CHUNK)
        _assert_same_files(Path(r.output), Path(single.output))
    merged = load_checkpoint(tmp_path / "s" / "lambda-0.3")
    original = load_checkpoint(base)
    assert not np.array_equal(merged[prefix[len("base_model.model."):] + "weight"],
                              original["model.layers.0.self_attn.q_proj.weight"])


def test_cli_sweep_json_reports_every_output(tmp_path):
    base, ft = _pair(tmp_path)
    result = CliRunner().invoke(main, ["sweep", str(base), str(ft), "-o", str(tmp_path / "s"),
                                       "--weights", "0.25:0.75:0.25", "--json", "--chunk-size", "4096"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["weights"] == [0.25, 0.5, 0.75]
    assert [Path(o["output"]).name for o in summary["outputs"]] == ["lambda-0.25", "lambda-0.5", "lambda-0.75"]
    for key in ("bytes_read", "bytes_written", "seconds", "throughput_bytes_per_s", "peak_rss_bytes", "tensors"):
        assert key in summary and all(key in o for o in summary["outputs"])
    assert [o["params"]["weights"] for o in summary["outputs"]] == [[0.25], [0.5], [0.75]]


def test_cli_sweep_summary_and_errors(tmp_path):
    base, ft = _pair(tmp_path)
    runner = CliRunner()
    ok = runner.invoke(main, ["sweep", str(base), str(ft), "-o", str(tmp_path / "s"), "--weights", "0.5,0.6"])
    assert ok.exit_code == 0, ok.output
    assert "Swept 2 weights (linear)" in ok.stderr and "lambda-0.6" in ok.stderr and ok.stdout == ""
    again = runner.invoke(main, ["sweep", str(base), str(ft), "-o", str(tmp_path / "s"), "--weights", "0.5"])
    assert again.exit_code == 1 and "Error:" in again.stderr and "--overwrite" in again.stderr
    bad = runner.invoke(main, ["sweep", str(base), str(ft), "-o", str(tmp_path / "t"), "--weights", "0.9:0.1:0.1"])
    assert bad.exit_code == 2 and "below start" in bad.stderr and "Traceback" not in bad.output
    ties = runner.invoke(main, ["sweep", str(base), str(ft), "-o", str(tmp_path / "t"), "--weights", "0.5",
                                "--method", "ties"])
    assert ties.exit_code == 2 and "cannot be swept" in ties.stderr


def test_pool_hands_out_every_buffer_across_threads():
    pool = BufferPool(3, 16, Abort())
    taken = [pool.acquire() for _ in range(3)]
    assert len({id(b) for b in taken}) == 3
    for b in taken:
        pool.release(b)


def test_a_slow_oldest_chunk_never_starves_for_a_buffer(tmp_path, monkeypatch):
    """Each output's hasher keeps a written chunk's buffer until the bytes before it are
    written. While the oldest chunk is slow, the other worker runs ahead, and the buffers of
    every chunk it finishes wait on the slow one: with too many chunks in flight they take the
    whole pool, and the slow chunk never gets a buffer to finish with."""
    base, ft = _pair(tmp_path)
    original = SweepExecutor._process
    first_merge: list = []

    def slow_first(self, chunk, writer, pool):
        if chunk.tensor.action == "merge" and not first_merge:
            first_merge.append(chunk)
            time.sleep(1.0)  # the other worker finishes the next chunks meanwhile
        return original(self, chunk, writer, pool)

    monkeypatch.setattr(SweepExecutor, "_process", slow_first)
    finished: list = []

    def run() -> None:
        try:
            finished.append(run_sweep(base, ft, tmp_path / "s", "0.1:0.9:0.1", chunk_size=CHUNK))
        except BaseException as exc:  # noqa: BLE001
            finished.append(exc)

    thread = threading.Thread(target=run, daemon=True)  # a hang fails the test, not CI
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "the sweep hung: its oldest chunk found no buffer"
    assert len(finished) == 1 and not isinstance(finished[0], BaseException), finished
    assert len(finished[0].outputs) == 9


@pytest.mark.parametrize("run", ["merge", "sweep", "diff"])
def test_every_input_opened_is_closed_when_a_later_one_fails_to_open(tmp_path, monkeypatch, run):
    """An adapter that fails to open after the base was opened: the base is closed all the same
    (a sweep once opened its inputs outside its cleanup and leaked the base)."""
    from safeblend.checkpoint import Checkpoint
    from safeblend.errors import CheckpointError

    base, _ = _pair(tmp_path)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                             "target_modules": ["q_proj"]}))  # no weights file
    opened: list[Checkpoint] = []
    closed: list[Checkpoint] = []
    real_open, real_close = Checkpoint.open.__func__, Checkpoint.close

    def spy_open(cls, path):
        ckpt = real_open(cls, path)
        opened.append(ckpt)
        return ckpt

    def spy_close(self):
        closed.append(self)
        real_close(self)

    monkeypatch.setattr(Checkpoint, "open", classmethod(spy_open))
    monkeypatch.setattr(Checkpoint, "close", spy_close)
    with pytest.raises(CheckpointError):
        if run == "merge":
            safeblend.merge(base, adapter, tmp_path / "out", on_warning=lambda m: None)
        elif run == "sweep":
            run_sweep(base, adapter, tmp_path / "s", "0.2,0.8", on_warning=lambda m: None)
        else:
            safeblend.diff(base, adapter)
    assert opened and all(any(c is o for c in closed) for o in opened)
