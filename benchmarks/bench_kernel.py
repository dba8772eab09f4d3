"""Achieved bandwidth of the Triton merge kernels against a device-to-device copy.

Both are measured the same way: CUDA events around each call, warm-up first, bytes read plus
bytes written divided by the median time; inputs are fresh random values (never zeros, which
some memory systems compress). The copy is ``torch``'s device-to-device ``copy_`` of a buffer
as large as the kernel's inputs together. Needs a CUDA GPU.

    python benchmarks/bench_kernel.py [--size-mib 512] [--out benchmarks/out]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

import torch  # noqa: E402
import triton  # noqa: E402

from safeblend.kernels import triton_backend as tb  # noqa: E402

TARGET_FRACTION = 0.85  # issue target: kernel ≥ 85% of the measured copy bandwidth
SWEEP = [(1024, 4), (2048, 4), (2048, 8), (4096, 4), (4096, 8), (8192, 8), (8192, 16), (16384, 16)]


def time_ms(fn: Callable[[], object], warmup: int, reps: int) -> list[float]:
    """Milliseconds per call, measured with CUDA events, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def row(what: str, provider: str, nbytes: int, times: list[float], **extra) -> dict:
    """One comparable result row; GB/s from the median (p20/p80 give the spread)."""
    med = statistics.median(times)
    return {
        "what": what, "provider": provider, "bytes_moved": nbytes,
        "median_ms": round(med, 4), "p20_ms": round(quantile(times, 0.2), 4), "p80_ms": round(quantile(times, 0.8), 4),
        "gbps": round(nbytes / (med * 1e-3) / 1e9, 1),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__, **extra,
    }


def random_tensor(n: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(n, device="cuda", dtype=torch.float32).to(dtype)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=512, help="bytes per bf16 input (default 512 MiB)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=25)
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    parser.add_argument("--no-sweep", action="store_true", help="skip the BLOCK_SIZE/num_warps sweep")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_kernel: no CUDA GPU visible to torch", file=sys.stderr)
        return 2
    n = args.size_mib * 2**20 // 2  # bf16 elements per input
    rows: list[dict] = []
    w, r = args.warmup, args.reps

    # The yardstick: a device-to-device copy as large as the kernel's two inputs together.
    src = random_tensor(2 * n, torch.bfloat16)
    dst = torch.empty_like(src)
    copy_bytes = 2 * src.numel() * src.element_size()
    rows.append(row("d2d copy", "torch.copy_", copy_bytes, time_ms(lambda: dst.copy_(src), w, r)))
    del src, dst

    base, ft = random_tensor(n, torch.bfloat16), random_tensor(n, torch.bfloat16)
    out = torch.empty_like(base)
    lerp_bytes = 3 * n * 2
    block, warps = tb.launch_settings(n)
    rows.append(row("lerp bf16,bf16->bf16", "triton (default)", lerp_bytes,
                    time_ms(lambda: tb.lerp(base, ft, 0.6, out), w, r), block=block, num_warps=warps))
    rows.append(row("lerp bf16,bf16->bf16", "torch.lerp (unfused ref)", lerp_bytes,
                    time_ms(lambda: torch.lerp(base.float(), ft.float(), 0.6).to(torch.bfloat16), w, r)))
    if not args.no_sweep:
        for block, warps in SWEEP:
            rows.append(row("lerp bf16,bf16->bf16", "triton sweep", lerp_bytes,
                            time_ms(lambda: tb.lerp(base, ft, 0.6, out, block_size=block, num_warps=warps), w, r),
                            block=block, num_warps=warps))
    ft32 = random_tensor(n, torch.float32)
    rows.append(row("lerp bf16,fp32->bf16", "triton (default)", n * (2 + 4 + 2),
                    time_ms(lambda: tb.lerp(base, ft32, 0.6, out), w, r)))
    out16 = torch.empty(n, dtype=torch.float16, device="cuda")
    rows.append(row("lerp bf16,bf16->fp16", "triton (default)", lerp_bytes,
                    time_ms(lambda: tb.lerp(base, ft, 0.6, out16), w, r)))
    del ft32, out16
    models = [ft, random_tensor(n, torch.bfloat16), random_tensor(n, torch.bfloat16)]
    rows.append(row("3-model delta sum bf16", "triton (default)", 5 * n * 2,
                    time_ms(lambda: tb.weighted_delta_sum(base, models, [0.3, 0.3, 0.2], out), w, r)))

    copy_gbps = rows[0]["gbps"]
    for item in rows:
        item["fraction_of_copy"] = round(item["gbps"] / copy_gbps, 3)
    print(f"{'what':26} {'provider':26} {'block':>6} {'warps':>5} {'median ms':>10} {'GB/s':>8} {'of copy':>8}")
    for item in rows:
        print(f"{item['what']:26} {item['provider']:26} {item.get('block', ''):>6} {item.get('num_warps', ''):>5} "
              f"{item['median_ms']:>10.3f} {item['gbps']:>8.1f} {item['fraction_of_copy']:>8.1%}")
    default = rows[1]
    best = max((x for x in rows if x["provider"].startswith("triton") and x["what"] == default["what"]),
               key=lambda x: x["gbps"])
    verdict = "meets" if default["fraction_of_copy"] >= TARGET_FRACTION else "MISSES"
    print(f"\nlerp bf16 default ({default['block']}, {default['num_warps']} warps): "
          f"{default['fraction_of_copy']:.1%} of copy bandwidth ({default['gbps']} vs {copy_gbps} GB/s) "
          f"-> {verdict} the {TARGET_FRACTION:.0%} target")
    print(f"best lerp setting: block {best.get('block')}, {best.get('num_warps')} warps, {best['gbps']} GB/s")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_kernel.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if verdict == "meets" else 1


if __name__ == "__main__":
    sys.exit(main())
