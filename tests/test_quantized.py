"""Quantized checkpoints (fp8 block scales, compressed-tensors FP8, MXFP4) are dequantized per
chunk exactly and merged; checked against float64 references of dequantize → merge written here.

Every quantized model is generated here from a float model with numpy/ml_dtypes, the scales laid
out as the published checkpoints lay them out: DeepSeek-V3's ``W_scale_inv`` (⌈rows/128⌉ ×
⌈cols/128⌉, amax/448 per block), compressed-tensors' ``W_scale`` ([1] per tensor, [rows, 1] per
channel), gpt-oss's ``P_blocks``/``P_scales`` (E2M1 pairs, low nibble first, E8M0 exponents).
"""

from __future__ import annotations

import json
from math import ceil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner

import safeblend
import safeblend.errors
from safeblend.cli import main
from safeblend.quantized import open_checkpoint
from tests.helpers import assert_within_tolerance, load_checkpoint, read_raw_safetensors, write_raw_safetensors

FP8 = ml_dtypes.float8_e4m3fn
BF16 = ml_dtypes.bfloat16
E4M3_MAX = 448.0
# Shapes that do not divide by 128, a 3-D expert stack, and one smaller than a block.
SHAPES = {
    "model.layers.0.self_attn.q_proj.weight": (300, 260),
    "model.layers.0.mlp.down_proj.weight": (130, 257),
    "model.layers.0.mlp.experts.gate_proj.weight": (2, 140, 130),
    "model.layers.1.self_attn.o_proj.weight": (40, 24),
}
PLAIN = {  # never quantized: embeddings, norms, lm_head, router
    "model.embed_tokens.weight": (50, 24),
    "model.layers.0.input_layernorm.weight": (24,),
    "model.layers.0.mlp.gate.weight": (8, 24),
    "lm_head.weight": (50, 24),
}
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def _raw(array: np.ndarray, dtype: str) -> tuple[str, list[int], bytes]:
    return dtype, list(array.shape), np.ascontiguousarray(array).tobytes()


def quantize_fp8_blocks(w: np.ndarray, block: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """DeepSeek-V3's quantizer: per (bm × bn) block of each matrix, s = amax / 448, q = fp8(w / s)."""
    *lead, rows, cols = w.shape
    bm, bn = block
    grid = np.zeros((*lead, ceil(rows / bm), ceil(cols / bn)), np.float32)
    q = np.zeros(w.shape, FP8)
    for index in np.ndindex(*lead, grid.shape[-2], grid.shape[-1]):
        *l, i, j = index
        part = w[(*l, slice(i * bm, (i + 1) * bm), slice(j * bn, (j + 1) * bn))].astype(np.float32)
        s = np.float32(np.abs(part).max() / E4M3_MAX)
        grid[index] = s
        q[(*l, slice(i * bm, (i + 1) * bm), slice(j * bn, (j + 1) * bn))] = (part / s).astype(FP8)
    return q, grid


def dequantize_fp8_blocks64(q: np.ndarray, grid: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """float64 reference: every fp8 value times its block's scale (exact in float64)."""
    bm, bn = block
    rows, cols = q.shape[-2:]
    scale = np.repeat(np.repeat(grid.astype(np.float64), bm, axis=-2), bn, axis=-1)[..., :rows, :cols]
    return q.astype(np.float64) * scale


def _float_model(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: (rng.standard_normal(shape) * 0.05).astype(np.float32) for name, shape in {**SHAPES, **PLAIN}.items()}


def write_fp8_model(directory: Path, weights: dict[str, np.ndarray], block=(128, 128),
                    config: dict | None = None) -> dict[str, np.ndarray]:
    """An fp8 block-quantized model; returns the float64 dequantized values of every tensor."""
    directory.mkdir(parents=True)
    tensors, reference = {}, {}
    for name, w in weights.items():
        if name in SHAPES:
            q, grid = quantize_fp8_blocks(w, block)
            tensors[name] = _raw(q, "F8_E4M3")
            tensors[name + "_scale_inv"] = _raw(grid, "F32")
            reference[name] = dequantize_fp8_blocks64(q, grid, block)
        else:
            tensors[name] = _raw(w.astype(BF16), "BF16")
            reference[name] = w.astype(BF16).astype(np.float64)
    write_raw_safetensors(directory / "model.safetensors", tensors)
    quant = config if config is not None else {**FP8_CONFIG, "weight_block_size": list(block)}
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "bfloat16",
                                                       "quantization_config": quant}))
    return reference


def write_bf16_model(directory: Path, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    directory.mkdir(parents=True)
    tensors = {name: _raw(w.astype(BF16), "BF16") for name, w in weights.items()}
    write_raw_safetensors(directory / "model.safetensors", tensors)
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "bfloat16"}))
    return {name: w.astype(BF16).astype(np.float64) for name, w in weights.items()}


@pytest.fixture(scope="module")
def fp8_pair(tmp_path_factory):
    """An fp8 base (128×128 blocks) and a bf16 fine-tune of it, with float64 references."""
    root = tmp_path_factory.mktemp("fp8")
    weights = _float_model(0)
    base = write_fp8_model(root / "base", weights)
    rng = np.random.default_rng(1)
    ft_weights = {n: (base[n] + rng.standard_normal(base[n].shape) * 0.01).astype(np.float32) for n in weights}
    ft = write_bf16_model(root / "ft", ft_weights)
    return root, base, ft


@pytest.mark.parametrize("decode_pairs", [1 << 15, 5])
def test_views_dequantize_exactly_for_any_chunking(fp8_pair, monkeypatch, decode_pairs):
    """Every view, of any length and start, is fp8 × scale rounded once; the codes decoded in
    one lookup or in many pieces (5 pairs: an odd tail and pieces that cut rows)."""
    monkeypatch.setattr("safeblend.quantized._DECODE_PAIRS", decode_pairs)
    root, base, _ = fp8_pair
    ckpt = open_checkpoint(root / "base")
    try:
        assert set(ckpt.tensors) == set(base)  # scale tensors hidden
        for name, ref in base.items():
            info = ckpt.tensors[name]
            assert info.shape == ref.shape
            f = ckpt.file_of(info)
            want = ref.astype(np.float32).reshape(-1)  # fp8 × scale, rounded once to fp32
            for step in (1, 7, 128, 129, 1000, ref.size):
                got = np.concatenate([np.array(f.view(info, i, min(step, ref.size - i)), dtype=np.float32)
                                      for i in range(0, ref.size, step)])
                np.testing.assert_array_equal(got, want, err_msg=f"{name} step {step}")
    finally:
        ckpt.close()


def test_fp8_base_and_bf16_finetune_merge_to_bf16(fp8_pair, tmp_path):
    root, base, ft = fp8_pair
    result = safeblend.merge(root / "base", root / "ft", tmp_path / "out", weight=0.3, chunk_size="2KiB")
    out = read_raw_safetensors(tmp_path / "out" / "model.safetensors")
    assert set(out) == set(base)  # no scale tensors
    for name in base:
        dtype, shape, raw = out[name]
        assert dtype == "BF16" and tuple(shape) == base[name].shape, name
        got = np.frombuffer(raw, BF16).reshape(shape)
        reference = base[name] + 0.3 * (ft[name] - base[name])
        assert_within_tolerance(got, reference, [base[name], ft[name]], name)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == "bfloat16"
    assert result.bytes_read < sum(v.size * 6 for v in base.values())  # fp8 read as bytes, not as fp32
    assert CliRunner().invoke(main, ["verify", str(tmp_path / "out")]).exit_code == 0


def test_dtype_fp32_output_and_quantized_finetune(fp8_pair, tmp_path):
    """A quantized fine-tune of a bf16 base, written in fp32."""
    root, base, ft = fp8_pair
    safeblend.merge(root / "ft", root / "base", tmp_path / "out", weight=0.75, dtype="fp32")
    out = load_checkpoint(tmp_path / "out")
    for name in base:
        reference = ft[name] + 0.75 * (base[name] - ft[name])
        assert out[name].dtype == np.float32
        assert_within_tolerance(out[name], reference, [base[name], ft[name]], name)


def _write_fp32_dequantized(directory: Path, reference: dict[str, np.ndarray]) -> None:
    """The same model with every quantized weight stored as fp32(fp8 × scale)."""
    directory.mkdir()
    tensors = {n: _raw(v.astype(np.float32), "F32") if n in SHAPES else _raw(v.astype(BF16), "BF16")
               for n, v in reference.items()}
    write_raw_safetensors(directory / "model.safetensors", tensors)


@pytest.mark.parametrize("method, params, fts", [
    ("linear", {"weight": 0.4}, 1),
    ("task-arithmetic", {"weight": 0.7, "lambda_": 0.9}, 1),
    ("slerp", {"weight": 0.3}, 1),
    ("ties", {"weight": 0.5, "density": 0.4}, 2),
    ("dare-linear", {"weight": 0.5, "density": 0.6, "seed": 3}, 2),
    ("dare-ties", {"weight": 0.5, "density": 0.6, "seed": 3, "rescale": "l1"}, 2),
    ("model-stock", {}, 2),
])
def test_every_method_sees_the_dequantized_values(fp8_pair, tmp_path, method, params, fts):
    """Each method merges an fp8 base exactly as it merges the base dequantized to fp32 by the
    reference above (bit for bit): its reduce passes see the dequantized values."""
    root, base, _ = fp8_pair
    if not (root / "fp32").exists():
        _write_fp32_dequantized(root / "fp32", base)
    models = [root / "ft", root / "base"][:fts]  # a second fine-tune that is itself quantized
    safeblend.merge(root / "base", models, tmp_path / "q", method=method, dtype="bf16", chunk_size="4KiB", **params)
    plain = [root / "ft", root / "fp32"][: len(models)]
    safeblend.merge(root / "fp32", plain, tmp_path / "f", method=method, dtype="bf16", chunk_size="4KiB", **params)
    q, f = load_checkpoint(tmp_path / "q"), load_checkpoint(tmp_path / "f")
    assert set(q) == set(f)
    for name in q:
        np.testing.assert_array_equal(q[name].view(np.uint16), f[name].view(np.uint16), err_msg=name)


def _write_lora(directory: Path, target: str, shape: tuple[int, int], rank: int, alpha: float, seed: int):
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal((rank, shape[1])) * 0.1).astype(np.float32)
    b = (rng.standard_normal((shape[0], rank)) * 0.1).astype(np.float32)
    directory.mkdir()
    module = target.removesuffix(".weight")
    write_raw_safetensors(directory / "adapter_model.safetensors", {
        f"base_model.model.{module}.lora_A.weight": _raw(a, "F32"),
        f"base_model.model.{module}.lora_B.weight": _raw(b, "F32"),
    })
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": [module.rsplit(".", 1)[-1]]}))
    return a.astype(np.float64), b.astype(np.float64)


@pytest.mark.parametrize("dtype", ["auto", "fp32"])
def test_lora_trained_on_an_fp8_base(fp8_pair, tmp_path, dtype):
    root, base, _ = fp8_pair
    target = "model.layers.0.self_attn.q_proj.weight"
    a, b = _write_lora(tmp_path / "lora", target, SHAPES[target], 4, 8.0, 5)
    safeblend.merge(root / "base", tmp_path / "lora", tmp_path / "out", weight=0.6, dtype=dtype)
    out = load_checkpoint(tmp_path / "out")
    for name in base:
        ft = base[name] + (2.0 * b @ a if name == target else 0.0)
        reference = base[name] + 0.6 * (ft - base[name])
        assert out[name].dtype == (np.float32 if dtype == "fp32" else BF16), name
        # Where the output is bf16 the product is formed in fp32 (safeblend.lora): its operands'
        # magnitude Σ|s·b·a| enters the tolerance where the sum cancels.
        terms = 2.0 * np.abs(b) @ np.abs(a) if name == target else 0.0
        assert_within_tolerance(out[name], reference, [base[name], ft, terms + 0.0 * ft], name)


def test_sweep_and_diff_read_a_quantized_base(fp8_pair, tmp_path):
    root, base, ft = fp8_pair
    safeblend.sweep(root / "base", root / "ft", tmp_path / "s", "0.25,0.5")
    for w in (0.25, 0.5):
        out = load_checkpoint(tmp_path / "s" / f"lambda-{w}")
        assert set(out) == set(base)
        for name in base:
            assert_within_tolerance(out[name], base[name] + w * (ft[name] - base[name]), [base[name], ft[name]], name)
        assert "quantization_config" not in json.loads((tmp_path / "s" / f"lambda-{w}" / "config.json").read_text())
    report = safeblend.diff(root / "base", root / "ft")
    entry = next(t for t in report.tensors if t.name == "model.layers.0.mlp.down_proj.weight")
    delta = ft[entry.name] - base[entry.name]
    np.testing.assert_allclose(entry.sums.max_abs, np.abs(delta).max(), rtol=1e-6)


def test_small_blocks_and_ue8m0_scales(tmp_path):
    """weight_block_size other than 128 and power-of-two F8_E8M0 scales (scale_fmt ue8m0)."""
    weights = {n: w for n, w in _float_model(2).items() if n in SHAPES}
    (tmp_path / "base").mkdir()
    tensors, reference = {}, {}
    for name, w in weights.items():
        q, grid = quantize_fp8_blocks(w, (16, 32))
        grid = np.exp2(np.ceil(np.log2(grid))).astype(np.float32)  # round scales up to powers of two
        q = (w / np.repeat(np.repeat(grid, 16, -2), 32, -1)[..., : w.shape[-2], : w.shape[-1]]).astype(FP8)
        tensors[name] = _raw(q, "F8_E4M3")
        tensors[name + "_scale_inv"] = _raw(grid.astype(ml_dtypes.float8_e8m0fnu), "F8_E8M0")
        reference[name] = dequantize_fp8_blocks64(q, grid, (16, 32))
    write_raw_safetensors(tmp_path / "base" / "model.safetensors", tensors)
    (tmp_path / "base" / "config.json").write_text(json.dumps(
        {"quantization_config": {**FP8_CONFIG, "weight_block_size": [16, 32], "scale_fmt": "ue8m0"}}))
    ckpt = open_checkpoint(tmp_path / "base")
    try:
        for name, ref in reference.items():
            info = ckpt.tensors[name]
            np.testing.assert_array_equal(ckpt.file_of(info).view(info, 0, ref.size), ref.astype(np.float32).ravel())
    finally:
        ckpt.close()


# -- compressed-tensors ----------------------------------------------------------------------------


def _compressed_tensors_config(strategy: str) -> dict:
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy, "dynamic": False}
    if strategy == "block":
        weights["block_structure"] = [128, 128]
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "ignore": ["lm_head"], "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                                                 "input_activations": {"num_bits": 8, "type": "float",
                                                                                       "strategy": "tensor"}}}}


@pytest.mark.parametrize("strategy", ["tensor", "channel", "block"])
def test_compressed_tensors_fp8(tmp_path, strategy):
    weights = {n: w for n, w in _float_model(3).items() if n != "model.layers.0.mlp.experts.gate_proj.weight"}
    (tmp_path / "base").mkdir()
    tensors, reference = {}, {}
    for name, w in weights.items():
        if name not in SHAPES:
            tensors[name] = _raw(w.astype(BF16), "BF16")
            reference[name] = w.astype(BF16).astype(np.float64)
            continue
        if strategy == "tensor":
            scale = np.array([np.abs(w).max() / E4M3_MAX], np.float32)
            expanded = scale.astype(np.float64)
        elif strategy == "channel":
            scale = (np.abs(w).max(axis=1, keepdims=True) / E4M3_MAX).astype(np.float32)
            expanded = scale.astype(np.float64)
        else:
            q, scale = quantize_fp8_blocks(w, (128, 128))
            expanded = dequantize_fp8_blocks64(np.ones(w.shape, FP8), scale, (128, 128))
        q = (w / expanded).astype(FP8)
        tensors[name] = _raw(q, "F8_E4M3")
        tensors[name.removesuffix("weight") + "weight_scale"] = _raw(scale, "F32")
        tensors[name.removesuffix("weight") + "input_scale"] = _raw(np.array([0.02], np.float32), "F32")
        reference[name] = q.astype(np.float64) * expanded
    write_raw_safetensors(tmp_path / "base" / "model.safetensors", tensors)
    (tmp_path / "base" / "config.json").write_text(json.dumps({"quantization_config": _compressed_tensors_config(strategy)}))
    ft = write_bf16_model(tmp_path / "ft", {n: (v * 1.01).astype(np.float32) for n, v in reference.items()})
    safeblend.merge(tmp_path / "base", tmp_path / "ft", tmp_path / "out", weight=0.5, chunk_size="1KiB")
    out = load_checkpoint(tmp_path / "out")
    assert set(out) == set(reference)  # weight_scale and input_scale gone
    for name, ref in reference.items():
        assert_within_tolerance(out[name], ref + 0.5 * (ft[name] - ref), [ref, ft[name]], name)


# -- MXFP4 (gpt-oss) -----------------------------------------------------------------------------------

# E2M1 (OCP MX spec): sign, 2 exponent bits (bias 1), 1 mantissa bit.
E2M1 = [s * v for s in (1.0, -1.0) for v in (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)]


def dequantize_mxfp4_64(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float64 reference of gpt-oss's layout: (E, R, G, 16) bytes, low nibble first, each 32-value
    group × 2^(scale − 127); the weight is (E, G·32, R)."""
    lut = np.array(E2M1)
    values = np.stack([lut[blocks & 0x0F], lut[blocks >> 4]], axis=-1)  # (E, R, G, 16, 2)
    values = values.reshape(*blocks.shape[:3], 32) * np.exp2(scales.astype(np.float64) - 127)[..., None]
    experts, rows, groups = scales.shape
    return values.reshape(experts, rows, groups * 32).transpose(0, 2, 1)


@pytest.fixture(scope="module")
def mxfp4_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("mxfp4")
    rng = np.random.default_rng(4)
    shapes = {"model.layers.0.mlp.experts.gate_up_proj": (3, 10, 5), "model.layers.0.mlp.experts.down_proj": (3, 7, 2)}
    tensors, reference = {}, {}
    for name, (experts, rows, groups) in shapes.items():
        blocks = rng.integers(0, 256, (experts, rows, groups, 16), dtype=np.uint8)
        scales = rng.integers(118, 134, (experts, rows, groups), dtype=np.uint8)
        tensors[name + "_blocks"] = _raw(blocks, "U8")
        tensors[name + "_scales"] = _raw(scales, "U8")
        tensors[name + "_bias"] = _raw(rng.standard_normal((experts, rows)).astype(BF16), "BF16")
        reference[name] = dequantize_mxfp4_64(blocks, scales)
        reference[name + "_bias"] = np.frombuffer(tensors[name + "_bias"][2], BF16).astype(np.float64).reshape(experts, rows)
    (root / "base").mkdir()
    write_raw_safetensors(root / "base" / "model.safetensors", tensors)
    (root / "base" / "config.json").write_text(json.dumps({"model_type": "gpt_oss", "quantization_config": {
        "quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "lm_head"]}}))
    ft = write_bf16_model(root / "ft", {n: (v + rng.standard_normal(v.shape) * 0.05).astype(np.float32)
                                        for n, v in reference.items()})
    return root, reference, ft


@pytest.mark.parametrize("tile", [256, 3])
def test_mxfp4_views_for_any_chunking(mxfp4_pair, monkeypatch, tile):
    monkeypatch.setattr("safeblend.quantized._MX_TILE", tile)  # rows dequantized per tile: several tiles too
    root, base, _ = mxfp4_pair
    ckpt = open_checkpoint(root / "base")
    try:
        assert set(ckpt.tensors) == set(base)
        for name, ref in base.items():
            info = ckpt.tensors[name]
            assert info.shape == ref.shape
            f = ckpt.file_of(info)
            for step in (1, 5, 31, 97, ref.size):
                got = np.concatenate([np.array(f.view(info, i, min(step, ref.size - i)), dtype=np.float64)
                                      for i in range(0, ref.size, step)])
                np.testing.assert_array_equal(got, ref.reshape(-1).astype(np.float32), err_msg=f"{name} {step}")
    finally:
        ckpt.close()


def test_mxfp4_base_merge(mxfp4_pair, tmp_path):
    root, base, ft = mxfp4_pair
    safeblend.merge(root / "base", root / "ft", tmp_path / "out", weight=0.5, chunk_size="512B")
    out = load_checkpoint(tmp_path / "out")
    assert set(out) == set(base)
    for name, ref in base.items():
        assert out[name].dtype == BF16
        assert_within_tolerance(out[name], ref + 0.5 * (ft[name] - ref), [ref, ft[name]], name)
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())


# -- bad inputs ---------------------------------------------------------------------------------------


def _fp8_variant(tmp_path: Path, change) -> Path:
    weights = {n: w for n, w in _float_model(5).items() if n in ("model.layers.0.mlp.down_proj.weight", "lm_head.weight")}
    write_fp8_model(tmp_path / "bad", weights)
    path = tmp_path / "bad" / "model.safetensors"
    tensors = read_raw_safetensors(path)
    config = json.loads((tmp_path / "bad" / "config.json").read_text())
    change(tensors, config)
    write_raw_safetensors(path, tensors)
    (tmp_path / "bad" / "config.json").write_text(json.dumps(config))
    return tmp_path / "bad"


def _wrong_grid(tensors, config):
    tensors["model.layers.0.mlp.down_proj.weight_scale_inv"] = _raw(np.ones((2, 2), np.float32), "F32")


def _missing_scale(tensors, config):
    del tensors["model.layers.0.mlp.down_proj.weight_scale_inv"]


def _orphan_scale(tensors, config):
    tensors["model.layers.9.weight_scale_inv"] = _raw(np.ones((1, 1), np.float32), "F32")


def _unknown_method(tensors, config):
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}


def _bad_block_size(tensors, config):
    config["quantization_config"]["weight_block_size"] = [128]


@pytest.mark.parametrize("change, message", [
    (_wrong_grid, "has shape [2, 2] but weight 'model.layers.0.mlp.down_proj.weight' of shape [130, 257] needs [2, 3]"),
    (_missing_scale, "is F8_E4M3 but has no scale tensor 'model.layers.0.mlp.down_proj.weight_scale_inv'"),
    (_orphan_scale, "scale tensor 'model.layers.9.weight_scale_inv' has no weight"),
    (_unknown_method, "quant_method 'bitsandbytes' is not supported"),
    (_bad_block_size, "weight_block_size must be two positive integers"),
])
def test_bad_quantized_inputs_are_one_line_errors(fp8_pair, tmp_path, change, message):
    root, _, _ = fp8_pair
    bad = _fp8_variant(tmp_path, change)
    for args in (["merge", str(bad), str(root / "ft"), "-o", str(tmp_path / "out")],
                 ["merge", str(root / "ft"), str(bad), "-o", str(tmp_path / "out")]):
        result = CliRunner().invoke(main, [*args, "--quiet"])
        assert result.exit_code == 1, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.stderr
        assert "Traceback" not in result.output
        assert not (tmp_path / "out").exists()


def test_fp8_without_a_quantization_config_is_copied_from_the_base(fp8_pair, tmp_path):
    """No config, no dequantization: the fp8 weights and their scales are copied as stored."""
    root, _, _ = fp8_pair
    (tmp_path / "bare").mkdir()
    single = tmp_path / "bare" / "model.safetensors"  # no config.json beside it
    single.write_bytes((root / "base" / "model.safetensors").read_bytes())
    messages = []
    safeblend.merge(single, single, tmp_path / "out", on_warning=messages.append)
    assert read_raw_safetensors(tmp_path / "out" / "model.safetensors") == read_raw_safetensors(single)
    ft = root / "ft" / "model.safetensors"  # a bf16 fine-tune: fp8 weights are not merged, and it says so
    safeblend.merge(single, ft, tmp_path / "out2", allow_missing="take", on_warning=messages.append)
    assert any("F8_E4M3) are copied from the base" in m for m in messages), messages
    out, stored = read_raw_safetensors(tmp_path / "out2" / "model.safetensors"), read_raw_safetensors(single)
    assert all(out[n] == stored[n] for n in stored if stored[n][0] != "BF16")


def test_sharded_base_with_scales_in_other_shards(fp8_pair, tmp_path):
    """DeepSeek's shards split a weight from its scale; the index is followed for both."""
    root, base, ft = fp8_pair
    stored = read_raw_safetensors(root / "base" / "model.safetensors")
    names = list(stored)
    (tmp_path / "base").mkdir()
    shards = {"model-00001-of-00002.safetensors": names[0::2], "model-00002-of-00002.safetensors": names[1::2]}
    for filename, group in shards.items():
        write_raw_safetensors(tmp_path / "base" / filename, {n: stored[n] for n in group})
    (tmp_path / "base" / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: f for f, group in shards.items() for n in group}}))
    (tmp_path / "base" / "config.json").write_text((root / "base" / "config.json").read_text())
    first, second = shards.values()
    assert any(n + "_scale_inv" in second for n in first)  # weights whose scale lies in the other shard
    safeblend.merge(tmp_path / "base", root / "ft", tmp_path / "sharded", weight=0.3)
    safeblend.merge(root / "base", root / "ft", tmp_path / "single", weight=0.3)
    assert load_checkpoint(tmp_path / "sharded").keys() == load_checkpoint(tmp_path / "single").keys()
    for name, value in load_checkpoint(tmp_path / "single").items():
        np.testing.assert_array_equal(load_checkpoint(tmp_path / "sharded")[name].view(np.uint16), value.view(np.uint16))


# -- the output loads in transformers -----------------------------------------------------------------


def test_merge_of_an_fp8_llama_loads_in_transformers(tmp_path):
    """A tiny Llama quantized as DeepSeek/Qwen3-FP8 publish it, merged with a bf16 fine-tune: the
    output loads in transformers as a plain bf16 model whose logits match the float64 reference."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=144, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    state = {k: v.detach().numpy().astype(np.float64) for k, v in model.state_dict().items()}
    linear = [k for k, v in state.items() if v.ndim == 2 and "proj" in k]
    (tmp_path / "base").mkdir()
    tensors, base = {}, {}
    for name, w in state.items():
        if name in linear:
            q, grid = quantize_fp8_blocks(w.astype(np.float32), (128, 128))
            tensors[name], tensors[name + "_scale_inv"] = _raw(q, "F8_E4M3"), _raw(grid, "F32")
            base[name] = dequantize_fp8_blocks64(q, grid, (128, 128))
        else:
            tensors[name] = _raw(w.astype(BF16), "BF16")
            base[name] = w.astype(BF16).astype(np.float64)
    write_raw_safetensors(tmp_path / "base" / "model.safetensors", tensors)
    (tmp_path / "base" / "config.json").write_text(json.dumps(
        {**config.to_dict(), "torch_dtype": "bfloat16", "quantization_config": FP8_CONFIG}))
    rng = np.random.default_rng(7)
    ft = write_bf16_model(tmp_path / "ft", {n: (v + rng.standard_normal(v.shape) * 0.01).astype(np.float32)
                                             for n, v in base.items()})
    safeblend.merge(tmp_path / "base", tmp_path / "ft", tmp_path / "out", weight=0.5)
    merged, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert getattr(merged.config, "quantization_config", None) is None
    assert all(p.dtype == torch.bfloat16 for p in merged.parameters())
    reference = transformers.LlamaForCausalLM(config).to(torch.float64)
    reference.load_state_dict({n: torch.from_numpy(base[n] + 0.5 * (ft[n] - base[n])) for n in base})
    tokens = torch.tensor([[1, 5, 9, 33, 60, 2]])
    with torch.no_grad():
        got, want = merged.to(torch.float64)(tokens).logits, reference(tokens).logits
    assert torch.allclose(got, want, rtol=1e-2, atol=1e-2), (got - want).abs().max()
    # --dtype fp8: transformers reads the output as the base's format (dequantizing it to bf16
    # on a machine without a GPU) and sees q × scale for every weight.
    safeblend.merge(tmp_path / "base", tmp_path / "ft", tmp_path / "out8", weight=0.5, dtype="fp8")
    fp8_model, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out8", output_loading_info=True)
    assert not any(info.values()), info
    stored = read_raw_safetensors(tmp_path / "out8" / "model.safetensors")
    loaded = {k: v.to(torch.float64).numpy() for k, v in fp8_model.state_dict().items()}
    # transformers' CPU dequantizer takes the block size as rows // scale rows, which is not the
    # format's 128 where a dimension does not divide by 128 (DeepSeek's own 576-row kv_a_proj is
    # refused there too): only the weights that divide are compared.
    for name in [n for n in linear if all(d % 128 == 0 or d < 128 for d in state[n].shape)]:
        q = np.frombuffer(stored[name][2], FP8).reshape(stored[name][1]).astype(np.float64)
        grid = np.frombuffer(stored[name + "_scale_inv"][2], np.float32).reshape(stored[name + "_scale_inv"][1])
        dequantized = dequantize_fp8_blocks64(q.astype(FP8), grid, (128, 128))
        np.testing.assert_array_equal(loaded[name], dequantized.astype(BF16).astype(np.float64), err_msg=name)


def test_gpu_pipeline_reads_dequantized_bytes(fp8_pair, mxfp4_pair, tmp_path, monkeypatch):
    """The CUDA executor (with the CPU stand-ins of tests/test_cuda_pipeline.py) takes quantized
    weights through ``byte_view``, dequantized on the host: the same output as the CPU path."""
    try:
        import safeblend.api
        from tests.test_cuda_pipeline import StandInExecutor, _select_stand_in
    except (ImportError, pytest.skip.Exception) as exc:
        pytest.skip(f"the CUDA stand-ins are unavailable: {exc}")
    monkeypatch.setattr(safeblend.api, "_select_backend", _select_stand_in)
    monkeypatch.setattr(safeblend.api, "CudaExecutor", StandInExecutor)
    for root, _, _ in (fp8_pair, mxfp4_pair):
        for device in ("cuda", "cpu"):
            safeblend.merge(root / "base", root / "ft", tmp_path / root.name / device, device=device, weight=0.6,
                            chunk_size=4096)
        got, want = load_checkpoint(tmp_path / root.name / "cuda"), load_checkpoint(tmp_path / root.name / "cpu")
        assert set(got) == set(want)
        for name, w in want.items():
            np.testing.assert_allclose(got[name].astype(np.float64), w.astype(np.float64), rtol=1e-2, atol=1e-6,
                                       err_msg=name)


# -- fp8 output (--dtype fp8) ---------------------------------------------------------------------------


def requantize_reference(x: np.ndarray, block: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The reference quantizer (README): per block s = fp32(amax / 448) (1 where amax is 0),
    q = fp8_e4m3fn(clip(fp32(x / s), ±448)) rounded to nearest even; returns (q, s grid)."""
    *lead, rows, cols = x.shape
    bm, bn = block
    grid = np.zeros((*lead, ceil(rows / bm), ceil(cols / bn)), np.float32)
    q = np.zeros(x.shape, FP8)
    for index in np.ndindex(*grid.shape):
        *l, i, j = index
        at = (*l, slice(i * bm, (i + 1) * bm), slice(j * bn, (j + 1) * bn))
        part = x[at].astype(np.float32)
        amax = np.float32(np.abs(part).max())
        s = np.float32(amax / np.float32(E4M3_MAX)) if amax != 0 else np.float32(1.0)
        grid[index] = s
        q[at] = np.clip(part / s, -E4M3_MAX, E4M3_MAX).astype(FP8)
    return q, grid


@pytest.mark.parametrize("chunk_size, method, params", [
    ("8MiB", "linear", {}), ("1KiB", "linear", {}), ("1KiB", "ties", {"density": 0.5}),
    ("8KiB", "slerp", {}),
])
def test_fp8_output_requantizes_with_fresh_block_scales(fp8_pair, tmp_path, chunk_size, method, params):
    """--dtype fp8: every merged weight is the reference quantizer's output on the fp32 merge,
    bit for bit; scales are F32 in the base's grid, other tensors keep the base's dtype, the
    config keeps its quantization_config."""
    root, base, ft = fp8_pair
    safeblend.merge(root / "base", root / "ft", tmp_path / "fp8", method=method, weight=0.3, dtype="fp8",
                    chunk_size=chunk_size, **params)
    safeblend.merge(root / "base", root / "ft", tmp_path / "fp32", method=method, weight=0.3, dtype="fp32", **params)
    out = read_raw_safetensors(tmp_path / "fp8" / "model.safetensors")
    merged32 = load_checkpoint(tmp_path / "fp32")
    stored = read_raw_safetensors(root / "base" / "model.safetensors")
    assert set(out) == set(stored)
    for name in base:
        if method == "linear":
            reference = base[name] + 0.3 * (ft[name] - base[name])
            assert_within_tolerance(merged32[name], reference, [base[name], ft[name]], name)
        if name not in SHAPES:
            assert out[name][0] == "BF16", name
            continue
        q, grid = requantize_reference(merged32[name], (128, 128))
        assert out[name][:2] == ("F8_E4M3", list(q.shape)), name
        assert out[name + "_scale_inv"][:2] == ("F32", list(grid.shape)), name
        np.testing.assert_array_equal(np.frombuffer(out[name + "_scale_inv"][2], np.float32), grid.ravel(), name)
        assert out[name][2] == q.tobytes(), name
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert config["quantization_config"] == FP8_CONFIG
    assert CliRunner().invoke(main, ["verify", str(tmp_path / "fp8")]).exit_code == 0
    reopened = open_checkpoint(tmp_path / "fp8")  # and it reads back as an fp8 model
    reopened.close()


def test_fp8_output_codes_held_for_hashing_are_bounded(fp8_pair, tmp_path, monkeypatch):
    """A requantized weight's codes wait for its scale tensor (laid out before it, complete only
    after the weight's last chunk) before they can be hashed: the hasher keeps at most
    _HOLD_UNPOOLED_BYTES of them in memory and reads the rest back from the file, so memory does
    not grow with the weight; the output is byte-identical either way."""
    from safeblend.journal import Progress

    root, _, _ = fp8_pair
    args = dict(weight=0.4, dtype="fp8", chunk_size="1KiB")  # q_proj: 3 chunks of 33,280 codes
    safeblend.merge(root / "base", root / "ft", tmp_path / "held", **args)
    monkeypatch.setattr("safeblend.journal._HOLD_UNPOOLED_BYTES", 40_000)
    held, landed = [0], Progress.landed

    def watched(self, *a, **k):
        landed(self, *a, **k)
        with self._cv:
            now = sum(memoryview(d).nbytes for s in self.shards for d, r in s.blocks.values() if r is None)
        held[0] = max(held[0], now)

    monkeypatch.setattr(Progress, "landed", watched)
    safeblend.merge(root / "base", root / "ft", tmp_path / "bounded", **args)
    assert 0 < held[0] <= 40_000
    for f in sorted((tmp_path / "held").iterdir()):
        assert (tmp_path / "bounded" / f.name).read_bytes() == f.read_bytes(), f.name


def test_fp8_output_copies_weights_a_lora_leaves_alone_as_stored(fp8_pair, tmp_path):
    root, base, _ = fp8_pair
    target = "model.layers.0.self_attn.q_proj.weight"
    a, b = _write_lora(tmp_path / "lora", target, SHAPES[target], 4, 8.0, 6)
    safeblend.merge(root / "base", tmp_path / "lora", tmp_path / "out", weight=0.6, dtype="fp8")
    safeblend.merge(root / "base", tmp_path / "lora", tmp_path / "f32", weight=0.6, dtype="fp32")
    out = read_raw_safetensors(tmp_path / "out" / "model.safetensors")
    stored = read_raw_safetensors(root / "base" / "model.safetensors")
    for name in stored:
        if name.startswith(target):
            continue
        assert out[name] == stored[name], name  # byte for byte, scales included
    # With an fp8 output the LoRA product is formed in fp32 (with an fp32 output in float64), so
    # the merge differs from the fp32 output in the last fp32 bits: compare the dequantized
    # output with the float64 reference instead, within half an fp8 step of each block.
    ft = base[target] + 2.0 * b @ a
    reference = base[target] + 0.6 * (ft - base[target])
    q = np.frombuffer(out[target][2], FP8).reshape(SHAPES[target]).astype(np.float64)
    grid = np.frombuffer(out[target + "_scale_inv"][2], np.float32).reshape(3, 3).astype(np.float64)
    scale = np.repeat(np.repeat(grid, 128, 0), 128, 1)[: q.shape[0], : q.shape[1]]
    _, want_grid = requantize_reference(reference, (128, 128))
    np.testing.assert_allclose(grid, want_grid, rtol=2**-22)
    magnitude = np.maximum(np.abs(reference) / scale, 2.0**-6)  # e4m3: 3 mantissa bits, subnormals below 2^-6
    step = np.exp2(np.floor(np.log2(magnitude)) - 3) * scale
    assert np.all(np.abs(q * scale - reference) <= 0.5 * step * (1 + 2**-10) + 2**-20 * np.abs(reference))


def test_fp8_output_needs_an_fp8_block_base(fp8_pair, tmp_path):
    root, _, _ = fp8_pair
    result = CliRunner().invoke(main, ["merge", str(root / "ft"), str(root / "base"), "-o", str(tmp_path / "o"),
                                       "--dtype", "fp8", "--quiet"])
    assert result.exit_code == 2 and "is not an fp8 block-quantized checkpoint" in result.stderr, result.output
    assert "Traceback" not in result.output
    with pytest.raises(safeblend.errors.SpecError, match="sweep does not write fp8"):
        safeblend.sweep(root / "base", root / "ft", tmp_path / "s", "0.5", dtype="fp8")
    with pytest.raises(safeblend.errors.SpecError, match="runs on the CPU"):
        safeblend.merge(root / "base", root / "ft", tmp_path / "o", dtype="fp8", device="cuda")
    assert not (tmp_path / "o").exists() and not (tmp_path / "s").exists()


@pytest.mark.parametrize("point", ["write:2", "write:6", "write:11", "write:16"])
def test_killed_fp8_output_merge_resumes_byte_identical(fp8_pair, tmp_path, point):
    """A scale tensor is written by its weight's chunks and laid out before the weight, so a
    resumed merge never keeps a weight whose scales it would have to recompute."""
    import os
    import signal
    import subprocess
    import sys

    root, _, _ = fp8_pair
    safeblend.merge(root / "base", root / "ft", tmp_path / "clean", weight=0.4, dtype="fp8", chunk_size="1KiB")
    cmd = [sys.executable, "-m", "safeblend.cli", "merge", str(root / "base"), str(root / "ft"), "-o",
           str(tmp_path / "out"), "--weight", "0.4", "--dtype", "fp8", "--chunk-size", "1KiB", "-q"]
    env = {**os.environ, "SAFEBLEND_FAULT_KILL_AT": point, "SAFEBLEND_FAULT_SLOW_WRITE_S": "0.003"}
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    safeblend.merge(root / "base", root / "ft", tmp_path / "out", weight=0.4, dtype="fp8", chunk_size="1KiB",
                    resume=True, on_warning=lambda m: None)
    for f in sorted((tmp_path / "clean").iterdir()):
        assert (tmp_path / "out" / f.name).read_bytes() == f.read_bytes(), f.name


@pytest.mark.parametrize("encode_block", [1 << 16, 7])
def test_requantize_matches_the_reference_on_zero_tiny_and_3d_blocks(monkeypatch, encode_block):
    """The quantizer itself, on whole-block-row chunks: all-zero blocks (scale 1), subnormal-range
    values, stacked matrices whose last block row is partial (chunks of whole matrices); codes
    encoded in one piece or in many."""
    from safeblend.quantized import Requantize

    monkeypatch.setattr("safeblend.quantized._ENCODE_BLOCK", encode_block)

    class Target:  # what the executor passes: the output tensors' names
        name = "w_scale_inv"

    rng = np.random.default_rng(9)
    x = (rng.standard_normal((3, 40, 50)) * np.exp2(rng.integers(-30, 10, (3, 40, 1)))).astype(np.float32)
    x[0, :16, :32] = 0.0
    x[1, 16:32, 32:] = 1e-41  # fp32 subnormals
    q, grid = requantize_reference(x, (16, 32))
    spec = Requantize(40, 50, 16, 32, 3, 2, True, scale=Target())
    assert spec.step(100) == 40 * 50  # a matrix's last block row is partial: whole matrices per chunk
    codes, scales = bytearray(), bytearray()
    for first in range(0, x.size, spec.step(100)):
        for target, offset, data in spec.quantize("w", x.reshape(-1)[first : first + spec.step(100)], first, frozenset()):
            (codes if target == "w" else scales).extend(bytes(data))
    assert bytes(codes) == q.tobytes()
    assert bytes(scales) == grid.tobytes()
    assert grid[0, 0, 0] == 1.0


def test_requantize_clips_where_a_subnormal_or_zero_scale_overshoots():
    """The clip to ±448 is skipped where every scale of a block row is a normal float (then
    |x/s| stays below 464 and encodes as 448 would); blocks whose amax/448 underflows keep it:
    s rounded down to the least subnormal gives x/s = 667, rounded to 0 gives inf."""
    from safeblend.quantized import Requantize

    class Target:
        name = "w_scale_inv"

    least = np.float32(2.0**-149)
    x = np.zeros((2, 128), np.float32)
    x[0, :32] = np.float32(667) * least * np.array([1, -1] * 16, np.float32)  # s = least: x/s = ±667
    x[0, 32:64] = np.float32(100) * least  # s rounds to 0: x/s = inf
    x[0, 64:96] = np.linspace(-3, 3, 32, dtype=np.float32)  # normal
    x[1] = np.linspace(-1e-3, 2e-3, 128, dtype=np.float32)
    with np.errstate(divide="ignore"):
        q, grid = requantize_reference(x, (1, 32))
    assert grid[0, 0] == least and grid[0, 1] == 0
    assert np.abs(q.astype(np.float32)[0, :64]).min() == E4M3_MAX  # clipped: unclipped they would be NaN codes
    spec = Requantize(2, 128, 1, 32, 2, 4, False, scale=Target())
    out = spec.quantize("w", x.reshape(-1).copy(), 0, frozenset())
    assert bytes(out[0][2]) == q.tobytes()
    assert bytes(out[1][2]) == grid.tobytes()


def test_fp8_encoding_table_rounds_every_float_as_ml_dtypes():
    """The table encoder against ml_dtypes' cast on random bit patterns (NaN codes aside) and
    on every tie between neighbouring fp8 values."""
    from safeblend.quantized import _encode_e4m3

    rng = np.random.default_rng(11)
    values = rng.integers(0, 2**32, 1 << 20, dtype=np.uint64).astype(np.uint32).view(np.float32)
    finite = np.isfinite(values)
    values = np.clip(values[finite], -E4M3_MAX, E4M3_MAX)
    grid = np.arange(256, dtype=np.uint8).view(FP8).astype(np.float64)
    grid = np.sort(grid[np.isfinite(grid)])
    ties = ((grid[1:] + grid[:-1]) / 2).astype(np.float32)  # exact in fp32
    values = np.concatenate([values, ties, np.nextafter(ties, np.float32(np.inf)), -ties]).astype(np.float32)
    np.testing.assert_array_equal(_encode_e4m3(values), values.astype(FP8).view(np.uint8))


def test_static_activation_scales_dropped_for_bf16_and_kept_for_fp8(fp8_pair, tmp_path):
    root, base, _ = fp8_pair
    stored = read_raw_safetensors(root / "base" / "model.safetensors")
    act = {n.removesuffix("weight") + "activation_scale": _raw(np.array([0.5 + i], np.float32), "F32")
           for i, n in enumerate(SHAPES)}
    (tmp_path / "base").mkdir()
    write_raw_safetensors(tmp_path / "base" / "model.safetensors", {**stored, **act})
    (tmp_path / "base" / "config.json").write_text(json.dumps(
        {"quantization_config": {**FP8_CONFIG, "activation_scheme": "static"}}))
    safeblend.merge(tmp_path / "base", root / "ft", tmp_path / "bf16", weight=0.5)
    assert set(load_checkpoint(tmp_path / "bf16")) == set(base)
    safeblend.merge(tmp_path / "base", root / "ft", tmp_path / "fp8", weight=0.5, dtype="fp8")
    out = read_raw_safetensors(tmp_path / "fp8" / "model.safetensors")
    assert set(out) == set(stored) | set(act)
    assert all(out[n] == act[n] for n in act)


@pytest.mark.parametrize("norm_first", [True, False])
def test_fp8_output_scales_are_not_counted_as_merged_bf16_values(tmp_path, norm_first):
    """The fresh scales a weight's chunks write (F32, placed just before the weight) are no merged
    values: their bytes read as bf16 must not count as NaN/inf. Here the one scale is 0x3C237F80,
    whose low half is bf16 +inf, after a merged bf16 norm, or first in the shard (before every
    merged tensor)."""
    scale = np.array([0x3C237F80], np.uint32).view(np.float32)[0]
    value = np.float32(scale * np.float32(E4M3_MAX))  # the block's amax: fresh scale = value / 448 = scale
    assert np.float32(value / np.float32(E4M3_MAX)) == scale
    name = "model.layers.0.mlp.down_proj.weight"
    (tmp_path / "base").mkdir()
    norm = {"model.norm.weight": _raw(np.full(8, 1.0, BF16), "BF16")}
    quantized = {name: _raw(np.zeros((128, 128), np.uint8), "F8_E4M3"),  # all zero, scale 1
                 name + "_scale_inv": _raw(np.ones((1, 1), np.float32), "F32")}
    write_raw_safetensors(tmp_path / "base" / "model.safetensors",
                          {**norm, **quantized} if norm_first else {**quantized, **norm})
    (tmp_path / "base" / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": FP8_CONFIG}))
    weight = np.zeros((128, 128), np.float32)
    weight[0, 0] = value
    (tmp_path / "ft").mkdir()
    write_raw_safetensors(tmp_path / "ft" / "model.safetensors", {
        "model.norm.weight": _raw(np.full(8, 1.5, BF16), "BF16"), name: _raw(weight, "F32")})
    (tmp_path / "ft" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    seen = []
    result = safeblend.merge(tmp_path / "base", tmp_path / "ft", tmp_path / "out", weight=1.0, dtype="fp8",
                             on_warning=seen.append)
    assert not [m for m in [*seen, *result.warnings] if "non-finite" in m], seen
    out = read_raw_safetensors(tmp_path / "out" / "model.safetensors")
    assert np.frombuffer(out[name + "_scale_inv"][2], np.float32).tolist() == [scale]
    codes = np.frombuffer(out[name][2], np.uint8)
    assert codes[0] == np.array([E4M3_MAX], np.float32).astype(FP8).view(np.uint8)[0] and not codes[1:].any()
