"""Models as users name them: local paths, Hugging Face Hub repo ids, and an adapter's own base.

``resolve_inputs`` turns the names a merge, sweep, diff or inspect was given into local paths,
before anything is opened:

- An existing local path is used as it is, always.
- ``org/name`` or ``org/name@revision`` (a branch, tag or commit hash, full or abbreviated) is
  a Hub repo. Its snapshot in the local Hugging Face cache (``HF_HUB_CACHE``, else
  ``HF_HOME/hub``) is used when it holds the weights; snapshot files are symlinks into the
  cache's blobs and are read through them. Otherwise, unless ``HF_HUB_OFFLINE=1``, the files a
  merge needs are downloaded into that cache (safetensors weights + index, config, generation
  config, tokenizer, processor and chat-template files, adapter files; never ``.bin`` or other
  formats), with a progress bar, using ``HF_TOKEN`` or the saved login for private and gated repos.
- A PEFT adapter given without a base takes its base from ``base_model_name_or_path`` in its
  ``adapter_config.json``; given with a base whose name differs, it is merged onto the base
  given, with a warning.

huggingface_hub is imported only when a repo id is resolved, so local merges do not pay for it.
"""

from __future__ import annotations

import json
import os
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from .checkpoint import ADAPTER_CONFIG_NAME, INDEX_NAME, SINGLE_NAME, lora_reference, peft_adapter_dir
from .errors import CheckpointError, SpecError, first_line
from .model_files import is_companion
from .remote import is_url, stage_repo, stage_url

ADAPTER_WEIGHTS = "adapter_model.safetensors"
# org/name, as the Hub spells repo ids, with an optional @revision (branches may hold "/").
_REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w.][\w./-]*))?$")
_SHORT_HASH = re.compile(r"^[0-9a-f]{7,39}$")  # an abbreviated commit hash
_FULL_HASH = re.compile(r"^[0-9a-f]{40}$")
# What `hf download` should fetch for a merge when we cannot list the repo (offline).
_FETCH_PATTERNS = ("*.safetensors", "*.json", "*.jinja", "*.model", "*.txt", "*.tiktoken")


@dataclass(frozen=True)
class RepoRef:
    """A Hub model repo at a revision (``main`` unless given)."""

    repo_id: str
    revision: str

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}"

    def fetch_command(self) -> str:
        """The command that puts what a merge needs into the cache."""
        includes = " ".join(f'--include "{p}"' for p in _FETCH_PATTERNS)
        return f"hf download {self.repo_id} --revision {self.revision} {includes}"


def parse_repo_ref(name: str | os.PathLike) -> RepoRef | None:
    """The repo id ``name`` spells (``org/name[@revision]``), or None for anything else."""
    match = _REPO_ID.match(str(name))
    if match is None or str(name).startswith(("./", "../")):
        return None
    return RepoRef(match["repo"], match["revision"] or "main")


def resolve_inputs(base: str | os.PathLike | None, models: Sequence[str | os.PathLike],
                   warn: Callable[[str], None] | None = None,
                   progress: bool = True, stream: bool = False) -> tuple[Path, list[Path]]:
    """Local paths for BASE and MODELS, each a local path or a Hub repo id (see module doc).

    ``base`` may be None when every model is a PEFT adapter naming the same base model.
    ``warn`` receives a warning when an adapter names another base than the one given;
    ``progress`` shows download progress bars on stderr. ``stream`` reads a repo that is not in
    the cache by range requests instead of downloading it (safeblend.remote); URLs
    (``https://``, ``s3://``, ``hf://``, ...) are always streamed, ``hf://`` ones cache first.

    Raises CheckpointError naming the repo (not found, not cached while offline, no safetensors
    weights) and SpecError when no base is given and the models do not name one.
    """
    if base is not None:  # the models first, as ever: the first failure among them is the one reported
        *model_paths, base_path = _resolve_all([*models, base], progress, stream)
    else:
        model_paths = _resolve_all(list(models), progress, stream)
    declared = {path: _declared_base(path) for path in model_paths if peft_adapter_dir(path) is not None}
    if base is None:
        named = _base_from_adapters(model_paths, declared)
        try:
            return _resolve(named, progress, stream), model_paths
        except CheckpointError as exc:
            raise CheckpointError(f"{exc} (the base named by base_model_name_or_path in "
                                  f"{peft_adapter_dir(model_paths[0]) / ADAPTER_CONFIG_NAME}; give BASE to merge onto "
                                  "another)") from None
    for adapter, name in declared.items():
        if name is not None and warn is not None and not _same_model(base, base_path, name):
            warn(f"{adapter}: the adapter was trained on {name} (base_model_name_or_path) but is merged onto the "
                 f"base given, {base}")
    return base_path, model_paths


def _resolve_all(names: list[str | os.PathLike], progress: bool, stream: bool) -> list[Path]:
    """``_resolve`` of each name. Streamed inputs (URLs; repo ids with ``stream``) are staged at
    the same time, each in a thread of its own: staging is many small requests (listing, config
    and tokenizer files, headers) whose round trips then overlap. The first failure in the
    order given is raised."""
    if len(names) < 2 or not (stream or all(is_url(n) for n in names)):
        return [_resolve(n, progress, stream) for n in names]
    results: list[Path | None] = [None] * len(names)
    errors: list[BaseException | None] = [None] * len(names)

    def run(k: int) -> None:
        try:
            results[k] = _resolve(names[k], progress, stream)
        except BaseException as exc:  # re-raised in the calling thread, in order
            errors[k] = exc

    threads = [threading.Thread(target=run, args=(k,), name=f"safeblend-stage-{k}", daemon=True)
               for k in range(len(names))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for error in errors:
        if error is not None:
            raise error
    return [path for path in results if path is not None]


def _resolve(name: str | os.PathLike, progress: bool, stream: bool = False) -> Path:
    """A local path for one model name: the path itself if it exists, else a Hub snapshot (or,
    streaming, a folder standing for the remote model: safeblend.remote); each part of a
    ``MODEL+ADAPTER`` reference is resolved alike."""
    reference = lora_reference(name)
    if reference is not None:
        return Path(f"{_resolve(reference[0], progress, stream)}+{_resolve(reference[1], progress, stream)}")
    path = Path(name)
    if path.exists():
        return path
    url = str(name) if is_url(name) else None
    if url is not None and not url.startswith("hf://"):
        return stage_url(url, progress)
    ref = parse_repo_ref(url[len("hf://"):].rstrip("/")) if url is not None else parse_repo_ref(name)
    if ref is None:
        if url is not None:
            raise CheckpointError(f"{url}: not a Hub model URL (hf://org/name or hf://org/name@revision)")
        raise CheckpointError(f"{path}: no such file or directory")
    cached = _cached_snapshot(ref)
    if cached is not None:
        return cached
    from huggingface_hub.constants import HF_HUB_CACHE, HF_HUB_OFFLINE

    if HF_HUB_OFFLINE:
        raise CheckpointError(f"{name}: no such local path, and Hub repo {ref.repo_id} at revision {ref.revision} "
                              f"is not in the cache ({HF_HUB_CACHE}) while HF_HUB_OFFLINE=1; fetch it with: "
                              f"{ref.fetch_command()}")
    if stream or url is not None:
        with _hub_errors(ref):
            return stage_repo(ref.repo_id, ref.revision, progress)
    return _download(ref, progress)


def cached_model_dir(name: str | os.PathLike) -> Path | None:
    """A local path for NAME without downloading anything: the path itself when it exists, a
    Hub id's cached snapshot (the folder a merge then opens for it), else None."""
    path = Path(name)
    if path.exists():
        return path
    ref = parse_repo_ref(name)
    return _cached_snapshot(ref) if ref is not None else None


def _cached_snapshot(ref: RepoRef) -> Path | None:
    """The cached snapshot of ``ref`` if it holds the weights a merge reads, else None.

    huggingface_hub's cache: ``models--org--name/refs/<branch or tag>`` holds a commit hash,
    ``snapshots/<commit>/`` the files (symlinks into ``blobs/``). A snapshot may hold only some
    of the repo's files (what earlier downloads asked for); it serves if it has the weights.
    """
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.file_download import repo_folder_name

    repo = Path(HF_HUB_CACHE) / repo_folder_name(repo_id=ref.repo_id, repo_type="model")
    snapshots = repo / "snapshots"
    ref_file = repo / "refs" / ref.revision
    if ref_file.is_file():
        folder = snapshots / ref_file.read_text(encoding="utf-8").strip()
    elif _SHORT_HASH.match(ref.revision) or _FULL_HASH.match(ref.revision):
        found = sorted(snapshots.glob(f"{ref.revision}*")) if snapshots.is_dir() else []
        if len(found) != 1:
            return None
        folder = found[0]
    else:
        return None
    return folder if folder.is_dir() and _holds_weights(folder) else None


def _holds_weights(folder: Path) -> bool:
    """Whether a snapshot folder has every weight file a merge opens (symlinks must resolve)."""
    if (folder / ADAPTER_CONFIG_NAME).is_file() and (folder / ADAPTER_WEIGHTS).is_file():
        return True
    index = folder / INDEX_NAME
    if index.is_file():
        shards = _index_shards(index)
        return bool(shards) and all((folder / s).is_file() for s in shards)
    return (folder / SINGLE_NAME).is_file() or any(p.is_file() for p in folder.glob("*.safetensors"))


def _index_shards(index: Path) -> list[str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return sorted(set(weight_map.values()))
    except (OSError, ValueError, AttributeError):
        return []


def _download(ref: RepoRef, progress: bool) -> Path:
    """Download what a merge of ``ref`` needs into the cache; its snapshot folder."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    where = f"Hub repo {ref.repo_id} at revision {ref.revision}"
    tqdm_class = None if progress else _silent_tqdm()
    with _hub_errors(ref):
        info = HfApi().model_info(ref.repo_id, revision=ref.revision)
        names = [s.rfilename for s in info.siblings or []]
        weights = _weight_files(names)
        if weights == [INDEX_NAME]:
            index = hf_hub_download(ref.repo_id, INDEX_NAME, revision=info.sha)
            weights += _index_shards(Path(index))
        if not weights:
            found = ", ".join(sorted(n for n in names if n.endswith((".bin", ".pt", ".pth", ".gguf")))[:3])
            raise CheckpointError(f"{where} has no safetensors weights" + (f" (found {found})" if found else ""))
        wanted = [*weights, *(n for n in names if "/" not in n and (n == "config.json" or is_companion(n)))]
        folder = snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=wanted,
                                   tqdm_class=tqdm_class)
    return Path(folder)


@contextmanager
def _hub_errors(ref: RepoRef) -> Iterator[None]:
    """The Hub client's errors as one-line CheckpointErrors naming the repo and revision."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    where = f"Hub repo {ref.repo_id} at revision {ref.revision}"
    try:
        yield
    except GatedRepoError as exc:
        raise CheckpointError(f"{where} is gated: accept its terms on the Hub and set HF_TOKEN (or run "
                              f"hf auth login) ({first_line(exc)})") from None
    except RepositoryNotFoundError as exc:
        raise CheckpointError(f"{where}: no such local path or Hub repo (a private repo needs HF_TOKEN or "
                              f"hf auth login) ({first_line(exc)})") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{where}: the repo has no revision {ref.revision!r}") from None
    except CheckpointError:
        raise
    except Exception as exc:  # the HTTP client's own errors (connection refused, timeouts, ...) too
        reason = f"{type(exc).__name__}: {first_line(exc)}"
        raise CheckpointError(f"{where}: not in the cache and cannot be downloaded ({reason}); fetch it with: "
                              f"{ref.fetch_command()}") from None


def _weight_files(names: list[str]) -> list[str]:
    """The weight files a merge reads among a repo's top-level files, as Checkpoint.open picks
    them (an adapter's; else the index, whose shards are added once it is read; else
    model.safetensors; else every top-level .safetensors)."""
    top = [n for n in names if "/" not in n]
    if ADAPTER_CONFIG_NAME in top and ADAPTER_WEIGHTS in top and SINGLE_NAME not in top and INDEX_NAME not in top:
        return [ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS]
    if INDEX_NAME in top:
        return [INDEX_NAME]
    if SINGLE_NAME in top:
        return [SINGLE_NAME]
    return sorted(n for n in top if n.endswith(".safetensors"))


def _silent_tqdm():
    from tqdm.auto import tqdm

    class Silent(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Silent


def _declared_base(adapter: Path) -> str | None:
    """``base_model_name_or_path`` of an adapter directory, if it names one."""
    directory = peft_adapter_dir(adapter)
    assert directory is not None
    try:
        data = json.loads((directory / ADAPTER_CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None  # opening the adapter reports the broken config
    name = data.get("base_model_name_or_path") if isinstance(data, dict) else None
    return name if isinstance(name, str) and name else None


def _base_from_adapters(models: list[Path], declared: dict[Path, str | None]) -> str:
    """The base every adapter names, for a merge given no BASE."""
    if not models:
        raise SpecError("give BASE and at least one fine-tuned MODEL")
    for path in models:
        if path not in declared:
            raise SpecError(f"{path}: is not a PEFT adapter, so the base model cannot be taken from it; give BASE "
                            "before the fine-tuned models")
        if declared[path] is None:
            raise SpecError(f"{path}: adapter_config.json names no base_model_name_or_path; give BASE before the "
                            "adapter")
    names = sorted(set(declared.values()))
    if len(names) > 1:
        raise SpecError(f"the adapters name different base models ({', '.join(names)}); give BASE")
    return names[0]


def _same_model(given: str | os.PathLike, resolved: Path, declared: str) -> bool:
    """Whether the base given is plausibly the one an adapter declares: the same path, the same
    repo id (revisions aside), or the same final name (a local copy of the repo)."""
    if Path(declared).exists():
        return Path(declared).resolve() == resolved.resolve()
    want = parse_repo_ref(declared)
    got = parse_repo_ref(given) if not Path(given).exists() else None
    if want is not None and got is not None:
        return want.repo_id.lower() == got.repo_id.lower()
    names = {_cached_repo_name(resolved) or resolved.name, resolved.name}
    last = (want.repo_id if want else declared).rstrip("/").rsplit("/", 1)[-1]
    return any(n.rsplit("/", 1)[-1].lower() == last.lower() for n in names)


def _cached_repo_name(path: Path) -> str | None:
    """org/name of a snapshot folder inside a Hub cache (``models--org--name/snapshots/<commit>``)."""
    parent = path.resolve().parent if path.is_dir() else path.resolve().parent.parent
    if parent.name == "snapshots" and parent.parent.name.startswith("models--"):
        return parent.parent.name[len("models--"):].replace("--", "/")
    return None
