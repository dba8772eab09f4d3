"""PEFT rank_pattern / alpha_pattern keys: PEFT's matching rule, in bounded time, with a
one-line error for a key that is invalid or cannot be matched safely."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from safeblend.cli import main
from safeblend.module_patterns import ModulePattern, PatternError
from tests.helpers import random_tensor, write_checkpoint
from tests.test_merge_parameters import Q, write_adapter

REPO = Path(__file__).resolve().parent.parent

ATOMS = ["a", "b", ".", r"\.", "[ab]", "[^.]", "(a|b.)", "(?:ab|)", r"\w", "[a-b]"]
QUANTIFIERS = ["", "", "*", "+", "?", "{1,2}", "{2}", "*?"]


def peft_matches(key: str, module: str) -> bool:
    """PEFT's own rule (peft.utils.other.get_pattern_key), on inputs small enough to be safe."""
    return re.match(rf"(.*\.)?({key})$", module) is not None


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(ATOMS), st.sampled_from(QUANTIFIERS)), min_size=1, max_size=4),
       st.booleans(), st.booleans(), st.text(alphabet="ab.", max_size=9))
def test_matches_exactly_as_peft_does(parts, anchor_start, anchor_end, module):
    key = ("^" if anchor_start else "") + "".join(a + q for a, q in parts) + ("$" if anchor_end else "")
    assert ModulePattern(key).matches(module) == peft_matches(key, module), (key, module)


@pytest.mark.parametrize("key", ["q_proj", "self_attn.q_proj", "model.layers.0.self_attn.q_proj", "layers.1",
                                 "layers.0.self_attn.q_proj.x", "", "proj"])
@pytest.mark.parametrize("module", ["model.layers.0.self_attn.q_proj", "model.layers.10.mlp.up_proj", "q_proj"])
def test_plain_keys_match_as_peft_does(key, module):
    assert ModulePattern(key).matches(module) == peft_matches(key, module)


@pytest.mark.parametrize("key", ["(.*.*)*Z", "(a|aa)*b", "(a*)*$", "((a+)+)+c", "(.*a){12}"])
def test_catastrophic_keys_finish_fast(key):
    module = "model.layers.0." + "a" * 300
    started = time.perf_counter()
    assert ModulePattern(key).matches(module) == (key in ("(a*)*$", "(.*a){12}"))
    assert time.perf_counter() - started < 0.5


@pytest.mark.parametrize("key, message", [
    ("(", "not a valid regular expression"),
    (r"(a)\1", "not supported"),
    ("(?=q)q_proj", "not supported"),
    ("(?i)Q_PROJ", "inline flags"),
    ("a{100000}", "too large"),
])
def test_unusable_keys_are_refused(key, message):
    with pytest.raises(PatternError, match=re.escape(message)):
        ModulePattern(key)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("patterns")
    rng = np.random.default_rng(1)
    write_checkpoint(root / "base", {Q: random_tensor(rng, (8, 6), "fp32")})
    return root / "base"


def test_an_invalid_key_is_one_line_naming_the_config(base, tmp_path):
    adapter = write_adapter(tmp_path / "lora", 8)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["rank_pattern"] = {"(": 4}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(main, ["merge", str(base), str(adapter), "-o", str(tmp_path / "o"), "-q"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "adapter_config.json" in lines[0] and "not a valid regular expression" in lines[0]


def test_a_hostile_key_in_an_adapter_does_not_stall_the_merge(base, tmp_path):
    adapter = write_adapter(tmp_path / "lora", 8)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["alpha_pattern"] = {"(.*.*.*)*Z": 4, "q_proj": 2}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    cmd = [sys.executable, "-m", "safeblend.cli", "merge", str(base), str(adapter), "-o", str(tmp_path / "o"), "-q"]
    try:  # Python's backtracking matcher needs far longer on this key
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("the merge stalled on a rank/alpha pattern")
    assert result.returncode == 0, result.stderr
