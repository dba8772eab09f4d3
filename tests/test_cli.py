"""The command line: merge's summary and JSON, inspect, demo."""

from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner

from safeblend.cli import main
from tests.helpers import load_checkpoint, write_checkpoint


def _pair(tmp_path):
    rng = np.random.default_rng(0)
    base = {"w": rng.standard_normal((300, 70)).astype(np.float32), "step": np.array([3], np.int64)}
    ft = {"w": base["w"] + 1.0, "step": np.array([9], np.int64)}
    write_checkpoint(tmp_path / "base", base, shards=2)
    write_checkpoint(tmp_path / "ft", ft)
    return base


def test_merge_json_summary_on_stdout(tmp_path):
    base = _pair(tmp_path)
    result = CliRunner().invoke(main, ["merge", str(tmp_path / "base"), str(tmp_path / "ft"),
                                       "-o", str(tmp_path / "out"), "--weight", "0.25", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    for key in ("output", "method", "params", "tensors", "bytes_read", "bytes_written", "seconds",
                "throughput_bytes_per_s", "peak_rss_bytes", "device"):
        assert key in summary
    assert summary["tensors"] == 2 and summary["params"]["weights"] == [0.25]
    merged = load_checkpoint(tmp_path / "out")
    np.testing.assert_allclose(merged["w"], base["w"] + 0.25, rtol=1e-6)
    assert merged["step"][0] == 3


def test_merge_prints_progress_and_a_summary_on_stderr(tmp_path):
    _pair(tmp_path)
    result = CliRunner().invoke(main, ["merge", str(tmp_path / "base"), str(tmp_path / "ft"), "-o", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert "Merged 2 tensors" in result.stderr and "merging" in result.stderr


def test_quiet_prints_nothing(tmp_path):
    _pair(tmp_path)
    result = CliRunner().invoke(main, ["merge", str(tmp_path / "base"), str(tmp_path / "ft"), "-o",
                                       str(tmp_path / "o"), "--quiet", "--weight", "2"])
    assert result.exit_code == 0
    assert result.stdout == "" and result.stderr.startswith("Warning: weight 2 is outside [0, 1]")


def test_inspect(tmp_path):
    _pair(tmp_path)
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "base"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["tensors"] == 2 and summary["parameters"] == 300 * 70 + 1
    assert summary["dtypes"]["F32"]["bytes"] == 300 * 70 * 4 and summary["dtypes"]["I64"]["tensors"] == 1
    assert len(summary["shards"]) == 2 and summary["largest_tensor"] == "w"
    text = CliRunner().invoke(main, ["inspect", str(tmp_path / "base")])
    assert text.exit_code == 0 and "parameters  21,001" in text.output


def test_demo_merges_and_checks(tmp_path):
    result = CliRunner().invoke(main, ["demo", str(tmp_path / "demo"), "--size", "tiny"])
    assert result.exit_code == 0, result.output
    assert "Checked every element against a float64 reference" in result.stderr
    assert (tmp_path / "demo" / "merged" / "config.json").exists()
