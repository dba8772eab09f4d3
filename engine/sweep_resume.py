"""``safeblend sweep --resume``: finishing what an interrupted sweep left, as ``merge --resume`` does.

A sweep stages each output exactly as a merge at its weight would (``MergeSession``: a locked,
journaled ``.lambda-<w>.safeblend-partial`` beside it), so each partial output resumes as a
merge's does: its fingerprint checked, each journaled tensor's checksum re-checked. What a
sweep adds:

* one read pass feeds every output, so a tensor is skipped only if *every* output kept it;
  each output keeps the tensors all of them kept (``keep_common``). That is a prefix of each
  shard again (each output's kept tensors are one), and the rest is rewritten with the same
  bytes, as a merge rewrites the tensors after the first whose checksum fails;
* outputs the interrupted sweep had already committed (it commits them one after another
  once the pass is over) are kept as they are when their recipe is this sweep's
  (``finished_output``).

The result is byte-identical to an uninterrupted sweep.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .checkpoint import read_safetensors_header
from .errors import CheckpointError
from .journal import JournaledWriter, Progress
from .manifest import MANIFEST_NAME
from .session import MergeSession
from .units import format_size


def finished_output(final: Path, metadata: dict[str, str]) -> bool:
    """Whether ``final`` is a committed output of the same recipe (manifest present, and its
    first shard records the same ``safeblend_recipe``)."""
    if final.is_symlink() or not (final / MANIFEST_NAME).is_file():
        return False
    shards = sorted(final.glob("*.safetensors"))
    if not shards:
        return False
    try:
        header = read_safetensors_header(shards[0])
    except CheckpointError:
        return False
    return header.metadata.get("safeblend_recipe") == metadata.get("safeblend_recipe")


def keep_common(sessions: Sequence[MergeSession]) -> str:
    """Restrict every session to the tensors all of them kept; returns the message to show.

    Called after ``MergeSession.start`` and before the writers open (their hasher threads
    start there), so the sessions' Progress and writer can still be rebuilt.
    """
    common = set.intersection(*(set(s.kept) for s in sessions))
    for s in sessions:
        if set(s.kept) != common:
            s.kept = {name: s.kept[name] for name in common}
            s.progress = Progress(s.staging, s.plan, s._journal_fd, set(common), s.abort)
            s.writer = JournaledWriter(s.staging, s.plan, s.progress, s.kept)
    first = sessions[0]
    return (f"--resume: kept {len(common)} of {len(first.plan.tensors)} tensors ({format_size(first.kept_bytes)}) "
            f"in each of {len(sessions)} partial outputs; sweeping the rest")
