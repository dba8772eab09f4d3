"""Peak RSS against model size: safeblend, mergekit and the naive script, and the plot for README.

Runs ``compare.py``'s linear merge (safeblend, mergekit, naive where it fits in RAM) on
TinyLlama-shaped bf16 pairs with 3, 22 and 88 layers (0.26B, 1.10B, 4.0B parameters — the
tensor shapes stay TinyLlama's, only the model grows), median of ``--runs`` each, alternating
order, deleting each pair before the next is generated. Writes the figures to
benchmarks/out/results/memory_sweep.json and the plot to benchmarks/memory.png; with
``--with-70b JSON`` (bench_70b.py's ``--json-out``) the 70B-shaped run is drawn too.

    python benchmarks/memory_sweep.py --runs 3 --with-70b benchmarks/out/results/bench70b.json
    python benchmarks/memory_sweep.py --plot-only --with-70b benchmarks/out/results/bench70b.json
    python benchmarks/memory_sweep.py --reuse benchmarks/out/results/compare-1.1b.json   # reuse a 1.1B run
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import compare  # noqa: E402

TOOLS = ("safeblend", "mergekit", "naive")
STYLE = {"safeblend": ("tab:green", "o"), "mergekit": ("tab:red", "s"), "naive": ("tab:gray", "^")}


def sweep(layer_counts: list[int], runs: int, reuse: list[Path], commit: str | None) -> list[dict]:
    reused = {}
    for path in reuse:
        r = json.loads(path.read_text())
        reused[(r["preset"], r["layers"])] = r
    points = []
    for layers in layer_counts:
        key = ("tinyllama-1.1b", layers)
        if key in reused:
            print(f"{layers} layers: reusing {key} from a compare.py run", file=sys.stderr)
            result = reused[key]
        else:
            argv = ["--layers", str(layers), "--runs", str(runs), "--methods", "linear",
                    "--mergekit-methods", "linear", "--peers", "mergekit,naive", "--no-check"]
            if commit:
                argv += ["--safeblend-commit", commit]
            result = compare.run(compare.parser().parse_args(argv))
            print(compare.format_table(result))
        point = {"layers": layers, "parameters": result["parameters"], "model_bytes": result["output_bytes"],
                 "runs": result["runs"], "notes": result["notes"]}
        for row in result["rows"]:
            if row["method"] == "linear" and row["tool"] in TOOLS:
                point[row["tool"]] = {"peak_rss_bytes": row["peak_rss_bytes"], "median_s": row["median_s"],
                                      "rss": row["rss"]}
        points.append(point)
    return points


def plot(points: list[dict], seventy: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import matplotlib.ticker  # noqa: F401

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    xs = [p["parameters"] / 1e9 for p in points]
    ax.plot(xs, [p["model_bytes"] / 2**30 for p in points], ls=":", color="black", lw=1,
            label="one model's size (bf16)")
    for tool in TOOLS:
        pts = [(p["parameters"] / 1e9, p[tool]["peak_rss_bytes"] / 2**30) for p in points if tool in p]
        if pts:
            color, marker = STYLE[tool]
            ax.plot(*zip(*pts), marker=marker, color=color, label=tool if tool != "naive" else "naive (torch load/save)")
    x = y = 0.0
    if seventy:
        x = seventy["parameters"] / 1e9
        y = seventy["rows"]["safeblend linear"]["peak_rss_bytes"] / 2**30
        ax.plot([x], [y], marker="*", ms=12, color="tab:green", ls="none",
                label=f"safeblend, Llama-3-70B shapes ({seventy['layers']} of 80 layers)")
    ax.set_xscale("log")
    ticks = [0.25, 0.5, 1, 2, 4, 8]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}B" for t in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    for p in points:  # label safeblend's points with their MiB
        if "safeblend" in p:
            ax.annotate(f"{p['safeblend']['peak_rss_bytes'] / 2**20:.0f} MiB", (p["parameters"] / 1e9,
                        p["safeblend"]["peak_rss_bytes"] / 2**30), textcoords="offset points", xytext=(0, 7),
                        ha="center", fontsize=7, color="tab:green")
    if seventy:
        ax.annotate(f"{y * 1024:.0f} MiB", (x, y), textcoords="offset points", xytext=(0, 9), ha="center",
                    fontsize=7, color="tab:green")
    ax.set_xlabel("parameters per model (bf16; each merge reads two models and writes one)")
    ax.set_ylabel("peak RSS (GiB)")
    ax.set_title("Peak memory of a linear merge against model size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}", file=sys.stderr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="3,22,88", help="TinyLlama-shaped layer counts")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--reuse", type=Path, action="append", default=[], help="compare.py --json-out results to reuse")
    p.add_argument("--with-70b", type=Path, default=None, help="bench_70b.py --json-out results to draw")
    p.add_argument("--safeblend-commit", default=None)
    p.add_argument("--results", type=Path, default=REPO / "benchmarks/out/results/memory_sweep.json")
    p.add_argument("--plot", type=Path, default=REPO / "benchmarks/memory.png")
    p.add_argument("--plot-only", action="store_true", help="redraw from --results")
    args = p.parse_args()

    if args.plot_only:
        points = json.loads(args.results.read_text())
    else:
        points = sweep([int(x) for x in args.layers.split(",")], args.runs, args.reuse, args.safeblend_commit)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(points, indent=2))
    seventy = json.loads(args.with_70b.read_text()) if args.with_70b and args.with_70b.exists() else None
    print("| parameters | " + " | ".join(f"{t} peak RSS MiB" for t in TOOLS) + " |")
    print("|---:|" + "---:|" * len(TOOLS))
    for pt in points:
        cells = [f"{pt[t]['peak_rss_bytes'] / 2**20:.0f}" if t in pt else "–" for t in TOOLS]
        print(f"| {pt['parameters'] / 1e9:.2f}B ({pt['layers']} layers) | " + " | ".join(cells) + " |")
    if seventy:
        r = seventy["rows"]["safeblend linear"]["peak_rss_bytes"]
        print(f"| {seventy['parameters'] / 1e9:.2f}B (Llama-3-70B shapes, {seventy['layers']} layers) | {r / 2**20:.0f} | – | – |")
    sb = [pt["safeblend"]["peak_rss_bytes"] for pt in points if "safeblend" in pt]
    if seventy:
        sb.append(seventy["rows"]["safeblend linear"]["peak_rss_bytes"])
    if sb:
        print(f"safeblend peak RSS spread: max/min = {max(sb) / min(sb):.2f} (target ≤ 1.10)")
    plot(points, seventy, args.plot)


if __name__ == "__main__":
    main()
