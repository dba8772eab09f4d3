"""Merge recipes: mergekit's YAML schema, read as mergekit reads it.

    merge_method: ties                 # see METHODS (mergekit's names, or safeblend's)
    base_model: ./Llama-3-8B-Instruct
    models:
      - model: ./ft-math
        parameters: {weight: 0.5, density: [0.2, 0.5, 0.8]}    # a gradient across layers
      - model: ./ft-code
        parameters:
          weight: [{filter: self_attn, value: 0.3}, {value: 0.6}]  # rules by tensor name
          density: 0.5
    parameters: {normalize: true, lambda: 1.0}
    dtype: float32
    out_dtype: bfloat16

A recipe means what it means to mergekit 0.1.5, or it is refused with a one-line error naming
the key or value; nothing is ignored silently:

* A merge-wide parameter (``parameters:``, or a slice's) is the default for every listed
  model, the base included: a model's own setting is consulted first, then the slice's, then
  the merge-wide one (rule by rule: where none of a model's filters matches a tensor).
* ``linear`` is mergekit's weighted sum over every listed model with its weight, the base
  included (``base_model`` not listed joins with the merge-wide weight): Σ wᵢ·θᵢ, divided by
  Σ wᵢ with ``normalize`` (its default). Without ``base_model`` the first model stands in for
  the base (it only anchors the arithmetic; the result is the same).
* Methods built on task vectors ignore the base's own parameters, as mergekit does: they are
  accepted with a warning. So is a per-model ``weight`` on slerp and model_stock.
* Defaults are mergekit's: ``normalize`` true for linear and ties, DARE's ``rescale`` true.
  ``rescale: true`` means what mergekit implements: the kept entries carry each task vector's
  L1 norm (safeblend's ``l1``), for DARE and TIES alike.
* ``chat_template`` (Jinja text, or ``auto``) replaces the base's in the output.
  ``tokenizer_source`` and the ``tokenizer`` block build mergekit's output vocabulary and give
  every model's embedding and LM head its rows (safeblend.vocab_union).
  ``model: MODEL+ADAPTER`` is that PEFT adapter applied to MODEL (local directories).

The file is read defensively: a regular file of at most 1 MiB of UTF-8 text, nesting at most
64 deep, at most 100,000 nodes once aliases are expanded, no duplicate keys.

Every ``model:`` path goes through ``_model_path``. Relative paths are relative to the
current directory, as in mergekit.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError, SpecError
from .methods.params import Setting, layer_count, setting

if TYPE_CHECKING:
    from .vocab_union import TokenRule

# mergekit's method names (every one mergekit 0.1.5 registers) → safeblend's method.
MERGEKIT_METHODS = {
    "linear": "linear",
    "task_arithmetic": "task-arithmetic",
    "slerp": "slerp",
    "ties": "ties",
    "dare_linear": "dare-linear",
    "dare_ties": "dare-ties",
    "model_stock": "model-stock",
    "nearswap": "nearswap",
    "multislerp": "multislerp",
    "nuslerp": "nuslerp",
    "karcher": "karcher",
    "breadcrumbs": "breadcrumbs",
    "breadcrumbs_ties": "breadcrumbs-ties",
    "ram": "ram",
    "ramplus_tl": "ramplus-tl",
    "sce": "sce",
    "arcee_fusion": "arcee-fusion",
    "della": "della",
    "della_linear": "della-linear",
    "passthrough": "passthrough",
}
# ... and safeblend's own spellings.
METHODS = {**MERGEKIT_METHODS, **{v: v for v in MERGEKIT_METHODS.values()}}

TOP_LEVEL = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "chat_template",
             "tokenizer_source", "tokenizer"}
UNSUPPORTED_TOP_LEVEL = {
    "modules": "multi-module merges are not supported",
}

# Per method: parameters per model (recipe key → safeblend keyword) and merge-wide ones.
_PER_MODEL = {
    "linear": {"weight": "weight"},
    "task-arithmetic": {"weight": "weight"},
    "ties": {"weight": "weight", "density": "density"},
    "dare-linear": {"weight": "weight", "density": "density"},
    "dare-ties": {"weight": "weight", "density": "density"},
    "slerp": {},
    "model-stock": {},
    "nearswap": {},
    "multislerp": {"weight": "weight"},
    "nuslerp": {"weight": "weight"},
    "karcher": {},
    "breadcrumbs": {"weight": "weight", "density": "density", "gamma": "gamma"},
    "breadcrumbs-ties": {"weight": "weight", "density": "density", "gamma": "gamma"},
    "ram": {},
    "ramplus-tl": {},
    "sce": {},
    "arcee-fusion": {},
    "della": {"weight": "weight", "density": "density", "epsilon": "epsilon"},
    "della-linear": {"weight": "weight", "density": "density", "epsilon": "epsilon"},
    "passthrough": {"scale": "scale"},
}
_GLOBAL = {
    "linear": {"normalize": "normalize"},
    "task-arithmetic": {"normalize": "normalize", "lambda": "lambda_", "int8_mask": None, "rescale": None,
                        "density": None},
    "ties": {"normalize": "normalize", "lambda": "lambda_", "consensus": "consensus", "int8_mask": None,
             "rescale": "rescale"},
    "dare-linear": {"normalize": "normalize", "lambda": "lambda_", "rescale": "rescale", "seed": "seed",
                    "int8_mask": None},
    "dare-ties": {"normalize": "normalize", "lambda": "lambda_", "rescale": "rescale", "seed": "seed",
                  "consensus": "consensus", "int8_mask": None},
    "slerp": {"t": "weight"},
    "model-stock": {"filter_wise": "filter_wise"},
    "nearswap": {"t": "t"},
    "multislerp": {"normalize_weights": "normalize_weights", "eps": "eps"},
    "nuslerp": {"nuslerp_row_wise": "row_wise", "nuslerp_flatten": "flatten"},
    "karcher": {"max_iter": "max_iter", "tol": "tol"},
    "breadcrumbs": {"normalize": "normalize", "lambda": "lambda_", "rescale": "rescale", "int8_mask": None},
    "breadcrumbs-ties": {"normalize": "normalize", "lambda": "lambda_", "rescale": "rescale",
                         "consensus": "consensus", "int8_mask": None},
    "ram": {"epsilon": "epsilon"},
    "ramplus-tl": {"epsilon": "epsilon", "r": "r", "alpha": "alpha"},
    "sce": {"select_topk": "select_topk", "int8_mask": None},
    "arcee-fusion": {},
    "della": {"normalize": "normalize", "lambda": "lambda_", "rescale": "rescale", "seed": "seed",
              "consensus": "consensus", "int8_mask": None},
    "della-linear": {"normalize": "normalize", "lambda": "lambda_", "rescale": "rescale", "seed": "seed",
                     "int8_mask": None},
    "passthrough": {},
}
# Per-model parameters mergekit accepts and ignores for a method: a warning, not an error.
_IGNORED_PER_MODEL = {"task-arithmetic": {"density"}, "slerp": {"weight"}, "model-stock": {"weight"}, "nearswap": {"weight"}, "karcher": {"weight"},
                      "ram": {"weight"}, "ramplus-tl": {"weight"}, "sce": {"weight"}, "arcee-fusion": {"weight"}}
# mergekit's defaults where they differ from safeblend's API defaults.
_RECIPE_DEFAULTS = {"linear": {"normalize": True}, "dare-linear": {"rescale": "l1"}, "dare-ties": {"rescale": "l1"}}
_REQUIRED = {"linear": ["weight"], "task-arithmetic": ["weight"], "ties": ["weight"],
             "dare-linear": ["weight"], "dare-ties": ["weight"], "slerp": ["t"], "model-stock": [],
             "nearswap": ["t"], "multislerp": ["weight"], "nuslerp": ["weight"], "karcher": [],
             "breadcrumbs": ["weight"], "breadcrumbs-ties": ["weight"], "ram": [], "ramplus-tl": [], "sce": [], "arcee-fusion": [],
             "della": ["weight"], "della-linear": ["weight"], "passthrough": []}
# Methods whose base_model is optional: without one, the first model is an operand with its own
# weight (passed as the base, with ``base_weight``); linear's base is always such an operand.
_WEIGHTED_BASE = {"linear", "multislerp", "nuslerp"}
_CONSTANT_ONLY = {"seed", "max_iter"}  # one value for the whole merge

MAX_BYTES = 1 << 20  # a recipe is a few hundred bytes; this refuses /dev/zero and accidents
MAX_DEPTH = 64
MAX_NODES = 100_000  # after aliases are expanded: refuses "billion laughs" documents


@dataclass
class Recipe:
    """A parsed recipe: the inputs, the method and its keyword parameters for ``safeblend.merge``."""

    source: str
    method: str
    base: str
    models: list[str]
    params: dict[str, Any]
    dtype: str | None = None  # output dtype alias (bf16, fp16, fp32) or None for the base's
    warnings: list[str] = field(default_factory=list)
    chat_template: str | None = None  # Jinja text replacing the base's; None keeps the base's
    tokenizer_from: str | None = None  # a model whose tokenizer files replace the base's
    vocabulary: Any = None  # a changed vocabulary (safeblend.vocab_union.VocabularyPlan)
    slices: Any = None  # a safeblend.slices.SliceLayout: output layers cut or stacked from the models'


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and validate a YAML recipe file; SpecError naming the problem otherwise."""
    path = Path(path)
    text = _read_text(path)
    return parse_recipe(_parse_yaml(text, str(path)), str(path))


def _read_text(path: Path) -> str:
    """The file's text: a regular file (never blocking on a FIFO), at most MAX_BYTES, UTF-8."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise SpecError(f"{path}: cannot read recipe: {exc.strerror or exc}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SpecError(f"{path}: a recipe must be a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise SpecError(f"{path}: cannot read recipe: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_BYTES:
        raise SpecError(f"{path}: recipe is larger than {MAX_BYTES // 1024} KiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: recipe is not UTF-8 text (byte {exc.start})") from None


def _parse_yaml(text: str, source: str) -> Any:
    """PyYAML's safe loader, refusing duplicate keys, deep nesting and alias bombs."""
    try:
        import yaml
    except ImportError as exc:
        raise SpecError(f"{source}: reading recipe files needs PyYAML: pip install 'safeblend[recipes]'") from exc

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):  # noqa: ANN001 (PyYAML's signature)
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"a key must be a string, got {key_node.tag.rsplit(':', 1)[-1]}",
                        key_node.start_mark) from None
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark)
            return super().construct_mapping(node, deep)

    loader = Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_size(node, source)
        return loader.construct_document(node)
    except RecursionError:
        raise SpecError(f"{source}: recipe is nested too deeply") from None
    except yaml.YAMLError as exc:
        first = str(exc).replace("\n", " ").split("  ")[0]
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or first
        raise SpecError(f"{source}: not valid YAML{where}: {problem}") from None
    finally:
        loader.dispose()


def _check_size(root: Any, source: str) -> None:
    """Count the nodes the document expands to (aliases counted each time they are used)."""
    import yaml

    count = 0
    stack = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise SpecError(f"{source}: recipe expands to more than {MAX_NODES} values (aliases included)")
        if depth > MAX_DEPTH:
            raise SpecError(f"{source}: recipe is nested more than {MAX_DEPTH} levels deep")
        if isinstance(node, yaml.SequenceNode):
            stack.extend((child, depth + 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                stack.extend(((key, depth + 1), (value, depth + 1)))


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate a recipe given as the mapping YAML would produce."""
    recipe = _parse_merge(data, source)
    recipe.chat_template = _chat_template(data.get("chat_template"), [recipe.base, *recipe.models], source)
    if data.get("tokenizer_source") is not None and data.get("tokenizer") is not None:
        raise SpecError(f"{source}: give tokenizer_source or tokenizer, not both (mergekit refuses both)")
    has_base = data.get("base_model") is not None
    if data.get("tokenizer_source") is not None:
        _check_tokenizer_source(data["tokenizer_source"], recipe, source, has_base)
    if data.get("tokenizer") is not None:
        _check_tokenizer_block(data["tokenizer"], recipe, source, has_base)
    if recipe.slices is not None and recipe.vocabulary is not None:
        raise SpecError(f"{source}: slices that cut or stack layers with a changed vocabulary "
                        "(tokenizer_source / tokenizer) are not supported yet")
    return recipe


def _check_tokenizer_block(block: Any, recipe: Recipe, source: str, has_base: bool) -> None:
    """mergekit's ``tokenizer:`` block: ``source`` (default union) as ``tokenizer_source``,
    ``tokens`` (each token's default row and ``force``), ``pad_to_multiple_of``
    (safeblend.vocab_union)."""
    what = f"{source}: tokenizer"
    if not isinstance(block, dict):
        raise SpecError(f"{what}: expected a mapping with source, tokens, pad_to_multiple_of")
    unknown = sorted(map(str, set(block) - {"source", "tokens", "pad_to_multiple_of"}))
    if unknown:
        raise SpecError(f"{what}: key {unknown[0]!r} is not supported")
    tokens = block.get("tokens") or {}
    if not isinstance(tokens, dict):
        raise SpecError(f"{what}.tokens: expected a mapping of token to {{source, force}}")
    rules = {}
    for token, config in tokens.items():
        key = f"{what}.tokens[{token!r}]"
        if not isinstance(token, str) or not token:
            raise SpecError(f"{key}: a token must be a non-empty string")
        if not isinstance(config, dict) or set(config) - {"source", "force"}:
            raise SpecError(f"{key}: expected {{source: ..., force: true|false}}")
        force = config.get("force", False)
        if not isinstance(force, bool):
            raise SpecError(f"{key}.force: expected true or false, got {force!r}")
        rules[token] = _token_rule(config.get("source"), force, key)
    pad = block.get("pad_to_multiple_of")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        raise SpecError(f"{what}.pad_to_multiple_of: expected a positive integer, got {pad!r}")
    _check_tokenizer_source(block.get("source", "union"), recipe, source, has_base, "tokenizer.source", rules, pad)


def _token_rule(value: Any, force: bool, key: str) -> TokenRule:
    """A ``tokens:`` entry's ``source``: a model path, ``{kind: zero}`` or ``{kind: model_token,
    model: PATH, token: TEXT | token_id: N}``. mergekit fails on an entry without one."""
    from .vocab_union import TokenRule

    if isinstance(value, str) and value:
        return TokenRule("model", model=value, force=force)
    if isinstance(value, dict) and value.get("kind") == "zero" and set(value) == {"kind"}:
        return TokenRule("zero", force=force)
    if isinstance(value, dict) and value.get("kind") == "model_token" and set(value) <= {"kind", "model", "token",
                                                                                         "token_id"}:
        model, token, token_id = value.get("model"), value.get("token"), value.get("token_id")
        if not isinstance(model, str) or not model:
            raise SpecError(f"{key}.source.model: expected a model path, got {model!r}")
        if (token is None) == (token_id is None):
            raise SpecError(f"{key}.source: give one of token and token_id")
        if token is not None and not isinstance(token, str):
            raise SpecError(f"{key}.source.token: expected a string, got {token!r}")
        if token_id is not None and (isinstance(token_id, bool) or not isinstance(token_id, int)):
            raise SpecError(f"{key}.source.token_id: expected an integer, got {token_id!r}")
        return TokenRule("model_token", model=model, token=token, token_id=token_id, force=force)
    raise SpecError(f"{key}.source: expected a model path, {{kind: zero}} or {{kind: model_token, model: ..., "
                    f"token: ...}}, got {value!r}")


def _check_tokenizer_source(value: Any, recipe: Recipe, source: str, has_base: bool,
                            key: str = "tokenizer_source", rules: dict | None = None, pad: int | None = None) -> None:
    """``tokenizer_source`` (base, union, or a model's path), as mergekit builds it
    (safeblend.vocab_union): where the output vocabulary gives every model the rows it stores
    and the tokenizer is its source's, the merge is the plain one, with that model's tokenizer
    files (``tokenizer_from``); otherwise ``recipe.vocabulary`` permutes the vocabulary tensors."""
    from .checkpoint import lora_reference, peft_adapter_dir
    from .vocab_union import plan_vocabulary

    what = f"{source}: {key} {value!r}"
    if not isinstance(value, str) or not value:
        raise SpecError(f"{what}: expected base, union or a model path")
    named = value not in ("base", "union") and not _same(value, recipe.base)
    if named:
        value = _local_model_dir(value, what)
    # An adapter applied to the base has the base's vocabulary; MODEL+ADAPTER has MODEL's.
    references = [lora_reference(m) for m in recipe.models]
    adapters = [m for m, r in zip(recipe.models, references) if r is not None or peft_adapter_dir(Path(m)) is not None]
    paths = [_local_model_dir(p, what) for p in
             [recipe.base, *(str(r[0]) if r is not None else m for m, r in zip(recipe.models, references)
                             if r is not None or peft_adapter_dir(Path(m)) is None)]]
    rules = {token: _rule_in_cache(rule) for token, rule in (rules or {}).items()}
    try:
        plan = plan_vocabulary(what, value if named or value == "union" else "base", paths, has_base, rules or {},
                               pad, f"{source}: tokenizer")
    except SpecError as exc:
        message = str(exc)
        raise SpecError(message if message.startswith(source) else f"{what}: {message}") from None
    except CheckpointError as exc:
        raise SpecError(f"{what}: {exc}") from None
    if not plan.changes_weights() and plan.same_tokenizer:
        if named:
            recipe.tokenizer_from = value
        return
    if adapters:
        raise SpecError(f"{what}: changes the vocabulary, which is not supported with a LoRA adapter among the "
                        f"models ({adapters[0]})")
    recipe.vocabulary = plan
    recipe.warnings.extend(plan.warnings)


def _chat_template(value: Any, models: list[str], source: str) -> str | None:
    """The output's chat template as mergekit sets it: ``auto``, the template most of the
    listed models (the base included) carry (none: the base's own stays; ties go to the
    first in base-then-models order, where mergekit's order is a set's); else the Jinja text
    itself, which mergekit takes when it is at least 20 characters with a ``{``."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise SpecError(f"{source}: chat_template must be a string (Jinja text or auto), got {type(value).__name__}")
    if value == "auto":
        from collections import Counter

        from .checkpoint import lora_reference
        from .model_files import read_chat_template

        # MODEL+ADAPTER carries MODEL's template; a Hub id is read from the local cache (refused
        # when not there: skipping it would pick another template than mergekit)
        directories = [_local_model_dir(str(r[0]) if (r := lora_reference(m)) is not None else m,
                                        f"{source}: chat_template auto") for m in dict.fromkeys(models)]
        found = [read_chat_template(Path(d)) for d in directories]
        counts = Counter(t.strip() for t in found if t)
        return counts.most_common(1)[0][0] if counts else None
    if len(value) < 20 or "{" not in value:
        raise SpecError(f"{source}: chat_template {value[:40]!r} is not supported: give the Jinja template text or "
                        "auto (mergekit's bundled named templates are not included)")
    return value


def _parse_merge(data: Any, source: str) -> Recipe:
    """The inputs, method and parameters of a recipe."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a recipe is a mapping with merge_method, models, ...; got {type(data).__name__}")
    for key in data:
        if key in UNSUPPORTED_TOP_LEVEL:
            raise SpecError(f"{source}: key {key!r} is not supported: {UNSUPPORTED_TOP_LEVEL[key]}")
        if key not in TOP_LEVEL:
            raise SpecError(f"{source}: unknown key {key!r} (safeblend reads: {', '.join(sorted(TOP_LEVEL))})")
    raw_method = data.get("merge_method")
    if not isinstance(raw_method, str) or raw_method not in METHODS:
        shown = raw_method if isinstance(raw_method, (str, int, float, type(None))) else type(raw_method).__name__
        raise SpecError(f"{source}: merge_method {shown!r} is not supported; choose one of: "
                        f"{', '.join(MERGEKIT_METHODS)}")
    method = METHODS[raw_method]
    warnings: list[str] = []

    if "slices" in data and "models" not in data and not _whole_model_slices(data["slices"], source):
        from .slices import read_slices  # frankenmerges and per-slice merges

        return read_slices(data, method, raw_method, source, warnings)
    entries, slice_params = _model_entries(data, source)
    merge_wide = _merge_wide(_mapping(data.get("parameters"), f"{source}: parameters"), slice_params, source)
    base = _model_path(data["base_model"], f"{source}: base_model") if data.get("base_model") is not None else None
    if base is not None and "+" in base and not os.path.exists(base):
        raise SpecError(f"{source}: base_model {base!r}: a LoRA reference (model+adapter) as the base is not "
                        "supported; merge the adapter into its model first")
    entries = [(_lora_reference(path, base, f"{source}: model {path}"), params) for path, params in entries]
    if method == "passthrough":  # one model, as it is
        return _passthrough(entries, base, source, raw_method, data, merge_wide, warnings)
    base, fine_tuned, params = _method_inputs(method, raw_method, entries, base, merge_wide, source, warnings)
    return Recipe(source=source, method=method, base=base, models=fine_tuned, params=params,
                  dtype=_output_dtype(data, source, warnings), warnings=warnings)


def _method_inputs(method: str, raw_method: str, entries: list[tuple[str, dict]], base: str | None,
                   merge_wide: dict[str, Setting], source: str,
                   warnings: list[str]) -> tuple[str, list[str], dict[str, Any]]:
    """(base, fine-tuned models, method keywords) for the listed models and their parameters
    (a whole recipe's, or one slice's)."""
    if method == "karcher":  # the base, if any, is one more model; none of them has parameters
        base = base if base is not None else entries[0][0]
        fine_tuned = [e for e in entries if not _same(e[0], base)]
        if not fine_tuned:
            raise SpecError(f"{source}: no models besides {base!r} to merge")
        params = _method_params(method, raw_method, merge_wide, entries, source, warnings)
    elif method in _WEIGHTED_BASE and (method == "linear" or base is None):
        if base is None:
            base = entries[0][0]  # no base: the first model anchors the arithmetic
        listed_base = [params for path, params in entries if _same(path, base)]
        base_params = listed_base[0] if listed_base else {}
        fine_tuned = [e for e in entries if not _same(e[0], base)]
        if not fine_tuned:
            raise SpecError(f"{source}: no models besides {base!r} to merge")
        params = _method_params(method, raw_method, merge_wide, fine_tuned, source, warnings)
        params["base_weight"] = _base_weight(base, base_params, merge_wide, source, raw_method)
        unknown = sorted(map(str, set(base_params) - {"weight"}))
        if unknown:
            raise SpecError(f"{source}: model {base}: parameter {unknown[0]!r} is not supported per model by "
                            f"{raw_method} (per-model parameters: weight)")
    else:
        if base is None:
            raise SpecError(f"{source}: merge_method {raw_method} needs base_model")
        fine_tuned = [e for e in entries if not _same(e[0], base)]
        if not fine_tuned:
            raise SpecError(f"{source}: no models besides the base {base!r} to merge")
        params = _method_params(method, raw_method, merge_wide, fine_tuned, source, warnings)
        for path, base_params in entries:
            if _same(path, base) and base_params:
                keys = ", ".join(sorted(map(str, base_params)))
                warnings.append(f"{source}: the base model's own parameters ({keys}) have no effect on "
                                f"{raw_method}, as in mergekit")
    return base, [e[0] for e in fine_tuned], params


def _passthrough(entries: list[tuple[str, dict]], base: str | None, source: str, raw_method: str, data: dict,
                 merge_wide: dict[str, Setting], warnings: list[str]) -> Recipe:
    """mergekit's passthrough of one model: that model merged with itself, each tensor times its
    ``scale`` (the model's own, else the merge-wide one; none: a copy)."""
    if len(entries) != 1 or (base is not None and not _same(base, entries[0][0])):
        raise SpecError(f"{source}: passthrough takes exactly one model (stack models with slices)")
    path = entries[0][0]
    params = _method_params("passthrough", raw_method, merge_wide, entries, source, warnings)
    return Recipe(source=source, method="passthrough", base=path, models=[path], params=params,
                  dtype=_output_dtype(data, source, warnings), warnings=warnings)


def _base_weight(base: str, base_params: dict, merge_wide: dict[str, Setting], source: str,
                 method: str = "linear") -> Setting:
    """The weight of a base that is an operand: its own, falling back to the merge-wide one."""
    own = setting(base_params["weight"], f"{source}: {base}: weight") if "weight" in base_params else None
    fallback = merge_wide.get("weight")
    if own is None and fallback is None:
        raise SpecError(f"{source}: model {base}: parameter 'weight' is required for {method}, the base included "
                        "(list the base under models with a weight, or set a merge-wide weight)")
    if own is None:
        return fallback
    return own.then(fallback) if fallback is not None else own


def _merge_wide(global_params: dict, slice_params: dict, source: str,
                slice_key: str = "slices[0].parameters") -> dict[str, Setting]:
    """Merge-wide settings: a slice's own first, then the recipe's (rule by rule)."""
    merged: dict[str, Setting] = {}
    for key in [*slice_params, *(k for k in global_params if k not in slice_params)]:
        if not isinstance(key, str):
            raise SpecError(f"{source}: parameter name {key!r} is not a string")
        chain = [setting(params[key], f"{source}: {where}.{key}")
                 for params, where in ((slice_params, slice_key), (global_params, "parameters"))
                 if key in params]
        merged[key] = chain[0].then(chain[1]) if len(chain) == 2 else chain[0]
    return merged


def _whole_model_slices(slices: Any, source: str) -> bool:
    """Whether ``slices`` reads as ``models``: one slice whose sources span every layer (or is
    malformed, for the checks of ``_model_entries`` to name). Anything else is read by
    ``safeblend.slices``."""
    if not (isinstance(slices, list) and len(slices) == 1 and isinstance(slices[0], dict)):
        return not isinstance(slices, list) or not slices or not all(isinstance(s, dict) for s in slices)
    sources = slices[0].get("sources")
    if not isinstance(sources, list):
        return True
    for item in sources:
        layer_range = item.get("layer_range") if isinstance(item, dict) else None
        if not (isinstance(layer_range, list) and len(layer_range) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in layer_range)):
            continue
        if layer_range[0] != 0 or not isinstance(item.get("model"), str) or "+" in item["model"]:
            return False
        try:
            if layer_range[1] != _layer_count(item["model"]):
                return False
        except CheckpointError:
            continue  # _check_full_range names the model
    return True


def _layer_count(path: str) -> int:
    from .checkpoint import Checkpoint
    from .hub import resolve_inputs

    checkpoint = Checkpoint.open(resolve_inputs(path, [])[0])  # a local path or a Hub repo id
    try:
        return layer_count(checkpoint.tensors)
    finally:
        checkpoint.close()


def _check_full_range(path: str, layer_range: Any, source: str) -> None:
    """A source of the one slice read as ``models`` spans every layer: [0, number of layers]."""
    if not (isinstance(layer_range, list) and len(layer_range) == 2 and all(isinstance(v, int) for v in layer_range)):
        raise SpecError(f"{source}: layer_range must be [start, end], got {layer_range!r}")
    count = _layer_count(path)
    if list(layer_range) != [0, count]:  # _whole_model_slices sends any other range to safeblend.slices
        raise SpecError(f"{source}: layer_range {layer_range} of {path} does not span its {count} layers")


def _model_entries(data: dict, source: str) -> tuple[list[tuple[str, dict]], dict]:
    """(path, per-model parameters) for every listed model, and slice-level parameters."""
    if ("models" in data) == ("slices" in data):
        raise SpecError(f"{source}: give exactly one of 'models' or 'slices'")
    if "models" in data:
        items, where, slice_params = data["models"], "models", {}
    else:
        slices = data["slices"]
        if not isinstance(slices, list) or len(slices) != 1 or not isinstance(slices[0], dict):
            raise SpecError(f"{source}: slices must be a list of {{sources: [...], parameters: ...}}")
        unknown = sorted(map(str, set(slices[0]) - {"sources", "parameters"}))
        if unknown:
            raise SpecError(f"{source}: slices[0]: key {unknown[0]!r} is not supported")
        items, where = slices[0].get("sources"), "slices[0].sources"
        slice_params = _mapping(slices[0].get("parameters"), f"{source}: slices[0].parameters")
    if not isinstance(items, list) or not items:
        raise SpecError(f"{source}: {where} must be a non-empty list of {{model: PATH, parameters: ...}}")
    entries = []
    for i, item in enumerate(items):
        what = f"{source}: {where}[{i}]"
        if isinstance(item, str):
            item = {"model": item}
        if not isinstance(item, dict) or "model" not in item:
            raise SpecError(f"{what}: expected {{model: PATH, parameters: ...}}")
        allowed = {"model", "parameters"} | ({"layer_range"} if where != "models" else set())
        unknown = sorted(map(str, set(item) - allowed))
        if unknown:
            raise SpecError(f"{what}: key {unknown[0]!r} is not supported")
        path = _model_path(item["model"], what)
        if any(_same(path, other) for other, _ in entries):
            raise SpecError(f"{what}: model {path} is listed twice")
        if "layer_range" in item:
            _check_full_range(path, item["layer_range"], what)
        entries.append((path, _mapping(item.get("parameters"), f"{what}.parameters")))
    return entries, slice_params


def _method_params(method: str, raw_method: str, merge_wide: dict[str, Setting],
                   fine_tuned: list[tuple[str, dict]], source: str, warnings: list[str]) -> dict[str, Any]:
    """safeblend keyword parameters for ``method`` from the recipe's parameter blocks."""
    per_model_keys, global_keys = _PER_MODEL[method], _GLOBAL[method]
    params: dict[str, Any] = {}
    for key, value in merge_wide.items():
        if key in global_keys:
            target = global_keys[key]
            if target is None:
                _no_effect(raw_method, key, value, source, warnings)
            elif key in _CONSTANT_ONLY:
                if value.constant is None:
                    raise SpecError(f"{source}: parameter {key!r} must be one number for the whole merge")
                params[target] = value.constant
            else:
                params[target] = _recipe_meaning(method, key, value)
        elif key in _IGNORED_PER_MODEL.get(method, set()):  # mergekit's default for a parameter it never reads
            warnings.append(f"{source}: parameter {key!r} has no effect on {raw_method} (mergekit ignores it too)")
        elif key not in per_model_keys:
            raise SpecError(f"{source}: parameter {key!r} is not supported by {raw_method} "
                            f"(it takes: {', '.join([*per_model_keys, *global_keys]) or 'none'})")
    for key, default in _RECIPE_DEFAULTS.get(method, {}).items():
        params.setdefault(key, default)
    for key, target in per_model_keys.items():
        fallback = merge_wide.get(key)
        values = []
        for path, model_params in fine_tuned:
            if key in model_params:
                s = setting(model_params[key], f"{source}: {path}: {key}")
                values.append(s.then(fallback) if fallback is not None else s)
            elif fallback is not None:
                values.append(fallback)
            elif key in _REQUIRED[method]:
                raise SpecError(f"{source}: model {path}: parameter {key!r} is required for {raw_method}")
            else:
                values.append(None)
        if any(v is not None for v in values):
            if any(v is None for v in values):
                raise SpecError(f"{source}: parameter {key!r} is set for some models but not all; "
                                "set it for every model or in the merge-wide parameters")
            params[target] = values
    ignored = _IGNORED_PER_MODEL.get(method, set())
    for path, model_params in fine_tuned:
        for key in sorted(map(str, set(model_params) & ignored)):
            warnings.append(f"{source}: model {path}: parameter {key!r} has no effect on {raw_method} "
                            "(mergekit ignores it too)")
        unknown = sorted(map(str, set(model_params) - set(per_model_keys) - ignored))
        if unknown:
            raise SpecError(f"{source}: model {path}: parameter {unknown[0]!r} is not supported per model by "
                            f"{raw_method} (per-model parameters: {', '.join(per_model_keys) or 'none'})")
    for key in _REQUIRED[method]:
        if key in global_keys and key not in merge_wide:
            raise SpecError(f"{source}: parameter {key!r} is required for {raw_method}")
    return params


def _recipe_meaning(method: str, key: str, value: Setting) -> Setting:
    """A merge-wide value as mergekit means it: DARE's ``rescale: true`` keeps the L1 norm."""
    if key == "rescale" and method in ("ties", "dare-linear", "dare-ties", "breadcrumbs", "breadcrumbs-ties"):
        meaning = {True: "l1", False: "none"}
        return Setting(tuple((p, meaning.get(v, v) if isinstance(v, bool) else v) for p, v in value.rules))
    return value


def _no_effect(method: str, key: str, value: Setting, source: str, warnings: list[str]) -> None:
    """Parameters that change mergekit's memory use, not its result, or that safeblend lacks."""
    if key == "int8_mask":
        warnings.append(f"{source}: int8_mask has no effect in safeblend (masks are never materialised)")
    elif key in ("rescale", "density"):  # task_arithmetic drops nothing
        warnings.append(f"{source}: {key} has no effect on {method} (nothing is dropped), as in mergekit")


def _output_dtype(data: dict, source: str, warnings: list[str]) -> str | None:
    from .dtypes import dtype_from_alias

    aliases = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
    chosen = None
    for key in ("dtype", "out_dtype"):
        value = data.get(key)
        if value is None:
            continue
        try:
            dtype_from_alias(str(value))
        except ValueError as exc:
            raise SpecError(f"{source}: {key}: {exc}") from None
        chosen = aliases.get(str(value).lower(), str(value).lower())
        if key == "dtype" and chosen not in ("fp32", "float", "float32"):
            warnings.append(f"{source}: dtype {value}: safeblend always computes in fp32 and rounds once; "
                            "the value only sets the output dtype (unless out_dtype does)")
    return chosen


def _mapping(value: Any, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError(f"{what}: expected a mapping of parameter names to values")
    return value


def _model_path(value: Any, what: str) -> str:
    """The one place a recipe's ``model:`` / ``base_model:`` value becomes a path to open."""
    if not isinstance(value, str) or not value:
        shown = repr(value) if isinstance(value, (int, float, type(None))) else f"a {type(value).__name__}"
        raise SpecError(f"{what}: model must be a path, got {shown}")
    return value


def _lora_reference(value: str, base: str | None, what: str) -> str:
    """A ``model+adapter`` reference (mergekit's: the PEFT adapter merged into the model) as the
    path safeblend opens: on ``base_model``, the adapter directory itself (safeblend applies an
    adapter to the base, W + s·B·A, ``safeblend.lora``); on another local model, the reference
    (``safeblend.lora.open_model`` applies the adapter to that model). An adapter that is not a
    local PEFT directory is refused."""
    if "+" not in value or os.path.exists(value):
        return value
    from .checkpoint import peft_adapter_dir

    parts = value.split("+")
    if len(parts) != 2 or not all(parts):
        raise SpecError(f"{what}: {value!r}: expected MODEL+ADAPTER")
    model, adapter = parts
    if peft_adapter_dir(Path(adapter)) is None:
        raise SpecError(f"{what}: {value!r}: {adapter} is not a local PEFT adapter directory (adapter_config.json)")
    if base is not None and _same(model, base):
        return adapter  # the adapter on the base: safeblend applies any adapter to the base
    if not Path(model).is_dir():
        raise SpecError(f"{what}: {value!r}: {model} is not a local model directory")
    return value  # opened as the adapter applied to MODEL (safeblend.lora.open_model)


def _local_model_dir(model: str, what: str) -> str:
    """The local directory of a model whose files the recipe reads before the merge (its
    tokenizer.json, its chat template): the path itself, or a Hub id's snapshot in the local
    cache (``safeblend.hub.cached_model_dir``). Nothing is downloaded here."""
    from .hub import cached_model_dir, parse_repo_ref

    found = cached_model_dir(model)
    if found is None or not found.is_dir():
        ref = parse_repo_ref(model) if found is None else None
        hint = f" (download it first: {ref.fetch_command()})" if ref is not None else ""
        raise SpecError(f"{what}: {model}: its files are read with the recipe, before the merge: give a local "
                        f"model directory or a Hub id in the local cache{hint}")
    return model if found == Path(model) else str(found)


def _rule_in_cache(rule: "TokenRule") -> "TokenRule":
    """A ``tokens`` entry whose model is a cached Hub id, naming that id's snapshot instead (any
    other name stays, for the vocabulary's plan to check against the merge's models)."""
    import dataclasses

    from .hub import cached_model_dir

    found = cached_model_dir(rule.model) if rule.model is not None else None
    return rule if found is None or found == Path(rule.model) else dataclasses.replace(rule, model=str(found))


def _same(a: str, b: str) -> bool:
    """Whether two model paths name the same model (symlinks resolved)."""
    return os.path.realpath(a) == os.path.realpath(b)


def merge_recipe(path: str | os.PathLike, out: str | os.PathLike, **options: Any):
    """Run the merge a recipe file describes; ``options`` go to ``safeblend.merge`` (e.g. ``dtype``,
    ``device``, ``seed``; an explicit ``dtype`` overrides the recipe's)."""
    from .api import merge

    recipe = load_recipe(path)
    params = dict(recipe.params)
    if "seed" in options:
        params["seed"] = options.pop("seed")
    options.setdefault("dtype", recipe.dtype or "auto")
    warn = options.get("on_warning")
    for message in recipe.warnings:
        if warn is not None:
            warn(message)
        else:
            import warnings

            warnings.warn(message, stacklevel=2)
    if recipe.chat_template is not None:
        options["chat_template"] = recipe.chat_template
    if recipe.tokenizer_from is not None:
        options["tokenizer_from"] = recipe.tokenizer_from
    if recipe.vocabulary is not None:
        options["vocabulary"] = recipe.vocabulary
    if recipe.slices is not None:
        options["slices"] = recipe.slices
    return merge(recipe.base, recipe.models, out, method=recipe.method, **params, **options)


__all__ = ["Recipe", "load_recipe", "merge_recipe", "parse_recipe"]
