"""Generated Llama-shaped checkpoints, for the demo, the tests and the benchmarks.

Real model hubs are out of reach on the machines this project is built on, so the tool makes
its own inputs: random weights with a Llama tensor list (names and shapes as transformers
writes them) and a matching config.json, plus a "fine-tuned" twin whose weights are the base's
plus a small perturbation. Files are written by the safetensors library itself, so the
engine's reader is exercised on files it did not write.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from .dtypes import DTYPES, TORCH_DTYPE_NAMES


@dataclass(frozen=True)
class LlamaShape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    vocab_size: int
    num_attention_heads: int
    num_key_value_heads: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def tensors(self) -> dict[str, tuple[int, ...]]:
        """Every weight's name and shape, in transformers' order."""
        h, i, kv = self.hidden_size, self.intermediate_size, self.num_key_value_heads * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab_size, h)}
        for n in range(self.num_hidden_layers):
            p = f"model.layers.{n}."
            shapes.update({
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            })
        shapes["model.norm.weight"] = (h,)
        shapes["lm_head.weight"] = (self.vocab_size, h)
        return shapes

    @property
    def parameters(self) -> int:
        return sum(int(np.prod(s)) for s in self.tensors().values())

    def config(self, torch_dtype: str) -> dict:
        """A config.json that transformers' LlamaForCausalLM accepts."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            **asdict(self),
            "max_position_embeddings": 256,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
            "hidden_act": "silu",
            "torch_dtype": torch_dtype,
        }


PRESETS: dict[str, LlamaShape] = {
    "tiny": LlamaShape(64, 176, 2, 512, 4, 2),
    "small": LlamaShape(512, 1408, 4, 8000, 8, 2),  # ~25M parameters
    "tinyllama-1.1b": LlamaShape(2048, 5632, 22, 32000, 32, 4),
    "llama-3-70b": LlamaShape(8192, 28672, 80, 128256, 64, 8),
}


def write_pair(
    base_dir: Path,
    ft_dir: Path,
    shape: LlamaShape,
    dtype: str = "BF16",
    seed: int = 0,
    shard_size: int = 2 * 10**9,
    delta_scale: float = 0.05,
) -> None:
    """Write a random base model and a perturbed "fine-tune" of it, each a HF model directory.

    Memory is one shard's worth of tensors at a time.
    """
    rng = np.random.default_rng(seed)
    np_dtype = DTYPES[dtype].numpy
    for directory in (base_dir, ft_dir):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(shape.config(TORCH_DTYPE_NAMES[dtype]), indent=2))
    groups: list[dict[str, tuple[int, ...]]] = [{}]
    filled = 0
    itemsize = DTYPES[dtype].itemsize
    for name, dims in shape.tensors().items():
        nbytes = int(np.prod(dims)) * itemsize
        if groups[-1] and filled + nbytes > shard_size:
            groups.append({})
            filled = 0
        groups[-1][name] = dims
        filled += nbytes
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    if len(groups) == 1:
        names = ["model.safetensors"]
    weight_map = {}
    for filename, group in zip(names, groups):
        base_tensors, ft_tensors = {}, {}
        for name, dims in group.items():
            base32 = _random(rng, dims, name)
            delta = rng.standard_normal(dims, dtype=np.float32)
            delta *= delta_scale * float(np.std(base32[:1024]) if base32.size > 1 else 1.0)
            base_tensors[name] = base32.astype(np_dtype)
            ft_tensors[name] = (base32 + delta).astype(np_dtype)
            weight_map[name] = filename
            del base32, delta
        save_file(base_tensors, str(base_dir / filename), metadata={"format": "pt"})
        save_file(ft_tensors, str(ft_dir / filename), metadata={"format": "pt"})
    if len(groups) > 1:
        total = sum(int(np.prod(d)) * itemsize for d in shape.tensors().values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        for directory in (base_dir, ft_dir):
            (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _random(rng: np.random.Generator, dims: tuple[int, ...], name: str) -> np.ndarray:
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * rng.standard_normal(dims, dtype=np.float32)
    values = rng.standard_normal(dims, dtype=np.float32)
    values *= 0.02
    return values
