"""Parameters that may vary by tensor: constants, layer gradients and name filters.

A *setting* is what a user writes for one parameter, in mergekit's forms:

    0.5                                   the same value for every tensor
    [0.0, 0.5, 1.0]                       a gradient: anchor values spread evenly over the
                                          layer stack, linearly interpolated at each layer
    [{filter: self_attn, value: 0.3},     rules: the first rule whose filter is a substring
     {filter: mlp, value: [0.2, 0.8]},    of the tensor name (or that has no filter, or "*")
     {value: 0.5}]                        gives the value, itself a constant or a gradient

A tensor's *position* t runs from 0 at the first transformer layer to 1 at the last
(layer_index / (num_layers − 1); 1 when there is a single layer); tensors outside the layers
(embeddings before them, the final norm and lm_head after them) get 0, the gradient's first
anchor, as in mergekit since 0.1.2. A
gradient with anchors v₀ … v_m evaluates at t to the linear interpolation between
v_⌊t·m⌋ and the next anchor.

A number written as a string (``"5e-1"``: PyYAML reads ``5e-1`` and ``1e-5``, exponents without
a decimal point, as strings) is read as that number, as mergekit's schema does.

Settings chain: when no rule of a model's own setting matches a tensor, the merge-wide
setting is consulted, then the method's default.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Iterable

from ..errors import SpecError

Scalar = float | int | bool | str
# A rule's value: a scalar, or a gradient (tuple of anchors).
Value = Scalar | tuple[Scalar, ...]

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


@dataclass(frozen=True)
class Setting:
    """A parameter's value as rules ``(filter or None, value)``; the first match wins."""

    rules: tuple[tuple[str | None, Value], ...]

    @property
    def constant(self) -> Scalar | None:
        """The value when it is the same for every tensor, else None."""
        if self.rules and self.rules[0][0] is None and not isinstance(self.rules[0][1], tuple):
            return self.rules[0][1]
        return None

    def at(self, name: str, position: float) -> Scalar | None:
        """The value for tensor ``name`` at layer position ``position``; None if no rule matches."""
        for pattern, value in self.rules:
            if pattern is None or pattern == "*" or pattern in name:
                return _evaluate(value, position)
        return None

    def then(self, fallback: "Setting") -> "Setting":
        """This setting, falling back to ``fallback`` where none of its rules match."""
        return Setting(self.rules + fallback.rules)

    def to_json(self) -> Any:
        """A JSON-able form, as a recipe would write it."""
        if self.constant is not None:
            return self.constant
        return [
            {**({"filter": p} if p is not None else {}), "value": list(v) if isinstance(v, tuple) else v}
            for p, v in self.rules
        ]


def _evaluate(value: Value, t: float) -> Scalar:
    if not isinstance(value, tuple):
        return value
    if len(value) == 1:
        return value[0]
    scaled = t * (len(value) - 1)
    i0 = min(int(math.floor(scaled)), len(value) - 1)
    i1 = min(i0 + 1, len(value) - 1)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return value[i0]  # non-numeric anchors step rather than interpolate
    frac = scaled - i0
    return (1.0 - frac) * float(value[i0]) + frac * float(value[i1])


def setting(value: Any, what: str) -> Setting:
    """Parse a user's value (scalar, gradient list or list of filter rules) into a Setting."""
    if isinstance(value, Setting):
        return value
    if _is_scalar(value):
        return Setting(((None, _number(value, what)),))
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, dict) for v in value):
        rules = []
        for i, rule in enumerate(value):
            unknown = sorted(set(rule) - {"filter", "value"})
            if unknown:
                raise SpecError(f"{what}: rule {i + 1} has unsupported key {unknown[0]!r} "
                                "(a rule has 'value' and optionally 'filter')")
            if "value" not in rule:
                raise SpecError(f"{what}: rule {i + 1} has no 'value'")
            pattern = rule.get("filter")
            if pattern is not None and not isinstance(pattern, str):
                raise SpecError(f"{what}: rule {i + 1}: filter must be a string, got {pattern!r}")
            rules.append((pattern, _value(rule["value"], what)))
        return Setting(tuple(rules))
    return Setting(((None, _value(value, what)),))


def _value(value: Any, what: str) -> Value:
    if _is_scalar(value):
        return _number(value, what)
    if isinstance(value, (list, tuple)) and value and all(_is_scalar(v) for v in value):
        return tuple(_number(v, what) for v in value)
    shown = json.dumps(value, default=str)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    raise SpecError(f"{what}: expected a number, a list of numbers (a gradient across layers) "
                    f"or a list of {{filter, value}} rules, got {shown}")


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float, bool, str))


_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
# Merges compute in float32: a parameter beyond its range would become inf there.
_FLOAT32_MAX = 3.4028234663852886e38


def _number(value: Scalar, what: str) -> Scalar:
    """A decimal number written as a string (``"1e-5"``) as a float; anything else as is. A
    number that is NaN, infinite or beyond float32's range (``"1e999"``, ``1e308``) is a SpecError."""
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        value = float(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            finite = math.isfinite(float(value)) and abs(float(value)) <= _FLOAT32_MAX
        except OverflowError:  # an int too large for a float
            finite = False
        if not finite:
            raise SpecError(f"{what}: {value!r} is not a finite number (within float32's range)")
    return value


def per_model(value: Any, n_models: int, what: str) -> list[Setting]:
    """One Setting per model from a single setting or a list with one entry per model.

    A list of numbers is one value per model (a gradient for every model is written as a
    list of rules, or as ``[[...], [...]]``); a list of ``{filter, value}`` rules applies
    to every model.
    """
    if isinstance(value, (list, tuple)) and not all(isinstance(v, dict) for v in value):
        if len(value) == 1:
            value = value[0]
        elif len(value) != n_models:
            raise SpecError(f"got {len(value)} {what} values for {n_models} fine-tuned model(s); "
                            f"give one, or one per model")
        else:
            return [setting(v, f"{what} of model {i + 1}") for i, v in enumerate(value)]
    return [setting(value, what)] * n_models


def resolve(s: Setting, name: str, position: float, what: str) -> Scalar:
    """The value of ``s`` for a tensor; SpecError naming the tensor when no rule matches."""
    value = s.at(name, position)
    if value is None:
        raise SpecError(f"{what}: no rule matches tensor {name!r} and there is no default; "
                        "add a rule without a filter")
    return value


def _for_tensor(name: str) -> str:
    """" for tensor 'x'" where the value is a tensor's; nothing where it holds for every tensor."""
    return f" for tensor {name!r}" if name else ""


def resolve_float(s: Setting, name: str, position: float, what: str) -> float:
    value = resolve(s, name, position, what)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(f"{what}: expected a number{_for_tensor(name)}, got {value!r}")
    return float(value)


def resolve_bool(s: Setting, name: str, position: float, what: str) -> bool:
    value = resolve(s, name, position, what)
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    raise SpecError(f"{what}: expected true or false{_for_tensor(name)}, got {value!r}")


def layer_count(names: Iterable[str]) -> int:
    """The number of transformer layers: one more than the largest layer index in the names."""
    return max((int(m.group(1)) for n in names if (m := _LAYER.search(n))), default=-1) + 1


def layer_positions(names: Iterable[str]) -> dict[str, float]:
    """Each tensor's position t in the layer stack (see the module docstring)."""
    names = list(names)
    indices = {n: int(m.group(1)) for n in names if (m := _LAYER.search(n))}
    count = max(indices.values(), default=-1) + 1
    positions = {}
    for n in names:
        if n in indices:
            positions[n] = indices[n] / (count - 1) if count > 1 else 1.0
        else:
            positions[n] = 0.0  # before the layers or after them: the first anchor, as in mergekit
    return positions
