"""Merge recipes: mergekit's YAML schema, for the part of it safeblend supports.

    merge_method: ties                 # linear, task_arithmetic, slerp, ties, dare_linear,
    base_model: ./Llama-3-8B-Instruct  #   dare_ties, model_stock (or safeblend's spellings)
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

Accepted: ``merge_method``, ``base_model``, ``models`` (or ``slices`` holding one slice whose
sources all span every layer, the way mergekit's SLERP examples are written), ``parameters``
(merge-wide values, which also serve as defaults for the per-model ones), ``dtype`` and
``out_dtype``. Every parameter takes mergekit's forms (``safeblend.methods.params``). Defaults
are mergekit's: ``normalize`` is true for linear and ties and false otherwise, DARE rescales by
1/density. Anything else is an error naming the key; safeblend never ignores a setting.

Relative model paths are relative to the current directory, as in mergekit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SpecError
from .methods.params import layer_count, setting

# mergekit's method names, and safeblend's own spellings, → safeblend's method.
METHODS = {
    "linear": "linear",
    "task_arithmetic": "task-arithmetic",
    "slerp": "slerp",
    "ties": "ties",
    "dare_linear": "dare-linear",
    "dare_ties": "dare-ties",
    "model_stock": "model-stock",
}
METHODS.update({v: v for v in list(METHODS.values())})

TOP_LEVEL = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype"}
UNSUPPORTED_TOP_LEVEL = {
    "modules": "multi-module merges are not supported",
    "tokenizer_source": "safeblend copies the base model's tokenizer and does not build a merged one",
    "tokenizer": "safeblend copies the base model's tokenizer and does not build a merged one",
    "chat_template": "safeblend copies the base model's chat template",
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
}
_GLOBAL = {
    "linear": {"normalize": "normalize"},
    "task-arithmetic": {"normalize": "normalize", "lambda": "lambda_"},
    "ties": {"normalize": "normalize", "lambda": "lambda_", "consensus": "consensus", "int8_mask": None},
    "dare-linear": {"normalize": "normalize", "lambda": "lambda_", "rescale": "rescale", "seed": "seed",
                    "int8_mask": None},
    "dare-ties": {"normalize": "normalize", "lambda": "lambda_", "rescale": "rescale", "seed": "seed",
                  "consensus": "consensus", "int8_mask": None},
    "slerp": {"t": "weight"},
    "model-stock": {"filter_wise": None},
}
# mergekit's defaults where they differ from safeblend's API defaults.
_RECIPE_DEFAULTS = {"linear": {"normalize": True}}
_REQUIRED = {"linear": ["weight"], "task-arithmetic": ["weight"], "ties": ["weight"],
             "dare-linear": ["weight"], "dare-ties": ["weight"], "slerp": ["t"], "model-stock": []}
_NEEDS_BASE = {"task-arithmetic", "ties", "dare-linear", "dare-ties", "slerp", "model-stock"}


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


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and validate a YAML recipe file; SpecError naming the problem otherwise."""
    path = Path(path)
    try:
        import yaml
    except ImportError as exc:
        raise SpecError(f"{path}: reading recipe files needs PyYAML: pip install 'safeblend[recipes]'") from exc
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"{path}: cannot read recipe: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from exc
    return parse_recipe(data, str(path))


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate a recipe given as the mapping YAML would produce."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a recipe is a mapping with merge_method, models, ...; got {type(data).__name__}")
    for key in data:
        if key in UNSUPPORTED_TOP_LEVEL:
            raise SpecError(f"{source}: key {key!r} is not supported: {UNSUPPORTED_TOP_LEVEL[key]}")
        if key not in TOP_LEVEL:
            raise SpecError(f"{source}: unknown key {key!r} (safeblend reads: {', '.join(sorted(TOP_LEVEL))})")
    raw_method = data.get("merge_method")
    if raw_method not in METHODS:
        choices = ", ".join(k for k in METHODS if "_" in k or k in ("linear", "slerp", "ties"))
        raise SpecError(f"{source}: merge_method {raw_method!r} is not supported; choose one of: {choices}")
    method = METHODS[raw_method]
    warnings: list[str] = []

    entries, slice_params = _model_entries(data, source)
    global_params = {**_mapping(data.get("parameters"), f"{source}: parameters"), **slice_params}
    base = _model_path(data["base_model"], f"{source}: base_model") if data.get("base_model") is not None else None
    if base is None:
        if method in _NEEDS_BASE:
            raise SpecError(f"{source}: merge_method {raw_method} needs base_model")
        base = entries[0][0]  # mergekit's linear has no base; safeblend takes the first model
    base_entries = [e for e in entries if _same(e[0], base)]
    fine_tuned = [e for e in entries if not _same(e[0], base)]
    if not fine_tuned:
        raise SpecError(f"{source}: no models besides the base {base!r} to merge")

    params = _method_params(method, global_params, fine_tuned, source, warnings)
    if base_entries and base_entries[0][1]:
        if method == "linear" and "weight" in base_entries[0][1]:
            # mergekit averages the base with the others; its weight only enters the normaliser.
            params["base_weight"] = setting(base_entries[0][1]["weight"], f"{source}: base model's weight")
            unknown = sorted(set(base_entries[0][1]) - {"weight"})
        else:
            unknown = sorted(base_entries[0][1])
        if unknown:
            raise SpecError(f"{source}: parameter {unknown[0]!r} of the base model {base!r} has no effect on "
                            f"{raw_method}; remove it")
    return Recipe(source=source, method=method, base=base, models=[e[0] for e in fine_tuned], params=params,
                  dtype=_output_dtype(data, source, warnings), warnings=warnings)


def _model_entries(data: dict, source: str) -> tuple[list[tuple[str, dict]], dict]:
    """(path, per-model parameters) for every listed model, and slice-level parameters."""
    if ("models" in data) == ("slices" in data):
        raise SpecError(f"{source}: give exactly one of 'models' or 'slices'")
    if "models" in data:
        items, where, slice_params = data["models"], "models", {}
    else:
        slices = data["slices"]
        if not isinstance(slices, list) or len(slices) != 1 or not isinstance(slices[0], dict):
            raise SpecError(f"{source}: slices: only one slice spanning every layer is supported "
                            "(safeblend does not stack or cut layers)")
        unknown = sorted(set(slices[0]) - {"sources", "parameters"})
        if unknown:
            raise SpecError(f"{source}: slices[0]: key {unknown[0]!r} is not supported")
        items, where = slices[0].get("sources"), "slices[0].sources"
        slice_params = _mapping(slices[0].get("parameters"), f"{source}: slices[0].parameters")
    if not isinstance(items, list) or not items:
        raise SpecError(f"{source}: {where} must be a non-empty list of {{model: PATH, parameters: ...}}")
    entries = []
    ranges = set()
    for i, item in enumerate(items):
        what = f"{source}: {where}[{i}]"
        if isinstance(item, str):
            item = {"model": item}
        if not isinstance(item, dict) or "model" not in item:
            raise SpecError(f"{what}: expected {{model: PATH, parameters: ...}}")
        allowed = {"model", "parameters"} | ({"layer_range"} if where != "models" else set())
        unknown = sorted(set(item) - allowed)
        if unknown:
            raise SpecError(f"{what}: key {unknown[0]!r} is not supported")
        if "layer_range" in item:
            ranges.add(tuple(item["layer_range"]) if isinstance(item["layer_range"], list) else item["layer_range"])
            entries.append((_model_path(item["model"], what), _mapping(item.get("parameters"), f"{what}.parameters"),
                            item["layer_range"]))
        else:
            entries.append((_model_path(item["model"], what), _mapping(item.get("parameters"), f"{what}.parameters"),
                            None))
    if len(ranges) > 1:
        raise SpecError(f"{source}: slices: the sources' layer_range values differ; safeblend merges whole models")
    for path, _, layer_range in entries:
        if layer_range is not None:
            _check_full_range(path, layer_range, source)
    return [(p, params) for p, params, _ in entries], slice_params


def _check_full_range(path: str, layer_range: Any, source: str) -> None:
    """A slice must span every layer of the model: [0, number of layers]."""
    from .checkpoint import Checkpoint
    from .hub import resolve_inputs

    if not (isinstance(layer_range, list) and len(layer_range) == 2 and all(isinstance(v, int) for v in layer_range)):
        raise SpecError(f"{source}: layer_range must be [start, end], got {layer_range!r}")
    checkpoint = Checkpoint.open(resolve_inputs(path, [])[0])  # a local path or a Hub repo id
    try:
        count = layer_count(checkpoint.tensors)
    finally:
        checkpoint.close()
    if list(layer_range) != [0, count]:
        raise SpecError(f"{source}: layer_range {layer_range} of {path} does not span its {count} layers "
                        f"([0, {count}]); safeblend merges whole models and does not cut or stack layers")


def _method_params(method: str, global_params: dict, fine_tuned: list[tuple[str, dict]], source: str,
                   warnings: list[str]) -> dict[str, Any]:
    """safeblend keyword parameters for ``method`` from the recipe's parameter blocks."""
    per_model_keys, global_keys = _PER_MODEL[method], _GLOBAL[method]
    params: dict[str, Any] = {}
    for key, value in global_params.items():
        if key in global_keys:
            target = global_keys[key]
            if target is None:
                _no_effect(method, key, value, source, warnings)
            else:
                params[target] = setting(value, f"{source}: parameters.{key}")
        elif key not in per_model_keys:
            raise SpecError(f"{source}: parameter {key!r} is not supported by {method} "
                            f"(it takes: {', '.join([*per_model_keys, *global_keys]) or 'none'})")
    for key, default in _RECIPE_DEFAULTS.get(method, {}).items():
        params.setdefault(key, default)
    for key, target in per_model_keys.items():
        fallback = global_params.get(key)
        values = []
        for path, model_params in fine_tuned:
            if key in model_params:
                s = setting(model_params[key], f"{source}: {path}: {key}")
                if fallback is not None:
                    s = s.then(setting(fallback, f"{source}: parameters.{key}"))
                values.append(s)
            elif fallback is not None:
                values.append(setting(fallback, f"{source}: parameters.{key}"))
            elif key in _REQUIRED[method]:
                raise SpecError(f"{source}: model {path}: parameter {key!r} is required for {method}")
            else:
                values.append(None)
        if any(v is not None for v in values):
            if any(v is None for v in values):
                raise SpecError(f"{source}: parameter {key!r} is set for some models but not all; "
                                "set it for every model or in the merge-wide parameters")
            params[target] = values
    for path, model_params in fine_tuned:
        unknown = sorted(set(model_params) - set(per_model_keys))
        if unknown:
            raise SpecError(f"{source}: model {path}: parameter {unknown[0]!r} is not supported per model by "
                            f"{method} (per-model parameters: {', '.join(per_model_keys) or 'none'})")
    for key in _REQUIRED[method]:
        if key in global_keys and key not in global_params:
            raise SpecError(f"{source}: parameter {key!r} is required for {method}")
    return params


def _no_effect(method: str, key: str, value: Any, source: str, warnings: list[str]) -> None:
    """Parameters that change mergekit's memory use, not its result, or that safeblend lacks."""
    if key == "int8_mask":
        warnings.append(f"{source}: int8_mask has no effect in safeblend (masks are never materialised)")
    elif key == "filter_wise":
        if value not in (False, None):
            raise SpecError(f"{source}: parameter 'filter_wise' is not supported by model-stock; "
                            "safeblend computes one cosine per tensor")


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
    if not isinstance(value, str) or not value:
        raise SpecError(f"{what}: model must be a path, got {value!r}")
    if "+" in value and not os.path.exists(value):
        raise SpecError(f"{what}: {value!r}: LoRA references (model+adapter) are not supported; "
                        "merge the adapter into its model first")
    return value


def _same(a: str, b: str) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)


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
    return merge(recipe.base, recipe.models, out, method=recipe.method, **params, **options)


__all__ = ["Recipe", "load_recipe", "merge_recipe", "parse_recipe"]
