"""A tiny Llama built by transformers, "fine-tuned" by perturbation, merged by the CLI and
loaded back with AutoModelForCausalLM: its logits match a float64 reference merge's."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from safeblend.cli import main

torch = pytest.importorskip("torch", reason="the test extra installs torch")
transformers = pytest.importorskip("transformers", reason="the test extra installs transformers")


def _tiny_llama(dtype):
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(dtype)


@pytest.mark.parametrize("dtype,shards", [(torch.bfloat16, "5GB"), (torch.float32, "40kB")])
def test_merged_llama_loads_and_matches_reference_logits(tmp_path, dtype, shards):
    weight = 0.6
    base_model = _tiny_llama(dtype)
    base_model.save_pretrained(tmp_path / "base")
    base_state = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for p in base_model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator).to(p.dtype))
    base_model.save_pretrained(tmp_path / "ft")
    ft_state = base_model.state_dict()

    result = CliRunner().invoke(main, ["merge", str(tmp_path / "base"), str(tmp_path / "ft"), "-o",
                                       str(tmp_path / "merged"), "--weight", str(weight), "--shard-size", shards, "-q"])
    assert result.exit_code == 0, result.output

    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", torch_dtype=dtype)
    reference = _tiny_llama(torch.float64)
    with torch.no_grad():
        ref_state = {}
        for name, b in base_state.items():
            b64, f64 = b.to(torch.float64), ft_state[name].to(torch.float64)
            ref_state[name] = (b64 + weight * (f64 - b64)).to(dtype).to(torch.float64)
        reference.load_state_dict(ref_state, strict=False)
    for name, value in merged.state_dict().items():
        assert value.dtype == dtype, name
    tokens = torch.tensor([[1, 17, 42, 99, 3, 250, 7, 8]])
    with torch.no_grad():
        got = merged.to(torch.float64)(tokens).logits
        want = reference(tokens).logits
    # Weights are equal element for element after rounding; logits differ only by the
    # tolerated ulp flips propagated through two layers.
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-3), (got - want).abs().max()
    assert got.argmax(-1).tolist() == want.argmax(-1).tolist()
