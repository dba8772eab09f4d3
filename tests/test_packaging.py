"""What the built wheel installs: one top-level package, ``safeblend``, with its kernels inside.

A top-level ``kernels`` or ``engine`` would collide with PyPI's ``kernels`` (Hugging Face's hub
kernels) or with a user's own ``engine.py``; the wheel is built here and its names read back.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(REPO)], check=True, capture_output=True, cwd=out)
    (built,) = out.glob("safeblend-*.whl")
    return built


def _top_level_names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return {name.split("/")[0] for name in archive.namelist() if not name.split("/")[0].endswith(".dist-info")}


def test_the_wheel_installs_only_the_safeblend_package(wheel):
    assert _top_level_names(wheel) == {"safeblend"}


def test_the_kernels_and_methods_are_inside_the_package(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    for module in ("safeblend/__init__.py", "safeblend/cli.py", "safeblend/methods/linear.py",
                   "safeblend/kernels/__init__.py", "safeblend/kernels/numpy_backend.py",
                   "safeblend/kernels/triton_backend.py"):
        assert module in names


def test_the_console_script_points_into_the_package(wheel):
    with zipfile.ZipFile(wheel) as archive:
        entry_points = next(n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt"))
        text = archive.read(entry_points).decode()
    assert "safeblend = safeblend.cli:main" in text


def test_the_public_api_is_importable_as_safeblend():
    code = ("import safeblend, safeblend.kernels; "
            "print(all(callable(getattr(safeblend, n)) for n in ('merge', 'sweep', 'diff', 'verify')), "
            "callable(safeblend.kernels.cpu_backend))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert result.stdout.split() == ["True", "True"]
