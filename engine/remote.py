"""Inputs streamed over the network: a model on the Hub or behind a URL, read by range requests.

A remote model is *staged* before it is opened: its listing is read, its non-weight files
(config, tokenizer, index, adapter config) are fetched whole into a small local folder, and
for each safetensors weight file only the header is fetched (a range read of the 8-byte
length, then one of the header). The folder then holds a placeholder in each weight file's
place, registered with ``safeblend.checkpoint.register_stand_in``, so every reader of model
directories (checkpoints, adapters, quantized views, sweep, diff, resume's fingerprint) works
on it unchanged while the weights' bytes come from a ``RemoteSafetensorsFile``.

That file serves the executors' ``view``/``byte_view``/``prefetch``/``release`` calls from
fixed blocks (``BLOCK_BYTES``) fetched by a small shared pool of concurrent range requests,
read ahead sequentially from where the merge reads, within ``READ_AHEAD_BYTES`` across all
remote files; a block goes once every byte of it was released (consumed), so memory stays
bounded and no weight file is ever held or written whole.

Transports: Hub repos and plain ``http(s)://`` URLs are listed and their small files fetched
through huggingface_hub's HTTP client (token, endpoint); weight files' ranges are read through
urllib3, each response body straight into the block it fills (huggingface_hub's client copies
a body several times over in 64 KiB pieces: ~2 s of CPU per GB against ~0.8-1 s, measured on
loopback by benchmarks/bench_transport.py, CPU the merge's arithmetic needs), with
huggingface_hub's headers (token), retry rules (connection errors and 408/429/5xx, with
backoff), proxies and TLS trust. Other URLs
(``s3://``, ``gs://``, ...) go through fsspec, where its backend is installed. A connection
that drops mid-body is retried with backoff from the byte it stopped at; a file whose ETag (or,
for the Hub, commit) differs from the one its header was read with is an ``InputChangedError``.
"""

from __future__ import annotations

import atexit
import bisect
import fcntl
import hashlib
import json
import logging
import mmap
import os
import re
import shutil
import struct
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import quote, urlsplit

import numpy as np

from .checkpoint import (ADAPTER_CONFIG_NAME, INDEX_NAME, MAX_HEADER_BYTES, SINGLE_NAME, InputChangedError,
                         SafetensorsFile, TensorInfo, parse_safetensors_header, register_stand_in)
from .errors import CheckpointError, OutputError, first_line
from .model_files import COMPANION_PATTERNS, is_companion

# Range requests are this large: a few round trips per shard's worth of MiBs, and a block is
# the unit a dropped connection resumes within (at its byte) and memory is accounted in.
BLOCK_BYTES = 8 * 2**20
# Blocks fetched ahead of use, all remote files together: the streaming part of the memory bound.
READ_AHEAD_BYTES = 64 * 2**20
# The budget while tensors are spooled (a method with reduce passes): such a merge also holds
# its method's state and the spools' pages. Halved, a streamed TIES merge peaked at 269-277 MiB
# instead of 307-310 (the 300 MiB bound), no slower at 100 or 500 MB/s (benchmarks/RESULTS.md).
SPOOLING_READ_AHEAD_BYTES = 32 * 2**20
FETCH_THREADS = 4  # concurrent range requests
RETRIES = 6  # attempts after a failure, per request, waiting RETRY_WAIT_S, doubling, capped at 8 s
# Before the merge starts (listing, config, headers) a failure is more likely permanent (a wrong
# host, a refused connection): a few seconds of retries, not half a minute.
STAGING_RETRIES = 2
RETRY_WAIT_S = 1.0
# Disk a remote file's spools may take at once, in its largest tensors: a spool goes as soon as
# the merge consumed it, but several tensors' chunks can be in flight (the oldest spools beyond
# this go first; a tensor whose spool went is read over the network again).
SPOOLS_KEPT = 2
# Blocks this far behind the latest read are dropped even if not every byte was released
# (a header block, tensors a resumed merge skips).
_BEHIND = 4
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(name: object) -> bool:
    """Whether a model name is a URL (``https://``, ``s3://``, ``hf://``, ...), read remotely."""
    return isinstance(name, str) and _URL.match(name) is not None


# -- transports ------------------------------------------------------------------------------


class _Blob:
    """One remote file: its size and version tag, and its bytes by range."""

    display: str
    size: int
    tag: str | None

    def read(self, start: int, end: int) -> bytes | bytearray | mmap.mmap:
        """Bytes [start, end) in a buffer of their own."""
        raise NotImplementedError

    def read_block(self, start: int, end: int) -> bytes | bytearray | memoryview:
        """A read-ahead block's bytes [start, end) (at most BLOCK_BYTES), where they can go: a
        reused buffer (_BlockBuffers) for HTTP, whose bodies are written into it as they arrive."""
        return self.read(start, end)

    def check_unchanged(self) -> None:
        raise NotImplementedError


class _HttpBlob(_Blob):
    """A file behind an HTTP URL, read by range requests through urllib3 (``_http_pool``), each
    body read straight into the buffer it fills; retries and resumption are done here."""

    def __init__(self, url: str, headers: dict[str, str], display: str) -> None:
        from huggingface_hub import constants

        if constants.is_offline_mode():  # as huggingface_hub's own client refuses to
            raise CheckpointError(f"{display}: cannot be read: offline mode is enabled (HF_HUB_OFFLINE)")
        self.url, self.headers, self.display = url, headers, display
        self.size, self.tag = -1, None
        self.retries = STAGING_RETRIES  # RETRIES once its header is read (_stand_in)
        self._first = self.read(0, 8)  # learns size and tag from the response

    def read(self, start: int, end: int) -> bytearray | memoryview:
        return self._read_into(_buffer(end - start), start, end)

    def read_block(self, start: int, end: int) -> bytearray | memoryview:
        return self._read_into(_blocks.take(end - start), start, end)

    def _read_into(self, out: bytearray | memoryview, start: int, end: int) -> bytearray | memoryview:
        """Fill ``out`` with bytes [start, end). A connection error, a 408/429/5xx answer or a
        body cut short is retried with backoff (huggingface_hub's: doubling from RETRY_WAIT_S,
        capped at 8 s, or the server's Retry-After), from the byte reached."""
        import urllib3

        got, failures = 0, 0
        while got < len(out):
            reason, wait = "the response ended early", 0.0
            headers = {**self.headers, "Range": f"bytes={start + got}-{end - 1}"}
            try:
                response = _http_pool(self.url).urlopen("GET", self.url, headers=headers, preload_content=False,
                                                        decode_content=False, timeout=_timeout())
            except (urllib3.exceptions.HTTPError, OSError) as exc:  # no response (after any redirects)
                reason, response = _failure(exc), None
            if response is not None:
                complete = False
                try:
                    if response.status in _RETRIED_STATUSES:
                        reason, wait = f"HTTP {response.status}", _retry_after(response)
                    else:
                        self._check(response, start + got, end)
                        if end > self.size:  # the first read (a bytearray), of a file shorter than it asked
                            end = self.size
                            del out[end - start :]
                        view = memoryview(out)  # the body straight into `out`, `got` kept if it drops
                        while got < len(out) and (n := response.readinto(view[got : got + _READ_STEP])):
                            got += n
                            meter.add(n)
                        complete = response.length_remaining in (0, None)  # no unread bytes left
                except (urllib3.exceptions.HTTPError, OSError) as exc:  # dropped mid-body
                    reason = _failure(exc)
                finally:
                    if not complete:  # a connection with unread bytes is not reused
                        response.close()
                    response.release_conn()
            if got < len(out):  # resume at `got`
                failures += 1
                if failures > self.retries:
                    raise CheckpointError(f"{self.display}: reading bytes {start + got}-{end - 1} failed "
                                          f"{failures} times ({reason})")
                time.sleep(max(wait, min(8.0, RETRY_WAIT_S * 2 ** (failures - 1))))
        return out

    def _check(self, response, start: int, end: int) -> None:
        """The response is the range asked of the file first seen: else an error naming why."""
        if response.status >= 400:
            raise CheckpointError(f"{self.display}: {_status_message(response, self.url)}")
        tag = response.headers.get("etag")
        total = _range_total(response.headers.get("content-range"))
        if response.status != 206 or total is None:
            raise CheckpointError(f"{self.display}: the server does not answer range requests "
                                  f"(HTTP {response.status}); streaming needs them")
        first, last = _range_bounds(response.headers.get("content-range"))
        if first != start:
            raise CheckpointError(f"{self.display}: asked for bytes from {start}, the server sent from {first}")
        if last >= end:
            raise CheckpointError(f"{self.display}: the server sent more bytes than asked ({first}-{last} "
                                  f"for {start}-{end - 1})")
        if self.size < 0:
            self.size, self.tag = total, tag
            return
        if total != self.size or (tag or self.tag) and tag != self.tag:
            raise InputChangedError(f"{self.display}: changed while being read (it was {self.size} bytes, ETag "
                                    f"{self.tag}; now {total} bytes, ETag {tag})")

    def check_unchanged(self) -> None:
        self.read(0, 1)  # a one-byte range: its size and ETag are checked against the first


# Answers retried as huggingface_hub's client retries them (the rest are errors at once).
_RETRIED_STATUSES = (408, 429, 500, 502, 503, 504)
_MAX_REDIRECTS = 20  # as huggingface_hub's client
# A body is read into its buffer this much at a time: urllib3's readinto reads into a bytes
# object of this size, then copies it; 1 MiB keeps that buffer small (4 threads: 4 MiB) at the
# CPU cost of one whole-block read (~0.8-1 s/GB of CPU, user and system: bench_transport.py).
_READ_STEP = 2**20


def _failure(exc: BaseException) -> str:
    """What went wrong with a request, in a few words (urllib3 wraps the cause in its errors)."""
    cause = getattr(exc, "reason", None)
    exc = cause if isinstance(cause, BaseException) else exc
    return f"{type(exc).__name__}: {first_line(exc)}"


def _retry_after(response) -> float:
    """The seconds a 429 or 503's Retry-After header asks to wait (0 when it names none)."""
    value = (response.headers.get("retry-after") or "").strip()
    return float(value) + 1 if value.isdigit() else 0.0


def _status_message(response, url: str) -> str:
    """huggingface_hub's one-line explanation of an error answer (a missing repo or file, a
    token refused), or the bare status."""
    import httpx2
    from huggingface_hub.utils import hf_raise_for_status

    body = response.read(2**16, cache_content=False)
    answer = httpx2.Response(response.status, headers=list(response.headers.items()), content=body,
                             request=httpx2.Request("GET", url))
    try:
        hf_raise_for_status(answer)
    except Exception as exc:
        return first_line(exc)
    return f"HTTP {response.status}"


_pools: dict[str | None, object] = {}  # proxy URL (None: direct) -> urllib3 pool manager
_pools_lock = threading.Lock()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_pools.clear)  # a child opens connections of its own


def _http_pool(url: str):
    """The process's urllib3 pool manager for ``url``: the proxy the environment names for it
    (HTTP(S)_PROXY, ALL_PROXY, NO_PROXY) and huggingface_hub's client's TLS trust (certifi, or
    SSL_CERT_FILE / SSL_CERT_DIR), a kept-alive connection per fetch thread, redirects followed
    (up to 20) with Authorization dropped when one leads to another host."""
    import urllib3
    from urllib.request import getproxies, proxy_bypass

    scheme, host = urlsplit(url).scheme, urlsplit(url).hostname or ""
    proxies = getproxies()
    proxy = proxies.get(scheme) or proxies.get("all")
    if proxy and proxy_bypass(host):
        proxy = None
    if proxy and "://" not in proxy:
        proxy = f"http://{proxy}"
    with _pools_lock:
        pool = _pools.get(proxy)
        if pool is None:
            import httpx2

            options = dict(num_pools=16, maxsize=FETCH_THREADS, ssl_context=httpx2.create_ssl_context(),
                           retries=urllib3.Retry(total=None, connect=0, read=0, status=0, other=0,
                                                 redirect=_MAX_REDIRECTS, raise_on_status=False))
            if proxy is None:
                pool = urllib3.PoolManager(**options)
            elif proxy.startswith("socks"):
                try:
                    from urllib3.contrib.socks import SOCKSProxyManager
                except ImportError:
                    raise CheckpointError(f"{url}: the proxy {proxy} needs PySocks (pip install pysocks)") from None
                pool = SOCKSProxyManager(proxy, **options)
            else:
                pool = urllib3.ProxyManager(proxy, **options)
            _pools[proxy] = pool
        return pool


class _FsspecBlob(_Blob):
    """A file on an fsspec file system (s3://, gs://, ...); its version tag is what the file
    system reports (ETag, md5, generation, modification time). A failed range is retried whole."""

    def __init__(self, fs, path: str, display: str) -> None:
        self.fs, self.path, self.display = fs, path, display
        self.size, self.tag = self._identity()

    def _identity(self) -> tuple[int, str | None]:
        try:
            info = self.fs.info(self.path)
        except FileNotFoundError:
            raise CheckpointError(f"{self.display}: no such file") from None
        except Exception as exc:
            raise CheckpointError(f"{self.display}: {type(exc).__name__}: {first_line(exc)}") from None
        for key in ("ETag", "etag", "md5Hash", "generation", "blob_id", "mtime", "LastModified", "created"):
            if info.get(key) is not None:
                return int(info["size"]), f"{key}={info[key]}"
        return int(info["size"]), None

    def read(self, start: int, end: int) -> bytes:
        failures = 0
        while True:
            try:
                data = self.fs.cat_file(self.path, start=start, end=end)
                if len(data) != end - start:
                    raise OSError(f"got {len(data)} bytes for a range of {end - start}")
                meter.add(len(data))
                return data
            except (FileNotFoundError, PermissionError) as exc:
                raise CheckpointError(f"{self.display}: {first_line(exc)}") from None
            except (OSError, TimeoutError, ConnectionError) as exc:
                failures += 1
                if failures > RETRIES:
                    raise CheckpointError(f"{self.display}: reading bytes {start}-{end - 1} failed {failures} "
                                          f"times ({type(exc).__name__}: {first_line(exc)})") from None
                time.sleep(min(8.0, RETRY_WAIT_S * 2 ** (failures - 1)))

    def check_unchanged(self) -> None:
        if self._identity() != (self.size, self.tag):
            raise InputChangedError(f"{self.display}: changed while being read ({self.tag} when the merge began)")


def _buffer(size: int) -> bytearray | mmap.mmap:
    """A writable buffer: a mapping of its own above 1 MiB, unmapped when its last view goes.
    (Blocks as bytearrays came from malloc, whose mmap threshold rises to a block's size once
    one is freed; later blocks then came from per-thread heaps that do not shrink: +50 MiB peak
    RSS measured on a 0.36 GB streamed merge.)"""
    return mmap.mmap(-1, size) if size >= 2**20 else bytearray(size)


def _refcount(items: list, k: int) -> int:
    """References to ``items[k]``, as counted from here (see _BlockBuffers)."""
    return sys.getrefcount(items[k])


class _BlockBuffers:
    """Block-sized mappings reused from one block to the next.

    A fresh mapping per block pays its page faults and zeroing, and unmapping it again: ~1 s of
    system CPU per GB streamed, measured, as much as receiving the bytes. A returned buffer is
    reused only once nothing else refers to it: every view of a block (a memoryview, a numpy
    array over it, a chunk still queued for writing) holds a reference to the buffer it looks
    into, so a buffer whose count is back to the free list's own has no reader left. Buffers
    still referenced when asked for are skipped (and a fresh one mapped), never overwritten.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[mmap.mmap] = []
        self._alone = _refcount([object()], 0)  # the count of an object only the list refers to

    def take(self, size: int) -> bytearray | memoryview:
        """A writable buffer of ``size`` bytes: a view of a block-sized mapping, reused when one
        is free (else mapped afresh)."""
        if size > BLOCK_BYTES:
            return _buffer(size)
        with self._lock:
            for k in range(len(self._free)):
                if len(self._free[k]) == BLOCK_BYTES and _refcount(self._free, k) == self._alone:
                    return memoryview(self._free.pop(k))[:size]
        return memoryview(self._map())[:size]

    @staticmethod
    def _map() -> mmap.mmap:
        return mmap.mmap(-1, BLOCK_BYTES)

    def give(self, data: object) -> None:
        """Return a block's buffer (``take``'s view) once the block is dropped; readers may still
        hold views of it (then it waits in the list until they are gone)."""
        owner = data.obj if isinstance(data, memoryview) else None
        if isinstance(owner, mmap.mmap) and len(owner) == BLOCK_BYTES:
            with self._lock:
                # Kept: as many as the read-ahead budget holds (a smaller one while spooling).
                kept = (SPOOLING_READ_AHEAD_BYTES if _spooling else READ_AHEAD_BYTES) // BLOCK_BYTES
                self._free = [b for b in self._free if len(b) == BLOCK_BYTES][:kept]  # BLOCK_BYTES set anew (tests)
                if len(self._free) < kept:
                    self._free.append(owner)


_blocks = _BlockBuffers()


def _timeout() -> float:
    from huggingface_hub import constants

    return float(constants.HF_HUB_DOWNLOAD_TIMEOUT)


def _range_total(value: str | None) -> int | None:
    match = re.match(r"^bytes (\d+)-(\d+)/(\d+)$", (value or "").strip())
    return int(match[3]) if match else None


def _range_bounds(value: str | None) -> tuple[int | None, int]:
    """First and last byte of a Content-Range (None, -1 when it names none)."""
    match = re.match(r"^bytes (\d+)-(\d+)/", (value or "").strip())
    return (int(match[1]), int(match[2])) if match else (None, -1)


# -- stores: where a model's files are -------------------------------------------------------


class _Store:
    """A remote model folder: its file names (None when it cannot be listed), files whole,
    and weight files as blobs."""

    display: str

    def names(self) -> list[str] | None:
        raise NotImplementedError

    def fetch(self, name: str) -> bytes | None:
        """The whole file, or None when it does not exist."""
        raise NotImplementedError

    def blob(self, name: str) -> _Blob:
        raise NotImplementedError


class _HttpStore(_Store):
    def __init__(self, url_of: Callable[[str], str], headers: dict[str, str], display: str,
                 listing: list[str] | None) -> None:
        self.url_of, self.headers, self.display, self._listing = url_of, headers, display, listing

    def names(self) -> list[str] | None:
        return self._listing

    def fetch(self, name: str) -> bytes | None:
        from huggingface_hub.utils import hf_raise_for_status, http_backoff

        url = self.url_of(name)
        try:
            response = http_backoff("GET", url, headers=self.headers, timeout=_timeout(), max_retries=STAGING_RETRIES,
                                    base_wait_time=RETRY_WAIT_S)
            if response.status_code == 404:
                return None
            hf_raise_for_status(response)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{self.display}/{name}: {type(exc).__name__}: {first_line(exc)}") from None
        meter.add(len(response.content))
        return response.content

    def blob(self, name: str) -> _Blob:
        return _HttpBlob(self.url_of(name), self.headers, f"{self.display}/{name}")


class _FsspecStore(_Store):
    def __init__(self, url: str) -> None:
        import fsspec

        self.display = url.rstrip("/")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as exc:
            raise CheckpointError(f"{url}: cannot read this URL: {first_line(exc)}") from None
        self.root = self.root.rstrip("/")

    def names(self) -> list[str] | None:
        try:
            entries = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            raise CheckpointError(f"{self.display}: no such file or directory") from None
        except Exception as exc:
            raise CheckpointError(f"{self.display}: {type(exc).__name__}: {first_line(exc)}") from None
        return [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "file"]

    def fetch(self, name: str) -> bytes | None:
        try:
            data = self.fs.cat_file(f"{self.root}/{name}")
        except FileNotFoundError:
            return None
        meter.add(len(data))
        return data

    def blob(self, name: str) -> _Blob:
        return _FsspecBlob(self.fs, f"{self.root}/{name}", f"{self.display}/{name}")


# -- reading ahead ---------------------------------------------------------------------------


_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_held: dict[int, int] = {}  # id(read-ahead) -> bytes of blocks it holds, for the shared budget


def _fetcher() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="safeblend-fetch")
        return _pool


def block_starts(size: int, tensors: list[tuple[int, int]], block: int) -> list[int]:
    """Where a file's blocks start, for its tensors' byte ranges ``(start, end)``: no block is
    larger than ``block``; a tensor larger than that is cut into blocks from its own first byte,
    so the merge's chunks of it (``block`` bytes or a divisor of it, for the default chunk size)
    each lie in one block and are served without a copy; smaller tensors share blocks."""
    starts, current = [0], 0
    for start, end in sorted(tensors):
        if end - current <= block:
            continue  # fits in the current block
        if start > current:
            starts.append(start)  # a block of its own from its first byte
        current = start
        while end - current > block:
            current += block
            starts.append(current)
    return [s for s in starts if s < size]


class _ReadAhead:
    """One remote file's blocks (``block_starts``): fetched on demand and sequentially ahead of
    the latest read, up to this file's share of ``READ_AHEAD_BYTES``; dropped once wholly released."""

    def __init__(self, blob: _Blob, tensors: list[tuple[int, int]]) -> None:
        self.blob = blob
        self._lock = threading.Lock()
        self._blocks: dict[int, Future] = {}
        self._released: dict[int, int] = {}
        self._starts = block_starts(blob.size, tensors, BLOCK_BYTES)
        self._count = len(self._starts)

    def _block_of(self, offset: int) -> int:
        return bisect.bisect_right(self._starts, offset) - 1

    def _bounds(self, k: int) -> tuple[int, int]:
        return self._starts[k], self._starts[k + 1] if k + 1 < self._count else self.blob.size

    def read(self, start: int, length: int) -> memoryview:
        """Bytes [start, start + length) of the file, read-only (a block's own when one holds them)."""
        if length <= 0:
            return memoryview(b"")
        first, last = self._block_of(start), self._block_of(start + length - 1)
        with self._lock:
            futures = [self._want(k) for k in range(first, last + 1)]
            # Blocks far behind the one read now will not be read again (chunks start in order),
            # even where not every byte of them was released (the header's, a resume's skips).
            for old in [b for b in self._blocks if b < first - _BEHIND]:
                self._drop(old)
            self._ahead(last + 1)
        blocks = [f.result() for f in futures]
        if first == last:
            lo = start - self._starts[first]
            return memoryview(blocks[0])[lo : lo + length].toreadonly()
        out = _buffer(length)  # a read across blocks (a chunk larger than a block): copied
        pos = 0
        for k, data in zip(range(first, last + 1), blocks):
            a, b = self._bounds(k)
            lo, hi = max(start, a) - a, min(start + length, b) - a
            out[pos : pos + hi - lo] = memoryview(data)[lo:hi]
            pos += hi - lo
        return memoryview(out).toreadonly()

    def prefetch(self, start: int, length: int) -> None:
        if length > 0:
            first, last = self._block_of(start), self._block_of(start + length - 1)
            with self._lock:
                for k in range(first, last + 1):
                    self._want(k)
                self._ahead(last + 1)

    def release(self, start: int, length: int) -> None:
        if length <= 0:
            return
        first, last = self._block_of(start), self._block_of(start + length - 1)
        with self._lock:
            for k in range(first, last + 1):
                a, b = self._bounds(k)
                self._released[k] = self._released.get(k, 0) + min(start + length, b) - max(start, a)
                if self._released[k] >= b - a:
                    self._drop(k)

    def close(self) -> None:
        with self._lock:
            for k in list(self._blocks):
                self._blocks[k].cancel()
                self._drop(k)
            _held.pop(id(self), None)

    def _block_size(self, k: int) -> int:
        a, b = self._bounds(k)
        return b - a

    def _want(self, k: int) -> Future:
        future = self._blocks.get(k)
        if future is None:
            start, end = self._bounds(k)
            future = self._blocks[k] = _fetcher().submit(self.blob.read_block, start, end)
            self._released.pop(k, None)
            _held[id(self)] = _held.get(id(self), 0) + end - start
        return future

    def _drop(self, k: int) -> None:
        future = self._blocks.pop(k, None)
        if future is not None:
            _held[id(self)] = _held.get(id(self), 0) - self._block_size(k)
            if future.done() and not future.cancelled() and future.exception() is None:
                _blocks.give(future.result())
        self._released.pop(k, None)

    def _ahead(self, k: int) -> None:
        """Schedule blocks from ``k`` on while this file holds less than its share of the budget."""
        budget = SPOOLING_READ_AHEAD_BYTES if _spooling else READ_AHEAD_BYTES
        share = budget // max(1, sum(1 for held in list(_held.values()) if held > 0))  # list(): atomic
        while k < self._count and _held.get(id(self), 0) + self._block_size(k) <= share:
            self._want(k)
            k += 1


# -- spooling: a tensor read several times, fetched once -------------------------------------


_spooling = False  # whether a merge spools (the read-ahead budget: SPOOLING_READ_AHEAD_BYTES)


@contextmanager
def spool_in(checkpoints, directory: Path) -> Iterator[None]:
    """While inside, the remote files of ``checkpoints`` spool into ``directory`` (a folder on
    the output's file system); each file carries its own folder, so merges running in threads
    of one process never spool into each other's outputs."""
    global _spooling
    files = [f for ckpt in checkpoints for f in getattr(ckpt, "files", []) if isinstance(f, RemoteSafetensorsFile)]
    for f in files:
        f.spool_dir = directory
    try:
        yield
    finally:
        for f in files:
            f.spool_dir = None
        _spooling = False


@dataclass
class _Spool:
    """Bytes [start, end) of a remote file, in an unlinked local file mapped read-only.
    ``merged`` counts the bytes the merge pass released, once the reduce passes are done."""

    start: int
    end: int
    map: mmap.mmap
    merged: int | None = None

    def view(self, start: int, length: int) -> memoryview:
        return memoryview(self.map)[start - self.start : start - self.start + length]

    def release(self, start: int, length: int) -> None:
        """Drop the pages of a consumed range from the process (they stay in the page cache)."""
        lo = (start - self.start) // mmap.PAGESIZE * mmap.PAGESIZE
        hi = min(self.end - self.start, start - self.start + length)
        if hi > lo:
            self.map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def _spool(reader: "_ReadAhead", start: int, end: int, display: str, folder: Path | None) -> _Spool:
    """Fetch bytes [start, end) through ``reader`` (block by block, each released once written)
    into a file in ``folder`` (else the temporary folder) that is unlinked at once: nothing is
    left behind however the merge ends, and its space is freed when the last view of its mapping goes."""
    directory = folder if folder is not None else Path(tempfile.gettempdir())
    try:
        fd, path = tempfile.mkstemp(prefix=".safeblend-spool-", dir=directory)
    except OSError as exc:
        raise OutputError(f"{directory}: cannot create a spool file for {display}: {exc.strerror or exc}") from None
    try:
        os.unlink(path)
        pos = start
        while pos < end:
            k = reader._block_of(pos)
            n = min(end, reader._bounds(k)[1]) - pos
            data = reader.read(pos, n)
            done = 0
            while done < n:
                done += os.pwrite(fd, data[done:], pos - start + done)
            del data
            reader.release(pos, n)
            pos += n
        return _Spool(start, end, mmap.mmap(fd, end - start, prot=mmap.PROT_READ))
    except OSError as exc:
        from .writer import filesystem_of

        raise OutputError(f"{directory}: cannot spool {end - start} bytes of {display} on "
                          f"{filesystem_of(directory)}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def _kept(spools: list[_Spool], limit: int) -> list[_Spool]:
    """The newest spools that fit in ``limit`` bytes (the newest always)."""
    kept, total = [], 0
    for spool in reversed(spools):
        total += spool.end - spool.start
        if kept and total > limit:
            break
        kept.insert(0, spool)
    return kept


def spool_bytes(checkpoints) -> int:
    """Disk the spools of these checkpoints' remote files may take at once: SPOOLS_KEPT of the
    largest tensors of each (counted in the output's free-space check)."""
    total = 0
    for ckpt in checkpoints:
        for f in getattr(ckpt, "files", []):
            if isinstance(f, RemoteSafetensorsFile) and f.tensors:
                total += sum(sorted((t.nbytes for t in f.tensors.values()), reverse=True)[:SPOOLS_KEPT])
    return total


@dataclass
class RemoteSafetensorsFile(SafetensorsFile):
    """A safetensors file read by range requests; ``path`` is its local placeholder.

    A tensor that reduce passes read several times is first ``hold``-ed: fetched once into a
    spool (``_Spool``), from which every pass and the merge read it."""

    source: _Blob | None = field(default=None, repr=False)
    spool_dir: Path | None = field(default=None, repr=False)  # the merge's staging folder (spool_in)
    _reader: _ReadAhead | None = field(default=None, repr=False)
    _spools: list[_Spool] = field(default_factory=list, repr=False)
    _spool_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _ahead(self) -> _ReadAhead:
        with self._map_lock:
            if self._reader is None:
                assert self.source is not None
                self._reader = _ReadAhead(self.source, [(t.start, t.start + t.nbytes) for t in self.tensors.values()])
            return self._reader

    def hold(self, info: TensorInfo) -> None:
        """Spool ``info``'s bytes (before its reduce passes), unless a spool holds them already."""
        global _spooling
        _spooling = True
        start, end = info.start, info.start + info.nbytes
        with self._spool_lock:
            if end > start and self._spooled(start, end - start) is None:
                assert self.source is not None
                limit = sum(sorted((t.nbytes for t in self.tensors.values()), reverse=True)[:SPOOLS_KEPT])
                self._spools = _kept([*self._spools, _spool(self._ahead(), start, end, self.source.display, self.spool_dir)], limit)

    def passes_done(self, info: TensorInfo) -> None:
        """The reduce passes over ``info`` are done: its spool goes once the merge released it all."""
        with self._spool_lock:
            for spool in self._spools:
                if (spool.start, spool.end) == (info.start, info.start + info.nbytes):
                    spool.merged = 0

    def _spooled(self, start: int, length: int) -> _Spool | None:
        for spool in self._spools:  # a list replaced whole, never changed in place: no lock to read it
            if spool.start <= start and start + length <= spool.end:
                return spool
        return None

    def view(self, info: TensorInfo, first: int, count: int) -> np.ndarray:
        data = self.byte_view(info.start + first * info.dtype.itemsize, count * info.dtype.itemsize)
        return np.frombuffer(data, dtype=info.dtype.numpy, count=count)

    def byte_view(self, start: int, length: int) -> memoryview:
        spool = self._spooled(start, length)
        return spool.view(start, length) if spool is not None else self._ahead().read(start, length)

    def prefetch(self, start: int, length: int) -> None:
        if self._spooled(start, length) is None:
            self._ahead().prefetch(start, length)

    def release(self, start: int, length: int) -> None:
        spool = self._spooled(start, length)
        if spool is not None:
            spool.release(start, length)
            with self._spool_lock:
                if spool.merged is not None:
                    spool.merged += length
                    if spool.merged >= spool.end - spool.start:
                        self._spools = [s for s in self._spools if s is not spool]
        elif self._reader is not None:
            self._reader.release(start, length)

    def check_unchanged(self) -> None:
        assert self.source is not None
        self.source.check_unchanged()

    def close(self) -> None:
        with self._map_lock:
            reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()
        self._spools = []  # each spool's mapping goes with its last view


# -- staging ---------------------------------------------------------------------------------


def _quiet_retries() -> None:
    """huggingface_hub logs a warning per retry; a read that fails for good is one error line here."""
    logging.getLogger("huggingface_hub.utils._http").setLevel(logging.ERROR)


def stage_url(url: str, progress: bool) -> Path:
    """A local folder standing for the model at ``url`` (http(s):// or any fsspec URL): its
    non-weight files fetched, its weight files' headers read (see module doc)."""
    _quiet_retries()
    if url.startswith(("http://", "https://")):
        base = url.rstrip("/")
        if base.endswith(".safetensors"):  # one file: no folder around it
            folder, name = base.rsplit("/", 1)
            store = _HttpStore(lambda n: f"{folder}/{quote(n)}", {}, folder, [name])
            return _stage(store, url, progress, single=name)
        store = _HttpStore(lambda n: f"{base}/{quote(n)}", {}, base, None)
        return _stage(store, url, progress)
    store = _FsspecStore(url)
    if store.root.endswith(".safetensors"):
        name = store.root.rsplit("/", 1)[1]
        store.root, store.display = store.root.rsplit("/", 1)[0], store.display.rsplit("/", 1)[0]
        return _stage(store, url, progress, single=name)
    return _stage(store, url, progress)


def stage_repo(repo_id: str, revision: str, progress: bool) -> Path:
    """A local folder standing for Hub repo ``repo_id`` at ``revision``, pinned to the commit
    the revision names now (every file is read at that commit)."""
    from huggingface_hub import HfApi, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    _quiet_retries()
    info = HfApi().model_info(repo_id, revision=revision)
    commit = info.sha or revision
    names = [s.rfilename for s in info.siblings or []]
    store = _HttpStore(lambda n: hf_hub_url(repo_id, n, revision=commit), build_hf_headers(),
                       f"{repo_id}@{commit}", names)
    return _stage(store, f"{repo_id}@{commit}", progress)


def _stage(store: _Store, key: str, progress: bool, single: str | None = None) -> Path:
    folder = _stage_folder(key)
    names = store.names()
    weights, fetched = _plan_files(store, names, single)
    for name, data in fetched.items():
        _write_stable(folder / name, data)
    if not weights:
        raise CheckpointError(f"{store.display}: no safetensors weights found (model.safetensors, "
                              f"{INDEX_NAME} or an adapter's {ADAPTER_WEIGHTS})")
    blobs = list(_fetcher().map(store.blob, weights))  # headers read concurrently
    meter.start(sum(b.size for b in blobs), progress)
    for name, blob in zip(weights, blobs):
        _stand_in(folder / name, blob)
    for stale in set(os.listdir(folder)) - {*fetched, *weights, ".lock"}:  # from an earlier run, since changed
        if not stale.startswith("."):
            (folder / stale).unlink(missing_ok=True)
    return folder / single if single is not None else folder


def _plan_files(store: _Store, names: list[str] | None, single: str | None) -> tuple[list[str], dict[str, bytes]]:
    """The weight files to stream and the other files to fetch whole (name -> bytes)."""
    from .hub import _weight_files  # the same choice Checkpoint.open makes for a local folder

    if single is not None:
        return [single], {}
    if names is None:  # plain HTTP: no listing; ask for the names a model folder uses, concurrently
        asked = [INDEX_NAME, ADAPTER_CONFIG_NAME, *_literal_companions()]
        config = store.fetch("config.json")  # alone first: an unreachable server fails once
        fetched = {n: d for n, d in zip(asked, _fetcher().map(store.fetch, asked)) if d is not None}
        if config is not None:
            fetched["config.json"] = config
        if INDEX_NAME in fetched:
            return _index_shards(store, fetched[INDEX_NAME]), fetched
        if ADAPTER_CONFIG_NAME in fetched:
            return [ADAPTER_WEIGHTS], fetched
        return [SINGLE_NAME], fetched
    top = [n for n in names if "/" not in n]
    weights = _weight_files(top)
    wanted = [n for n in top if n == "config.json" or is_companion(n)]
    if weights == [INDEX_NAME] or weights[:1] == [ADAPTER_CONFIG_NAME]:
        wanted.append(weights.pop(0))
    fetched = {}
    for name, data in zip(wanted, _fetcher().map(store.fetch, wanted)):
        if data is None:
            raise CheckpointError(f"{store.display}/{name}: listed but cannot be fetched")
        fetched[name] = data
    if INDEX_NAME in fetched:
        weights = _index_shards(store, fetched[INDEX_NAME])
    return weights, fetched


def _literal_companions() -> list[str]:
    return [p for p in COMPANION_PATTERNS if "*" not in p and "?" not in p]


def _index_shards(store: _Store, data: bytes) -> list[str]:
    try:
        weight_map = json.loads(data.decode("utf-8"))["weight_map"]
        shards = list(dict.fromkeys(weight_map.values()))
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{store.display}/{INDEX_NAME}: cannot read index JSON ({exc})") from None
    for shard in shards:  # Checkpoint.open checks the rest; a shard must be a plain name to fetch it
        if not isinstance(shard, str) or "/" in shard or not shard.endswith(".safetensors") or shard in ("", ".."):
            raise CheckpointError(f"{store.display}/{INDEX_NAME}: names shard {shard!r}, which is not a plain "
                                  ".safetensors file name")
    return shards


def _stand_in(placeholder: Path, blob: _Blob) -> None:
    """Read ``blob``'s header and make ``placeholder`` stand for it (checkpoint.register_stand_in).

    The placeholder holds the file's identity (URL, size, tag), so that resume's fingerprint
    of the input folder changes when the remote file does."""
    prefix = blob._first if isinstance(blob, _HttpBlob) else blob.read(0, min(8, blob.size))
    if len(prefix) < 8:
        raise CheckpointError(f"{blob.display}: file is {blob.size} bytes, too short to be safetensors")
    (header_len,) = struct.unpack("<Q", bytes(prefix[:8]))
    if header_len > MAX_HEADER_BYTES or 8 + header_len > blob.size:
        raise CheckpointError(f"{blob.display}: header length {header_len} is implausible for a {blob.size}-byte "
                              "file; the file is corrupt or not safetensors")
    raw = bytes(blob.read(8, 8 + header_len))
    if isinstance(blob, _HttpBlob):
        blob.retries = RETRIES  # the merge's reads: a dropped connection is worth half a minute
    try:
        tensors, metadata = parse_safetensors_header(placeholder, raw, blob.size)
    except CheckpointError as exc:
        raise CheckpointError(str(exc).replace(str(placeholder), blob.display)) from None
    _write_stable(placeholder, json.dumps({"safeblend_stream": blob.display, "size": blob.size,
                                           "tag": blob.tag}).encode())

    def opener() -> SafetensorsFile:
        return RemoteSafetensorsFile(path=placeholder, size=blob.size, tensors=tensors, metadata=metadata,
                                     source=blob)

    register_stand_in(placeholder, opener)


_folders: dict[Path, int] = {}  # staged folders and the descriptors of their shared locks
_folders_lock = threading.Lock()


def _stage_folder(key: str) -> Path:
    """The local folder for one remote model: named after ``key``, the same on every run (a
    resumed merge's inputs must be the same paths); removed when the process exits, unless
    another process still uses it (each holds a shared lock on its ``.lock``)."""
    root = Path(tempfile.gettempdir()) / f"safeblend-stream-{os.getuid()}"
    root.mkdir(mode=0o700, exist_ok=True)
    if root.is_symlink() or root.stat().st_uid != os.getuid():
        raise CheckpointError(f"{root}: not a directory of this user's; cannot stage streamed inputs there")
    readable = re.sub(r"[^A-Za-z0-9._@-]+", "-", key.split("://", 1)[-1].replace("/", "--")).strip("-")[:80]
    folder = root / f"{readable}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    folder.mkdir(mode=0o700, exist_ok=True)
    with _folders_lock:  # inputs are staged concurrently (safeblend.hub)
        if folder not in _folders:
            lock = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(lock, fcntl.LOCK_SH)
            if not _folders:
                atexit.register(_remove_folders)
            _folders[folder] = lock
    return folder


def _remove_folders() -> None:
    meter.close()
    for folder, lock in _folders.items():
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # no other process stages from it
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            pass
        finally:
            os.close(lock)


def _write_stable(path: Path, data: bytes) -> None:
    """Write ``path`` (mode 0644) with a modification time that is a function of its bytes: the
    same remote file staged again looks unchanged to resume's fingerprint, a changed one does not."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temp, "wb") as handle:
        handle.write(data)
    os.chmod(temp, 0o644)
    stamp = int(hashlib.sha256(data).hexdigest()[:8], 16) * 10**9  # seconds since 1970: up to 2106
    os.utime(temp, ns=(stamp, stamp))
    os.replace(temp, path)


# -- network throughput on the terminal ------------------------------------------------------


class _Meter:
    """Bytes received from the network, as a progress bar (stderr) when one was asked for."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bar = None
        self.received = 0

    def start(self, total: int, enabled: bool) -> None:
        with self._lock:
            if not enabled:
                return
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1000, desc="network",
                                 file=sys.stderr, dynamic_ncols=True, position=1, leave=False, smoothing=0.1)
            self._bar.total += total
            self._bar.refresh()

    def add(self, n: int) -> None:
        with self._lock:
            self.received += n
            if self._bar is not None:
                self._bar.update(n)

    def close(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None


meter = _Meter()
