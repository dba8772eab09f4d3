"""safeblend diff: per-tensor, per-layer and per-module drift against a float64 numpy reference,
the table, the JSON and the plot."""

from __future__ import annotations

import importlib.util
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

from safeblend.cli import main
from safeblend.drift import DriftReport, diff, format_report, layer_of, module_of, plot_drift, plot_series
from safeblend.errors import IncompatibleInputsError, SafeblendError
from tests.helpers import NUMPY_DTYPES, random_tensor, write_checkpoint

LAYERS = 3


def _pair(tmp_path: Path, seed: int = 0) -> tuple[Path, Path, dict, dict]:
    """A 3-layer Llama-ish pair in mixed dtypes; later layers move more, the MLP more than attention."""
    rng = np.random.default_rng(seed)
    base: dict[str, np.ndarray] = {"model.embed_tokens.weight": random_tensor(rng, (50, 16), "bf16")}
    scale: dict[str, float] = {"model.embed_tokens.weight": 0.001}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for name, shape, dtype, s in (
            ("self_attn.q_proj.weight", (16, 16), "bf16", 0.01),
            ("self_attn.k_proj.weight", (8, 16), "bf16", 0.01),
            ("self_attn.v_proj.weight", (8, 16), "fp16", 0.02),
            ("self_attn.o_proj.weight", (16, 16), "fp32", 0.02),
            ("mlp.gate_proj.weight", (44, 16), "bf16", 0.05),
            ("mlp.up_proj.weight", (44, 16), "bf16", 0.05),
            ("mlp.down_proj.weight", (16, 44), "fp32", 0.05),
            ("input_layernorm.weight", (16,), "fp32", 0.001),
        ):
            base[p + name] = random_tensor(rng, shape, dtype)
            scale[p + name] = s * (i + 1)
    base["model.norm.weight"] = random_tensor(rng, (16,), "fp32")
    scale["model.norm.weight"] = 0.0  # unchanged
    base["lm_head.weight"] = random_tensor(rng, (50, 16), "bf16")
    scale["lm_head.weight"] = 0.002
    base["model.rotary.counts"] = np.arange(5, dtype=np.int32)
    ft = {n: (v.astype(np.float64) + scale[n] * rng.standard_normal(v.shape)).astype(v.dtype)
          for n, v in base.items() if v.dtype != np.int32}
    ft["model.rotary.counts"] = np.array([0, 1, 9, 3, 9], dtype=np.int32)
    write_checkpoint(tmp_path / "base", base, shards=2)
    write_checkpoint(tmp_path / "ft", ft)
    return tmp_path / "base", tmp_path / "ft", base, ft


def _reference(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    d = b64 - a64
    return {"rel_change": float(np.linalg.norm(d) / np.linalg.norm(a64)),
            "cosine": float(a64 @ b64 / (np.linalg.norm(a64) * np.linalg.norm(b64))),
            "max_abs_delta": float(np.max(np.abs(d)))}


# Documented bounds (engine/diff.py): ≤16-bit inputs are summed in fp32 runs, others in float64.
REL_16BIT = 1e-6
REL_WIDE = 1e-12


def _assert_figures(got: dict, want: dict, what: str, rel: float = REL_16BIT) -> None:
    for key, value in want.items():
        if key == "max_abs_delta":
            assert got[key] == value, f"{what}: {key}"  # exact on every path
        else:
            assert got[key] == pytest.approx(value, rel=rel, abs=1e-15), f"{what}: {key}"


def _bound(*arrays: np.ndarray) -> float:
    return REL_16BIT if all(x.dtype.itemsize <= 2 for x in arrays) else REL_WIDE


@pytest.mark.parametrize("chunk_size", [64, 1000, 8 * 2**20])
def test_tensor_figures_match_a_float64_reference(tmp_path, chunk_size):
    base_dir, ft_dir, base, ft = _pair(tmp_path)
    report = diff(base_dir, ft_dir, chunk_size=chunk_size)
    rows = {t["name"]: t for t in report.to_dict()["tensors"]}
    assert list(rows) == list(base) or set(rows) == set(base)
    for name, a in base.items():
        if a.dtype == np.int32:
            continue
        _assert_figures(rows[name], _reference(a, ft[name]), name, _bound(a, ft[name]))
    assert rows["model.norm.weight"]["rel_change"] == 0.0 and rows["model.norm.weight"]["max_abs_delta"] == 0.0
    assert rows["model.rotary.counts"]["changed_elements"] == 2
    assert report.bytes_read == sum(a.nbytes + ft[n].nbytes for n, a in base.items())


def test_groups_match_the_reference_over_concatenated_tensors(tmp_path):
    base_dir, ft_dir, base, ft = _pair(tmp_path)
    report = diff(base_dir, ft_dir, chunk_size=256)
    data = report.to_dict()
    floats = [n for n in base if base[n].dtype != np.int32]

    def group(names):
        return _reference(np.concatenate([base[n].astype(np.float64).ravel() for n in names]),
                          np.concatenate([ft[n].astype(np.float64).ravel() for n in names]))

    for row in data["by_layer"]:
        _assert_figures(row, group([n for n in floats if f"layers.{row['layer']}." in n]), f"layer {row['layer']}")
    assert [row["layer"] for row in data["by_layer"]] == list(range(LAYERS))
    patterns = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
                "down": "down_proj", "norm": "norm", "embed": ("embed_tokens", "lm_head")}
    assert list(data["by_module"]) == list(patterns)  # display order; no "other" here
    for module, pattern in patterns.items():
        names = [n for n in floats if (any(p in n for p in pattern) if isinstance(pattern, tuple) else pattern in n)]
        _assert_figures(data["by_module"][module], group(names), module)
    _assert_figures(data["overall"], group(floats), "overall")
    for module, per_layer in data["by_layer_module"].items():
        for layer, rel in per_layer.items():
            names = [n for n in floats if f"layers.{layer}." in n and module_of(n) == module]
            assert rel == pytest.approx(group(names)["rel_change"], rel=REL_16BIT)
    assert "embed" not in data["by_layer_module"]  # outside the layer stack


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("scale, delta", [(0.02, 5e-4), (1.0, 1e-3)])  # weights; norms near 1
def test_16bit_bound_holds_on_a_million_elements(tmp_path, dtype, scale, delta):
    rng = np.random.default_rng(3)
    shape = (1024, 1000)  # not a multiple of the block or run length: partial runs too
    values = scale * (1.0 + 0.05 * rng.standard_normal(shape)) if scale == 1.0 else scale * rng.standard_normal(shape)
    a = values.astype(NUMPY_DTYPES[dtype])
    b = (a.astype(np.float64) + delta * rng.standard_normal(shape)).astype(a.dtype)
    write_checkpoint(tmp_path / "b", {"model.layers.0.mlp.up_proj.weight": a})
    write_checkpoint(tmp_path / "f", {"model.layers.0.mlp.up_proj.weight": b})
    row = diff(tmp_path / "b", tmp_path / "f").to_dict()["tensors"][0]
    _assert_figures(row, _reference(a, b), dtype)


def test_fp32_overflow_and_underflow_fall_back_to_float64(tmp_path):
    bf16 = NUMPY_DTYPES["bf16"]
    n = 300_000  # more than one fp32 block: the first overflows fp32 squares, the last underflows them
    a = np.full(n, 1e-3)
    a[:10], a[-50_000:] = 3e30, 1e-30
    b = a.copy()
    b[5], b[-7] = -2e30, 2e-30
    a, b = a.astype(bf16), b.astype(bf16)
    write_checkpoint(tmp_path / "b", {"w": a, "tiny": a[-20_000:]})
    write_checkpoint(tmp_path / "f", {"w": b, "tiny": b[-20_000:]})  # tiny: underflow only
    rows = {t["name"]: t for t in diff(tmp_path / "b", tmp_path / "f").to_dict()["tensors"]}
    for name, x, y in (("w", a, b), ("tiny", a[-20_000:], b[-20_000:])):
        want = _reference(x, y)
        assert all(math.isfinite(v) and v > 0 for v in want.values())
        _assert_figures(rows[name], want, name, REL_WIDE)


@pytest.mark.parametrize("tiny", [2.0**-30, -(2.0**-30)])
def test_max_abs_delta_is_exact_when_fp32_rounds_the_difference(tmp_path, tiny):
    a = np.full(5000, 0.25)
    b = a.copy()
    a[100], b[100] = 1.0, tiny  # |Δ| = 1 ∓ 2^-30 needs 31 bits: fp32 rounds it to 1
    a[200], b[200] = 0.5, -0.5  # |Δ| = 1 exactly: ties the rounded one in fp32
    a, b = a.astype(NUMPY_DTYPES["bf16"]), b.astype(NUMPY_DTYPES["bf16"])
    write_checkpoint(tmp_path / "b", {"w": a})
    write_checkpoint(tmp_path / "f", {"w": b})
    row = diff(tmp_path / "b", tmp_path / "f").to_dict()["tensors"][0]
    assert row["max_abs_delta"] == max(1.0, 1.0 - tiny) == _reference(a, b)["max_abs_delta"]


@pytest.mark.parametrize("name, layer, module", [
    ("model.layers.12.self_attn.q_proj.weight", 12, "q"),
    ("model.layers.0.self_attn.k_proj.bias", 0, "k"),
    ("model.layers.3.self_attn.q_norm.weight", 3, "norm"),
    ("model.layers.7.mlp.down_proj.weight", 7, "down"),
    ("model.layers.7.post_attention_layernorm.weight", 7, "norm"),
    ("transformer.h.5.attn.c_attn.weight", 5, "other"),
    ("model.embed_tokens.weight", None, "embed"),
    ("lm_head.weight", None, "embed"),
    ("model.norm.weight", None, "norm"),
    ("model.layers.2.block_sparse_moe.experts.3.w1.weight", 2, "gate"),
])
def test_layer_and_module_of_a_name(name, layer, module):
    assert layer_of(name) == layer and module_of(name) == module


def test_zero_base_and_nan_become_null_in_json(tmp_path):
    base = {"model.layers.0.mlp.up_proj.weight": np.zeros((4, 4), np.float32),
            "model.layers.0.mlp.down_proj.weight": np.ones((4, 4), np.float32)}
    ft = {"model.layers.0.mlp.up_proj.weight": np.ones((4, 4), np.float32),
          "model.layers.0.mlp.down_proj.weight": np.full((4, 4), np.nan, np.float32)}
    write_checkpoint(tmp_path / "b", base)
    write_checkpoint(tmp_path / "f", ft)
    report = diff(tmp_path / "b", tmp_path / "f")
    rows = {t["name"]: t for t in report.to_dict()["tensors"]}
    up, down = rows["model.layers.0.mlp.up_proj.weight"], rows["model.layers.0.mlp.down_proj.weight"]
    assert up["rel_change"] is None and up["cosine"] is None and up["max_abs_delta"] == 1.0
    assert down["rel_change"] is None and down["max_abs_delta"] is None
    json.dumps(report.to_dict(), allow_nan=False)  # strict JSON
    assert "inf" in format_report(report) and "nan" in format_report(report)


def test_mismatched_inputs_are_refused(tmp_path):
    write_checkpoint(tmp_path / "b", {"w": np.zeros((4, 4), np.float32)})
    write_checkpoint(tmp_path / "f", {"w": np.zeros((4, 5), np.float32)})
    with pytest.raises(IncompatibleInputsError, match="shape"):
        diff(tmp_path / "b", tmp_path / "f")


def test_lora_adapter_is_diffed_as_base_plus_its_delta(tmp_path):
    base_dir, _, base, _ = _pair(tmp_path)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}))
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((2, 16)).astype(np.float32), rng.standard_normal((16, 2)).astype(np.float32)
    prefix = "base_model.model.model.layers.1.self_attn.q_proj."
    save_file({prefix + "lora_A.weight": a, prefix + "lora_B.weight": b}, str(adapter / "adapter_model.safetensors"))
    report = diff(base_dir, adapter)
    rows = {t["name"]: t for t in report.to_dict()["tensors"]}
    w = base["model.layers.1.self_attn.q_proj.weight"].astype(np.float64)
    ft = (w + 2.0 * (b.astype(np.float64) @ a.astype(np.float64))).astype(np.float32)  # s = alpha / r
    want = _reference(w, ft)
    got = rows["model.layers.1.self_attn.q_proj.weight"]
    assert got["rel_change"] == pytest.approx(want["rel_change"], rel=1e-6)
    assert got["cosine"] == pytest.approx(want["cosine"], rel=1e-9)
    assert all(r["rel_change"] == 0.0 for n, r in rows.items() if "layers.1.self_attn.q_proj" not in n
               and "changed_elements" not in r)


needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="matplotlib is not installed (pip install 'safeblend[plot]')")


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@needs_matplotlib
def test_plot_is_a_png_with_one_line_per_module_type(tmp_path):
    base_dir, ft_dir, base, ft = _pair(tmp_path)
    report = diff(base_dir, ft_dir)
    series = plot_drift(report, tmp_path / "drift.png", dpi=100)
    assert _png_size(tmp_path / "drift.png") == (900, 500)
    assert list(series) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "norms"]
    for label, (xs, ys) in series.items():
        assert xs == list(range(LAYERS))
        module = {"norms": "norm"}.get(label, label.removesuffix("_proj"))
        want = [100 * _reference(base[n], ft[n])["rel_change"]
                for n in base if module_of(n) == module and layer_of(n) is not None]
        assert ys == pytest.approx(want, rel=REL_16BIT)
    assert series["gate_proj"][1][2] > series["gate_proj"][1][0]  # the pair drifts more in later layers


@needs_matplotlib
def test_plot_draws_those_series_with_labels(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    base_dir, ft_dir, _, _ = _pair(tmp_path)
    report = diff(base_dir, ft_dir)
    drawn = {}
    savefig = Figure.savefig

    def spy(self, *args, **kwargs):
        axes = self.axes[0]
        drawn["lines"] = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in axes.lines}
        drawn["labels"] = (axes.get_xlabel(), axes.get_ylabel(), axes.get_title())
        drawn["legend"] = [t.get_text() for t in axes.get_legend().get_texts()]
        return savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    series = plot_drift(report, tmp_path / "d.png")
    for label, (xs, ys) in series.items():
        assert drawn["lines"][label] == (xs, pytest.approx(ys))
    assert "all modules" in drawn["lines"]
    xlabel, ylabel, title = drawn["labels"]
    assert xlabel == "layer" and "relative change" in ylabel and "ft" in title and "base" in title
    assert drawn["legend"] == [*series, "all modules"]


def test_plot_without_layers_is_a_clear_error(tmp_path):
    report = DriftReport("b", "f", [])
    assert plot_series(report) == {}
    if importlib.util.find_spec("matplotlib") is not None:
        with pytest.raises(SafeblendError, match="no tensor name has a layer index"):
            plot_drift(report, tmp_path / "x.png")


def test_missing_matplotlib_is_one_line_before_any_reading(tmp_path, monkeypatch):
    base_dir, ft_dir, _, _ = _pair(tmp_path)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    import safeblend.drift as module

    read = []
    monkeypatch.setattr(module, "_measure_all", lambda *a, **k: read.append(1) or 0)
    result = CliRunner().invoke(main, ["diff", str(base_dir), str(ft_dir), "--plot", str(tmp_path / "d.png")])
    assert result.exit_code == 1 and not read
    assert result.stderr.strip() == ("Error: --plot needs matplotlib, which is not installed: "
                                     "pip install 'safeblend[plot]'")


def test_cli_table(tmp_path):
    base_dir, ft_dir, _, _ = _pair(tmp_path)
    result = CliRunner().invoke(main, ["diff", str(base_dir), str(ft_dir), "--top", "3", "-q"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    for text in ("overall", "module", "q_proj", "gate_proj", "embeddings/lm_head", "layer", "top 3 tensors",
                 "model.rotary.counts (2 elements differ)"):
        assert text in out, text
    assert "Warning: model.rotary.counts: 2 of 5 elements differ" in result.stderr
    layer_rows = [line for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(layer_rows) == LAYERS


def test_cli_json_and_plot(tmp_path):
    base_dir, ft_dir, _, _ = _pair(tmp_path)
    args = ["diff", str(base_dir), str(ft_dir), "--json"]
    has_mpl = importlib.util.find_spec("matplotlib") is not None
    if has_mpl:
        args += ["--plot", str(tmp_path / "p.png")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) >= {"overall", "by_module", "by_layer", "by_layer_module", "tensors", "bytes_read", "seconds"}
    assert len(data["by_layer"]) == LAYERS and math.isclose(data["by_module"]["norm"]["cosine"], 1.0, abs_tol=1e-3)
    if has_mpl:
        assert _png_size(tmp_path / "p.png")[0] > 0
