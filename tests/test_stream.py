"""Streamed inputs (safeblend.remote): models read by range requests from the loopback Hub of
tests/test_hub.py, over plain HTTP, through huggingface_hub (HF_ENDPOINT) and through fsspec,
with throttling, 503s, dropped connections and a file that changes mid-merge."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import numpy as np
import pytest

import safeblend
from safeblend import remote
from safeblend.errors import CheckpointError
from helpers import load_checkpoint, random_tensor, write_checkpoint
from test_hub import CONFIG, _Hub, _run, models  # noqa: F401 (models: a fixture)

WEIGHT = 0.6


def _bigger(seed: int) -> dict[str, np.ndarray]:
    """~1.5 MiB per model: enough 64 KiB blocks and 32 KiB chunks for read-ahead to matter."""
    rng = np.random.default_rng(seed)
    tensors = {"model.embed_tokens.weight": random_tensor(rng, (256, 128), "fp32")}
    for layer in range(4):
        tensors[f"model.layers.{layer}.mlp.up_proj.weight"] = random_tensor(rng, (256, 256), "bf16")
        tensors[f"model.layers.{layer}.input_layernorm.weight"] = random_tensor(rng, (256,), "fp32")
    tensors["lm_head.weight"] = random_tensor(rng, (256, 128), "fp32")
    return tensors


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, Path]:
    """A two-shard base with tokenizer files and a one-file fine-tune, and their local merge."""
    root = tmp_path_factory.mktemp("stream")
    base = write_checkpoint(root / "base", _bigger(0), shards=2, config=CONFIG)
    (base / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    (base / "chat_template.jinja").write_text("{{ messages }}")
    ft = write_checkpoint(root / "ft", _bigger(1), config=CONFIG)
    local = root / "local"
    safeblend.merge(base, ft, local, weight=WEIGHT)
    return {"base": base, "ft": ft, "local": local}


@pytest.fixture
def small_blocks(monkeypatch):
    """64 KiB blocks within a 256 KiB budget, and retries that wait 10 ms."""
    monkeypatch.setattr(remote, "BLOCK_BYTES", 64 * 2**10)
    monkeypatch.setattr(remote, "READ_AHEAD_BYTES", 256 * 2**10)
    monkeypatch.setattr(remote, "SPOOLING_READ_AHEAD_BYTES", 128 * 2**10)
    monkeypatch.setattr(remote, "RETRY_WAIT_S", 0.01)


def _same_output(out: Path, local: Path) -> None:
    """Every tensor byte for byte, the same non-weight files, the same header metadata except
    the recipe's input paths."""
    a, b = load_checkpoint(out), load_checkpoint(local)
    assert a.keys() == b.keys() and all(a[n].tobytes() == b[n].tobytes() for n in a)
    names = {p.name for p in out.iterdir()}
    assert names == {p.name for p in local.iterdir()}
    for name in names - {"safeblend.json"}:
        if not name.endswith(".safetensors"):
            assert (out / name).read_bytes() == (local / name).read_bytes(), name


def _ranges(hub: _Hub, name: str) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in (r.split("-") for m, p, r in hub.log if p.endswith("/" + name))]


def _merge_urls(hub: _Hub, out: Path, **options):
    return safeblend.merge(f"{hub.url}/plain/org/base", f"{hub.url}/plain/org/ft", out, weight=WEIGHT,
                           chunk_size="32KiB", **options)


class _LoggingHub(_Hub):
    """The loopback Hub, also logging each ranged read as (method, path, 'first-last')."""

    def __init__(self, repos, token=None):
        super().__init__(repos, token)
        self.log: list[tuple[str, str, str]] = []

    def _send_range(self, request, name, data, body):
        self.log.append((request.command, request.path, request.headers["Range"].removeprefix("bytes=")))
        return super()._send_range(request, name, data, body)


def test_a_plain_url_merge_reads_headers_first_then_blocks_and_equals_the_local_merge(pair, tmp_path, small_blocks):
    with _LoggingHub({"org/base": pair["base"], "org/ft": pair["ft"]}) as hub:
        result = _merge_urls(hub, tmp_path / "out")
    _same_output(tmp_path / "out", pair["local"])
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors"]
    # Weight files are never fetched whole: only ranges, the header's first (8 bytes, then the header).
    whole = [p for m, p, _ in hub.requests if m == "GET" and p.endswith(".safetensors")]
    assert len(whole) == len(hub.log)
    header_reads, data_reads = [], []
    for i, (_, path, span) in enumerate(hub.log):
        name = path.rsplit("/", 1)[1]
        local = (pair["base"] if "of" in name else pair["ft"]) / name
        header_len = int.from_bytes(local.read_bytes()[:8], "little")
        (header_reads if span in ("0-7", f"8-{8 + header_len - 1}") else data_reads).append(i)
    # Every header is read before any data: the plan is made from headers alone.
    assert len(header_reads) == 2 * len(shards) and max(header_reads) < min(data_reads)
    for name in shards:
        ranges = _ranges(hub, name)
        assert ranges[0] == (0, 7)
        local = (pair["base"] if "of" in name else pair["ft"]) / name
        size = os.path.getsize(local)
        assert ranges[-1] == (0, 0)  # before commit: is it still the same file (size, ETag)?
        data = ranges[2:-1]
        assert data and all(b - a + 1 <= remote.BLOCK_BYTES for a, b in data)
        # Blocks follow the tensors: one larger than a block is read from its own first byte.
        tensors = _tensor_ranges(local)
        assert any(e - s > remote.BLOCK_BYTES for s, e in tensors)
        assert all((s, min(e, s + remote.BLOCK_BYTES) - 1) in data for s, e in tensors if e - s > remote.BLOCK_BYTES)
        # Each request lies in one block and starts at its first byte, or inside it: a retry
        # resuming where a dropped (or, under load, timed-out) response stopped.
        starts = remote.block_starts(size, tensors, remote.BLOCK_BYTES)
        ends = [*starts[1:], size]
        assert all(any(s <= a and b < e for s, e in zip(starts, ends)) for a, b in data)  # within one block
        # Every block is fetched; the merge reads in the base's tensor order, which is not this
        # file's (its fp32 tensors come first), so a block read ahead may be dropped before the
        # merge reaches it and fetched again, but not more than twice.
        from_start = [a for a, _ in data if a in starts]
        assert set(from_start) == set(starts[1:]) and max(map(from_start.count, from_start)) <= 2, (name, data)
    assert result.bytes_read > 0


def _tensor_ranges(path: Path) -> list[tuple[int, int]]:
    """(first byte, end) in the file of each tensor of a safetensors file, from its header."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    return sorted((8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1]) for k, v in header.items()
                  if k != "__metadata__")


def test_blocks_share_small_tensors_and_cut_large_ones_from_their_first_byte():
    b = 1000
    tensors = [(100, 150), (150, 150 + 2500), (2650, 2660), (2660, 2670), (2670, 4000), (4000, 4010)]
    starts = remote.block_starts(4010, tensors, b)
    # The header and the small tensor share block 0; the large one starts its own and is cut
    # every b bytes from its first byte; its tail block takes the next small tensors; the
    # 1330-byte tensor starts a block of its own, its last 330 bytes one more with the last tensor.
    assert starts == [0, 150, 1150, 2150, 2670, 3670]
    assert all(e - s <= b for s, e in zip(starts, [*starts[1:], 4010]))
    assert remote.block_starts(50, [(8, 50)], b) == [0]


def test_block_buffers_are_reused_only_once_no_view_of_them_is_left(monkeypatch):
    monkeypatch.setattr(remote, "BLOCK_BYTES", 4096)
    pool = remote._BlockBuffers()
    first = pool.take(4000)
    first[:3] = b"abc"
    viewed = id(first.obj)  # (an id: a reference held here would itself keep the buffer from reuse)
    view = np.frombuffer(first, dtype=np.uint8)[:3]  # a reader still looking at the block
    pool.give(first)
    del first
    second = pool.take(4096)
    assert id(second.obj) != viewed  # still viewed: not handed out again
    second[:3] = b"xyz"
    assert view.tobytes() == b"abc"
    free = id(second.obj)
    pool.give(second)
    del second
    assert id(pool.take(10).obj) == free  # nothing looks at it any more: reused


def test_hub_repos_stream_through_huggingface_hub_with_the_token_and_nothing_in_the_cache(pair, tmp_path):
    cache = tmp_path / "cache"
    with _Hub({"org/base": pair["base"], "org/ft": pair["ft"]}, token="hf_secret") as hub:
        env = {"HF_HOME": str(tmp_path / "home"), "HF_HUB_CACHE": str(cache), "HF_ENDPOINT": hub.url,
               "HF_TOKEN": "hf_secret"}
        result = _run(["merge", "org/base", "org/ft", "-o", "out", "--weight", str(WEIGHT), "--stream",
                       "--chunk-size", "32KiB"], tmp_path, **env)
        assert result.returncode == 0, result.stderr
        hf_url = _run(["merge", "hf://org/base", f"hf://org/ft@{'0123456789abcdef0123456789abcdef01234567'}",
                       "-o", "hf-url", "--weight", str(WEIGHT), "-q"], tmp_path, **env)
        assert hf_url.returncode == 0, hf_url.stderr
    _same_output(tmp_path / "out", pair["local"])
    _same_output(tmp_path / "hf-url", pair["local"])
    weight_gets = [r for r in hub.requests if r[0] == "GET" and r[1].endswith(".safetensors")]
    assert weight_gets and all(auth == "Bearer hf_secret" for _, _, auth in weight_gets)
    assert all(f"/resolve/{'0123456789abcdef0123456789abcdef01234567'}/" in p for _, p, _ in weight_gets)
    assert hub.ranged  # every weight read was ranged
    assert not list(cache.rglob("*.safetensors"))  # nothing downloaded
    assert "network" in result.stderr  # the network throughput bar
    recipe = json.loads(load_metadata(tmp_path / "out")["safeblend_recipe"])
    assert "org--base@0123456789abcdef" in recipe["base"]


def load_metadata(out: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "np") as f:
        return f.metadata()


def test_503s_and_dropped_connections_are_retried_resuming_at_the_byte(pair, tmp_path, small_blocks):
    with _LoggingHub({"org/base": pair["base"], "org/ft": pair["ft"]}) as hub:
        hub.fault_from = 4096  # faults on data reads, past the headers
        hub.fail = {"model.safetensors": 2}
        hub.drop = {"model-00001-of-00002.safetensors": [1000, 70]}
        _merge_urls(hub, tmp_path / "out")
        ranges = _ranges(hub, "model-00001-of-00002.safetensors")
        failed = hub.fail
    _same_output(tmp_path / "out", pair["local"])
    assert failed == {"model.safetensors": 0}
    # Each cut read went on from the byte it stopped at (two reads in flight may take the cuts in
    # either order): after 1000 bytes of one range, after 70 of the same or another.
    assert any((a + 1000, b) in ranges for a, b in ranges), ranges
    assert any((a + 70, b) in ranges or (a + 1070, b) in ranges for a, b in ranges), ranges
    assert len(ranges) == len(set(ranges))  # nothing read twice


def test_a_server_that_keeps_failing_is_one_line_and_nothing_at_out(pair, tmp_path, small_blocks, monkeypatch):
    monkeypatch.setattr(remote, "RETRIES", 2)
    with _Hub({"org/base": pair["base"], "org/ft": pair["ft"]}, token=None) as hub:
        hub.fault_from = 4096
        hub.drop = {"model.safetensors": [10] * 50}
        with pytest.raises(CheckpointError, match=r"/plain/org/ft/model\.safetensors: reading bytes \d+-\d+ failed "
                                                  r"3 times"):
            _merge_urls(hub, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no OUT, no partial output


def test_a_server_that_keeps_answering_503_is_one_line_and_nothing_at_out(pair, tmp_path, small_blocks,
                                                                          monkeypatch):
    monkeypatch.setattr(remote, "RETRIES", 2)
    with _Hub({"org/base": pair["base"], "org/ft": pair["ft"]}, token=None) as hub:
        hub.fault_from = 4096
        hub.fail = {"model.safetensors": 50}
        with pytest.raises(CheckpointError, match=r"/plain/org/ft/model\.safetensors: reading bytes \d+-\d+ failed "
                                                  r"3 times \(.*503"):
            _merge_urls(hub, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


class _RedirectingHub(_Hub):
    """The loopback Hub, answering each ranged read of a weight file with a redirect to the same
    path on ``cdn`` (another origin: a signed CDN URL's place), logged in ``requests``."""

    cdn = ""

    def answer(self, request, body: bool) -> None:
        path = urlsplit(request.path).path
        if request.headers.get("Range") and path.endswith(".safetensors"):
            self.requests.append((request.command, path, request.headers.get("Authorization")))
            return self._send(request, 302, b"", body, {"Location": self.cdn + request.path})
        super().answer(request, body)


def test_a_redirect_to_another_host_is_followed_without_the_token(pair, tmp_path):
    repos = {"org/base": pair["base"], "org/ft": pair["ft"]}
    with _Hub(repos, token=None) as cdn, _RedirectingHub(repos, token="hf_secret") as hub:
        hub.cdn = cdn.url
        result = _run(["merge", "org/base", "org/ft", "-o", "out", "--weight", str(WEIGHT), "--stream",
                       "--chunk-size", "32KiB", "-q"], tmp_path, HF_HOME=str(tmp_path / "home"),
                      HF_HUB_CACHE=str(tmp_path / "cache"), HF_ENDPOINT=hub.url, HF_TOKEN="hf_secret")
        assert result.returncode == 0, result.stderr
    _same_output(tmp_path / "out", pair["local"])
    asked = [auth for _, path, auth in hub.requests if path.endswith(".safetensors")]
    served = [auth for _, path, auth in cdn.requests if path.endswith(".safetensors")]
    assert asked and set(asked) == {"Bearer hf_secret"}  # the Hub gets the token
    assert len(served) == len(asked) and set(served) == {None}  # the other host never does
    assert sum(cdn.ranged.values()) == len(served)  # every read there ranged


def test_a_file_that_changes_mid_merge_is_an_error_and_nothing_at_out(pair, tmp_path, small_blocks):
    changed = bytearray((pair["ft"] / "model.safetensors").read_bytes())
    changed[-1] ^= 1
    with _Hub({"org/base": pair["base"], "org/ft": pair["ft"]}, token=None) as hub:
        hub.change = {"model.safetensors": (5, bytes(changed))}
        with pytest.raises(CheckpointError, match=r"/plain/org/ft/model\.safetensors: changed while being read"):
            _merge_urls(hub, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_change_after_the_last_read_is_caught_before_commit(pair, tmp_path, small_blocks, monkeypatch):
    """The ETag is checked once more before the output is committed (check_inputs_unchanged)."""
    changed = bytearray((pair["ft"] / "model.safetensors").read_bytes())
    changed[-1] ^= 1
    from safeblend import api

    with _Hub({"org/base": pair["base"], "org/ft": pair["ft"]}, token=None) as hub:
        real = api.check_inputs_unchanged

        def change_then_check(checkpoints):
            hub.change = {"model.safetensors": (0, bytes(changed))}
            return real(checkpoints)

        monkeypatch.setattr(api, "check_inputs_unchanged", change_then_check)
        with pytest.raises(CheckpointError, match="changed while being read"):
            _merge_urls(hub, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_read_ahead_stays_within_its_budget_and_never_holds_a_shard(pair, tmp_path, small_blocks, monkeypatch):
    peak = [0]
    real = remote._ReadAhead._want

    def counting(self, k):
        future = real(self, k)
        peak[0] = max(peak[0], sum(remote._held.values()))
        return future

    monkeypatch.setattr(remote._ReadAhead, "_want", counting)
    with _Hub({"org/base": pair["base"], "org/ft": pair["ft"]}, token=None) as hub:
        hub.rate = 20e6  # throttled: the merge waits on the network, read-ahead fills up
        _merge_urls(hub, tmp_path / "out")
    _same_output(tmp_path / "out", pair["local"])
    # The budget, plus the blocks of the chunks being computed (4 workers x 2 in flight, a 32 KiB
    # chunk spans at most 2 blocks of each of 2 inputs).
    assert 0 < peak[0] <= remote.READ_AHEAD_BYTES + 8 * 2 * 2 * remote.BLOCK_BYTES
    assert peak[0] < os.path.getsize(pair["ft"] / "model.safetensors")


def test_fsspec_urls_stream_through_their_file_system(pair, tmp_path, small_blocks):
    fsspec = pytest.importorskip("fsspec")  # a dependency of huggingface_hub: always there
    fs = fsspec.filesystem("memory")
    for name in ("base", "ft"):
        for path in pair[name].iterdir():
            fs.pipe(f"/models/{name}/{path.name}", path.read_bytes())
    try:
        safeblend.merge("memory://models/base", "memory://models/ft", tmp_path / "out", weight=WEIGHT,
                        chunk_size="32KiB")
    finally:
        fs.rm("/models", recursive=True)
    _same_output(tmp_path / "out", pair["local"])


def test_missing_backends_and_files_are_one_line_errors(tmp_path):
    missing = _run(["merge", "s3://bucket/base", "s3://bucket/ft", "-o", "out"], tmp_path)
    assert missing.returncode == 1 and len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    assert missing.stderr.startswith("Error: s3://bucket/ft: cannot read this URL: ") and "s3fs" in missing.stderr
    with _Hub({}, token=None) as hub:
        gone = _run(["merge", f"{hub.url}/plain/org/none", f"{hub.url}/plain/org/none", "-o", "out"], tmp_path)
    assert gone.returncode == 1 and len(gone.stderr.strip().splitlines()) == 1, gone.stderr
    assert gone.stderr.startswith(f"Error: {hub.url}/plain/org/none/model.safetensors: ")
    assert not (tmp_path / "out").exists()


def test_an_interrupted_streamed_merge_resumes(pair, tmp_path):
    with _Hub({"org/base": pair["base"], "org/ft": pair["ft"]}, token=None) as hub:
        args = ["merge", f"{hub.url}/plain/org/base", f"{hub.url}/plain/org/ft", "-o", "out", "--weight",
                str(WEIGHT), "--chunk-size", "32KiB", "-q"]
        killed = _run(args, tmp_path, SAFEBLEND_FAULT_KILL_AT="write:20",
                      SAFEBLEND_FAULT_SLOW_WRITE_S="0.01")
        assert killed.returncode == -signal.SIGKILL
        assert not (tmp_path / "out").exists() and (tmp_path / ".out.safeblend-partial").is_dir()
        before = sum(hub.ranged.values())
        resumed = _run([*args, "--resume"], tmp_path)
        assert resumed.returncode == 0, resumed.stderr
        assert sum(hub.ranged.values()) > before
    _same_output(tmp_path / "out", pair["local"])
    # The staged inputs have the same names and fingerprint: the journaled tensors are kept.
    kept = re.match(r"Warning: --resume: kept (\d+) of 10 tensors", resumed.stderr)
    assert kept and int(kept[1]) > 0, resumed.stderr


def test_a_streamed_lora_adapter_merges_as_the_local_one(models, tmp_path):
    """An adapter folder over HTTP: its config fetched whole, its weights by ranges."""
    local = tmp_path / "local"
    safeblend.merge(models["base"], models["adapter"], local, weight=1.0)
    with _Hub({"org/base": models["base"], "org/adapter": models["adapter"]}, token=None) as hub:
        notes: list[str] = []  # the adapter names org/base; a URL is not that name: a warning
        safeblend.merge(f"{hub.url}/plain/org/base", f"{hub.url}/plain/org/adapter", tmp_path / "out", weight=1.0,
                        on_warning=notes.append)
        assert hub.ranged["adapter_model.safetensors"] >= 3  # length, header, data
    _same_output(tmp_path / "out", local)


def test_an_unreachable_server_fails_fast_in_one_line(tmp_path, monkeypatch, caplog):
    import socket

    monkeypatch.setattr(remote, "RETRY_WAIT_S", 0.01)
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/base"
    with pytest.raises(CheckpointError, match=r"^http://127\.0\.0\.1:\d+/base/config\.json: ConnectError: "):
        safeblend.merge(url, url, tmp_path / "out")
    # huggingface_hub's per-retry warnings are not shown: the error above is the one line.
    assert not [r for r in caplog.records if r.name.startswith("huggingface_hub") and r.levelname == "WARNING"]
    assert not (tmp_path / "out").exists()


def _hub_env(hub: _Hub, tmp_path: Path) -> dict[str, str]:
    return {"HF_HOME": str(tmp_path / "home"), "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_ENDPOINT": hub.url}


def test_sweep_stream_reads_hub_repos_by_ranges_as_merge_stream_does(pair, tmp_path):
    """`sweep --stream`: nothing downloaded, each output the local merge at its weight."""
    local = tmp_path / "local-0.3"
    safeblend.merge(pair["base"], pair["ft"], local, weight=0.3)
    with _Hub({"org/base": pair["base"], "org/ft": pair["ft"]}, token=None) as hub:
        result = _run(["sweep", "org/base", "org/ft", "-o", "sweep", "--weights", f"0.3,{WEIGHT}", "--stream",
                       "--chunk-size", "32KiB", "-q"], tmp_path, **_hub_env(hub, tmp_path))
        assert result.returncode == 0, result.stderr
        assert hub.ranged  # weights read by range requests
    assert not list((tmp_path / "cache").rglob("*.safetensors"))  # nothing downloaded
    _same_output(tmp_path / "sweep" / f"lambda-{WEIGHT}", pair["local"])
    _same_output(tmp_path / "sweep" / "lambda-0.3", local)


def test_diff_stream_reads_hub_repos_by_ranges_and_reports_as_for_local_models(pair, tmp_path):
    expected = safeblend.diff(pair["base"], pair["ft"], chunk_size="32KiB").to_dict()
    with _Hub({"org/base": pair["base"], "org/ft": pair["ft"]}, token=None) as hub:
        result = _run(["diff", "org/base", "org/ft", "--stream", "--json", "--chunk-size", "32KiB"], tmp_path,
                      **_hub_env(hub, tmp_path))
        assert result.returncode == 0, result.stderr
        assert hub.ranged
    assert not list((tmp_path / "cache").rglob("*.safetensors"))
    got = json.loads(result.stdout)
    for report in (got, expected):  # the inputs' names and the timings differ; the figures must not
        for key in ("base", "ft", "seconds", "throughput_bytes_per_s"):
            report.pop(key)
    assert _close(got, expected)


def _close(a, b) -> bool:
    """Nested JSON equal, floats within 1e-12 relative (the figures are float64 sums)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        return all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        assert len(a) == len(b)
        return all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-12, abs=1e-300), (a, b)
        return True
    assert a == b
    return True


def _weight_bytes(*folders: Path) -> int:
    return sum(p.stat().st_size for folder in folders for p in folder.glob("*.safetensors"))


def test_reduce_passes_read_a_spool_and_fetch_each_tensor_once(pair, tmp_path, small_blocks):
    """TIES runs several passes over each tensor: a streamed input is fetched once (spooled
    beside the output), not once per pass, and the merge equals the local one."""
    local = tmp_path / "local"
    safeblend.merge(pair["base"], pair["ft"], local, method="ties", weight=WEIGHT, density=0.3, chunk_size="32KiB")
    with _LoggingHub({"org/base": pair["base"], "org/ft": pair["ft"]}) as hub:
        _merge_urls(hub, tmp_path / "out", method="ties", density=0.3)
        fetched = sum(int(b) - int(a) + 1 for _, _, span in hub.log for a, b in [span.split("-")])
    _same_output(tmp_path / "out", local)
    # Each byte about once: a spool beyond its file's disk allowance (two of its largest tensors,
    # here 256 KiB, while up to 8 chunks of 32 KiB are in flight) goes before it is merged and is
    # read again, as timing has it (1.0-1.12x seen); without the spool ~2.5x (a sampling pass, a
    # counting pass, the merge).
    assert fetched <= 1.5 * _weight_bytes(pair["base"], pair["ft"]), (fetched, _weight_bytes(pair["base"], pair["ft"]))
    assert not [p for p in tmp_path.rglob("*") if "spool" in p.name]  # nothing left behind


def test_a_merge_that_spools_reads_ahead_within_the_smaller_budget(tmp_path, monkeypatch):
    """Once a tensor is held for reduce passes, read-ahead fills SPOOLING_READ_AHEAD_BYTES, not
    READ_AHEAD_BYTES; the next merge (outside spool_in) has the whole budget again."""
    from safeblend.checkpoint import TensorInfo
    from safeblend.dtypes import DTYPES

    monkeypatch.setattr(remote, "BLOCK_BYTES", 1024)
    monkeypatch.setattr(remote, "READ_AHEAD_BYTES", 16 * 1024)
    monkeypatch.setattr(remote, "SPOOLING_READ_AHEAD_BYTES", 4 * 1024)

    class Zeros(remote._Blob):
        display, size, tag = "zeros", 64 * 1024, None

        def read(self, start: int, end: int) -> bytes:
            return bytes(end - start)

    def held_after_one_read() -> int:
        reader = remote._ReadAhead(Zeros(), [(0, 64 * 1024)])
        reader.read(0, 10)
        held = remote._held[id(reader)]
        reader.close()
        return held

    info = TensorInfo("t", DTYPES["F32"], (256,), tmp_path / "t", 0, 1024)
    f = remote.RemoteSafetensorsFile(path=tmp_path / "t", size=64 * 1024, tensors={"t": info}, metadata={},
                                     source=Zeros())
    with remote.spool_in([SimpleNamespace(files=[f])], tmp_path):
        assert held_after_one_read() == 16 * 1024
        f.hold(info)  # a reduce pass's tensor: spooled
        f.close()  # (its own read-ahead would take a share)
        assert held_after_one_read() == 4 * 1024
    assert held_after_one_read() == 16 * 1024


def test_each_merge_spools_into_its_own_output(tmp_path, monkeypatch):
    """Two merges in threads of one process: each remote file spools into the folder of the merge
    that opened it, whatever the other merge set (the folder was once a module-wide setting)."""
    import tempfile as tempfile_module

    from safeblend.checkpoint import TensorInfo
    from safeblend.dtypes import DTYPES

    class Zeros(remote._Blob):
        display, size, tag = "zeros", 4096, None

        def read(self, start: int, end: int) -> bytes:
            return bytes(end - start)

    folders = []
    real_mkstemp = tempfile_module.mkstemp

    def recording_mkstemp(*args, **kwargs):
        folders.append(Path(kwargs["dir"]))
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(remote.tempfile, "mkstemp", recording_mkstemp)
    info = TensorInfo("t", DTYPES["F32"], (256,), tmp_path / "t", 0, 1024)
    files = [remote.RemoteSafetensorsFile(path=tmp_path / f"t{k}", size=4096, tensors={"t": info}, metadata={},
                                          source=Zeros()) for k in range(2)]
    outputs = [tmp_path / "out-a", tmp_path / "out-b"]
    for out in outputs:
        out.mkdir()
    with remote.spool_in([SimpleNamespace(files=[files[0]])], outputs[0]):
        with remote.spool_in([SimpleNamespace(files=[files[1]])], outputs[1]):  # the second merge starts
            files[0].hold(info)
            files[1].hold(info)
    assert folders == outputs
    for f in files:
        f.close()


def test_the_spools_space_is_checked_before_the_merge(pair, tmp_path, small_blocks, monkeypatch):
    """A method with reduce passes needs room for the output and the spools: refused up front."""
    import shutil as shutil_module

    from safeblend.errors import OutputError

    real = shutil_module.disk_usage
    output = sum(p.stat().st_size for p in pair["local"].glob("*.safetensors"))
    monkeypatch.setattr("safeblend.writer.shutil.disk_usage",
                        lambda path: real(path)._replace(free=output + 100_000))  # the output and its files fit
    with _Hub({"org/base": pair["base"], "org/ft": pair["ft"]}, token=None) as hub:
        _merge_urls(hub, tmp_path / "linear")  # no reduce pass: no spool
        with pytest.raises(OutputError, match="not enough space"):
            _merge_urls(hub, tmp_path / "ties", method="ties", density=0.3)
    assert (tmp_path / "linear").is_dir() and not (tmp_path / "ties").exists()


class _SlowHub(_Hub):
    """The loopback Hub answering every request after 20 ms, recording when each was served."""

    def __init__(self, repos, token=None):
        super().__init__(repos, token)
        self.served: list[tuple[float, float, str]] = []

    def answer(self, request, body):
        import time

        start = time.perf_counter()
        time.sleep(0.02)
        super().answer(request, body)
        self.served.append((start, time.perf_counter(), request.path))


def test_streamed_inputs_are_staged_at_the_same_time(pair, tmp_path):
    """Each input's many small staging requests (config and tokenizer names, headers) overlap
    with the other input's, rather than waiting for them."""
    with _SlowHub({"org/base": pair["base"], "org/ft": pair["ft"]}) as hub:
        _merge_urls(hub, tmp_path / "out")
    _same_output(tmp_path / "out", pair["local"])
    # The fine-tune's weight file is asked for (its header) only once its config and tokenizer
    # names were tried; the base's requests began before that, not after its staging.
    ft_header = min(a for a, _, path in hub.served if path.endswith("/org/ft/model.safetensors"))
    assert min(a for a, _, path in hub.served if "/org/base/" in path) < ft_header
