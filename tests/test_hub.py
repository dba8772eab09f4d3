"""Hub repo ids as inputs: the Hugging Face cache (offline), downloads from a loopback Hub, and
PEFT adapters that bring their own base.

Each command runs in a subprocess so that huggingface_hub reads HF_HUB_CACHE, HF_HUB_OFFLINE,
HF_ENDPOINT and HF_TOKEN from that process's environment, as it does for a user (it reads them
once, when imported). The loopback server answers only on 127.0.0.1 and serves exactly the API
and file endpoints huggingface_hub's client calls: model info at a revision, the recursive tree
listing, and HEAD/GET of ``/{repo}/resolve/{revision}/{file}``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest

from helpers import assert_within_tolerance, load_checkpoint, random_tensor, write_checkpoint

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
CONFIG = {"model_type": "llama", "torch_dtype": "float32", "vocab_size": 16}


def _tensors(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "model.embed_tokens.weight": random_tensor(rng, (16, 8), "fp32"),
        "model.layers.0.self_attn.q_proj.weight": random_tensor(rng, (8, 8), "bf16"),
        "model.layers.0.mlp.down_proj.weight": random_tensor(rng, (8, 12), "fp32"),
        "lm_head.weight": random_tensor(rng, (16, 8), "fp32"),
    }


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A base (two shards + index), a fine-tune, a base at another revision, and a LoRA adapter
    of the base, as plain directories."""
    root = tmp_path_factory.mktemp("models")
    base = write_checkpoint(root / "base", _tensors(0), shards=2, config=CONFIG)
    (base / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    (base / "chat_template.jinja").write_text("{{ messages }}")
    (base / "pytorch_model.bin").write_bytes(b"not to be downloaded")
    (base / "README.md").write_text("# base\n")
    ft = write_checkpoint(root / "ft", _tensors(1), config=CONFIG)
    old = write_checkpoint(root / "old", _tensors(2), config=CONFIG)
    adapter = root / "adapter"
    adapter.mkdir()
    rng = np.random.default_rng(3)
    from safetensors.numpy import save_file

    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": random_tensor(rng, (2, 8), "fp32"),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": random_tensor(rng, (8, 2), "fp32")},
              str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
        "base_model_name_or_path": "org/base"}))
    return {"base": base, "ft": ft, "old": old, "adapter": adapter}


def _cache_repo(cache: Path, repo_id: str, source: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Lay ``source``'s files out as huggingface_hub caches a repo: content-addressed blobs,
    ``snapshots/<commit>/<file>`` symlinks to them (relative, as huggingface_hub makes them) and
    ``refs/<name>`` holding the commit. Returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in sorted(source.iterdir()):
        data = f.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot / f.name).symlink_to(Path("..", "..", "blobs", blob))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def cache(models, tmp_path_factory) -> Path:
    """A Hugging Face cache holding org/base (main and tag v1 → COMMIT; OTHER_COMMIT with older
    weights), org/ft and org/adapter."""
    root = tmp_path_factory.mktemp("hf").resolve()
    hub = root / "hub"
    _cache_repo(hub, "org/base", models["base"], COMMIT, refs=("main", "v1"))
    _cache_repo(hub, "org/base", models["old"], OTHER_COMMIT, refs=())
    _cache_repo(hub, "org/ft", models["ft"], COMMIT)
    _cache_repo(hub, "org/adapter", models["adapter"], COMMIT)
    return hub


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """``safeblend ARGS`` in a fresh process with the Hub settings given (and no others)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    clean.update(env)
    return subprocess.run([sys.executable, "-m", "safeblend.cli", *args], cwd=cwd, env=clean, capture_output=True,
                          text=True, timeout=120)


def _offline(cache: Path) -> dict[str, str]:
    return {"HF_HOME": str(cache.parent / "home"), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_cached_repo_ids_merge_offline_to_the_same_bytes_as_the_snapshot(cache, tmp_path):
    snapshot = cache / "models--org--base" / "snapshots" / COMMIT
    ft_snapshot = cache / "models--org--ft" / "snapshots" / COMMIT
    by_id = _run(["merge", "org/base", "org/ft", "-o", "by-id", "--weight", "0.6", "-q"], tmp_path, **_offline(cache))
    assert by_id.returncode == 0, by_id.stderr
    by_dir = _run(["merge", str(snapshot), str(ft_snapshot), "-o", "by-dir", "--weight", "0.6", "-q"], tmp_path)
    assert by_dir.returncode == 0, by_dir.stderr
    ours, theirs = _files(tmp_path / "by-id"), _files(tmp_path / "by-dir")
    assert ours == theirs
    assert {"model.safetensors", "config.json", "tokenizer_config.json", "chat_template.jinja"} <= set(ours)
    # The snapshot's symlinks were followed: the output holds the merged values, not links.
    merged = load_checkpoint(tmp_path / "by-id")
    base, ft = _tensors(0), _tensors(1)
    name = "model.layers.0.mlp.down_proj.weight"
    b, f = base[name].astype(np.float64), ft[name].astype(np.float64)
    assert_within_tolerance(merged[name], b + 0.6 * (f - b), [b, f], name)
    assert not any(p.is_symlink() for p in (tmp_path / "by-id").iterdir())


@pytest.mark.parametrize("revision,commit", [("main", COMMIT), ("v1", COMMIT), (COMMIT, COMMIT),
                                             (OTHER_COMMIT, OTHER_COMMIT), (OTHER_COMMIT[:7], OTHER_COMMIT)],
                         ids=["branch", "tag", "commit", "other-commit", "short-commit"])
def test_revisions_pick_their_snapshot(cache, tmp_path, revision, commit):
    result = _run(["inspect", f"org/base@{revision}", "--json"], tmp_path, **_offline(cache))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["path"] == str(cache / "models--org--base" / "snapshots" / commit)


def test_hf_home_alone_locates_the_cache(cache, tmp_path):
    result = _run(["inspect", "org/base", "--json"], tmp_path, HF_HOME=str(cache.parent), HF_HUB_OFFLINE="1")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["path"] == str(cache / "models--org--base" / "snapshots" / COMMIT)


def test_offline_and_not_cached_is_one_line_naming_the_fetch_command(cache, tmp_path):
    result = _run(["merge", "org/base@v2", "org/ft", "-o", "out", "-q"], tmp_path, **_offline(cache))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: org/base@v2: ") and "org/base at revision v2" in lines[0]
    assert "hf download org/base --revision v2 --include" in lines[0]
    assert not (tmp_path / "out").exists()
    # The command it names is one the installed huggingface_hub accepts (its dry-run checks the
    # options, then fails for want of a network, not for a usage error).
    command = lines[0].split("fetch it with: ", 1)[1]
    assert command.startswith("hf download ") and shutil.which("hf") is not None


def test_a_local_path_wins_over_a_repo_id(cache, models, tmp_path):
    shutil.copytree(models["ft"], tmp_path / "org" / "base")  # ./org/base exists: it is used
    result = _run(["inspect", "org/base", "--json"], tmp_path, **_offline(cache))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["path"] == "org/base"
    assert json.loads(result.stdout)["shards"][0]["file"] == "model.safetensors"  # ft's layout, not the repo's


def test_a_word_that_is_no_path_and_no_repo_id_is_a_missing_path(tmp_path):
    result = _run(["inspect", "nothing-here"], tmp_path, HF_HUB_OFFLINE="1")
    assert result.returncode == 1
    assert result.stderr.strip() == "Error: nothing-here: no such file or directory"


def test_adapter_without_base_takes_the_base_it_names(cache, models, tmp_path):
    alone = _run(["merge", str(models["adapter"]), "-o", "alone", "-q"], tmp_path, **_offline(cache))
    assert alone.returncode == 0, alone.stderr
    assert alone.stderr == ""
    explicit = _run(["merge", "org/base", "org/adapter", "-o", "explicit", "-q"], tmp_path, **_offline(cache))
    assert explicit.returncode == 0, explicit.stderr
    assert explicit.stderr == ""  # the base given is the one the adapter names: no warning
    a, b = load_checkpoint(tmp_path / "alone"), load_checkpoint(tmp_path / "explicit")
    assert a.keys() == b.keys() and all(a[n].tobytes() == b[n].tobytes() for n in a)


def test_adapter_onto_another_base_warns(cache, models, tmp_path):
    result = _run(["merge", str(models["old"]), str(models["adapter"]), "-o", "out", "-q"], tmp_path,
                  **_offline(cache))
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == (f"Warning: {models['adapter']}: the adapter was trained on org/base "
                                     f"(base_model_name_or_path) but is merged onto the base given, {models['old']}")


def test_a_lone_full_model_is_a_usage_error(models, tmp_path):
    result = _run(["merge", str(models["ft"]), "-o", "out"], tmp_path)
    assert result.returncode == 2
    assert "is not a PEFT adapter, so the base model cannot be taken from it; give BASE" in result.stderr


def test_sweep_diff_and_recipes_take_repo_ids(cache, models, tmp_path):
    env = _offline(cache)
    swept = _run(["sweep", "org/base", "org/ft", "-o", "sweep", "--weights", "0.6", "-q"], tmp_path, **env)
    assert swept.returncode == 0, swept.stderr
    merged = _run(["merge", "org/base", "org/ft", "-o", "merged", "--weight", "0.6", "-q"], tmp_path, **env)
    assert merged.returncode == 0, merged.stderr
    assert _files(tmp_path / "sweep" / "lambda-0.6") == _files(tmp_path / "merged")
    drift = _run(["diff", "org/base", "org/ft", "--json", "-q"], tmp_path, **env)
    assert drift.returncode == 0, drift.stderr
    assert len(json.loads(drift.stdout)["tensors"]) == 4
    lone = _run(["diff", "org/adapter", "--json", "-q"], tmp_path, **env)
    assert lone.returncode == 0, lone.stderr
    changed = [t["name"] for t in json.loads(lone.stdout)["tensors"] if t["rel_change"] > 0]
    assert changed == ["model.layers.0.self_attn.q_proj.weight"]
    # task_arithmetic is θ_base + Σ wᵢ·(θᵢ − θ_base), the same arithmetic as `merge --weight`.
    (tmp_path / "recipe.yaml").write_text("merge_method: task_arithmetic\nbase_model: org/base\nmodels:\n"
                                          "  - model: org/ft\n    parameters: {weight: 0.6}\n")
    recipe = _run(["merge", "--config", "recipe.yaml", "-o", "recipe-out", "-q"], tmp_path, **env)
    assert recipe.returncode == 0, recipe.stderr
    a, b = load_checkpoint(tmp_path / "recipe-out"), load_checkpoint(tmp_path / "merged")
    assert all(a[n].tobytes() == b[n].tobytes() for n in b)


# -- downloads from a loopback Hub ---------------------------------------------------------------


class _Hub:
    """A Hub on 127.0.0.1 serving one repo per directory at COMMIT, recording each request.

    It answers ``Range: bytes=a-b`` with 206 (streamed inputs, tests/test_stream.py), also
    serves each repo as plain files under ``/plain/{repo}/{file}``, and injects faults into
    ranged reads: ``rate`` throttles bodies (bytes/s), ``fail[name] = n`` answers the next n
    ranged reads of a file with 503, ``drop[name] = [k, ...]`` cuts the next ones' bodies after
    k bytes, and ``change[name] = (n, data)`` serves ``data`` (a new ETag) from its n-th ranged
    read on; ``fail`` and ``drop`` spare reads that start before byte ``fault_from`` (headers).
    ``token=None`` takes any request.
    """

    def __init__(self, repos: dict[str, Path], token: str | None) -> None:
        self.repos, self.token, self.requests = repos, token, []
        self.rate: float | None = None
        self.fail: dict[str, int] = {}
        self.drop: dict[str, list[int]] = {}
        self.change: dict[str, tuple[int, bytes]] = {}
        self.fault_from = 0
        self.ranged: dict[str, int] = {}  # ranged reads per file name
        self._faults = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                hub.answer(self, body=False)

            def do_GET(self) -> None:
                hub.answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "_Hub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def _files(self, repo: str) -> dict[str, bytes]:
        root = self.repos[repo]
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    def answer(self, request: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(request.path).path)
        self.requests.append((request.command, path, request.headers.get("Authorization")))
        parts = path.strip("/").split("/")
        if parts[0] == "plain" and len(parts) >= 4:  # /plain/{org}/{name}/{file}
            parts = [*parts[1:3], "resolve", COMMIT, *parts[3:]]
        if self.token is not None and request.headers.get("Authorization") != f"Bearer {self.token}":
            return self._send(request, 401, b'{"error": "Invalid credentials"}', body, {"X-Error-Code": "RepoNotFound"})
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            repo = "/".join(parts[2:4])
            if repo not in self.repos:
                return self._send(request, 404, b'{"error": "Repository not found"}', body,
                                  {"X-Error-Code": "RepoNotFound"})
            files = self._files(repo)
            if parts[4] == "revision":
                info = {"id": repo, "modelId": repo, "sha": COMMIT, "private": False,
                        "siblings": [{"rfilename": name} for name in files]}
                return self._send(request, 200, json.dumps(info).encode(), body)
            tree = [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for name, data in files.items()]
            return self._send(request, 200, json.dumps(tree).encode(), body)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, name = "/".join(parts[:2]), "/".join(parts[4:])
            data = self._files(repo).get(name) if repo in self.repos else None
            if data is None:
                return self._send(request, 404, b"", body, {"X-Error-Code": "EntryNotFound"})
            if request.headers.get("Range"):
                return self._send_range(request, parts[-1], data, body)
            return self._send(request, 200, data, body, {"X-Repo-Commit": COMMIT,
                                                         "ETag": f'"{hashlib.sha256(data).hexdigest()}"'})
        return self._send(request, 404, b"", body)

    def _send_range(self, request, name: str, data: bytes, body: bool) -> None:
        """206 with the asked bytes of ``data`` (or of its changed version), faults injected."""
        with self._faults:
            count = self.ranged[name] = self.ranged.get(name, 0) + 1
            if name in self.change and count >= self.change[name][0]:
                data = self.change[name][1]
            first, last = request.headers["Range"].removeprefix("bytes=").split("-")
            first, last = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
            faulty = first >= self.fault_from
            if faulty and self.fail.get(name, 0) > 0:
                self.fail[name] -= 1
                return self._send(request, 503, b"busy", body)
            cut = self.drop[name].pop(0) if faulty and self.drop.get(name) else None
        if first >= len(data):
            return self._send(request, 416, b"", body, {"Content-Range": f"bytes */{len(data)}"})
        piece = data[first : last + 1]
        request.send_response(206)
        request.send_header("Content-Range", f"bytes {first}-{last}/{len(data)}")
        request.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        request.send_header("X-Repo-Commit", COMMIT)
        request.send_header("Content-Length", str(len(piece)))
        request.end_headers()
        if not body:
            return
        if cut is not None:  # the connection drops after `cut` bytes of the body
            request.wfile.write(piece[:cut])
            request.wfile.flush()
            request.close_connection = True
            request.connection.shutdown(2)
            return
        step = 1 << 16
        started = time.perf_counter()
        for pos in range(0, len(piece), step):
            request.wfile.write(piece[pos : pos + step])
            if self.rate:  # sleep until this many bytes are due at `rate`
                time.sleep(max(0.0, started + (pos + step) / self.rate - time.perf_counter()))

    @staticmethod
    def _send(request, status: int, data: bytes, body: bool, headers: dict[str, str] | None = None) -> None:
        request.send_response(status)
        for key, value in (headers or {}).items():
            request.send_header(key, value)
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        if body:
            request.wfile.write(data)


def test_download_fetches_only_what_a_merge_needs_then_works_offline(models, tmp_path):
    repo_dir = tmp_path / "served"
    shutil.copytree(models["base"], repo_dir)
    (repo_dir / "original").mkdir()
    (repo_dir / "original" / "consolidated.safetensors").write_bytes((models["ft"] / "model.safetensors").read_bytes())
    cache = tmp_path / "cache"
    with _Hub({"org/base": repo_dir, "org/ft": models["ft"], "org/adapter": models["adapter"]},
              token="hf_secret") as hub:
        online = {"HF_HOME": str(tmp_path / "home"), "HF_HUB_CACHE": str(cache), "HF_ENDPOINT": hub.url,
                  "HF_TOKEN": "hf_secret"}
        result = _run(["merge", "org/base", "org/ft", "-o", "by-id", "--weight", "0.6"], tmp_path, **online)
        assert result.returncode == 0, result.stderr
        fetched = {p for method, p, _ in hub.requests if method == "GET" and "/resolve/" in p}
        # Every request for the repos carries HF_TOKEN (huggingface_hub also asks for its own
        # registries, e.g. /api/agent-harnesses, without it).
        repo_requests = [r for r in hub.requests if r[1].startswith(("/api/models/", "/org/"))]
        assert repo_requests and all(auth == "Bearer hf_secret" for _, _, auth in repo_requests), hub.requests
        # An adapter repo alone: it and the base it names are downloaded.
        lone = _run(["merge", "org/adapter", "-o", "lone", "-q"], tmp_path, **online)
        assert lone.returncode == 0, lone.stderr
        adapter_files = {p.rsplit("/", 1)[1] for m, p, _ in hub.requests
                         if m == "GET" and p.startswith("/org/adapter/resolve/")}
        assert adapter_files == {"adapter_config.json", "adapter_model.safetensors"}
        # A wrong token: the repo is "not found", in one line.
        denied = _run(["inspect", "org/other"], tmp_path, **{**online, "HF_TOKEN": "wrong"})
    assert {p.rsplit("/", 1)[1] for p in fetched} == {
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
        "config.json", "tokenizer_config.json", "chat_template.jinja", "model.safetensors"}
    assert not any("pytorch_model.bin" in p or "README" in p or "original/" in p for p in fetched)
    assert "Downloading" in result.stderr or "Fetching" in result.stderr  # huggingface_hub's progress bar
    assert denied.returncode == 1 and len(denied.stderr.strip().splitlines()) == 1, denied.stderr
    assert denied.stderr.startswith("Error: Hub repo org/other at revision main: ")

    local = _run(["merge", str(models["base"]), str(models["ft"]), "-o", "local", "--weight", "0.6", "-q"], tmp_path)
    assert local.returncode == 0, local.stderr
    a, b = load_checkpoint(tmp_path / "by-id"), load_checkpoint(tmp_path / "local")
    assert a.keys() == b.keys() and all(a[n].tobytes() == b[n].tobytes() for n in a)
    # The server is gone: the same command now runs from the cache, offline.
    again = _run(["merge", "org/base", "org/ft", "-o", "again", "--weight", "0.6", "-q"], tmp_path, **_offline(cache))
    assert again.returncode == 0, again.stderr
    assert _files(tmp_path / "again") == _files(tmp_path / "by-id")


def test_an_unreachable_hub_is_one_line_naming_the_fetch_command(tmp_path):
    import socket

    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = _run(["inspect", "org/none"], tmp_path, HF_HOME=str(tmp_path / "home"),
                  HF_ENDPOINT=f"http://127.0.0.1:{port}")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: Hub repo org/none at revision main: not in the cache and "
                                                   "cannot be downloaded ("), result.stderr
    assert lines[0].endswith("; fetch it with: " + 'hf download org/none --revision main --include "*.safetensors" '
                             '--include "*.json" --include "*.jinja" --include "*.model" --include "*.txt" '
                             '--include "*.tiktoken"')
