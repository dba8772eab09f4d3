"""A recipe's ``slices``: output layers taken from ranges of the inputs' layers, as mergekit 0.1.5
builds them.

    slices:
      - sources: [{model: A, layer_range: [0, 24]}]
      - sources: [{model: B, layer_range: [20, 40]}]
    merge_method: passthrough

The output's layers are the slices' layers in order, renumbered from 0: slice s contributes
``end − start`` layers, its i-th merging layer ``start + i`` of each of its sources (every source
of a slice spans as many layers; each has its own start). A source layer used twice is written
twice. Tensors outside the layers come, as in mergekit, from the first slice's sources (the
embeddings) and from the last slice's (the final norm and the LM head), merged with those
slices' parameters at t = 0. A layer's position t, for gradients, runs from 0 to 1 across its
own slice (i / (length − 1); 1 for a slice of one layer). Per-model parameters match filters
against the source's tensor name (its own layer number); merge-wide ones against the output's,
as mergekit reads them.

The merge runs on *views*: one checkpoint per operand (the base, then each fine-tuned model,
by their place in every slice) whose tensors are the sources' stored tensors under the output's
names, the same bytes of the same files. Nothing is read or copied to rename; a tensor every
operand takes from the same bytes stays a byte-for-byte copy, as in any merge.

Layer naming is known for transformers' decoder-only layout (``model.embed_tokens``,
``model.layers.N.…``, ``model.norm``, ``lm_head``: Llama, Mistral, Qwen2, Gemma, Phi-3, …);
any other layout, a tensor outside the layers that is none of those, or a config.json without
``num_hidden_layers``, is refused naming ``layer_range``. config.json of the output has
``num_hidden_layers`` set to the output's layer count and, where present, ``layer_types``
giving each output layer its source layer's type.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint
from .errors import CheckpointError, SpecError
from .methods.params import Setting, setting
from .quirks import read_json_object

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
PRE = ("model.embed_tokens.weight",)  # before the layers: from the first slice's sources
POST = ("model.norm.weight", "lm_head.weight")  # after them: from the last slice's sources
_PER_LAYER_OK = {"layer_types"}  # per-layer config lists safeblend rebuilds for the output's layers


@dataclass(frozen=True)
class Span:
    """Layers [start, end) of one model: one source of one slice."""

    model: str
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SliceLayout:
    """The output's layers: ``operands[o][s]`` is the span operand ``o`` (0 the base, then the
    fine-tuned models) takes in slice ``s``. ``config_from`` is the model whose config.json and
    tokenizer the output carries."""

    operands: tuple[tuple[Span, ...], ...]
    config_from: str

    @property
    def n_models(self) -> int:
        """Fine-tuned operands (passthrough's single source is merged with itself: one)."""
        return max(len(self.operands) - 1, 1)

    @property
    def lengths(self) -> list[int]:
        return [span.length for span in self.operands[0]]

    @property
    def n_layers(self) -> int:
        return sum(self.lengths)

    def paths(self) -> list[str]:
        """Every model the merge reads, the config's first."""
        return list(dict.fromkeys([self.config_from, *(span.model for spans in self.operands for span in spans)]))

    def with_paths(self, mapping: dict[str, str]) -> "SliceLayout":
        """The same layout with each model path replaced by ``mapping``'s (resolved Hub ids)."""
        return SliceLayout(tuple(tuple(replace(span, model=mapping.get(span.model, span.model)) for span in spans)
                                 for spans in self.operands), mapping.get(self.config_from, self.config_from))

    def locate(self, name: str) -> tuple[int, int | None, str]:
        """(slice, index of the layer within it or None outside the layers, rest of the name)."""
        match = _LAYER.match(name)
        if match is None:
            return (len(self.lengths) - 1 if name in POST else 0), None, name
        k, rest = int(match.group(1)), match.group(2)
        for s, length in enumerate(self.lengths):
            if k < length:
                return s, k, rest
            k -= length
        raise SpecError(f"{name}: layer beyond the output's {self.n_layers} layers")

    def evaluation(self, name: str, operand: int | None) -> tuple[int, str, float]:
        """(slice, name to match filters against, position t) for output tensor ``name``: the
        source's name for an operand's own parameters, the output's for merge-wide ones."""
        s, i, rest = self.locate(name)
        if i is None:
            return s, name, 0.0  # embeddings, final norm, LM head: t = 0 (mergekit ≥ 0.1.2)
        length = self.lengths[s]
        t = i / (length - 1) if length > 1 else 1.0
        if operand is None:
            return s, name, t
        spans = self.operands[min(operand, len(self.operands) - 1)]  # passthrough: its one source twice
        return s, f"model.layers.{spans[s].start + i}.{rest}", t

    def describe(self) -> list[dict[str, Any]]:
        """The slices as a recipe writes them (for the output's metadata)."""
        return [{"sources": [{"model": str(spans[s].model), "layer_range": [spans[s].start, spans[s].end]}
                             for spans in self.operands]} for s in range(len(self.lengths))]

    def assemble(self, opened: dict[str, Checkpoint]) -> list[Checkpoint]:
        """One view per operand: the sources' tensors under the output's names (no data read)."""
        layers = {path: layer_tensors(ckpt, path) for path, ckpt in opened.items()}
        views = []
        for spans in self.operands:
            tensors = {}
            first, last = opened[spans[0].model], opened[spans[-1].model]
            for name in PRE:
                if name in first.tensors:
                    tensors[name] = first.tensors[name]
            k = 0
            for span in spans:
                for j in range(span.start, span.end):
                    for rest, info in layers[span.model][j]:
                        out = f"model.layers.{k}.{rest}"
                        tensors[out] = replace(info, name=out)
                    k += 1
            for name in POST:
                if name in last.tensors:
                    tensors[name] = last.tensors[name]
            files = list({id(f): f for span in spans for f in opened[span.model].files}.values())
            config = opened[self.config_from]
            views.append(Checkpoint(path=Path(spans[0].model), files=files, tensors=tensors,
                                    model_dir=config.model_dir))
        if len(views) == 1:  # passthrough: the one source merged with itself
            views.append(views[0])
        return views

    def config_changes(self) -> dict[str, Any]:
        """config.json keys the output changes: its layer count, and each output layer's type
        where the config lists one per layer (``layer_types``: the source layer's own)."""
        changes: dict[str, Any] = {"num_hidden_layers": self.n_layers}
        config = read_model_config(self.config_from)
        if "layer_types" in config:
            types = []
            for span in self.operands[0]:
                source = read_model_config(span.model).get("layer_types")
                if not isinstance(source, list) or len(source) < span.end:
                    raise SpecError(f"{span.model}: layer_range: config.json's layer_types does not list layers "
                                    f"{span.start}..{span.end - 1}")
                types.extend(source[span.start:span.end])
            changes["layer_types"] = types
        return changes


@dataclass(frozen=True, eq=False)
class SliceSetting(Setting):
    """A parameter that differs by slice: slice s's own setting, read at the output tensor's
    place in slice s (``SliceLayout.evaluation``); ``operand`` None matches filters against the
    output's names (merge-wide parameters), else against that operand's source names."""

    per_slice: tuple[Setting, ...] = ()
    layout: SliceLayout | None = None
    operand: int | None = None

    @property
    def constant(self):  # the value when every slice's is the same constant (True is not 1 here)
        first = self.per_slice[0].constant
        same = all(type(s.constant) is type(first) and s.constant == first for s in self.per_slice)
        return first if same else None

    def at(self, name: str, position: float):
        s, match, t = self.layout.evaluation(name, self.operand)
        return self.per_slice[s].at(match, t)

    def then(self, fallback: Setting) -> Setting:
        raise TypeError("a per-slice setting is final")

    def to_json(self) -> Any:
        if self.constant is not None:
            return self.constant
        return [{"slice": s, "value": v.to_json()} for s, v in enumerate(self.per_slice)]


def combine_params(per_slice: list[dict[str, Any]], layout: SliceLayout, defaults: dict[str, Any],
                   constant_only: set[str], source: str) -> dict[str, Any]:
    """One set of method keywords from each slice's: a value every slice shares as it is, else a
    SliceSetting (per operand for per-model lists and ``base_weight``). A keyword some slices
    leave out takes the method's default there (``defaults``; none: SpecError)."""
    keys = list(dict.fromkeys(key for params in per_slice for key in params))
    combined: dict[str, Any] = {}
    for key in keys:
        values = []
        for s, params in enumerate(per_slice):
            if key in params:
                values.append(params[key])
            elif defaults.get(key) is not None:
                values.append(None)  # filled below, in the shape the other slices give
            else:
                raise SpecError(f"{source}: slices[{s}]: parameter {key!r} is set in some slices but not all; "
                                "set it in every slice or in the merge-wide parameters")
        given = next(v for v in values if v is not None)
        fill = [defaults[key]] * len(given) if isinstance(given, list) else defaults.get(key)
        values = [fill if v is None else v for v in values]
        if isinstance(given, list):
            combined[key] = [_per_slice([v[i] for v in values], layout, i + 1, key) for i in range(len(given))]
        elif key == "base_weight":
            combined[key] = _per_slice(values, layout, 0, key)
        elif all(v == values[0] for v in values) and not isinstance(values[0], Setting):
            combined[key] = values[0]
        elif key in constant_only:
            raise SpecError(f"{source}: parameter {key!r} must be one value for the whole merge, not per slice")
        else:
            combined[key] = _per_slice(values, layout, None, key)
    return combined


def _per_slice(values: list[Any], layout: SliceLayout, operand: int | None, key: str) -> Setting:
    settings = tuple(setting(v, key) for v in values)
    if all(s == settings[0] for s in settings) and operand is None and settings[0].constant is not None:
        return settings[0]  # the same for every tensor; anything else is read at its place in its slice
    return SliceSetting(rules=(), per_slice=settings, layout=layout, operand=operand)


def layer_tensors(ckpt: Checkpoint, what: str) -> dict[int, list[tuple[str, Any]]]:
    """Layer index → [(name after ``model.layers.N.``, tensor)], checking that every other
    tensor is the embedding, the final norm or the LM head; SpecError otherwise."""
    layers: dict[int, list[tuple[str, Any]]] = {}
    for name, info in ckpt.tensors.items():
        match = _LAYER.match(name)
        if match is not None:
            layers.setdefault(int(match.group(1)), []).append((match.group(2), info))
        elif name not in PRE and name not in POST:
            raise SpecError(f"{what}: layer_range: tensor {name!r} is outside the layers and is not the embedding, "
                            "final norm or LM head; safeblend cannot place it as mergekit would (layer naming known: "
                            "model.layers.N, as Llama, Mistral, Qwen2, Gemma save it)")
    if not layers:
        raise SpecError(f"{what}: layer_range: no tensors named model.layers.N.*; safeblend cannot identify this "
                        "model's layers")
    missing = sorted(set(range(max(layers) + 1)) - set(layers))
    if missing:
        raise SpecError(f"{what}: layer_range: layer {missing[0]} has no tensors")
    return layers


def model_layer_count(path: str, what: str) -> int:
    """Layers of a local model directory, checked against its config.json; SpecError naming
    ``layer_range`` where safeblend cannot identify them or the config cannot be changed right."""
    from .hub import resolve_inputs
    from .quantized import open_checkpoint

    try:
        ckpt = open_checkpoint(resolve_inputs(path, [])[0])
    except CheckpointError as exc:
        raise SpecError(f"{what}: {exc}") from None
    try:
        if type(ckpt) is not Checkpoint:
            raise SpecError(f"{what}: layer_range: {path} is quantized; slices of quantized models are not supported")
        count = len(layer_tensors(ckpt, f"{what}: {path}"))
        model_dir = ckpt.model_dir
    finally:
        ckpt.close()
    config = _config(model_dir)
    if config.get("num_hidden_layers") != count:
        raise SpecError(f"{what}: layer_range: {path}'s config.json has num_hidden_layers "
                        f"{config.get('num_hidden_layers')!r}, its weights {count} layers; cannot set the output's")
    for key, value in config.items():
        per_layer = isinstance(value, list) and len(value) == count and count > 1
        if per_layer and key not in _PER_LAYER_OK | {"architectures"} and not key.endswith(("token_id", "token_ids")):
            raise SpecError(f"{what}: layer_range: {path}'s config.json lists {key!r} per layer; safeblend cannot "
                            "rebuild it for the output's layers")
    return count


def read_model_config(path: str) -> dict[str, Any]:
    """config.json of a model directory (or of the directory beside a weights file)."""
    root = Path(path)
    return _config(root if root.is_dir() else root.parent)


def _config(model_dir: Path | None) -> dict[str, Any]:
    if model_dir is None or not (model_dir / "config.json").is_file():
        raise SpecError(f"{model_dir}: layer_range: no config.json to set the output's layer count in")
    try:
        return read_json_object(model_dir / "config.json")
    except CheckpointError as exc:  # the recipe cannot be honoured: a usage error, as the rest here
        raise SpecError(str(exc)) from None


def read_slices(data: dict, method: str, raw_method: str, source: str, warnings: list[str]):
    """A recipe's ``slices`` (more than one, or cutting layers) as a Recipe whose ``slices`` is
    the SliceLayout; SpecError naming the key that safeblend cannot honour."""
    from . import recipe as r

    slices = data["slices"]
    global_params = r._mapping(data.get("parameters"), f"{source}: parameters")
    base = r._model_path(data["base_model"], f"{source}: base_model") if data.get("base_model") is not None else None
    counts: dict[str, int] = {}
    per_slice, operands = [], []
    for s, item in enumerate(slices):
        what = f"{source}: slices[{s}]"
        unknown = sorted(map(str, set(item) - {"sources", "parameters"}))
        if unknown:
            raise SpecError(f"{what}: key {unknown[0]!r} is not supported")
        spans, entries = _sources(item.get("sources"), what, counts)
        if len(spans) != len(slices[0]["sources"]):
            raise SpecError(f"{what}: {len(spans)} sources where slices[0] has {len(slices[0]['sources'])}; "
                            "safeblend needs the same number in every slice")
        merge_wide = r._merge_wide(global_params, r._mapping(item.get("parameters"), f"{what}.parameters"), source,
                                   f"slices[{s}].parameters")
        if method == "passthrough":
            if len(spans) != 1:
                raise SpecError(f"{what}: passthrough takes exactly one source per slice, got {len(spans)}")
            order, params = [0], r._method_params(method, raw_method, merge_wide, entries, what, warnings)
        else:
            listed = base is not None and any(r._same(base, e[0]) for e in entries)
            if base is not None and not listed and method != "linear":  # linear never reads the base
                raise SpecError(f"{what}: sources do not include base_model {base}, which {raw_method} needs "
                                "(mergekit does not add it to a slice)")
            anchor, fine_tuned, params = r._method_inputs(method, raw_method, entries, base if listed else None,
                                                          merge_wide, what, warnings)
            paths = [e[0] for e in entries]
            order = [paths.index(anchor), *(paths.index(p) for p in fine_tuned)]
        per_slice.append(params)
        operands.append([spans[i] for i in order])
    if base is not None:  # its config.json is the output's
        base = next((p for p in counts if r._same(p, base)), base)
        if base not in counts:
            model_layer_count(base, f"{source}: base_model")
    layout = SliceLayout(tuple(zip(*operands)), base if base is not None else operands[0][0].model)
    params = combine_params(per_slice, layout, _defaults(method), r._CONSTANT_ONLY, source)
    paths = layout.paths()
    warnings[:] = list(dict.fromkeys(warnings))  # one per recipe, not one per slice
    return r.Recipe(source=source, method=method, base=paths[0], models=paths[1:], params=params,
                    dtype=r._output_dtype(data, source, warnings), warnings=warnings, slices=layout)


def _defaults(method: str) -> dict[str, Any]:
    """The method's keyword defaults (what a slice that leaves a parameter out gets)."""
    import inspect

    from .methods import get_method

    signature = inspect.signature(get_method(method).__init__)
    return {name: p.default for name, p in signature.parameters.items() if p.default is not inspect.Parameter.empty}


def _sources(items: Any, what: str, counts: dict[str, int]) -> tuple[list[Span], list[tuple[str, dict]]]:
    """A slice's sources: their spans (checked against each model's layers) and parameters."""
    from . import recipe as r

    if not isinstance(items, list) or not items:
        raise SpecError(f"{what}.sources must be a non-empty list of {{model, layer_range, parameters}}")
    spans, entries = [], []
    for i, item in enumerate(items):
        where = f"{what}.sources[{i}]"
        if not isinstance(item, dict) or "model" not in item:
            raise SpecError(f"{where}: expected {{model: PATH, layer_range: [start, end], parameters: ...}}")
        unknown = sorted(map(str, set(item) - {"model", "layer_range", "parameters"}))
        if unknown:
            raise SpecError(f"{where}: key {unknown[0]!r} is not supported")
        path = r._model_path(item["model"], where)
        if "+" in path and not Path(path).exists():
            raise SpecError(f"{where}: {path!r}: a LoRA reference (model+adapter) in a slice is not supported")
        if any(r._same(path, e[0]) for e in entries):
            raise SpecError(f"{where}: model {path} is listed twice in one slice")
        layer_range = item.get("layer_range")
        if not (isinstance(layer_range, list) and len(layer_range) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in layer_range)):
            raise SpecError(f"{where}: layer_range must be [start, end], got {layer_range!r}")
        path = next((p for p in counts if r._same(p, path)), path)  # one spelling per model
        if path not in counts:
            counts[path] = model_layer_count(path, where)
        start, end = layer_range
        if not 0 <= start < end <= counts[path]:
            raise SpecError(f"{where}: layer_range {layer_range} is not within {path}'s {counts[path]} layers "
                            f"(0 <= start < end <= {counts[path]})")
        if spans and end - start != spans[0].length:
            raise SpecError(f"{where}: layer_range {layer_range} spans {end - start} layers where the slice's first "
                            f"source spans {spans[0].length}; every source of a slice spans as many")
        spans.append(Span(path, start, end))
        entries.append((path, r._mapping(item.get("parameters"), f"{where}.parameters")))
    return spans, entries
