"""Thousands of shard files: inputs are mapped lazily and a bounded number stay open, so a
merge never fails with "Too many open files"; an output needing more files than the hard
limit allows is refused up front naming the limit."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from tests.helpers import load_checkpoint

REPO = Path(__file__).resolve().parent.parent
SHARDS = 1500  # × 2 inputs: far over the 1024 descriptors the merge below may hold


def _many_shards(directory: Path, seed: int) -> dict[str, np.ndarray]:
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    tensors, weight_map = {}, {}
    for i in range(SHARDS):
        name, filename = f"layers.{i}.w", f"model-{i + 1:05d}-of-{SHARDS:05d}.safetensors"
        tensors[name] = rng.standard_normal(4).astype(np.float32)
        save_file({name: tensors[name]}, str(directory / filename))
        weight_map[name] = filename
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return tensors


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, dict, dict]:
    root = tmp_path_factory.mktemp("many")
    return root, _many_shards(root / "base", 1), _many_shards(root / "ft", 2)


def _merge_with_limit(args: list[str], limit: int) -> subprocess.CompletedProcess:
    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    return subprocess.run([sys.executable, "-m", "safeblend.cli", "merge", *args, "-q"], cwd=REPO,
                          preexec_fn=lower, capture_output=True, text=True, timeout=300)


def test_thousands_of_input_shards_merge_within_a_small_descriptor_limit(pair):
    root, base, ft = pair
    done = _merge_with_limit([str(root / "base"), str(root / "ft"), "-o", str(root / "out"), "--weight", "0.25",
                              "--device", "cpu"], limit=1024)
    assert done.returncode == 0, done.stderr[-2000:]
    out = load_checkpoint(root / "out")
    for name in base:
        b, f = base[name].astype(np.float64), ft[name].astype(np.float64)
        assert np.allclose(out[name], b + 0.25 * (f - b), rtol=1e-6, atol=1e-7), name


def test_an_output_of_more_shards_than_the_limit_allows_is_one_clear_line(pair, tmp_path):
    root, _, _ = pair
    done = _merge_with_limit([str(root / "base"), str(root / "ft"), "-o", str(tmp_path / "out"),
                              "--shard-size", "100B", "--device", "cpu"], limit=1024)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert "open files, over this process's limit of 1024" in done.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()
