"""What an output path may replace or delete: only what safeblend itself wrote.

The rules, enforced here and called from the merge, the sweep and the writer:

- OUT must be named: an empty string (an unset shell variable) is a usage error, never ``.``.
- OUT must not be, contain or lie inside an input. Paths are compared after resolving
  symlinks, and by (device, inode) of OUT against every input file and the directories above
  it, so a symlinked BASE, a bind mount or a shard an index names through a symlink into OUT
  are all caught — for every input: model directories, each of their files, adapters.
- ``--overwrite`` replaces only a previous safeblend output: a real directory (not a symlink)
  holding the manifest safeblend writes (``safeblend.json``) and nothing but the files that
  manifest lists, or an empty directory. Anything else is refused, naming what is there.
- OUT is replaced by renaming it into a fresh directory reserved with ``mkdtemp`` (a name
  nobody else holds, created with mkdir's exclusive semantics), then deleting from it only the
  names the manifest lists. A pre-existing ``.OUT.safeblend-old`` is never touched, and a
  replacement that cannot finish leaves at most a uniquely named directory, never one that
  blocks the next run. A read-only OUT is refused up front.
- The staging directory ``.OUT.safeblend-partial`` must be a real directory owned by this
  user; an existing one must look like safeblend's (regular files only, its lock and journal),
  so a planted symlink or a foreign directory there is refused, never cleared.
"""

from __future__ import annotations

import functools
import json
import os
import stat
import tempfile
import warnings
from pathlib import Path
from typing import Iterable, Sequence

from .errors import OutputError, SpecError

MANIFEST_NAME = "safeblend.json"  # the manifest every output carries (safeblend.manifest)
_LOCK_NAME = ".safeblend-lock"
_JOURNAL_NAME = ".safeblend-journal"
_JOURNAL_KEY = b'{"safeblend_journal":'


def check_output_name(out: str | os.PathLike) -> Path:
    """The output path, absolute; SpecError for an empty name (which would mean the cwd)."""
    text = os.fspath(out)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if not text.strip():
        raise SpecError("the output path is empty (an unset variable?); name the output directory")
    return Path(os.path.abspath(text))


# -- output is not an input ------------------------------------------------------------------


def input_files(item: str | os.PathLike) -> list[Path]:
    """Every path a merge may read for one input: the path itself and, for a directory, each
    entry in it (shards an index names, adapter files, config and tokenizer files); both parts
    of a ``MODEL+ADAPTER`` reference."""
    from .checkpoint import lora_reference

    reference = lora_reference(item)
    if reference is not None:
        return [*input_files(reference[0]), *input_files(reference[1])]
    root = Path(item)
    paths = [root]
    if root.is_dir():
        try:
            paths += sorted(root.iterdir())
        except OSError:
            pass
        paths += _index_shards(root)
    return paths


def _index_shards(root: Path) -> list[Path]:
    """Shards the directory's safetensors index names (plain names; odd ones are left to the
    checkpoint reader to refuse)."""
    try:
        weight_map = json.loads((root / "model.safetensors.index.json").read_text(encoding="utf-8"))["weight_map"]
        return [root / name for name in set(weight_map.values()) if isinstance(name, str) and "\0" not in name]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _ancestry(path: Path) -> set[tuple[int, int]]:
    """(device, inode) of ``path`` (symlinks followed) and of every directory above it."""
    real = Path(os.path.realpath(path))
    ident = _identity(real)
    ids = set(_directory_ancestry(str(real.parent)))
    if ident is not None:
        ids.add(ident)
    return ids


@functools.lru_cache(maxsize=256)
def _directory_ancestry(directory: str) -> frozenset[tuple[int, int]]:
    """``_ancestry`` of a resolved directory; the files of one model share it (10k shards: one walk)."""
    real = Path(directory)
    return frozenset(i for i in (_identity(p) for p in (real, *real.parents)) if i is not None)


def check_output_not_input(out: str | os.PathLike, inputs: Sequence[str | os.PathLike]) -> None:
    """SpecError when OUT is, contains or lies inside any input file or directory."""
    target = check_output_name(out)
    _directory_ancestry.cache_clear()  # identities are read afresh for every merge
    real_target = Path(os.path.realpath(target))
    target_ids = _ancestry(target)  # OUT and what holds it, if they exist
    out_id = _identity(target)
    for item in inputs:
        for path in input_files(item):
            real = Path(os.path.realpath(path))
            clash = real == real_target or real.is_relative_to(real_target) or real_target.is_relative_to(real)
            # By identity, whatever the path spelling (bind mounts, hard-linked directories):
            # the input (or a directory above it) is OUT, or OUT sits inside the input.
            ident = _identity(path)
            clash = clash or (out_id is not None and out_id in _ancestry(path))
            clash = clash or (ident is not None and path.is_dir() and ident in target_ids)
            if clash:
                raise SpecError(f"{target}: the output must not be, contain or lie inside an input ({path})")


# -- what --overwrite may replace --------------------------------------------------------------


def safeblend_names(directory: Path) -> set[str] | None:
    """The names a safeblend output directory's manifest says safeblend wrote there (the
    manifest included), or None if ``directory`` has no readable safeblend manifest."""
    path = directory / MANIFEST_NAME
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        names = {s["file"] for s in data["shards"]} | set(data.get("files", {}))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None
    if not isinstance(data, dict) or "safeblend_manifest" not in data:
        return None
    if not all(isinstance(n, str) and n and Path(n).name == n and n not in (".", "..") for n in names):
        return None
    return names | {MANIFEST_NAME}


def replaceable_names(final: Path) -> set[str]:
    """The entries of an existing OUT that ``--overwrite`` may delete; OutputError when OUT
    is anything but an empty directory or a previous safeblend output with nothing added."""
    try:
        st = os.lstat(final)
    except FileNotFoundError:
        return set()
    if stat.S_ISLNK(st.st_mode):
        raise OutputError(f"{final}: is a symbolic link; --overwrite replaces only a directory safeblend wrote "
                          "(give the real path, or remove the link)")
    if not stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{final}: is a file, not a previous safeblend output; --overwrite will not replace it")
    try:
        entries = sorted(os.listdir(final))
    except OSError as exc:
        raise OutputError(f"{final}: cannot list it to check what --overwrite would delete: "
                          f"{exc.strerror or exc}") from exc
    if not entries:
        return set()
    names = safeblend_names(final)
    if names is None:
        raise OutputError(f"{final}: is not a previous safeblend output (no {MANIFEST_NAME}) and is not empty "
                          f"(holds {_some(entries)}); --overwrite replaces only those; choose another output")
    foreign = [e for e in entries if e not in names or not stat.S_ISREG(os.lstat(final / e).st_mode)]
    if foreign:
        raise OutputError(f"{final}: holds {_some(foreign)}, which safeblend did not write; move it away "
                          "before --overwrite replaces this output")
    if not os.access(final, os.W_OK | os.X_OK):
        raise OutputError(f"{final}: is read-only, so --overwrite could not remove the old files; make it "
                          "writable or choose another output")
    return set(entries)


def check_replaceable(final: str | os.PathLike, overwrite: bool) -> None:
    """Up front: OUT is absent, or ``overwrite`` is given and OUT may be replaced."""
    final = Path(final)
    if not (final.exists() or final.is_symlink()):
        return
    if not overwrite:
        raise OutputError(f"{final}: output already exists (pass --overwrite to replace it)")
    replaceable_names(final)


def _some(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(printable(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def replace_output(staging: Path, final: Path, overwrite: bool) -> None:
    """Rename the finished ``staging`` to ``final``. An existing ``final`` (checked again now)
    moves into a freshly reserved hidden directory first, and only the names it was allowed
    to hold are deleted from there."""
    if not (final.exists() or final.is_symlink()):
        os.rename(staging, final)
        return
    if not overwrite:
        raise OutputError(f"{final}: output appeared while merging; left the result at {staging}")
    names = replaceable_names(final)
    moved = _identity(final)
    # mkdtemp creates the name exclusively (mode 0700); renaming a directory onto an empty
    # directory replaces it atomically, so nothing another process made there is lost.
    holder = Path(tempfile.mkdtemp(prefix=f".{final.name}.safeblend-old-", dir=final.parent))
    os.rename(final, holder)
    os.rename(staging, final)
    _delete_names(holder, names, moved)


def remove_output(final: Path) -> list[str]:
    """Delete a safeblend output's own files (the names its manifest lists) and then the
    directory if nothing else is left in it; returns the names left in place (files someone
    else put there, such as an evaluation's results). A directory without safeblend's manifest
    is left whole."""
    names = safeblend_names(final)
    if names is None or final.is_symlink():
        return sorted(os.listdir(final)) if final.is_dir() else []
    _delete_names(final, names, _identity(final), quiet=True)
    return sorted(os.listdir(final)) if final.is_dir() else []


def _delete_names(directory: Path, names: Iterable[str], expected: tuple[int, int] | None,
                  quiet: bool = False) -> None:
    """Delete the listed regular files of ``directory``, then the directory if it is empty;
    anything else is left in place with a warning."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return
    try:
        st = os.fstat(fd)
        if expected is not None and (st.st_dev, st.st_ino) != expected:
            return  # not the directory we moved; leave it alone
        for name in names:
            try:
                if stat.S_ISREG(os.lstat(name, dir_fd=fd).st_mode):
                    os.unlink(name, dir_fd=fd)
            except OSError:
                pass
    finally:
        os.close(fd)
    try:
        os.rmdir(directory)
    except OSError:
        if not quiet:
            warnings.warn(f"{directory}: the replaced output could not be removed completely; delete it by hand",
                          stacklevel=3)


# -- staging directory -------------------------------------------------------------------------


def reserve_staging(final: Path, kind: str) -> Path:
    """A fresh, uniquely named hidden directory beside ``final`` for an output that is written
    whole and renamed into place (adapters, extracted LoRAs): created exclusively by mkdtemp, so
    cleaning it up on failure can only delete what safeblend wrote there."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=f".safeblend-{kind}-partial", dir=final.parent))



def check_staging(staging: Path, existed: bool) -> None:
    """OutputError unless ``staging`` is a real directory owned by this user, and, when it was
    already there, looks like a safeblend partial output (regular files only, with a lock file
    and no journal but safeblend's), so clearing or resuming it deletes nothing foreign."""
    try:
        st = os.lstat(staging)
    except FileNotFoundError:
        raise OutputError(f"{staging}: the staging directory vanished while the merge began") from None
    if not stat.S_ISDIR(st.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a directory"
        raise OutputError(f"{staging}: is {kind}, not a partial output safeblend made; remove it and merge again")
    if st.st_uid != os.geteuid():
        raise OutputError(f"{staging}: belongs to another user (uid {st.st_uid}); safeblend will not use it")
    if not existed:
        return
    entries = sorted(os.listdir(staging))
    odd = [e for e in entries if not stat.S_ISREG(os.lstat(staging / e).st_mode)]
    if odd:
        raise OutputError(f"{staging}: holds {_some(odd)}, which is not a file safeblend writes; this is not a "
                          "partial output of safeblend's: move it away")
    if entries and _LOCK_NAME not in entries:
        return  # _lock refuses it: a partial without a lock file
    if _JOURNAL_NAME in entries:
        with open(staging / _JOURNAL_NAME, "rb") as handle:
            start = handle.read(len(_JOURNAL_KEY))
        if start and start != _JOURNAL_KEY:
            raise OutputError(f"{staging}: its {_JOURNAL_NAME} is not safeblend's; this is not a partial output "
                              "of safeblend's: move it away")
    elif len(entries) > 1:
        raise OutputError(f"{staging}: holds files but no journal; not a partial output of safeblend's: "
                          "move it away")


# -- printing names ------------------------------------------------------------------------------


def printable(text: object) -> str:
    """``text`` with control characters escaped (``\\n``, ``\\x1b``), for messages that print
    file or tensor names an input chose."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or ch == " " else ch.encode("unicode_escape").decode("ascii")
                   for ch in text)
