"""The non-weight files a merge carries over: the list against transformers' own constants, and
a weights file given as BASE taking its directory's config and tokenizer."""

from __future__ import annotations

import inspect
import json
import pkgutil

import numpy as np
import pytest

import safeblend
from safeblend.model_files import COMPANION_DIRS, is_companion

from helpers import random_tensor, write_checkpoint


def _transformers_file_names() -> dict[str, str]:
    """Every non-weight file name transformers reads for a model, by where it is named:
    the file-name constants of transformers.utils and the tokenizer base, and each tokenizer
    class's ``vocab_files_names``."""
    import importlib

    import transformers
    import transformers.tokenization_utils_base as tokenization
    import transformers.utils as utils

    names = {}
    for module in (utils, tokenization):
        for attr, value in vars(module).items():
            if attr.isupper() and attr.endswith(("_NAME", "_FILE", "_DIR")) and isinstance(value, str):
                names[f"{module.__name__}.{attr}"] = value
    for info in pkgutil.iter_modules(transformers.models.__path__):
        package = f"transformers.models.{info.name}"
        spec = importlib.util.find_spec(package)
        for sub in pkgutil.iter_modules(spec.submodule_search_locations or []):
            if not sub.name.startswith("tokenization_"):
                continue
            try:
                module = importlib.import_module(f"{package}.{sub.name}")
            except Exception:  # a tokenizer needing an optional dependency: its module still names files
                continue
            for attr, value in vars(module).items():
                if attr == "VOCAB_FILES_NAMES" and isinstance(value, dict):
                    names.update({f"{package}.{attr}[{k}]": v for k, v in value.items() if isinstance(v, str)})
                elif inspect.isclass(value) and isinstance(getattr(value, "vocab_files_names", None), dict):
                    names.update({f"{value.__module__}.{value.__name__}.vocab_files_names[{k}]": v
                                  for k, v in value.vocab_files_names.items() if isinstance(v, str)})
    return names


# Names transformers defines that are weights, the config (written separately, dtype updated),
# a model card, or an adapter: not carried over from the base.
_NOT_CARRIED = {"config.json", "modelcard.json", "adapter_config.json", "adapter_model.safetensors",
                "adapter_model.bin", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json"}


def test_every_file_transformers_reads_is_carried_over():
    names = _transformers_file_names()
    assert "transformers.utils.PROCESSOR_NAME" in names and "transformers.utils.VIDEO_PROCESSOR_NAME" in names
    assert len(names) > 60  # the tokenizer modules were found
    missing = {where: name for where, name in names.items()
               if name not in _NOT_CARRIED and "/" not in name and not name.endswith(("_MIN_VERSION",))
               and "." in name and not is_companion(name)}
    assert missing == {}
    assert names["transformers.utils.CHAT_TEMPLATE_DIR"] in COMPANION_DIRS


def test_the_list_carries_no_weights():
    for name in ["model.safetensors", "model-00001-of-00002.safetensors", "pytorch_model.bin", "model.pt",
                 "adapter_model.safetensors", "model.gguf", "consolidated.00.pth", "config.json", "README.md",
                 "safeblend.json"]:
        assert not is_companion(name), name


@pytest.fixture
def pair(tmp_path):
    rng = np.random.default_rng(5)
    base = {"model.embed_tokens.weight": random_tensor(rng, (8, 4), "fp32")}
    write_checkpoint(tmp_path / "base", base, config={"model_type": "llama", "torch_dtype": "float32"})
    for name, text in [("tokenizer.json", "{}"), ("processor_config.json", '{"processor_class": "LlavaProcessor"}'),
                       ("video_preprocessor_config.json", "{}"), ("chat_template.json", '{"chat_template": "x"}')]:
        (tmp_path / "base" / name).write_text(text)
    (tmp_path / "base" / "additional_chat_templates").mkdir()
    (tmp_path / "base" / "additional_chat_templates" / "tool_use.jinja").write_text("{{ tools }}")
    write_checkpoint(tmp_path / "ft", {n: t + 1 for n, t in base.items()})
    return tmp_path


def test_a_weights_file_as_base_takes_its_directorys_files(pair):
    messages = []
    safeblend.merge(pair / "base" / "model.safetensors", pair / "ft", pair / "out", on_warning=messages.append)
    out = pair / "out"
    assert messages == []
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    for name in ["tokenizer.json", "processor_config.json", "video_preprocessor_config.json", "chat_template.json"]:
        assert (out / name).read_bytes() == (pair / "base" / name).read_bytes(), name
    assert (out / "additional_chat_templates" / "tool_use.jinja").read_text() == "{{ tools }}"


def test_a_bare_weights_file_as_base_warns(pair):
    bare = pair / "bare"
    bare.mkdir()
    (pair / "base" / "model.safetensors").rename(bare / "model.safetensors")
    messages = []
    safeblend.merge(bare / "model.safetensors", pair / "ft", pair / "out", on_warning=messages.append)
    assert messages == [f"{bare / 'model.safetensors'}: a bare weights file with no config.json beside it: the output "
                        "holds weights only (no config or tokenizer) and will not load with from_pretrained"]
    assert sorted(p.name for p in (pair / "out").iterdir()) == ["model.safetensors", "safeblend.json"]
