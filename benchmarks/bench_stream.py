"""A streamed merge against a plain download of the same inputs, over a throttled loopback link.

Generates a Llama-shaped bf16 pair (``safeblend.synthetic.write_pair``; ~0.36 GB together by
default) and serves both folders from a small HTTP server on 127.0.0.1 that answers range
requests and sends every body through one shared token bucket of RATE bytes/s (a link of
that speed, whatever the number of connections). Then alternates, run after run, at each
rate:

* download: ``curl`` fetching every file of both inputs to disk, one after the other (a plain
            client: what a user runs before a merge today)
* stream:   ``safeblend merge URL_BASE URL_FT -o OUT --weight 0.6`` (inputs read by range
            requests, only the output written), under ``/usr/bin/time -v``

and prints medians (p20/p80) of wall time, the merge's peak RSS, and the disk it used: the
output's size, and the most the process's staging folder (config, tokenizer and placeholder
files; safeblend.remote) held while sampled every 20 ms.

    python benchmarks/bench_stream.py --runs 3                   # 100 and 500 MB/s
    python benchmarks/bench_stream.py --runs 1 --rates 100 --layers 2
    python benchmarks/bench_stream.py --runs 3 --local --baseline /tmp/old   # + local merge, older code
    python benchmarks/bench_stream.py --runs 1 --rates 100 --methods ties,slerp --baseline /tmp/old
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import quantiles, safeblend_command  # noqa: E402

from safeblend.synthetic import LlamaShape, write_pair  # noqa: E402

SHAPE = LlamaShape(1024, 2816, 5, 16000, 16, 4)  # ~89M parameters, 178 MB per model in bf16


class Link:
    """One token bucket shared by every connection: bytes leave at ``rate`` per second, with a
    burst of ``BURST`` bytes, so a sender that comes back a little late (its own write, a
    sleep that overshot) catches up instead of losing link time: one connection can fill the
    link as well as several (without it, curl's single connection got ~80% of 500 MB/s)."""

    BURST = 2**20

    def __init__(self, rate: float) -> None:
        self.rate, self._lock, self._free_at = rate, threading.Lock(), 0.0
        self.sent = 0  # bytes of bodies sent

    def send(self, n: int) -> None:
        with self._lock:
            self.sent += n
            now = time.perf_counter()
            self._free_at = max(self._free_at, now - self.BURST / self.rate) + n / self.rate
            wait = self._free_at - now
        if wait > 0:
            time.sleep(wait)


def serve(root: Path, link: Link) -> ThreadingHTTPServer:
    """Files under ``root`` at ``/path``: whole (200) or by ``Range: bytes=a-b`` (206), throttled."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def setup(self) -> None:
            super().setup()  # headers and body go in separate writes: without NODELAY, Nagle's
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # 40 ms stalls

        def do_GET(self) -> None:
            path = root / self.path.lstrip("/")
            if not path.is_file():
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            size = path.stat().st_size
            first, last = 0, size - 1
            if "Range" in self.headers:
                a, b = self.headers["Range"].removeprefix("bytes=").split("-")
                first, last = int(a), min(int(b) if b else size - 1, size - 1)
                if first >= size:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
            else:
                self.send_response(200)
            self.send_header("ETag", f'"{path.stat().st_mtime_ns}-{size}"')
            self.send_header("Content-Length", str(last - first + 1))
            self.end_headers()
            with open(path, "rb") as handle:  # sendfile: the server's own CPU stays small beside the client's
                pos, step = first, 256 * 2**10
                while pos <= last:
                    n = min(step, last + 1 - pos)
                    link.send(n)
                    end = pos + n
                    while pos < end:
                        pos += os.sendfile(self.connection.fileno(), handle.fileno(), pos, end - pos)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _q(values: list[float]) -> str:
    median, p20, p80 = quantiles(values)
    return f"{median:.2f} ({p20:.2f}–{p80:.2f})"


def folder_bytes(folder: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                pass
    return total


def sampled_peak(folder: Path, stop: threading.Event, peak: list[int]) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], folder_bytes(folder))
        time.sleep(0.02)


def timed_merge(cmd: list[str], env: dict[str, str] | None) -> tuple[float, int, float, float]:
    """(wall s, peak RSS bytes, user CPU s, system CPU s) of one command under ``/usr/bin/time -v``."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")

    def field(label: str) -> float:
        return float(re.search(rf"{re.escape(label)}: ([\d.]+)", proc.stderr).group(1))

    return wall, int(field("Maximum resident set size (kbytes)")) * 1024, field("User time (seconds)"), \
        field("System time (seconds)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rates", default="100,500", help="link speeds in MB/s (10^6 bytes)")
    parser.add_argument("--layers", type=int, default=SHAPE.num_hidden_layers)
    parser.add_argument("--work", type=Path, default=Path("benchmarks/out/stream"))
    parser.add_argument("--baseline", type=Path, metavar="DIR",
                        help="also time the merge with PYTHONPATH=DIR (a copy of an older safeblend package, "
                             "e.g. `git archive OLD engine kernels`, engine/ renamed safeblend/ and kernels/ "
                             "moved into it), paired run by run")
    parser.add_argument("--methods", default="",
                        help="also merge with these methods (e.g. ties,slerp; ties at density 0.3) and report the "
                             "bytes the server sent per byte of weights: reduce passes read a tensor several times")
    parser.add_argument("--local", action="store_true",
                        help="also time the same merge from the local files (page cache warm): the floor")
    args = parser.parse_args()

    shape = LlamaShape(**{**SHAPE.__dict__, "num_hidden_layers": args.layers})
    models = args.work / f"models-{args.layers}"
    if not (models / "ft" / "config.json").exists():
        shutil.rmtree(models, ignore_errors=True)
        write_pair(models / "base", models / "ft", shape, shard_size=10**8)
    files = sorted(p.relative_to(models) for p in models.rglob("*") if p.is_file())
    inputs = sum((models / f).stat().st_size for f in files)
    staging = Path(tempfile.gettempdir()) / f"safeblend-stream-{os.getuid()}"
    safeblend = safeblend_command()
    variants = {"merge": None}
    if args.baseline is not None:
        variants["baseline"] = {**os.environ, "PYTHONPATH": str(args.baseline.resolve())}
    if args.local:
        variants["local"] = None  # the same merge from the files on disk: the merge's own cost
    print(f"{shape.parameters / 1e6:.0f}M parameters per model, inputs {inputs / 1e9:.3f} GB "
          f"({len(files)} files), {args.runs} runs per rate, load average {os.getloadavg()[0]:.2f} at start")
    print("| rate MB/s | variant | link time s | download s | streamed merge s | merge / download | "
          "CPU user s/GB | CPU sys s/GB | peak RSS MiB | output GB | staging peak KiB |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    weights = sum((models / f).stat().st_size for f in files if str(f).endswith(".safetensors"))
    for rate in (float(r) for r in args.rates.split(",")):
        link = Link(rate * 1e6)
        server = serve(models, link)
        url = f"http://127.0.0.1:{server.server_address[1]}"
        download: list[float] = []
        runs: dict[str, list[tuple[float, int, float, float]]] = {name: [] for name in variants}
        staged: list[int] = []
        out = args.work / "merged"
        fetched = args.work / "downloaded"
        try:
            for run in range(args.runs):
                shutil.rmtree(fetched, ignore_errors=True)
                fetched.mkdir(parents=True)
                curl = ["curl", "-sf"]
                for f in files:
                    curl += ["-o", str(fetched / str(f).replace("/", "--")), f"{url}/{f}"]
                start = time.perf_counter()
                subprocess.run(curl, check=True)
                download.append(time.perf_counter() - start)
                shutil.rmtree(fetched)

                order = list(variants) if run % 2 == 0 else list(reversed(variants))  # paired, alternating
                for name in order:
                    shutil.rmtree(out, ignore_errors=True)
                    stop, peak = threading.Event(), [0]
                    sampler = threading.Thread(target=sampled_peak, args=(staging, stop, peak))
                    sampler.start()
                    where = str(models) if name == "local" else url
                    runs[name].append(timed_merge([safeblend, "merge", f"{where}/base", f"{where}/ft", "-o", str(out),
                                                   "--weight", "0.6", "-q"], variants[name]))
                    stop.set()
                    sampler.join()
                    staged.append(peak[0])
            written = folder_bytes(out)
            for method in filter(None, args.methods.split(",")):
                extra = ["--density", "0.3"] if method in ("ties", "dare-ties", "della", "breadcrumbs-ties") else []
                for name in variants:
                    if name == "local":
                        continue
                    shutil.rmtree(out, ignore_errors=True)
                    before = link.sent
                    wall, peak_rss, _, _ = timed_merge([safeblend, "merge", f"{url}/base", f"{url}/ft", "-o", str(out),
                                                       "--method", method, "--weight", "0.6", *extra, "-q"],
                                                      variants[name])
                    print(f"  {rate:.0f} MB/s {method} ({name}): {(link.sent - before) / weights:.2f}x the weights' "
                          f"bytes sent, {wall:.2f} s, peak RSS {peak_rss / 2**20:.0f} MiB", flush=True)
        finally:
            server.shutdown()
            server.server_close()
        d = statistics.median(download)
        for name, results in runs.items():
            wall, rss, user, system = ([r[i] for r in results] for i in range(4))
            m = statistics.median(wall)
            print(f"| {rate:.0f} | {name} | {inputs / (rate * 1e6):.2f} | {_q(download)} | {_q(wall)} | {m / d:.2f}× | "
                  f"{statistics.median(user) / (inputs / 1e9):.2f} | {statistics.median(system) / (inputs / 1e9):.2f} | "
                  f"{statistics.median(rss) / 2**20:.0f} (max {max(rss) / 2**20:.0f}) | {written / 1e9:.3f} | "
                  f"{max(staged) / 1024:.0f} |", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
