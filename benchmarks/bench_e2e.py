"""End to end: `safeblend merge --device cuda` against `--device cpu` on the same checkpoint.

Generates a Llama-shaped pair with safeblend.synthetic (once; reused from --work), reads it
into the page cache, then runs the CLI alternately on each device (so drift in the machine
hits both), and compares the outputs byte for byte. Wall time is the CLI's own ``seconds``
(merge start to output committed, fdatasync included) plus process start-up, measured here.

    python benchmarks/bench_e2e.py [--preset tinyllama-1.1b] [--repeats 2] [--out benchmarks/out]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from safeblend.synthetic import PRESETS, write_pair  # noqa: E402


def generate(work: Path, preset: str) -> tuple[Path, Path]:
    """The base/fine-tune pair for ``preset``, written once."""
    base, ft = work / preset / "base", work / preset / "ft"
    marker = work / preset / "complete"
    if not marker.exists():
        shutil.rmtree(work / preset, ignore_errors=True)
        started = time.perf_counter()
        write_pair(base, ft, PRESETS[preset], dtype="BF16")
        marker.write_text("ok\n")
        print(f"generated {preset} pair in {time.perf_counter() - started:.1f}s")
    return base, ft


def warm_page_cache(*directories: Path) -> int:
    """Read every file once so the merges start from the page cache; returns bytes read."""
    total = 0
    for directory in directories:
        for path in sorted(directory.iterdir()):
            with open(path, "rb", buffering=0) as handle:
                while chunk := handle.read(64 * 2**20):
                    total += len(chunk)
    return total


def merge(base: Path, ft: Path, out: Path, device: str) -> dict:
    """One CLI merge; the JSON summary plus the wall time including process start-up."""
    shutil.rmtree(out, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    command = [sys.executable, "-c", "from safeblend.cli import main; main()", "merge", str(base), str(ft),
               "-o", str(out), "--weight", "0.6", "--device", device, "--json", "--quiet"]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"--device {device} failed ({result.returncode}): {result.stderr.strip()}")
    summary = json.loads(result.stdout)
    summary["wall_s"] = round(wall, 3)
    return summary


def compare(a: Path, b: Path) -> dict:
    """Byte equality of every output file, and for unequal shards the count of differing bf16 words."""
    report = {"files": 0, "identical_files": 0, "differing_words": 0}
    for path in sorted(a.glob("*.safetensors")):
        other = b / path.name
        report["files"] += 1
        x = np.memmap(path, dtype=np.uint8, mode="r")
        y = np.memmap(other, dtype=np.uint8, mode="r")
        if x.shape == y.shape and np.array_equal(x, y):
            report["identical_files"] += 1
        elif x.shape == y.shape and x.size % 2 == 0:
            report["differing_words"] += int(np.count_nonzero(x.view(np.uint16) != y.view(np.uint16)))
        else:
            report["differing_words"] = -1
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tinyllama-1.1b", choices=sorted(PRESETS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", default=os.environ.get("BENCH_WORK", "/tmp/safeblend-bench"))
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    args = parser.parse_args()
    work = Path(args.work)
    base, ft = generate(work, args.preset)
    print(f"page cache: read {warm_page_cache(base, ft) / 1e9:.2f} GB of inputs")
    runs: dict[str, list[dict]] = {"cpu": [], "cuda": []}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i in range(args.repeats):
        for device in (("cpu", "cuda") if i % 2 == 0 else ("cuda", "cpu")):
            try:
                summary = merge(base, ft, work / f"out-{device}", device)
            except RuntimeError as exc:
                print(f"run {i + 1}: {exc}", file=sys.stderr)
                (out_dir / "bench_e2e.json").write_text(json.dumps({"preset": args.preset, "runs": runs,
                                                                     "error": str(exc)}, indent=2) + "\n")
                return 1
            runs[device].append(summary)
            print(f"run {i + 1} --device {device}: {summary['wall_s']:.2f}s wall, merge {summary['seconds']:.2f}s, "
                  f"peak RSS {summary['peak_rss_bytes'] / 2**20:.0f} MiB, device={summary['device']}")
    equality = compare(work / "out-cuda", work / "out-cpu")
    table = []
    for device, items in runs.items():
        table.append({
            "device": device,
            "reported_device": items[-1]["device"],
            "median_wall_s": statistics.median(x["wall_s"] for x in items),
            "median_merge_s": statistics.median(x["seconds"] for x in items),
            "throughput_gbps": round(statistics.median(x["throughput_bytes_per_s"] for x in items) / 1e9, 2),
            "peak_rss_mib": round(max(x["peak_rss_bytes"] for x in items) / 2**20),
        })
    print(f"\n{args.preset}: {runs['cpu'][0]['bytes_read'] / 1e9:.2f} GB read, "
          f"{runs['cpu'][0]['bytes_written'] / 1e9:.2f} GB written")
    print(f"{'device':8} {'wall s':>8} {'merge s':>8} {'GB/s':>7} {'peak RSS MiB':>13}")
    for item in table:
        print(f"{item['device']:8} {item['median_wall_s']:>8.2f} {item['median_merge_s']:>8.2f} "
              f"{item['throughput_gbps']:>7.2f} {item['peak_rss_mib']:>13}")
    cpu, cuda = table
    faster = cuda["median_wall_s"] <= cpu["median_wall_s"]
    print(f"cuda/cpu wall time: {cuda['median_wall_s'] / cpu['median_wall_s']:.2f} "
          f"({'meets' if faster else 'MISSES'} the 'not slower than CPU' target); "
          f"cuda RSS {'within' if cuda['peak_rss_mib'] <= 1024 else 'ABOVE'} 1 GiB")
    print(f"outputs: {equality['identical_files']}/{equality['files']} shard files byte-identical, "
          f"{equality['differing_words']} differing 16-bit words")
    (out_dir / "bench_e2e.json").write_text(json.dumps(
        {"preset": args.preset, "table": table, "runs": runs, "equality": equality}, indent=2) + "\n")
    ok = faster and cuda["reported_device"] == "cuda" and equality["identical_files"] == equality["files"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
