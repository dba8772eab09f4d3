"""PEFT LoRA adapters as fine-tuned inputs (engine/lora.py), against PEFT itself.

Adapters are made by the real ``peft`` library on tiny transformers models built from a
config, with every factor randomised (PEFT initialises B to zero, which would make the delta
vanish). The reference fine-tuned model is PEFT's own ``merge_and_unload`` run in float64, so
``--weight 1.0`` is checked against PEFT's merge and other weights against a float64 merge,
both with the tolerance of safeblend.tolerance; the merged model is then loaded with transformers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

import safeblend
from safeblend import lora
from safeblend.checkpoint import Checkpoint
from safeblend.cli import main
from safeblend.errors import CheckpointError, IncompatibleInputsError
from safeblend.methods import linear
from safeblend.methods.linear import Linear
from safeblend.plan import make_plan as plan
from tests.helpers import NUMPY_DTYPES, assert_within_tolerance, load_checkpoint, random_tensor, write_checkpoint

torch = pytest.importorskip("torch", reason="the test extra installs torch")
transformers = pytest.importorskip("transformers", reason="the test extra installs transformers")
peft = pytest.importorskip("peft", reason="the test extra installs peft")

LLAMA = dict(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
GPT2 = dict(vocab_size=96, n_embd=48, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
TOKENS = [[1, 17, 42, 90, 3, 55, 7, 8]]


@dataclass(frozen=True)
class Case:
    arch: str  # "llama" or "gpt2"
    dtype: str  # the base model's torch dtype
    lora: dict  # LoraConfig arguments
    adapter_dtype: str = "float32"  # the dtype the adapter's tensors are saved in


CASES = {
    "llama-plain": Case("llama", "float32", dict(r=8, lora_alpha=16, target_modules="all-linear")),
    "llama-rslora-bf16-adapter": Case("llama", "bfloat16", dict(r=4, lora_alpha=8, use_rslora=True,
                                                                 target_modules=["q_proj", "v_proj", "up_proj"]),
                                      adapter_dtype="bfloat16"),
    "llama-rank-alpha-patterns": Case("llama", "float16", dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
        rank_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 6}, alpha_pattern={"v_proj": 3, "o_proj": 32})),
    "llama-embedding-modules-to-save": Case("llama", "bfloat16", dict(
        r=4, lora_alpha=4, target_modules=["embed_tokens", "q_proj"], modules_to_save=["lm_head"]),
        adapter_dtype="float16"),
    "gpt2-fan-in-fan-out-bias-all": Case("gpt2", "float32", dict(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, bias="all")),
    "gpt2-lora-only-lora-bias": Case("gpt2", "bfloat16", dict(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, bias="lora_only",
        lora_bias=True)),
}


def _torch_dtype(name: str):
    return getattr(torch, name)


def _model(arch: str, dtype: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**LLAMA, **overrides}))
    else:
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**GPT2, **overrides}))
    return model.to(_torch_dtype(dtype))


def _save_adapter(base_dir: Path, out: Path, arch: str, config, seed: int, adapter_dtype: str = "float32") -> Path:
    """An adapter made by PEFT on the model in ``base_dir``, every trainable tensor randomised."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = peft.get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in peft_model.named_parameters():
            if p.requires_grad:  # LoRA factors, modules_to_save copies, trainable biases
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    peft_model.to(_torch_dtype(adapter_dtype)).save_pretrained(out)
    return out


def _peft_merged(base_dir: Path, adapter_dir: Path, dtype=torch.float64) -> dict[str, np.ndarray]:
    """θ_ft from PEFT: PeftModel.from_pretrained(...).merge_and_unload(), in ``dtype``."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    merged = peft.PeftModel.from_pretrained(model, adapter_dir).to(dtype).merge_and_unload()
    return {k: v.detach().numpy().copy() for k, v in merged.state_dict().items()}


@dataclass
class Prepared:
    case: Case
    base: Path
    adapter: Path
    base_tensors: dict[str, np.ndarray]
    theta: dict[str, np.ndarray]  # PEFT's merged fine-tune, float64


@pytest.fixture(scope="module", params=list(CASES))
def prepared(request, tmp_path_factory) -> Prepared:
    case = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    _model(case.arch, case.dtype).save_pretrained(root / "base")
    _save_adapter(root / "base", root / "adapter", case.arch, peft.LoraConfig(**case.lora), seed=1,
                  adapter_dtype=case.adapter_dtype)
    base_tensors = load_checkpoint(root / "base")
    theta = _peft_merged(root / "base", root / "adapter")
    return Prepared(case, root / "base", root / "adapter", base_tensors, theta)


def _reference(p: Prepared, weight: float) -> dict[str, np.ndarray]:
    """θ_base + λ·(θ_ft − θ_base) in float64, rounded to each tensor's output dtype."""
    ref = {}
    for name, b in p.base_tensors.items():
        b64 = b.astype(np.float64)
        ref[name] = (b64 + weight * (p.theta[name] - b64)).astype(b.dtype).astype(np.float64)
    return ref


@pytest.mark.parametrize("weight", [1.0, 0.6])
def test_merge_matches_peft_and_float64(prepared, tmp_path, weight):
    p = prepared
    # 4 KiB chunks: most chunks start and end inside a row of the weight.
    safeblend.merge(p.base, p.adapter, tmp_path / "out", weight=weight, chunk_size=4096)
    merged = load_checkpoint(tmp_path / "out")
    assert merged.keys() == p.base_tensors.keys()
    ref = _reference(p, weight)
    changed = 0
    for name, b in p.base_tensors.items():
        assert merged[name].dtype == b.dtype, name
        assert_within_tolerance(merged[name], ref[name], [b, p.theta[name]], f"{p.case} {name}")
        changed += not np.array_equal(merged[name], b)
    assert changed >= 2  # the adapter did change the model


def test_fp32_output_of_a_16_bit_model_holds_fp32_tolerance(prepared, tmp_path):
    """A bf16/fp16 model merged with --dtype fp32: the delta is then formed in float64 (an fp32
    product is only good enough for 16-bit outputs), so fp32's 1-ulp rule holds."""
    p = prepared
    safeblend.merge(p.base, p.adapter, tmp_path / "out", weight=0.6, dtype="fp32", chunk_size=4096)
    merged = load_checkpoint(tmp_path / "out")
    for name, b in p.base_tensors.items():
        b64 = b.astype(np.float64)
        ref = (b64 + 0.6 * (p.theta[name] - b64)).astype(np.float32).astype(np.float64)
        assert merged[name].dtype == np.float32, name
        assert_within_tolerance(merged[name], ref, [b, p.theta[name]], f"{p.case} {name}")


def test_weight_one_equals_peft_merge_and_unload_in_the_models_dtype(prepared, tmp_path):
    """The literal comparison: PEFT's merge_and_unload in the model's own dtype."""
    p = prepared
    safeblend.merge(p.base, p.adapter, tmp_path / "out", weight=1.0)
    merged = load_checkpoint(tmp_path / "out")
    peft_merged = _peft_merged(p.base, p.adapter, dtype=torch.float32)
    for name, b in p.base_tensors.items():
        # PEFT's merge runs here in fp32 (in bf16/fp16 it would round the delta to the weight
        # dtype before adding it: a double rounding), and its result is the reference.
        ref = peft_merged[name].astype(np.float64)
        if b.dtype != np.float32:
            assert_within_tolerance(merged[name], ref, [b, p.theta[name]], f"{p.case} {name}")
            continue
        # In fp32, PEFT's own product is a few ulps off where W and s·B·A nearly cancel
        # (safeblend accumulates it in float64), so the tolerance of safeblend.tolerance is widened by
        # PEFT's distance from the float64 merge.
        got, theta = merged[name].astype(np.float64), p.theta[name]
        allowed = (np.abs(ref - theta) + np.spacing(np.abs(ref).astype(np.float32))
                   + 2.0**-22 * np.maximum(np.abs(b), np.abs(theta)))
        bad = np.abs(got - ref) > allowed
        assert not bad.any(), f"{name}: {int(bad.sum())} of {bad.size} elements differ from PEFT's beyond tolerance"


def test_merged_model_loads_and_matches_reference_logits(prepared, tmp_path):
    p = prepared
    weight = 0.6
    result = CliRunner().invoke(main, ["merge", str(p.base), str(p.adapter), "-o", str(tmp_path / "merged"),
                                       "--weight", str(weight), "-q"])
    assert result.exit_code == 0, result.output
    dtype = _torch_dtype(p.case.dtype)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=dtype)
    assert all(v.dtype == dtype for v in merged.state_dict().values())
    reference = transformers.AutoModelForCausalLM.from_pretrained(p.base, dtype=torch.float64)
    state = {k: torch.from_numpy(v) for k, v in _reference(p, weight).items()}
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing)  # GPT-2 ties lm_head to wte
    tokens = torch.tensor(TOKENS)
    with torch.no_grad():
        got = merged.to(torch.float64)(tokens).logits
        want = reference(tokens).logits
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-3), (got - want).abs().max()
    assert got.argmax(-1).tolist() == want.argmax(-1).tolist()


# -- format variants ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, Path]:
    """A fp32 tiny Llama and a rank-8 adapter on all its linear layers."""
    root = tmp_path_factory.mktemp("llama")
    _model("llama", "float32").save_pretrained(root / "base")
    _save_adapter(root / "base", root / "adapter", "llama", peft.LoraConfig(r=8, lora_alpha=16,
                                                                              target_modules="all-linear"), seed=1)
    return root / "base", root / "adapter"


def _rewrite_adapter(src: Path, dst: Path, rename) -> Path:
    dst.mkdir()
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    tensors = load_file(str(src / "adapter_model.safetensors"))
    save_file({rename(k): v for k, v in tensors.items()}, str(dst / "adapter_model.safetensors"))
    return dst


@pytest.mark.parametrize("rename", [
    lambda k: k.removeprefix("base_model.model."),
    lambda k: k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight"),
], ids=["no-prefix", "adapter-name-segment"])
def test_key_variants_give_the_same_merge(llama, tmp_path, rename):
    base, adapter = llama
    variant = _rewrite_adapter(adapter, tmp_path / "variant", rename)
    safeblend.merge(base, adapter, tmp_path / "a", weight=0.6)
    safeblend.merge(base, variant, tmp_path / "b", weight=0.6)
    _assert_same_tensors(tmp_path / "a", tmp_path / "b")


def _assert_same_tensors(a: Path, b: Path) -> None:
    got, want = load_checkpoint(a), load_checkpoint(b)
    assert got.keys() == want.keys()
    for name, w in want.items():
        assert np.array_equal(got[name], w), name


def test_adapter_weights_file_path_is_accepted(llama, tmp_path):
    base, adapter = llama
    safeblend.merge(base, adapter / "adapter_model.safetensors", tmp_path / "a", weight=0.6)
    safeblend.merge(base, adapter, tmp_path / "b", weight=0.6)
    _assert_same_tensors(tmp_path / "a", tmp_path / "b")


@pytest.mark.parametrize("method", ["linear", "task-arithmetic", "slerp", "ties", "dare-linear", "dare-ties",
                                    "model-stock"])
def test_every_method_matches_the_materialised_fine_tune(llama, tmp_path_factory, tmp_path, method):
    """An adapter merges like the full model PEFT would have written for it."""
    base, adapter = llama
    root = tmp_path_factory.getbasetemp() / "llama-full"
    if not root.exists():
        second = _save_adapter(base, root / "adapter2", "llama",
                               peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]), seed=2)
        for i, a in enumerate([adapter, second]):
            model = transformers.AutoModelForCausalLM.from_pretrained(base)
            peft.PeftModel.from_pretrained(model, a).merge_and_unload().save_pretrained(root / f"full{i}")
    adapters = [adapter, root / "adapter2"] if method != "slerp" else [adapter]
    fulls = [root / "full0", root / "full1"][: len(adapters)]
    params = dict(density=0.5) if method in ("ties", "dare-linear", "dare-ties") else {}
    safeblend.merge(base, adapters, tmp_path / "lora", method=method, on_warning=lambda m: None, **params)
    safeblend.merge(base, fulls, tmp_path / "full", method=method, on_warning=lambda m: None, **params)
    got, want = load_checkpoint(tmp_path / "lora"), load_checkpoint(tmp_path / "full")
    for name, w in want.items():
        # Both fine-tunes are fp32 W + s·B·A, rounded once but summed in another order.
        close = np.isclose(got[name], w, rtol=1e-5, atol=1e-7)
        assert close.mean() > 0.999, f"{method} {name}: {int((~close).sum())} of {close.size} differ"


def test_delta_views_for_any_chunking_and_block(llama, monkeypatch):
    """View arbitrary ranges, including pieces of rows and rows wider than the inner block."""
    base_dir, adapter = llama
    base = Checkpoint.open(base_dir)
    theta = _peft_merged(base_dir, adapter, dtype=torch.float64)
    monkeypatch.setattr(lora, "_BLOCK_MULS", 7 * 8)  # 7-element blocks at rank 8
    ckpt = lora.open_model(adapter, base)
    rng = np.random.default_rng(0)
    for name in ckpt.targeted:
        info = ckpt.tensors[name]
        f = ckpt.file_of(info)
        assert info.dtype.name == "F32" and info.shape == base.tensors[name].shape
        want = theta[name].ravel()
        for _ in range(5):
            first = int(rng.integers(0, info.numel))
            count = int(rng.integers(1, info.numel - first + 1))
            got = f.view(info, first, count).astype(np.float64)
            assert np.allclose(got, want[first : first + count], rtol=1e-5, atol=1e-7), name
            raw = np.frombuffer(f.byte_view(info.start + first * 4, count * 4), dtype=np.float32)
            assert np.array_equal(raw, got.astype(np.float32))
            f.release(info.start + first * 4, count * 4)
    ckpt.close()
    base.close()


def test_segments_cover_the_range_exactly():
    for first, count, cols, block in [(0, 100, 10, 25), (3, 95, 10, 25), (5, 3, 10, 4), (0, 50, 50, 7),
                                      (13, 200, 7, 1000), (9, 1, 10, 10)]:
        pieces = list(lora._segments(first, count, cols, block))
        pos = first
        for start, rows, c0, c1 in pieces:
            assert start == pos and start % cols == c0 and rows * (c1 - c0) <= max(block, 1)
            assert rows == 1 or (c0 == 0 and c1 == cols)
            pos += rows * (c1 - c0)
        assert pos == first + count


def test_gpu_pipeline_reads_adapters_through_byte_view(llama, tmp_path, monkeypatch):
    """The CUDA executor (with the CPU stand-ins of tests/test_cuda_pipeline.py) takes a LoRA
    fine-tune's bytes from the same virtual file; the delta is computed on the host."""
    try:
        import safeblend.api
        from tests.test_cuda_pipeline import StandInExecutor, _select_stand_in
    except (ImportError, pytest.skip.Exception) as exc:
        pytest.skip(f"the CUDA stand-ins are unavailable: {exc}")
    base, adapter = llama
    monkeypatch.setattr(safeblend.api, "_select_backend", _select_stand_in)
    monkeypatch.setattr(safeblend.api, "CudaExecutor", StandInExecutor)
    # The CPU merge reads θ_ft from the same virtual file too (not the fused low-rank terms,
    # which skip θ_ft's rounding to fp32 and so differ in the last fp32 bits).
    monkeypatch.setattr(Linear, "takes_low_rank", False)
    kwargs = dict(weight=0.6, chunk_size=4096)
    safeblend.merge(base, adapter, tmp_path / "cuda", device="cuda", **kwargs)
    safeblend.merge(base, adapter, tmp_path / "cpu", device="cpu", **kwargs)
    got, want = load_checkpoint(tmp_path / "cuda"), load_checkpoint(tmp_path / "cpu")
    for name, w in want.items():
        assert np.allclose(got[name], w, rtol=2e-7, atol=1e-9), name


# -- linear merges add the low-rank terms; untouched tensors are copies --------------------------


@pytest.fixture
def low_rank_calls(monkeypatch) -> list[list[str]]:
    """Every call of the fused linear arithmetic (linear.merge_low_rank), as its models' kinds."""
    calls: list[list[str]] = []
    original = linear.merge_low_rank

    def spy(backend, base, models, weights, out):
        calls.append(["lora" if isinstance(m, lora.LowRankChunk) else "full" for m in models])
        original(backend, base, models, weights, out)

    monkeypatch.setattr(linear, "merge_low_rank", spy)
    return calls


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("weight", [1.0, 0.6])
def test_low_rank_linear_merge_matches_float64(prepared, tmp_path, low_rank_calls, weight, dtype):
    """On the CPU, linear adds w·s·B·A to the base without forming θ_ft; the result holds
    the tolerance (safeblend.tolerance) of the float64 merge for 16-bit and fp32 outputs alike."""
    p = prepared
    safeblend.merge(p.base, p.adapter, tmp_path / "out", weight=weight, dtype=dtype, device="cpu", chunk_size=4096)
    assert low_rank_calls and all(kinds == ["lora"] for kinds in low_rank_calls)
    merged = load_checkpoint(tmp_path / "out")
    for name, b in p.base_tensors.items():
        b64 = b.astype(np.float64)
        ref = (b64 + weight * (p.theta[name] - b64)).astype(NUMPY_DTYPES[dtype]).astype(np.float64)
        assert merged[name].dtype == NUMPY_DTYPES[dtype], name
        assert_within_tolerance(merged[name], ref, [b, p.theta[name]], f"{p.case} {name}")


def _stored_tensor_bytes(directory: Path) -> int:
    """The data bytes of every safetensors file in ``directory``: its size less its header."""
    total = 0
    for path in directory.glob("*.safetensors"):
        with open(path, "rb") as handle:
            total += path.stat().st_size - 8 - int.from_bytes(handle.read(8), "little")
    return total


def test_bytes_read_is_what_the_files_hold(prepared, tmp_path, low_rank_calls):
    """The summary's bytes_read for a fused LoRA merge: the base's tensors and the adapter's
    once each, not the fp32 θ_ft that the adapter stands for."""
    p = prepared
    result = safeblend.merge(p.base, p.adapter, tmp_path / "out", weight=0.6, chunk_size=4096)
    assert low_rank_calls
    assert result.bytes_read == _stored_tensor_bytes(p.base) + _stored_tensor_bytes(p.adapter)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_linear_merge_of_a_lora_and_a_full_model(llama, tmp_path, low_rank_calls, dtype):
    """One LoRA and one full fine-tune: the full model's term through the backend, the LoRA's
    from its factors, one rounding; against the float64 three-model merge."""
    base_dir, adapter = llama
    base = load_checkpoint(base_dir)
    rng = np.random.default_rng(3)
    full = {n: (t + 0.01 * rng.standard_normal(t.shape)).astype(t.dtype) for n, t in base.items()}
    write_checkpoint(tmp_path / "full", full)
    theta = _peft_merged(base_dir, adapter)
    safeblend.merge(base_dir, [adapter, tmp_path / "full"], tmp_path / "out", weight=[0.6, 0.3], dtype=dtype,
                 device="cpu", chunk_size=4096)
    assert low_rank_calls and all(kinds == ["lora", "full"] for kinds in low_rank_calls)
    merged = load_checkpoint(tmp_path / "out")
    for name, b in base.items():
        b64 = b.astype(np.float64)
        ref = b64 + 0.6 * (theta[name] - b64) + 0.3 * (full[name] - b64)
        ref = ref.astype(NUMPY_DTYPES[dtype]).astype(np.float64)
        assert_within_tolerance(merged[name], ref, [b, theta[name], full[name]], name)


def test_low_rank_chunks_for_any_range(llama, monkeypatch):
    """LowRankChunk pieces and products over arbitrary ranges. Matmuls of at most 100 elements
    (rank 8) and pieces of at most 250: a piece of whole 48-wide rows takes one stacked matmul
    of 2-row steps and a remainder row; pieces starting or ending mid-row take one row each."""
    base_dir, adapter = llama
    base = Checkpoint.open(base_dir)
    base_tensors = load_checkpoint(base_dir)
    theta = _peft_merged(base_dir, adapter)
    monkeypatch.setattr(lora, "_BLOCK_MULS", 100 * 8)
    rng = np.random.default_rng(0)
    for out_dtype in ("BF16", "F32"):  # fp32 products, float64 products
        ckpt = lora.open_model(adapter, base, out_dtype, low_rank=True)
        for name in ckpt.targeted:
            info = ckpt.tensors[name]
            f = ckpt.file_of(info)
            cols = info.shape[-1]
            delta = (theta[name] - base_tensors[name].astype(np.float64)).ravel()
            for _ in range(5):
                first = int(rng.integers(0, info.numel))
                count = int(rng.integers(1, info.numel - first + 1))
                want = delta[first : first + count]
                chunk = f.view(info, first, count)
                assert isinstance(chunk, lora.LowRankChunk)
                pieces = list(chunk.pieces(250))
                assert pieces[0][0] == 0 and pieces[-1][1] == count
                for (lo, hi), (next_lo, _) in zip(pieces, pieces[1:] + [(count, None)]):
                    start, end = first + lo, first + hi
                    one_row = start // cols == (end - 1) // cols
                    assert hi == next_lo and 0 < hi - lo <= 250 and (one_row or (start % cols == 0 == end % cols))
                acc = np.full(count, 0.25, dtype=chunk.precision)
                for lo, hi in pieces:
                    chunk.product_into(acc[lo:hi], lo, 0.6, accumulate=True)
                assert np.allclose(acc, 0.25 + 0.6 * want, rtol=1e-5, atol=1e-7), name
                fresh = np.empty(count, dtype=np.float32)  # an fp32 accumulator of a float64 product too
                chunk.product_into(fresh, 0, 1.0, accumulate=False)
                assert np.allclose(fresh, want, rtol=1e-5, atol=1e-7), name
                # The GPU path's bytes are still θ_ft itself.
                raw = np.frombuffer(f.byte_view(info.start + first * 4, count * 4), dtype=np.float32)
                assert np.allclose(raw, theta[name].ravel()[first : first + count], rtol=1e-5, atol=1e-7), name
        ckpt.close()
    base.close()


def test_tensors_an_adapter_leaves_alone_are_copied_from_the_base(llama, tmp_path):
    """Embeddings, LM head and norms of a LoRA fine-tune are the base's tensors: planned as
    copies (one input read, no arithmetic), their bytes the base's, inf and -0.0 included
    (a literal merge would give inf − inf = NaN and +0.0). In a targeted weight, ±inf stays
    too: θ_ft − θ_base is s·B·A."""
    base_dir, adapter = llama
    tensors = load_checkpoint(base_dir)
    q = "model.layers.0.self_attn.q_proj.weight"
    tensors["model.norm.weight"][:2] = [np.inf, -0.0]
    tensors[q][0, 0] = -np.inf
    write_checkpoint(tmp_path / "base", tensors)

    base = Checkpoint.open(tmp_path / "base")
    ckpt = lora.open_model(adapter, base, None, low_rank=True)
    merge_plan = plan(base, [ckpt], None, 2**30, {})
    for t in merge_plan.tensors:
        untouched = t.name not in ckpt.targeted
        assert t.action == ("copy" if untouched else "merge") and (not t.models) == untouched, t.name
    assert {t.name for t in merge_plan.tensors if t.action == "copy"} >= {
        "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"}
    ckpt.close()
    base.close()

    safeblend.merge(tmp_path / "base", adapter, tmp_path / "out", weight=0.6, device="cpu")
    safeblend.merge(tmp_path / "base", adapter, tmp_path / "bf16", weight=0.6, dtype="bf16", device="cpu")
    merged, cast = load_checkpoint(tmp_path / "out"), load_checkpoint(tmp_path / "bf16")
    for t in merge_plan.tensors:
        if t.action == "copy":
            assert merged[t.name].tobytes() == tensors[t.name].tobytes(), t.name
            assert cast[t.name].tobytes() == tensors[t.name].astype(NUMPY_DTYPES["bf16"]).tobytes(), t.name
    assert merged[q][0, 0] == -np.inf and cast[q][0, 0] == -np.inf
    assert np.isfinite(merged[q].ravel()[1:]).all()


def test_a_full_fine_tune_is_merged_even_where_it_equals_the_base(tmp_path):
    """Only the same stored tensor is a copy: a full fine-tune's tensor equal to the base's
    in value, and one that differs, are both merged; the base given as its own fine-tune is
    copied whole, reading each tensor once."""
    rng = np.random.default_rng(0)
    tensors = {"same.weight": random_tensor(rng, (8, 16), "bf16"), "changed.weight": random_tensor(rng, (8, 16), "bf16")}
    ft = {"same.weight": tensors["same.weight"].copy(), "changed.weight": random_tensor(rng, (8, 16), "bf16")}
    write_checkpoint(tmp_path / "base", tensors)
    write_checkpoint(tmp_path / "ft", ft)
    base, other, itself = (Checkpoint.open(tmp_path / d) for d in ("base", "ft", "base"))
    assert all(t.action == "merge" and len(t.models) == 1 for t in plan(base, [other], None, 2**30, {}).tensors)
    assert all(t.action == "copy" and not t.models for t in plan(base, [itself], None, 2**30, {}).tensors)
    for ckpt in (base, other, itself):
        ckpt.close()

    safeblend.merge(tmp_path / "base", tmp_path / "ft", tmp_path / "out", weight=0.6)
    merged = load_checkpoint(tmp_path / "out")
    for name, b in tensors.items():
        b64 = b.astype(np.float64)
        ref = (b64 + 0.6 * (ft[name].astype(np.float64) - b64)).astype(b.dtype).astype(np.float64)
        assert_within_tolerance(merged[name], ref, [b, ft[name]], name)
    result = safeblend.merge(tmp_path / "base", tmp_path / "base", tmp_path / "self", weight=0.6)
    assert result.bytes_read == sum(t.nbytes for t in tensors.values())
    copied = load_checkpoint(tmp_path / "self")
    assert all(copied[n].tobytes() == t.tobytes() for n, t in tensors.items())


# -- unsupported adapters ----------------------------------------------------------------------


def _ia3(base: Path, out: Path) -> Path:
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    peft.get_peft_model(model, peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                              feedforward_modules=["down_proj"])).save_pretrained(out)
    return out


def _dora(base: Path, out: Path) -> Path:
    return _save_adapter(base, out, "llama", peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), seed=3)


def _wrong_shape(base: Path, out: Path) -> Path:
    other = out.parent / "wider"
    _model("llama", "float32", hidden_size=64).save_pretrained(other)
    return _save_adapter(other, out, "llama", peft.LoraConfig(r=4, target_modules=["q_proj"]), seed=3)


def _other_arch(base: Path, out: Path) -> Path:
    other = out.parent / "gpt2"
    _model("gpt2", "float32").save_pretrained(other)
    return _save_adapter(other, out, "gpt2", peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True),
                         seed=3)


@pytest.mark.parametrize("make,message", [
    (_ia3, "peft_type 'IA3' is not supported"),
    (_dora, "DoRA (use_dora) rescales"),
    (_wrong_shape, "but the base's 'model.layers.0.self_attn.q_proj.weight' is [48, 48]"),
    (_other_arch, "which the base"),
], ids=["ia3", "dora", "shape", "other-model"])
def test_unsupported_adapters_fail_with_one_line(llama, tmp_path, make, message):
    base, _ = llama
    bad = make(base, tmp_path / "bad")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["merge", str(base), str(bad), "-o", str(out), "-q"])
    assert result.exit_code == 1, result.output
    # Before the error, an adapter trained on another model says which (base_model_name_or_path).
    lines = [line for line in result.stderr.strip().splitlines()
             if not line.startswith(f"Warning: {bad}: the adapter was trained on ")]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.stderr
    assert str(bad) in lines[0]
    assert not out.exists()


def test_adapter_as_base_is_refused(llama, tmp_path):
    base, adapter = llama
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["merge", str(adapter), str(base), "-o", str(out), "-q"])
    assert result.exit_code == 1, result.output
    assert result.stderr.strip() == (f"Error: {adapter}: is a PEFT adapter (adapter_config.json), not a full model; "
                                     "give it as a fine-tuned model (FT), after the full BASE model it was trained from")
    assert not out.exists()


def test_adapter_config_errors(llama, tmp_path):
    base_dir, adapter = llama
    base = Checkpoint.open(base_dir)
    bad = _rewrite_adapter(adapter, tmp_path / "bad", lambda k: k)
    config = json.loads((adapter / "adapter_config.json").read_text())
    for change, message in [({"r": 4}, "its factors have rank 8 but adapter_config.json gives rank 4"),
                            ({"bias": "some"}, "bias 'some' is not supported"),
                            ({"layer_replication": [[0, 1]]}, "layer_replication changes the model's layer stack")]:
        (bad / "adapter_config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
            lora.open_model(bad, base)
    (bad / "adapter_config.json").write_text(json.dumps(config))
    (bad / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no adapter_model.safetensors"):
        lora.open_model(bad, base)
    only_a = _rewrite_adapter(adapter, tmp_path / "only_a", lambda k: k.replace("lora_B", "lora_A.x"))
    with pytest.raises(CheckpointError):
        lora.open_model(only_a, base)
    base.close()


def test_modules_to_save_of_the_wrong_shape(llama, tmp_path):
    base_dir, adapter = llama
    base = Checkpoint.open(base_dir)
    bad = _rewrite_adapter(adapter, tmp_path / "bad", lambda k: k)
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    tensors["base_model.model.lm_head.weight"] = np.zeros((100, 48), np.float32)  # a resized vocabulary
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    with pytest.raises(IncompatibleInputsError, match=r"resized vocabularies are not supported"):
        lora.open_model(bad, base)
    base.close()


# -- recipes: mergekit's model+adapter references -----------------------------------------------


def _check_task_arithmetic(out_dir: Path, base: Path, theta: dict[str, np.ndarray], weight: float):
    """OUT is θ_base + weight·(θ − θ_base) over every base tensor, against a float64 reference;
    returns the output's and the base's tensors."""
    base_tensors = load_checkpoint(base)
    out = load_checkpoint(out_dir)
    assert set(out) == set(base_tensors)
    for name, w in base_tensors.items():
        b = w.astype(np.float64)
        expected = b + weight * (theta[name].astype(np.float64) - b)
        assert_within_tolerance(out[name], expected, [w, theta[name]], name)
    return out, base_tensors


def test_recipe_model_plus_lora_is_the_adapter_merged_into_the_base(llama, tmp_path):
    """``model: BASE+ADAPTER`` in a recipe is mergekit's reference to the adapter merged into
    BASE (PEFT's merge_and_unload): task_arithmetic with weight 0.7 gives
    θ_base + 0.7·(θ_peft − θ_base), checked against PEFT's own float64 merge."""
    import yaml

    from safeblend.recipe import merge_recipe

    base, adapter = llama
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(base),
                                      "models": [{"model": f"{base}+{adapter}", "parameters": {"weight": 0.7}}],
                                      "dtype": "float32"}))
    merge_recipe(recipe, tmp_path / "out")
    out, base_tensors = _check_task_arithmetic(tmp_path / "out", base, _peft_merged(base, adapter), 0.7)
    assert any(not np.array_equal(out[n], base_tensors[n]) for n in out)


def test_recipe_adapter_on_another_model_is_applied_to_that_model(llama, tmp_path):
    """``model: OTHER+ADAPTER`` with OTHER not the base: mergekit merges the adapter into OTHER
    (PEFT's merge_and_unload on OTHER), then merges that model as usual; task_arithmetic with
    weight 0.7 against PEFT's float64 merge on OTHER; OTHER's files are closed afterwards."""
    import shutil

    import yaml

    from safeblend.recipe import merge_recipe

    base, adapter = llama
    other = tmp_path / "other"
    shutil.copytree(base, other)
    rng = np.random.default_rng(3)
    tensors = {k: (v + 0.05 * rng.standard_normal(v.shape)).astype(v.dtype)
               for k, v in load_checkpoint(base).items()}
    save_file(tensors, str(other / "model.safetensors"), metadata={"format": "pt"})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(base),
                                      "models": [{"model": f"{other}+{adapter}", "parameters": {"weight": 0.7}}],
                                      "dtype": "float32"}))
    merge_recipe(recipe, tmp_path / "out")
    _check_task_arithmetic(tmp_path / "out", base, _peft_merged(other, adapter), 0.7)


def test_recipe_lora_references_refused(llama, tmp_path):
    """An adapter as the base, a reference whose adapter is not a PEFT directory or whose model
    is not a local directory: one line naming it, nothing written."""
    import yaml

    base, adapter = llama
    for recipe, message in [
        ({"merge_method": "task_arithmetic", "base_model": str(base),
          "models": [{"model": f"{tmp_path}/other+{adapter}", "parameters": {"weight": 1}}]},
         "is not a local model directory"),
        ({"merge_method": "task_arithmetic", "base_model": f"{base}+{adapter}",
          "models": [{"model": str(base), "parameters": {"weight": 1}}]}, "as the base is not supported"),
        ({"merge_method": "task_arithmetic", "base_model": str(base),
          "models": [{"model": f"{base}+{tmp_path}", "parameters": {"weight": 1}}]}, "not a local PEFT adapter"),
    ]:
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump(recipe))
        result = CliRunner().invoke(main, ["merge", "--config", str(path), "-o", str(tmp_path / "out")])
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert result.exit_code != 0 and len(errors) == 1 and message in errors[0], result.output
        assert not (tmp_path / "out").exists()
