"""CPU per GB of HTTP range reads into reused 8 MiB buffers, by client, on loopback.

The server is bench_stream.py's (range requests, ``sendfile``), unthrottled, in a child process
so that only the client's CPU is counted. Each client reads a 256 MiB file in 8 MiB ranges on
four threads (as safeblend.remote's fetch pool does), each body into a block-sized mapping
reused by its thread, and reports wall time and user/system CPU seconds per GB:

* httpx2-iter:      huggingface_hub's ``http_stream_backoff`` and ``response.iter_bytes()``, each
                    piece copied into the buffer (safeblend.remote before urllib3)
* urllib3-readinto: a ``PoolManager``; ``HTTPResponse.readinto`` 1 MiB at a time (safeblend.remote)
* urllib3-whole:    the same, one ``readinto`` of the whole 8 MiB
* http.client:      the standard library's ``HTTPResponse.readinto`` on a connection per thread
                    (no copy beyond the kernel's: the floor)

    python benchmarks/bench_transport.py --repeats 3
"""

from __future__ import annotations

import argparse
import http.client
import mmap
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SIZE, BLOCK, THREADS = 256 * 2**20, 8 * 2**20, 4


def _serve(root: str, port: "multiprocessing.Value") -> None:
    from bench_stream import Link, serve

    server = serve(Path(root), Link(1e12))
    port.value = server.server_address[1]
    threading.Event().wait()


def _read(client: str, port: int) -> tuple[float, float, float]:
    """(wall s, user CPU s, system CPU s) of reading the file once with ``client``."""
    url, local, buffers = f"http://127.0.0.1:{port}/blob", threading.local(), []
    if client.startswith("urllib3"):
        import urllib3

        pool = urllib3.PoolManager(maxsize=THREADS)
    step = BLOCK if client == "urllib3-whole" else 2**20

    def fetch(start: int) -> int:
        if not hasattr(local, "out"):
            local.out = memoryview(mmap.mmap(-1, BLOCK))
            buffers.append(local.out)
        out, got, headers = local.out, 0, {"Range": f"bytes={start}-{start + BLOCK - 1}"}
        if client == "httpx2-iter":
            from huggingface_hub.utils import http_stream_backoff

            with http_stream_backoff("GET", url, headers=headers, timeout=10) as response:
                for piece in response.iter_bytes():
                    out[got : got + len(piece)] = piece
                    got += len(piece)
        elif client.startswith("urllib3"):
            response = pool.urlopen("GET", url, headers=headers, preload_content=False, decode_content=False)
            while got < BLOCK and (n := response.readinto(out[got : got + step])):
                got += n
            response.release_conn()
        else:
            if not hasattr(local, "conn"):
                local.conn = http.client.HTTPConnection("127.0.0.1", port)
            local.conn.request("GET", "/blob", headers=headers)
            response = local.conn.getresponse()
            while got < BLOCK and (n := response.readinto(out[got:])):
                got += n
            response.read()
        assert got == BLOCK, (client, got)
        return got

    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    with ThreadPoolExecutor(THREADS) as pool_:
        assert sum(pool_.map(fetch, range(0, SIZE, BLOCK))) == SIZE
    after = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter() - start, after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    clients = ["httpx2-iter", "urllib3-readinto", "urllib3-whole", "http.client"]
    with tempfile.TemporaryDirectory() as root:
        Path(root, "blob").write_bytes(os.urandom(SIZE))
        port = multiprocessing.Value("i", 0)
        server = multiprocessing.Process(target=_serve, args=(root, port), daemon=True)
        server.start()
        while not port.value:
            time.sleep(0.05)
        results: dict[str, list[tuple[float, float, float]]] = {c: [] for c in clients}
        try:
            for _ in range(args.repeats):  # interleaved, so that load changes touch every client alike
                for client in clients:
                    results[client].append(_read(client, port.value))
        finally:
            server.terminate()
    gb = SIZE / 1e9
    print(f"{args.repeats} reads of {SIZE / 2**20:.0f} MiB per client; load average {os.getloadavg()[0]:.2f} at end")
    print("| client | wall s | CPU user s/GB | CPU sys s/GB | CPU total s/GB |\n|---|---:|---:|---:|---:|")
    for client, runs in results.items():
        wall, user, system = (statistics.median(r[i] for r in runs) for i in range(3))
        total = statistics.median((r[1] + r[2]) / gb for r in runs)
        print(f"| {client} | {wall:.2f} | {user / gb:.2f} | {system / gb:.2f} | {total:.2f} |")


if __name__ == "__main__":
    main()
