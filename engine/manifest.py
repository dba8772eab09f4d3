"""The output manifest (``safeblend.json``) and ``safeblend verify``.

A merge records, beside its shards, each shard's size and SHA-256 (hashed while writing, see
``safeblend.journal``) and the SHA-256 of every other file it wrote (index, config, tokenizer).
``verify`` re-reads everything and reports each mismatch: a missing, resized or
altered shard, a header that does not parse, an index that does not match the shards or whose
``total_size`` is wrong, and files that changed or appeared.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .checkpoint import INDEX_NAME, Checkpoint, read_safetensors_header
from .errors import CheckpointError
from .output_paths import printable

MANIFEST_NAME = "safeblend.json"
MANIFEST_VERSION = 1
_BLOCK = 8 * 2**20


def write_manifest(directory: Path, plan, shard_sha256: dict[str, str]) -> dict:
    """Write ``safeblend.json``: shards (size, SHA-256) and the other files' SHA-256."""
    from .writer import write_text_durably

    shard_names = {s.filename for s in plan.shards}
    manifest = {
        "safeblend_manifest": MANIFEST_VERSION,
        "safeblend_version": __version__,
        "tensors": len(plan.tensors),
        "total_size": plan.total_size,
        "shards": [{"file": s.filename, "size": s.size, "sha256": shard_sha256[s.filename]} for s in plan.shards],
        "files": {p.name: file_sha256(p) for p in sorted(directory.iterdir())
                  if p.is_file() and not p.name.startswith(".") and p.name not in shard_names
                  and p.name != MANIFEST_NAME},
    }
    write_text_durably(directory / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    return manifest


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class VerifyReport:
    """What ``verify`` checked and every problem it found."""

    path: str
    shards: int = 0
    bytes_checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(directory: str | os.PathLike, threads: int = 2) -> VerifyReport:
    """Re-read a merged checkpoint and check it against its manifest, headers and index."""
    root = Path(directory)
    report = VerifyReport(str(root))
    if not root.is_dir():
        report.problems.append(f"{root}: not a directory")
        return report
    manifest = _read_manifest(root, report)
    listed = {s["file"]: s for s in manifest.get("shards", [])} if manifest else {}
    present = sorted(p.name for p in root.glob("*.safetensors"))
    for name in present:
        if manifest is not None and name not in listed:
            report.problems.append(f"{printable(root / name)}: shard not listed in {MANIFEST_NAME}")
    files = manifest.get("files", {}) if manifest is not None else {}
    # Only plain, regular files inside OUT are read: a name in the manifest never leads outside.
    linked = [n for n in sorted(os.listdir(root)) if os.path.islink(root / n)]
    for name in linked:
        report.problems.append(f"{printable(root / name)}: is a symbolic link, not a file safeblend wrote; not read")
    if manifest is not None:
        written = {*listed, *files, MANIFEST_NAME}
        for name in sorted(set(os.listdir(root)) - written - set(linked)):
            if not name.endswith(".safetensors"):  # unlisted shards are reported above
                report.problems.append(f"{printable(root / name)}: not listed in {MANIFEST_NAME} "
                                       "(added after the merge)")
    names = [n for n in (listed if manifest is not None else present) if n not in linked]
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for problems, size in pool.map(lambda n: _check_shard(root / n, listed.get(n)), names):
            report.problems += problems
            report.bytes_checked += size
    report.shards = len(names)
    if not linked:
        _check_structure(root, manifest, report)
    for name, digest in files.items():
        path = root / name
        if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
            report.problems.append(f"{MANIFEST_NAME}: lists {printable(name)!r}, which is not a plain file name in "
                                   f"{printable(root)}; not read")
        elif name in linked:
            continue
        elif not path.is_file():
            report.problems.append(f"{printable(path)}: listed in {MANIFEST_NAME} but missing")
        elif file_sha256(path) != digest:
            report.problems.append(f"{printable(path)}: SHA-256 differs from {MANIFEST_NAME} (the file was changed)")
    return report


def _read_manifest(root: Path, report: VerifyReport) -> dict | None:
    path = root / MANIFEST_NAME
    if not path.is_file():
        report.problems.append(f"{path}: missing, so shard checksums cannot be checked (not written by safeblend, "
                               "or removed)")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("safeblend_manifest") != MANIFEST_VERSION:
            raise ValueError(f"unknown manifest version {data.get('safeblend_manifest')!r}")
        for s in data["shards"]:
            if not (isinstance(s["file"], str) and isinstance(s["size"], int) and isinstance(s["sha256"], str)):
                raise ValueError("shard entries need file, size and sha256")
            if Path(s["file"]).name != s["file"]:
                raise ValueError(f"shard name {s['file']!r} is not a plain file name")
        if not isinstance(data.get("files", {}), dict):
            raise ValueError("'files' must map names to SHA-256")
        return data
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        report.problems.append(f"{path}: unreadable manifest ({exc})")
        return None


def _check_shard(path: Path, expected: dict | None) -> tuple[list[str], int]:
    """A shard's size, header and SHA-256 against its manifest entry."""
    if not path.is_file():
        return [f"{path}: shard listed in {MANIFEST_NAME} is missing"], 0
    problems = []
    size = path.stat().st_size
    if expected is not None and size != expected["size"]:
        problems.append(f"{path}: size is {size} bytes, {MANIFEST_NAME} says {expected['size']}")
    try:
        read_safetensors_header(path)
    except CheckpointError as exc:
        problems.append(f"header: {exc}")
    if expected is not None and file_sha256(path) != expected["sha256"]:
        problems.append(f"{path}: SHA-256 differs from {MANIFEST_NAME} (the shard's bytes changed)")
    return problems, size


def _check_structure(root: Path, manifest: dict | None, report: VerifyReport) -> None:
    """The directory must open as a checkpoint whose index and totals agree with the manifest."""
    try:
        ckpt = Checkpoint.open(root)
    except CheckpointError as exc:
        report.problems.append(f"checkpoint: {exc}")
        return
    try:
        total = ckpt.nbytes
        index = root / INDEX_NAME
        if len(ckpt.files) > 1 and not index.is_file():
            report.problems.append(f"{index}: missing for a checkpoint of {len(ckpt.files)} shards")
        if index.is_file():
            try:
                declared = json.loads(index.read_text(encoding="utf-8")).get("metadata", {}).get("total_size")
            except (ValueError, AttributeError) as exc:
                declared = f"unreadable ({exc})"
            if declared != total:
                report.problems.append(f"{index}: metadata.total_size is {declared}, the shards hold {total} bytes")
        if manifest is not None:
            if manifest.get("tensors") != len(ckpt.tensors):
                report.problems.append(f"{root}: holds {len(ckpt.tensors)} tensors, {MANIFEST_NAME} says "
                                       f"{manifest.get('tensors')}")
            if manifest.get("total_size") != total:
                report.problems.append(f"{root}: tensors hold {total} bytes, {MANIFEST_NAME} says "
                                       f"{manifest.get('total_size')}")
    finally:
        ckpt.close()
