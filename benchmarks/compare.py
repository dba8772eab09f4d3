"""safeblend against the tools a user would pick instead: mergekit, the naive script, the floor.

On one generated Llama-shaped bf16 pair (TinyLlama-1.1B shapes by default; ``--preset`` and
``--layers`` change the size), in one session, with the page cache warmed and the order of the
contestants reversed on every other run, times each of:

* ``safeblend``  ``safeblend merge BASE FT -o OUT --device cpu`` for every method the installed
                 safeblend offers (Model Stock needs two fine-tunes; the pair has one, so it is
                 skipped with a note);
* ``mergekit``   ``mergekit-yaml RECIPE OUT`` (mergekit from PyPI, in its own virtual
                 environment, created by this script under benchmarks/out/mergekit-venv) with
                 the equivalent recipe for linear, slerp, ties and dare_ties (dare_linear on
                 request), computing in float32 and writing bfloat16, as safeblend does;
* ``naive``      a short script: both checkpoints loaded whole with ``safetensors.torch``,
                 merged in float32 tensor by tensor into a new state dict, saved in 5 GB shards
                 with an index (run by this Python in a subprocess);
* ``floor``      the same bytes read and written by plain file copies: ``cat`` both inputs to
                 /dev/null, ``cp`` the base's shards, ``sync`` them.

safeblend flushes its output to disk (fdatasync) before it reports success; mergekit and the
naive script do not, so their timed command ends with ``sync`` of the files they wrote, as the
floor's does. Every command runs under ``/usr/bin/time -v`` for its peak RSS (the largest
process in it). Throughput is (bytes of both inputs + bytes of the output) / wall time.

After timing, the outputs of the last linear and slerp runs of safeblend and mergekit are
compared tensor by tensor, a row block at a time, with the tolerance rule (safeblend.tolerance)
(``safeblend.tolerance.out_of_tolerance``, mergekit's value as the reference and the larger input
magnitude at each element for the cancellation term), and each against a float64 reference
computed here from the inputs. (On the 1.1B pair the check takes ~3 minutes per method.)

The working tree may change under a long run (other sessions commit while it runs);
``--safeblend-commit REV`` runs safeblend from a ``git archive`` snapshot of REV instead, so
every row comes from one version.

    python benchmarks/compare.py                              # 1.1B pair, 3 runs, everything
    python benchmarks/compare.py --safeblend-commit HEAD      # the same, pinned to HEAD
    python benchmarks/compare.py --layers 3 --runs 3          # ~0.26B pair
    python benchmarks/compare.py --methods linear --mergekit-methods linear --peers naive,floor
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import ml_dtypes  # noqa: E402,F401  (safetensors.numpy reads BF16 only once ml_dtypes is imported)
import numpy as np  # noqa: E402

from safeblend.synthetic import PRESETS, LlamaShape, write_pair  # noqa: E402
from measure import add_warm_memory_option, quantiles, timed, warm_free_memory  # noqa: E402

WEIGHT = 0.6  # λ for linear, t for slerp, the fine-tune's weight for task arithmetic
DENSITY = 0.5  # ties and DARE
MERGEKIT_VERSION = "0.1.5"
TORCH_PIN = "torch==2.13.0"  # the local CPU wheel; a loose requirement pulls a multi-GB CUDA build

# safeblend method → its command-line parameters.
SAFEBLEND_ARGS = {
    "linear": f"--weight {WEIGHT}",
    "slerp": f"--weight {WEIGHT}",
    "task-arithmetic": f"--weight {WEIGHT}",
    "ties": f"--weight 1 --density {DENSITY}",
    "dare-linear": f"--weight 1 --density {DENSITY}",
    "dare-ties": f"--weight 1 --density {DENSITY}",
}
SKIPPED_METHODS = {"model-stock": "needs at least two fine-tuned models; the benchmark pair has one"}
# mergekit method → the safeblend method with the same parameters (the row its ratios use).
MERGEKIT_EQUIVALENT = {"linear": "linear", "slerp": "slerp", "ties": "ties",
                       "dare_linear": "dare-linear", "dare_ties": "dare-ties"}
CHECKED = ("linear", "slerp")  # same math in both tools: outputs must agree


@dataclass
class Contestant:
    tool: str  # safeblend, mergekit, naive, floor
    method: str
    command: str
    out: Path
    ratio_against: str  # the safeblend method whose row the ratios divide by
    walls: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.tool} {self.method}"


# ---------------------------------------------------------------------------------- helpers

def shape_for(preset: str, layers: int | None) -> LlamaShape:
    shape = PRESETS[preset]
    return shape if layers is None else replace(shape, num_hidden_layers=layers)


def ensure_pair(workdir: Path, preset: str, shape: LlamaShape) -> tuple[Path, Path]:
    """The generated base/fine-tune pair for ``shape``, written once (a marker says complete)."""
    tag = f"{preset}-L{shape.num_hidden_layers}"
    base, ft, marker = workdir / f"{tag}-base", workdir / f"{tag}-ft", workdir / f"{tag}.complete"
    if not marker.exists():
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(ft, ignore_errors=True)
        started = time.perf_counter()
        print(f"generating a {shape.parameters / 1e9:.2f}B-parameter bf16 pair in {workdir} ...", file=sys.stderr)
        write_pair(base, ft, shape, dtype="BF16")
        marker.write_text("ok\n")
        print(f"  done in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return base, ft


def weight_files(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("*.safetensors"))


def dir_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in weight_files(model_dir))


def resolve_commit(commit: str) -> str:
    """The short hash of ``commit`` (read-only git)."""
    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", commit], capture_output=True, text=True,
                          check=True).stdout.strip()


def safeblend_command(commit: str | None, root: Path) -> str:
    """The shell words that run safeblend's CLI: the installed one, or a snapshot of ``commit``.

    The working tree is shared with engineers editing it while benchmarks run; a snapshot of a
    commit (``git archive``, read-only) keeps a run on one consistent version of the engine.
    """
    if not commit:
        return "safeblend"
    sha = resolve_commit(commit)
    dest = root / f"safeblend-{sha}"
    pyproject = subprocess.run(["git", "-C", str(REPO), "show", f"{sha}:pyproject.toml"],
                               capture_output=True, text=True, check=True).stdout
    # Commits before the package was named safeblend installed engine/ and kernels/ as
    # top-level packages; later ones map engine/ to safeblend and kernels/ to safeblend.kernels.
    renamed = "safeblend.cli:main" in pyproject
    entry = "safeblend.cli" if renamed else "engine.cli"
    if not dest.exists():
        layout = {"engine": "safeblend", "kernels": "safeblend/kernels"} if renamed else \
                 {"engine": "engine", "kernels": "kernels"}
        for folder, target in layout.items():
            (dest / target).mkdir(parents=True, exist_ok=True)
            archive = subprocess.run(["git", "-C", str(REPO), "archive", sha, folder],
                                     capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "--strip-components=1", "-C", str(dest / target)],
                           input=archive, check=True)
    return (f"env PYTHONPATH={dest.resolve()} {sys.executable} -c "
            f"'import sys; sys.argv[0] = \"safeblend\"; from {entry} import main; main()'")


def safeblend_version(cmd: str) -> str:
    return subprocess.run(f"{cmd} --version", shell=True, capture_output=True, text=True).stdout.strip() or "?"


def available_methods(cmd: str = "safeblend") -> list[str]:
    """The methods this ``safeblend merge`` offers (read from its --help)."""
    text = subprocess.run(f"{cmd} merge --help", shell=True, capture_output=True, text=True, check=True).stdout
    match = re.search(r"--method \[([^\]]+)\]", text)
    return match.group(1).split("|") if match else ["linear"]


def machine_description() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) / 2**20
    except OSError:
        mem = float("nan")
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, Linux {platform.release()}, Python {platform.python_version()}"


# --------------------------------------------------------------------------------- mergekit

def ensure_mergekit(venv: Path) -> Path | None:
    """mergekit-yaml from a virtual environment of its own, created on first use.

    torch is installed first, pinned to the local CPU wheel, so that mergekit's own torch
    requirement is already met; afterwards the script checks that pip left it in place.
    """
    exe = venv / "bin" / "mergekit-yaml"
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    if not exe.exists():
        print(f"installing mergekit {MERGEKIT_VERSION} into {venv} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([*pip, TORCH_PIN], check=True)
        done = subprocess.run([*pip, f"mergekit=={MERGEKIT_VERSION}"])
        if done.returncode != 0:
            print("  mergekit did not install; its rows are skipped", file=sys.stderr)
            return None
    torch_version = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch; print(torch.__version__)"],
                                   capture_output=True, text=True).stdout.strip()
    if not torch_version.startswith(TORCH_PIN.split("==")[1]):
        print(f"  warning: pip replaced torch in {venv}: now {torch_version!r}", file=sys.stderr)
    return exe if exe.exists() else None


def mergekit_version(venv: Path) -> str:
    out = subprocess.run([str(venv / "bin" / "python"), "-c",
                          "import importlib.metadata as m; print(m.version('mergekit'), m.version('torch'))"],
                         capture_output=True, text=True).stdout.split()
    return f"mergekit {out[0]}, torch {out[1]}" if len(out) == 2 else "mergekit ?"


def mergekit_recipe(method: str, base: Path, ft: Path) -> str:
    """mergekit's YAML for the same merge safeblend runs (float32 math, bfloat16 output)."""
    tail = "dtype: float32\nout_dtype: bfloat16\n"
    if method == "linear":  # mergekit's linear averages the listed models; normalize is its default
        return (f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: {1 - WEIGHT:g}}}\n"
                f"  - model: {ft}\n    parameters: {{weight: {WEIGHT:g}}}\n"
                f"parameters: {{normalize: true}}\n" + tail)
    if method == "slerp":
        return (f"merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {ft}\n"
                f"parameters: {{t: {WEIGHT:g}}}\n" + tail)
    return (f"merge_method: {method}\nbase_model: {base}\nmodels:\n  - model: {ft}\n"
            f"    parameters: {{weight: 1.0, density: {DENSITY:g}}}\n" + tail)


# ------------------------------------------------------------------------------------ naive

NAIVE_SCRIPT = r'''
import json, sys
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file

base_dir, ft_dir, out_dir, weight = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])
shard_limit = 5 * 10**9

def load(model_dir):
    state = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(str(path)))
    return state

base, ft = load(base_dir), load(ft_dir)
merged = {}
for name, a in base.items():
    merged[name] = ((1 - weight) * a.float() + weight * ft[name].float()).to(a.dtype)

shards, size = [[]], 0
for name, t in merged.items():
    nbytes = t.numel() * t.element_size()
    if shards[-1] and size + nbytes > shard_limit:
        shards.append([])
        size = 0
    shards[-1].append(name)
    size += nbytes
out_dir.mkdir(parents=True, exist_ok=True)
weight_map = {}
for i, names in enumerate(shards):
    fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file({n: merged[n] for n in names}, str(out_dir / fname), metadata={"format": "pt"})
    weight_map.update({n: fname for n in names})
if len(shards) > 1:
    total = sum(t.numel() * t.element_size() for t in merged.values())
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
(out_dir / "config.json").write_text((base_dir / "config.json").read_text())
'''


def naive_fits(shape: LlamaShape) -> tuple[bool, str]:
    """Whether the naive script (both inputs + the merged copy in RAM) fits this machine now."""
    need = 3 * shape.parameters * 2 + 2 * 4 * max(int(np.prod(s)) for s in shape.tensors().values())
    avail = int(re.search(r"MemAvailable:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) * 1024
    return need < 0.85 * avail, f"needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available"


# ----------------------------------------------------------------------------------- checks

def _tensor_files(model_dir: Path) -> dict[str, Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        return {k: model_dir / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="np") as f:
        return {k: model_dir / "model.safetensors" for k in f.keys()}


def _reference_coefficients(method: str, aa: float, bb: float, ab: float) -> tuple[float, float]:
    """(c_base, c_ft) of the float64 reference: out = c_base·base + c_ft·ft."""
    if method == "linear":
        return 1.0 - WEIGHT, WEIGHT
    # slerp, written from the formula: lerp where the angle is ill-conditioned (as both tools do)
    if aa <= 0.0 or bb <= 0.0:
        return 1.0 - WEIGHT, WEIGHT
    cos = ab / math.sqrt(aa * bb)
    if abs(cos) > 0.9995:
        return 1.0 - WEIGHT, WEIGHT
    omega = math.acos(max(-1.0, min(1.0, cos)))
    return math.sin((1.0 - WEIGHT) * omega) / math.sin(omega), math.sin(WEIGHT * omega) / math.sin(omega)


def compare_outputs(method: str, ours: Path, theirs: Path, base: Path, ft: Path, block: int = 1 << 22) -> dict:
    """Each output against the other and against the float64 reference, with the tolerance rule (safeblend.tolerance).

    Streams a row block at a time (slerp first gathers its whole-tensor dot products in float64).
    Counts elements outside ``safeblend.tolerance.out_of_tolerance`` for: safeblend vs mergekit
    (mergekit's value as reference), safeblend vs float64, mergekit vs float64.
    """
    from safetensors import safe_open

    from safeblend.tolerance import out_of_tolerance

    maps = [_tensor_files(d) for d in (ours, theirs, base, ft)]
    stats = {"tensors": len(maps[0]), "elements": 0, "bad": 0, "bad_ours_vs_ref": 0, "bad_theirs_vs_ref": 0,
             "identical": 0, "max_abs": 0.0, "worst": ""}
    if set(maps[0]) != set(maps[1]):
        stats.update(bad=-1, note=f"tensor names differ: {sorted(set(maps[0]) ^ set(maps[1]))[:5]}")
        return stats
    handles: dict[Path, object] = {}

    def get(path: Path):
        if path not in handles:
            handles[path] = safe_open(str(path), framework="np")
        return handles[path]

    for name in sorted(maps[0]):
        slices = [get(m[name]).get_slice(name) for m in maps]
        shape = slices[0].get_shape()
        rows = shape[0] if shape else 1
        step = max(1, block // max(1, int(np.prod(shape[1:]))))
        spans = [(r, min(rows, r + step)) for r in range(0, rows, step)]
        aa = bb = ab = 0.0
        if method == "slerp":
            for r0, r1 in spans:
                x = slices[2][r0:r1].astype(np.float64).ravel()
                y = slices[3][r0:r1].astype(np.float64).ravel()
                aa, bb, ab = aa + float(x @ x), bb + float(y @ y), ab + float(x @ y)
        c0, c1 = _reference_coefficients(method, aa, bb, ab)
        bad_here = 0
        for r0, r1 in spans:
            a, b = slices[0][r0:r1], slices[1][r0:r1]
            x, y = slices[2][r0:r1].astype(np.float64), slices[3][r0:r1].astype(np.float64)
            absmax = np.maximum(np.abs(x), np.abs(y))
            ref = c0 * x + c1 * y
            mask = out_of_tolerance(a, b.astype(np.float64), absmax)
            bad_here += int(mask.sum())
            stats["bad_ours_vs_ref"] += int(out_of_tolerance(a, ref, absmax).sum())
            stats["bad_theirs_vs_ref"] += int(out_of_tolerance(b, ref, absmax).sum())
            stats["elements"] += a.size
            stats["identical"] += int((a.view(np.uint16) == b.view(np.uint16)).sum()) if a.dtype.itemsize == 2 else 0
            stats["max_abs"] = max(stats["max_abs"], float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))))
        stats["bad"] += bad_here
        if bad_here and not stats["worst"]:
            stats["worst"] = f"{name}: {bad_here}"
    return stats


# ------------------------------------------------------------------------------------- main

def build_contestants(args, base: Path, ft: Path, shape: LlamaShape, notes: list[str]) -> list[Contestant]:
    work = args.workdir
    out_root = work / "outputs"
    out_root.mkdir(parents=True, exist_ok=True)
    contestants: list[Contestant] = []
    sb = safeblend_command(args.safeblend_commit, REPO / "benchmarks/out")
    offered = available_methods(sb)
    notes.append(f"safeblend: {safeblend_version(sb)}"
                 + (f", snapshot of commit {resolve_commit(args.safeblend_commit)} (git archive)" if args.safeblend_commit
                    else " (installed, working tree)"))
    wanted = args.methods.split(",") if args.methods else offered
    for method in wanted:
        if method not in offered:
            notes.append(f"safeblend {method}: not offered by the installed safeblend; skipped")
            continue
        if method in SKIPPED_METHODS:
            notes.append(f"safeblend {method}: {SKIPPED_METHODS[method]}; skipped")
            continue
        extra = SAFEBLEND_ARGS.get(method, "")
        out = out_root / f"safeblend-{method}"
        cmd = (f"{sb} merge {base} {ft} -o {out} --method {method} {extra} --device cpu "
               f"--shard-size 5GB --overwrite --quiet")
        contestants.append(Contestant("safeblend", method, cmd, out, method))
    have = {c.method for c in contestants}
    ref = "linear" if "linear" in have else (sorted(have)[0] if have else "")

    peers = set(args.peers.split(",")) if args.peers else set()
    if "mergekit" in peers:
        exe = ensure_mergekit(args.mergekit_venv)
        if exe is None:
            notes.append("mergekit: could not be installed; skipped")
        else:
            notes.append(f"mergekit: {mergekit_version(args.mergekit_venv)} in {args.mergekit_venv}")
            for method in args.mergekit_methods.split(","):
                if method not in MERGEKIT_EQUIVALENT:
                    notes.append(f"mergekit {method}: no recipe here; skipped")
                    continue
                recipe = work / f"mergekit-{method}.yaml"
                recipe.write_text(mergekit_recipe(method, base.resolve(), ft.resolve()))
                out = out_root / f"mergekit-{method}"
                cmd = (f"{exe} {recipe} {out} --no-cuda --lazy-unpickle --no-copy-tokenizer "
                       f"--out-shard-size 5B --quiet && sync {out}/*.safetensors {out}")
                against = MERGEKIT_EQUIVALENT[method] if MERGEKIT_EQUIVALENT[method] in have else ref
                contestants.append(Contestant("mergekit", method, cmd, out, against))
    if "naive" in peers:
        fits, why = naive_fits(shape)
        if fits:
            script = work / "naive_merge.py"
            script.write_text(NAIVE_SCRIPT)
            out = out_root / "naive-linear"
            cmd = f"{sys.executable} {script} {base} {ft} {out} {WEIGHT} && sync {out}/*.safetensors {out}"
            contestants.append(Contestant("naive", "linear", cmd, out, ref))
        else:
            notes.append(f"naive: would not fit in memory ({why}); skipped")
    if "floor" in peers:
        out = out_root / "floor"
        inputs = " ".join(str(p) for p in weight_files(base) + weight_files(ft))
        shards = " ".join(str(p) for p in weight_files(base))
        cmd = f"mkdir -p {out} && cat {inputs} > /dev/null && cp {shards} {out}/ && sync {out}/* {out}"
        contestants.append(Contestant("floor", "copy", cmd, out, ref))
    return contestants


def run(args) -> dict:
    """Generate (or reuse) the pair, time every contestant, check outputs; a dict of results."""
    shape = shape_for(args.preset, args.layers)
    args.workdir.mkdir(parents=True, exist_ok=True)
    base, ft = ensure_pair(args.workdir, args.preset, shape)
    notes: list[str] = []
    contestants = build_contestants(args, base, ft, shape, notes)
    in_bytes = dir_bytes(base) + dir_bytes(ft)
    moved = in_bytes + dir_bytes(base)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    subprocess.run(["cat", *map(str, weight_files(base) + weight_files(ft))], stdout=subprocess.DEVNULL, check=True)
    for run_no in range(args.runs):
        order = contestants if run_no % 2 == 0 else contestants[::-1]
        for c in order:
            shutil.rmtree(c.out, ignore_errors=True)
            warm_free_memory(args.warm_memory)
            wall, rss = timed(c.command, env)
            c.walls.append(wall)
            c.rss.append(rss)
            needed = (run_no == args.runs - 1 and not args.no_check and c.tool in ("safeblend", "mergekit")
                      and c.method in CHECKED)
            if not (needed or args.keep_outputs):
                shutil.rmtree(c.out, ignore_errors=True)  # frees disk and page cache for the next one
            print(f"run {run_no + 1}/{args.runs} {c.label:<26} {wall:7.2f} s {rss / 2**20:8.0f} MiB", file=sys.stderr)

    checks = {}
    if not args.no_check:
        by_key = {(c.tool, c.method): c for c in contestants}
        for method in CHECKED:
            ours, theirs = by_key.get(("safeblend", method)), by_key.get(("mergekit", method))
            if ours and theirs:
                print(f"checking safeblend {method} against mergekit {method} ...", file=sys.stderr)
                checks[method] = compare_outputs(method, ours.out, theirs.out, base, ft)
    if not args.keep_outputs:
        for c in contestants:
            shutil.rmtree(c.out, ignore_errors=True)

    rows = []
    for c in contestants:
        med, p20, p80 = quantiles(c.walls)
        rows.append({"tool": c.tool, "method": c.method, "median_s": med, "p20_s": p20, "p80_s": p80,
                     "gb_per_s": moved / med / 1e9, "peak_rss_bytes": int(statistics.median(c.rss)),
                     "ratio_against": c.ratio_against, "walls": c.walls, "rss": c.rss})
    ref = {r["method"]: r for r in rows if r["tool"] == "safeblend"}
    for r in rows:
        sb = ref.get(r["ratio_against"])
        r["time_x"] = r["median_s"] / sb["median_s"] if sb else None
        # the same ratio taken within each run (the two ran minutes apart at most), then the median:
        # steadier than a ratio of medians when the machine's load changes between runs
        r["paired_time_x"] = (statistics.median(w / v for w, v in zip(r["walls"], sb["walls"])) if sb else None)
        r["rss_x"] = r["peak_rss_bytes"] / sb["peak_rss_bytes"] if sb else None
    result = {
        "preset": args.preset, "layers": shape.num_hidden_layers, "parameters": shape.parameters,
        "input_bytes": in_bytes, "output_bytes": dir_bytes(base), "moved_bytes": moved, "runs": args.runs, "warm_memory_bytes": args.warm_memory,
        "machine": machine_description(), "rows": rows, "checks": checks, "notes": notes,
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(ft, ignore_errors=True)
        (args.workdir / f"{args.preset}-L{shape.num_hidden_layers}.complete").unlink(missing_ok=True)
    return result


def format_table(result: dict) -> str:
    lines = [
        f"{result['preset']} shapes, {result['layers']} layers: {result['parameters'] / 1e9:.2f}B parameters, bf16; "
        f"inputs {result['input_bytes'] / 1e9:.2f} GB, output {result['output_bytes'] / 1e9:.2f} GB; "
        f"median of {result['runs']} runs, alternating order, warm page cache, output synced to disk",
        f"machine: {result['machine']}",
        "",
        "| tool | method | median s | p20–p80 s | GB/s | peak RSS MiB | time ÷ safeblend | same, per run | RSS ÷ safeblend |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        tx = f"{r['time_x']:.2f}× ({r['ratio_against']})" if r["time_x"] is not None else "–"
        px = f"{r['paired_time_x']:.2f}×" if r.get("paired_time_x") is not None else "–"
        rx = f"{r['rss_x']:.1f}×" if r["rss_x"] is not None else "–"
        lines.append(f"| {r['tool']} | {r['method']} | {r['median_s']:.2f} | {r['p20_s']:.2f}–{r['p80_s']:.2f} | "
                     f"{r['gb_per_s']:.2f} | {r['peak_rss_bytes'] / 2**20:.0f} | {tx} | {px} | {rx} |")
    if result["checks"]:
        lines.append("")
        for method, c in result["checks"].items():
            if c["bad"] < 0:
                lines.append(f"{method}: cannot compare — {c.get('note', '')}")
                continue
            lines.append(
                f"{method}: safeblend vs mergekit: {c['bad']:,} of {c['elements']:,} elements outside the tolerance rule "
                f"tolerance ({c['identical']:,} bit-identical, max |diff| {c['max_abs']:.3g}); against the float64 "
                f"reference, outside tolerance: safeblend {c['bad_ours_vs_ref']:,}, mergekit {c['bad_theirs_vs_ref']:,}")
    for note in result["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tinyllama-1.1b", choices=sorted(PRESETS))
    p.add_argument("--layers", type=int, default=None, help="override the number of layers (size)")
    p.add_argument("--runs", type=int, default=3)
    add_warm_memory_option(p)
    p.add_argument("--methods", default=None, help="safeblend methods, comma-separated (default: all offered)")
    p.add_argument("--peers", default="mergekit,naive,floor", help="comma-separated: mergekit, naive, floor")
    p.add_argument("--mergekit-methods", default="linear,slerp,ties,dare_ties",
                   help="any of linear, slerp, ties, dare_linear, dare_ties")
    p.add_argument("--mergekit-venv", type=Path, default=REPO / "benchmarks/out/mergekit-venv")
    p.add_argument("--safeblend-commit", default=None,
                   help="run safeblend from a snapshot of this commit (e.g. HEAD) instead of the working tree")
    p.add_argument("--workdir", type=Path, default=REPO / "benchmarks/out/compare")
    p.add_argument("--no-check", action="store_true", help="skip the output agreement check")
    p.add_argument("--keep", action="store_true", help="keep the generated pair for the next run")
    p.add_argument("--keep-outputs", action="store_true", help="keep the merged outputs")
    p.add_argument("--from-json", type=Path, default=None, help="print the table of a saved --json-out run")
    p.add_argument("--json-out", type=Path, default=None, help="also write the results as JSON here")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.from_json:  # re-print a saved run
        result = json.loads(args.from_json.read_text())
        ref = {r["method"]: r for r in result["rows"] if r["tool"] == "safeblend"}
        for r in result["rows"]:
            sb = ref.get(r["ratio_against"])
            r["paired_time_x"] = statistics.median(w / v for w, v in zip(r["walls"], sb["walls"])) if sb else None
        print(format_table(result))
        return
    result = run(args)
    print(format_table(result))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
