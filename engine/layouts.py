"""Tensor names across the layouts transformers saves and loads.

transformers renames checkpoint keys when it loads them (its conversion_mapping): a Llava saved
as ``language_model.model.layers.0…``, ``language_model.lm_head``, ``vision_tower.vision_model…``
and ``multi_modal_projector…`` is loaded into modules named ``model.language_model.layers.0…``,
``lm_head``, ``model.vision_tower…``, ``model.multi_modal_projector…``; Qwen2-VL's ``model.layers``
and ``visual`` become ``model.language_model.layers`` and ``model.visual``; Gemma 3, PaliGemma,
Mistral 3, InternVL, Aria, LLaVA-NeXT and others follow the Llava rules. Which layout a file holds
depends on the transformers version that wrote it, and PEFT names an adapter's tensors after the
modules of the version that trained it. So a base and an adapter, or a base and a full fine-tune,
can name the same weight differently.

Almost all of these renames add, drop or reorder *wrapper* segments — module containers such as
``model``, ``language_model`` or ``vision_model`` — around an unchanged module path. Removing
them gives a name's ``canonical`` form; two names with the same canonical form name the same
weight, provided that form is unique within each model (a model where removing wrappers merges
two names, such as CLIP's ``text_model.encoder…`` and ``vision_model.encoder…``, never matches
through it). Exact names always match first.
"""

from __future__ import annotations

from typing import Iterable

# Module containers transformers' renames add, drop or move (see the module doc).
WRAPPERS = frozenset({"model", "language_model", "text_model", "vision_model", "llm"})


def canonical(name: str) -> str:
    """A tensor name with its wrapper segments removed."""
    return ".".join(part for part in name.split(".") if part not in WRAPPERS)


def canonical_lookup(names: Iterable[str]) -> dict[str, str]:
    """canonical form → name, for the names whose canonical form no other name shares."""
    seen: dict[str, str | None] = {}
    for name in names:
        key = canonical(name)
        seen[key] = None if key in seen else name
    return {key: name for key, name in seen.items() if name is not None}


def align(names: Iterable[str], reference: Iterable[str]) -> dict[str, str]:
    """name → reference name, for each of ``names`` absent from ``reference`` whose canonical
    form matches exactly one reference name that ``names`` lacks (a one-to-one renaming)."""
    names, reference = list(names), list(reference)
    mine, theirs = set(names), set(reference)
    lookup = canonical_lookup(n for n in reference if n not in mine)
    own = canonical_lookup(n for n in names if n not in theirs)
    return {name: lookup[key] for key, name in own.items() if key in lookup}
