"""``--chunk-size`` is capped at what the largest tensor needs, a pool beyond available memory
is refused up front, and a sweep range with a vanishing step is a clear error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from safeblend import merge
from safeblend.cli import main
from safeblend.errors import SpecError
from tests.helpers import load_checkpoint, random_tensor, write_checkpoint

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chunks")
    rng = np.random.default_rng(8)
    shapes = {"layers.0.w": (256, 256), "layers.1.w": (64,)}
    write_checkpoint(root / "base", {n: random_tensor(rng, s, "bf16") for n, s in shapes.items()})
    write_checkpoint(root / "ft", {n: random_tensor(rng, s, "bf16") for n, s in shapes.items()})
    return root


def test_a_huge_chunk_size_is_capped_and_changes_nothing(pair, tmp_path):
    # 100 GB × the pool's 8 buffers cannot be allocated anywhere; capped, it is the 128 KiB tensor.
    code = ("import resource, safeblend, sys; safeblend.merge(sys.argv[1], sys.argv[2], sys.argv[3], "
            "chunk_size='100GB', device='cpu'); print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    done = subprocess.run([sys.executable, "-c", code, str(pair / "base"), str(pair / "ft"), str(tmp_path / "big")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) * 1024 < 1e9
    merge(pair / "base", pair / "ft", tmp_path / "small", chunk_size="4KiB", device="cpu")
    big, small = load_checkpoint(tmp_path / "big"), load_checkpoint(tmp_path / "small")
    assert all(np.array_equal(big[n].view(np.uint16), small[n].view(np.uint16)) for n in small)


def test_a_pool_beyond_available_memory_is_refused(pair, tmp_path, monkeypatch):
    from safeblend import units

    monkeypatch.setattr(units, "available_memory", lambda: 200_000)  # 8 × 128 KiB do not fit
    with pytest.raises(SpecError, match=r"--chunk-size .* more than the 200.00 kB of memory available"):
        merge(pair / "base", pair / "ft", tmp_path / "o", chunk_size="1MiB", device="cpu")
    assert not (tmp_path / "o").exists() and not list(tmp_path.iterdir())
    merge(pair / "base", pair / "ft", tmp_path / "o", chunk_size="16KiB", device="cpu")  # 8 × 16 KiB fit


def test_a_vanishing_sweep_step_is_a_clear_error(pair, tmp_path):
    result = CliRunner().invoke(main, ["sweep", str(pair / "base"), str(pair / "ft"), "-o", str(tmp_path / "s"),
                                       "--weights", "0:1:1e-999999999999"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "the step is too small" in result.output
    assert not (tmp_path / "s").exists()
