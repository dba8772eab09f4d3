"""Real-world checkpoint quirks: resized vocabularies, tied embeddings, tensors only one model
has, PyTorch .bin checkpoints."""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
import pytest

from safeblend import merge
from safeblend.checkpoint import Checkpoint
from safeblend.errors import CheckpointError, IncompatibleInputsError
from tests.helpers import assert_within_tolerance, load_checkpoint, random_tensor, write_checkpoint

H = 64


def _lerp(a, b, w):
    ref = (1 - w) * np.asarray(a, np.float64) + w * np.asarray(b, np.float64)
    return ref.astype(a.dtype)


def _model(rng, vocab: int, head: bool = True, dtype: str = "bf16") -> dict:
    t = {"model.embed_tokens.weight": random_tensor(rng, (vocab, H), dtype),
         "model.layers.0.mlp.up_proj.weight": random_tensor(rng, (3 * H, H), dtype),
         "model.norm.weight": random_tensor(rng, (H,), dtype)}
    if head:
        t["lm_head.weight"] = random_tensor(rng, (vocab, H), dtype)
    return t


@pytest.mark.parametrize("out_dtype", ["auto", "fp32"])
def test_resized_vocabulary_merges_shared_rows_and_takes_added_rows(tmp_path, out_dtype):
    rng = np.random.default_rng(1)
    base, ft = _model(rng, 100), _model(rng, 108)
    write_checkpoint(tmp_path / "base", base, config={"vocab_size": 100, "tie_word_embeddings": False})
    write_checkpoint(tmp_path / "ft", ft, config={"vocab_size": 108, "tie_word_embeddings": False})
    (tmp_path / "base" / "tokenizer.json").write_text('{"vocab": "base"}')
    (tmp_path / "ft" / "tokenizer.json").write_text('{"vocab": "ft, with added tokens"}')
    warnings: list[str] = []
    result = merge(tmp_path / "base", tmp_path / "ft", tmp_path / "out", weight=0.6, dtype=out_dtype,
                   chunk_size="4KiB", on_warning=warnings.append)
    out = load_checkpoint(tmp_path / "out")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert out[name].shape == (108, H)
        shared = _lerp(base[name], ft[name][:100], 0.6)
        if out_dtype == "fp32":
            shared = (0.4 * base[name].astype(np.float64) + 0.6 * ft[name][:100].astype(np.float64)).astype(np.float32)
        assert_within_tolerance(out[name][:100], shared, [base[name], ft[name][:100]], name)
        np.testing.assert_array_equal(out[name][100:], ft[name][100:].astype(out[name].dtype))
    assert any("vocabulary resized by fine-tuning" in w and "8 added rows" in w for w in warnings), warnings
    assert any("vocabulary resized" in w for w in result.warnings)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vocab_size"] == 108
    assert "added tokens" in (tmp_path / "out" / "tokenizer.json").read_text()


def test_non_weight_files_are_written_once_as_the_quirks_decide(tmp_path, monkeypatch):
    """config.json and the tokenizer files go into the output once each, already holding what
    the quirks decided (they were once copied from the base, then rewritten at commit)."""
    import safeblend.model_files
    import safeblend.writer

    rng = np.random.default_rng(2)
    write_checkpoint(tmp_path / "base", _model(rng, 100), config={"vocab_size": 100, "torch_dtype": "bfloat16"})
    write_checkpoint(tmp_path / "ft", _model(rng, 104), config={"vocab_size": 104})
    for side in ("base", "ft"):
        (tmp_path / side / "tokenizer.json").write_text(json.dumps({"vocab": side}))
    (tmp_path / "base" / "generation_config.json").write_text('{"temperature": 0.7}')
    written: list[str] = []
    real_text, real_copy = safeblend.writer.write_text_durably, safeblend.model_files.copy_regular_file

    def text(path, content):
        written.append(path.name)
        real_text(path, content)

    def copy(source, target):
        written.append(os.path.basename(target))
        real_copy(source, target)

    monkeypatch.setattr(safeblend.writer, "write_text_durably", text)
    monkeypatch.setattr(safeblend.model_files, "write_text_durably", text)
    monkeypatch.setattr(safeblend.model_files, "copy_regular_file", copy)
    merge(tmp_path / "base", tmp_path / "ft", tmp_path / "out", weight=0.5, dtype="fp16", on_warning=lambda m: None)
    assert sorted(n for n in written if n != "safeblend.json") == ["config.json", "generation_config.json",
                                                                   "tokenizer.json"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["vocab_size"], config["torch_dtype"]) == (104, "float16")
    assert json.loads((tmp_path / "out" / "tokenizer.json").read_text()) == {"vocab": "ft"}


def test_fewer_rows_in_fine_tune_is_an_error(tmp_path):
    rng = np.random.default_rng(2)
    write_checkpoint(tmp_path / "base", _model(rng, 100))
    write_checkpoint(tmp_path / "ft", _model(rng, 96))
    with pytest.raises(IncompatibleInputsError, match="96 vocabulary rows, fewer than the base's 100"):
        merge(tmp_path / "base", tmp_path / "ft", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_other_shape_change_is_still_an_error(tmp_path):
    rng = np.random.default_rng(3)
    base, ft = _model(rng, 100), _model(rng, 100)
    ft["model.layers.0.mlp.up_proj.weight"] = random_tensor(rng, (3 * H + 1, H), "bf16")
    write_checkpoint(tmp_path / "base", base)
    write_checkpoint(tmp_path / "ft", ft)
    with pytest.raises(IncompatibleInputsError, match="up_proj.weight' has shape"):
        merge(tmp_path / "base", tmp_path / "ft", tmp_path / "out")


@pytest.mark.parametrize("tied", ["ft", "base"])
def test_tied_embeddings_merge_with_the_embedding_as_lm_head(tmp_path, tied):
    rng = np.random.default_rng(4)
    base, ft = _model(rng, 100, head=tied != "base"), _model(rng, 100, head=tied != "ft")
    write_checkpoint(tmp_path / "base", base, config={"tie_word_embeddings": tied == "base"})
    write_checkpoint(tmp_path / "ft", ft, config={"tie_word_embeddings": tied == "ft"})
    warnings: list[str] = []
    merge(tmp_path / "base", tmp_path / "ft", tmp_path / "out", weight=0.5, on_warning=warnings.append)
    out = load_checkpoint(tmp_path / "out")
    b_head = base.get("lm_head.weight", base["model.embed_tokens.weight"])
    f_head = ft.get("lm_head.weight", ft["model.embed_tokens.weight"])
    assert_within_tolerance(out["lm_head.weight"], _lerp(b_head, f_head, 0.5), [b_head, f_head], "lm_head")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert any("tie_word_embeddings" in w for w in warnings)


def test_both_tied_output_stays_tied(tmp_path):
    rng = np.random.default_rng(5)
    write_checkpoint(tmp_path / "base", _model(rng, 100, head=False), config={"tie_word_embeddings": True})
    write_checkpoint(tmp_path / "ft", _model(rng, 100, head=False), config={"tie_word_embeddings": True})
    merge(tmp_path / "base", tmp_path / "ft", tmp_path / "out")
    assert "lm_head.weight" not in load_checkpoint(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True


def test_tensors_in_one_model_only(tmp_path):
    rng = np.random.default_rng(6)
    base, ft = _model(rng, 100), _model(rng, 100)
    base["model.rotary.inv_freq"] = np.arange(8, dtype=np.float32)
    ft["model.layers.0.extra.weight"] = random_tensor(rng, (4, H), "fp32")
    write_checkpoint(tmp_path / "base", base)
    write_checkpoint(tmp_path / "ft", ft)
    with pytest.raises(IncompatibleInputsError) as info:
        merge(tmp_path / "base", tmp_path / "ft", tmp_path / "out")
    message = str(info.value)
    assert "model.rotary.inv_freq" in message and "model.layers.0.extra.weight" in message
    assert "--allow-missing take" in message
    assert not (tmp_path / "out").exists()
    warnings: list[str] = []
    merge(tmp_path / "base", tmp_path / "ft", tmp_path / "out", allow_missing="take", dtype="bf16",
          on_warning=warnings.append)
    out = load_checkpoint(tmp_path / "out")
    np.testing.assert_array_equal(out["model.rotary.inv_freq"], base["model.rotary.inv_freq"].astype(ml_dtypes.bfloat16))
    np.testing.assert_array_equal(out["model.layers.0.extra.weight"],
                                  ft["model.layers.0.extra.weight"].astype(ml_dtypes.bfloat16))
    assert any("2 tensor(s) are missing from some inputs" in w for w in warnings)


def test_pytorch_bin_with_its_index_is_a_clear_error(tmp_path):
    d = tmp_path / "pt"
    d.mkdir()
    (d / "pytorch_model-00001-of-00002.bin").write_bytes(b"PK\3\4")
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"a": "pytorch_model-00001-of-00002.bin"}}))
    with pytest.raises(CheckpointError, match="only safetensors is read.*safe_serialization=True"):
        Checkpoint.open(d)
    with pytest.raises(CheckpointError, match="only safetensors is read"):
        Checkpoint.open(d / "pytorch_model.bin.index.json")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "pytorch_model-00001-of-00002.bin"}}))
    with pytest.raises(CheckpointError, match="not a .safetensors file.*only safetensors is read"):
        Checkpoint.open(d)


def test_gpu_pipeline_takes_added_rows_like_the_cpu(tmp_path, monkeypatch):
    """The CUDA executor (on its CPU stand-in) casts copied tails to the output dtype too."""
    pytest.importorskip("torch")
    from tests import test_cuda_pipeline as cuda_tests

    if not hasattr(cuda_tests, "StandInExecutor"):
        pytest.skip("the CUDA stand-in is unavailable here")
    rng = np.random.default_rng(9)
    write_checkpoint(tmp_path / "base", _model(rng, 100))
    write_checkpoint(tmp_path / "ft", _model(rng, 104, dtype="fp32"))
    merge(tmp_path / "base", tmp_path / "ft", tmp_path / "cpu", device="cpu", dtype="bf16")
    cuda_tests.stand_in.__wrapped__(monkeypatch)
    merge(tmp_path / "base", tmp_path / "ft", tmp_path / "gpu", device="cuda", dtype="bf16")
    assert (tmp_path / "gpu" / "model.safetensors").read_bytes() == (tmp_path / "cpu" / "model.safetensors").read_bytes()
