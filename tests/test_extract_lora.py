"""safeblend extract-lora: a rank-R LoRA of FT − BASE, against a float64 SVD of each task vector,
and applied back by safeblend's own LoRA reader and by PEFT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

import safeblend
from safeblend import extract_lora as extract_module
from safeblend.cli import main
from safeblend.extract_lora import extract_lora
from tests.helpers import load_checkpoint, write_checkpoint

RANK = 6


def _with_spectrum(rng: np.random.Generator, m: int, n: int, sigma: np.ndarray) -> np.ndarray:
    u = np.linalg.qr(rng.standard_normal((m, len(sigma))))[0]
    v = np.linalg.qr(rng.standard_normal((n, len(sigma))))[0]
    return (u * sigma) @ v.T


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Path:
    """fp32 tensors: a decaying spectrum, a flat one (noise), an embedding, a changed norm, an
    unchanged matrix, and one narrower than the rank."""
    root = tmp_path_factory.mktemp("extract")
    rng = np.random.default_rng(5)
    shapes = {"model.layers.0.self_attn.q_proj.weight": (64, 48), "model.layers.0.mlp.up_proj.weight": (80, 48),
              "model.embed_tokens.weight": (100, 32), "model.norm.weight": (48,),
              "model.layers.0.self_attn.k_proj.weight": (16, 48), "model.layers.0.mlp.thin.weight": (40, 4)}
    base = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    deltas = {
        "model.layers.0.self_attn.q_proj.weight": _with_spectrum(rng, 64, 48, 0.6 ** np.arange(40)),
        "model.layers.0.mlp.up_proj.weight": 0.1 * rng.standard_normal((80, 48)),
        "model.embed_tokens.weight": _with_spectrum(rng, 100, 32, 0.8 ** np.arange(32)),
        "model.norm.weight": 0.01 * rng.standard_normal(48),
        "model.layers.0.mlp.thin.weight": 0.1 * rng.standard_normal((40, 4)),
    }
    ft = {k: (v.astype(np.float64) + deltas.get(k, 0)).astype(np.float32) for k, v in base.items()}
    write_checkpoint(root / "base", base)
    write_checkpoint(root / "ft", ft)
    return root


def _delta(pair: Path, name: str) -> np.ndarray:
    base, ft = load_checkpoint(pair / "base"), load_checkpoint(pair / "ft")
    return ft[name].astype(np.float64) - base[name].astype(np.float64)


def _approximation(adapter: Path, module: str) -> np.ndarray:
    f = {k: v.astype(np.float64) for k, v in load_file(str(adapter / "adapter_model.safetensors")).items()}
    key = f"base_model.model.{module}"
    if f"{key}.lora_embedding_A" in f:
        return (f[f"{key}.lora_embedding_B"] @ f[f"{key}.lora_embedding_A"]).T
    return f[f"{key}.lora_B.weight"] @ f[f"{key}.lora_A.weight"]


@pytest.fixture(scope="module")
def extracted(pair) -> tuple[Path, safeblend.extract_lora.ExtractReport]:
    report = extract_lora(pair / "base", pair / "ft", pair / "adapter", RANK)
    return pair / "adapter", report


@pytest.mark.parametrize("name, epsilon", [
    ("model.layers.0.self_attn.q_proj.weight", 1e-3),  # decaying spectrum: essentially optimal
    ("model.embed_tokens.weight", 1e-3),
    ("model.layers.0.mlp.up_proj.weight", 0.05),  # flat spectrum: the hardest case for a range finder
])
def test_error_is_within_epsilon_of_the_optimal_rank_r_error(pair, extracted, name, epsilon):
    adapter, report = extracted
    d = _delta(pair, name)
    sigma = np.linalg.svd(d, compute_uv=False)  # float64 reference
    optimal = np.sqrt(np.sum(sigma[RANK:] ** 2))
    error = np.linalg.norm(d - _approximation(adapter, name.removesuffix(".weight")))
    assert error <= (1 + epsilon) * optimal, (error, optimal)
    entry = next(t for t in report.tensors if t.name == name)
    assert entry.rank == RANK
    assert entry.retained_energy == pytest.approx(1 - error ** 2 / np.sum(d ** 2), abs=1e-6)
    assert entry.delta_norm == pytest.approx(np.linalg.norm(d), rel=1e-9)


def test_report_kinds_config_and_small_ranks(pair, extracted):
    adapter, report = extracted
    kinds = {t.name: t.kind for t in report.tensors}
    assert kinds == {"model.layers.0.self_attn.q_proj.weight": "linear", "model.layers.0.mlp.up_proj.weight": "linear",
                     "model.embed_tokens.weight": "embedding", "model.norm.weight": "not representable",
                     "model.layers.0.self_attn.k_proj.weight": "unchanged", "model.layers.0.mlp.thin.weight": "linear"}
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == RANK and config["peft_type"] == "LORA"
    assert config["target_modules"] == sorted(["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj",
                                               "model.embed_tokens", "model.layers.0.mlp.thin"])
    assert config["rank_pattern"] == config["alpha_pattern"] == {"model.layers.0.mlp.thin": 4}  # only 4 columns
    thin = _delta(pair, "model.layers.0.mlp.thin.weight")
    np.testing.assert_allclose(_approximation(adapter, "model.layers.0.mlp.thin"), thin, atol=1e-6)
    saved = json.loads((adapter / "safeblend_extract.json").read_text())
    assert saved["retained_energy"] == pytest.approx(report.retained_energy)


def test_blocks_of_rows_not_whole_tensors_and_the_same_result(pair, tmp_path, monkeypatch):
    seen = []
    original = extract_module._Rows.__iter__

    def spy(self):
        for r0, r1, d in original(self):
            seen.append(d.nbytes)
            yield r0, r1, d

    monkeypatch.setattr(extract_module._Rows, "__iter__", spy)
    small = extract_lora(pair / "base", pair / "ft", tmp_path / "a", RANK, chunk_size=2048)
    assert max(seen) <= max(2048, 48 * 8 * 2) and max(seen) < 64 * 48 * 8
    whole = extract_lora(pair / "base", pair / "ft", tmp_path / "b", RANK)
    assert [t.retained_energy for t in small.tensors] == pytest.approx([t.retained_energy for t in whole.tensors],
                                                                       abs=1e-9)


def test_full_rank_adapter_merges_back_to_the_fine_tune(pair, tmp_path):
    extract_lora(pair / "base", pair / "ft", tmp_path / "full", 64)
    safeblend.merge(pair / "base", tmp_path / "full", tmp_path / "merged", weight=1.0)
    merged, ft, base = (load_checkpoint(p) for p in (tmp_path / "merged", pair / "ft", pair / "base"))
    for name, value in ft.items():
        if value.ndim == 2:
            np.testing.assert_allclose(merged[name], value, rtol=0, atol=1e-5, err_msg=name)
        else:  # 1-D: not representable, stays the base's
            np.testing.assert_array_equal(merged[name], base[name])


def test_cli_errors_are_one_line(pair, tmp_path):
    runner = CliRunner()
    args = ["extract-lora", str(pair / "base"), str(pair / "ft"), "-o", str(tmp_path / "a"), "--rank", "4", "-q"]
    assert runner.invoke(main, args).exit_code == 0
    again = runner.invoke(main, args)
    assert again.exit_code == 1 and "already exists" in again.stderr and "Traceback" not in again.output
    zero = runner.invoke(main, [*args[:-3], "--rank", "0"])
    assert zero.exit_code == 2
    write_checkpoint(tmp_path / "other", {"model.embed_tokens.weight": np.zeros((3, 3), np.float32)})
    bad = runner.invoke(main, ["extract-lora", str(pair / "base"), str(tmp_path / "other"), "-o", str(tmp_path / "b"),
                               "--rank", "4"])
    assert bad.exit_code == 1 and bad.stderr.startswith("Error: ") and "lacks" in bad.stderr
    assert not (tmp_path / "b").exists()


def test_peft_applies_the_extracted_adapter(tmp_path):
    """A tiny transformers Llama and a fine-tune of it: the full-rank adapter, loaded by PEFT and
    merged with merge_and_unload, gives back the fine-tune's matrices."""
    torch = pytest.importorskip("torch", reason="the test extra installs torch")
    peft = pytest.importorskip("peft", reason="the test extra installs peft")
    from tests.test_lora import _model

    base_model = _model("llama", "float32")
    base_model.save_pretrained(tmp_path / "base")
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in base_model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=generator))
    base_model.save_pretrained(tmp_path / "ft")
    extract_lora(tmp_path / "base", tmp_path / "ft", tmp_path / "adapter", 96)
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float64)
    merged = peft.PeftModel.from_pretrained(model, tmp_path / "adapter").to(torch.float64).merge_and_unload()
    got = {k: v.detach().numpy() for k, v in merged.state_dict().items()}
    ft = load_checkpoint(tmp_path / "ft")
    matrices = [k for k, v in ft.items() if v.ndim == 2]
    assert "model.embed_tokens.weight" in matrices and "lm_head.weight" in matrices
    for name in matrices:
        np.testing.assert_allclose(got[name], ft[name], rtol=0, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("m, k", [(1000, 12), (333, 40), (50, 12)])
def test_tall_skinny_qr_is_an_orthonormal_basis_of_the_same_span(monkeypatch, m, k):
    monkeypatch.setattr(extract_module, "_PANEL_BYTES", 4096)  # panels of 42 rows for k=12: many of them
    rng = np.random.default_rng(m)
    x = (rng.standard_normal((m, k)) * 0.5 ** np.arange(k)).astype(np.float32)
    q = extract_module._orth(x).astype(np.float64)
    assert q.shape == (m, k)
    np.testing.assert_allclose(q.T @ q, np.eye(k), atol=1e-6)  # fp32-stored columns
    x64 = x.astype(np.float64)
    assert np.linalg.norm(x64 - q @ (q.T @ x64)) <= 1e-6 * np.linalg.norm(x64)  # x lies in span(q)


def test_panelled_qr_gives_the_same_adapter(pair, tmp_path, monkeypatch):
    whole = extract_lora(pair / "base", pair / "ft", tmp_path / "a", RANK)
    monkeypatch.setattr(extract_module, "_PANEL_BYTES", 1024)
    panels = extract_lora(pair / "base", pair / "ft", tmp_path / "b", RANK)
    assert [t.retained_energy for t in panels.tensors] == pytest.approx([t.retained_energy for t in whole.tensors],
                                                                        abs=1e-6)


def test_overwrite_replaces_only_a_previous_extraction(pair, tmp_path):
    """--overwrite follows the merge's rule: a foreign directory is refused and kept whole; an
    adapter extract-lora wrote (it carries safeblend.json) is replaced."""
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(safeblend.SafeblendError, match="not a previous safeblend output"):
        extract_lora(pair / "base", pair / "ft", out, rank=2, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    extract_lora(pair / "base", pair / "ft", out, rank=2, overwrite=True)
    assert (out / "safeblend.json").is_file()
    extract_lora(pair / "base", pair / "ft", out, rank=3, overwrite=True)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 3
    assert not list(tmp_path.glob(".*"))  # no staging or replaced output left behind
    with pytest.raises(safeblend.SafeblendError, match="must not be, contain or lie inside an input"):
        extract_lora(pair / "base", pair / "ft", pair / "ft" / "adapter", rank=2)
