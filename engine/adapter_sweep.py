"""``safeblend sweep BASE LORA --as-adapters``: every λ as a PEFT LoRA adapter, not a model.

For ``linear`` and ``task-arithmetic`` with one LoRA fine-tune, the merge at λ is

    θ = θ_base + c·(θ_ft − θ_base)        c = λ (linear), λ_ta·w (task-arithmetic; 1 with normalize)

and each part of the adapter contributes linearly to θ_ft − θ_base, so the merge at λ is
itself an adapter with the same configuration:

* the LoRA scaling s multiplied by c — ``lora_alpha`` and every ``alpha_pattern`` entry
  become c·α in ``adapter_config.json``, so s·B·A becomes c·s·B·A for every module, the
  embedding LoRA's and a LoRA bias's (``lora_B.bias``, which PEFT also scales by s) included.
  Scaling α rather than B leaves every factor bit for bit as trained: PEFT multiplies the
  scale in exactly, where a scaled B would be rounded again (in fp32 that rounding shows
  where W and s·B·A cancel; in a 16-bit B it would add a 16-bit rounding), and the adapter
  keeps its size;
* lora_A and lora_B copied unchanged;
* every full tensor the adapter stores (``modules_to_save`` copies, trained biases with
  ``bias: all/lora_only``) replaced by θ_base + c·(T − θ_base), in the merge's output dtype,
  the value ``safeblend merge --weight λ`` writes for it;
* the adapter's tokenizer files copied.

Applying the adapter at λ with PEFT (``merge_and_unload`` or multi-LoRA serving) gives the
merge at λ within the merge's tolerance. Outputs are kilobytes to megabytes each, written in
one pass over the adapter (and over the base tensors that full tensors replace), each in a
hidden staging directory renamed into place when complete, with a ``safeblend.json``
manifest (its files' SHA-256) that marks it as written by safeblend.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import __version__
from .checkpoint import ADAPTER_CONFIG_NAME, Checkpoint, TensorInfo, peft_adapter_dir, read_safetensors_header
from .dtypes import DTYPES
from .errors import OutputError, SpecError
from .lora import ADAPTER_WEIGHTS_NAME, _base_name, _classify, open_adapter, read_adapter_config
from .layouts import canonical_lookup
from .manifest import MANIFEST_NAME, MANIFEST_VERSION, file_sha256
from .methods import MergeMethod
from .model_files import companion_files
from .output_paths import check_output_not_input, check_replaceable, replace_output, reserve_staging
from .writer import fsync_dir, write_text_durably

ADAPTER_METHODS = ("linear", "task-arithmetic")
_CHUNK_ELEMENTS = 1 << 20  # elements per step: a few MiB per output at most


@dataclass(frozen=True)
class _Part:
    """One tensor of the output adapter: how it is made from the source adapter (and base)."""

    name: str  # its key, as in the source adapter
    source: TensorInfo
    action: str  # "copy" (bytes unchanged) or "blend" (base + c·(x − base))
    base: TensorInfo | None = None  # the base tensor a "blend" part replaces
    dtype: str = ""  # output dtype name

    @property
    def nbytes(self) -> int:
        return self.source.numel * DTYPES[self.dtype].itemsize


def adapter_scales(mergers: Sequence[MergeMethod]) -> list[float]:
    """c for each weight: the single fine-tune's resolved coefficient (SpecError if per tensor)."""
    scales = []
    for merger in mergers:
        weights = getattr(merger, "weights", None)
        if weights is None or len(weights) != 1:
            raise SpecError("--as-adapters needs one constant weight per output (no per-tensor weights or "
                            "gradients)")
        scales.append(float(weights[0]))
    return scales


def check_adapter_sweep(method: str, model_paths: Sequence[str | os.PathLike]) -> Path:
    """The adapter directory to sweep; SpecError unless the request can be written as adapters."""
    if method not in ADAPTER_METHODS:
        raise SpecError(f"--as-adapters works for {' and '.join(ADAPTER_METHODS)} (a merge that is the adapter "
                        f"scaled), not {method}")
    if len(model_paths) != 1:
        raise SpecError("--as-adapters takes exactly one fine-tuned model, a LoRA adapter")
    directory = peft_adapter_dir(Path(model_paths[0]))
    if directory is None:
        raise SpecError(f"{model_paths[0]}: --as-adapters needs a PEFT LoRA adapter directory as the fine-tuned "
                        "model (a full fine-tune is not an adapter)")
    return directory


def sweep_as_adapters(base: str | os.PathLike, model_paths: Sequence[str | os.PathLike], root: Path,
                      weights: list[float], mergers: list[MergeMethod], out_dtype: str | None, overwrite: bool,
                      started: float) -> Any:
    """The sweep, each weight written as an adapter to ``root/lambda-<w>/``; returns its SweepResult."""
    from .api import MergeResult, output_metadata
    from .lambda_sweep import SweepResult, output_name

    method = mergers[0].name
    adapter = check_adapter_sweep(method, model_paths)
    scales = adapter_scales(mergers)
    finals = [root / output_name(w) for w in weights]
    metadata = [output_metadata(m, base, model_paths, out_dtype) for m in mergers]
    tensors, read, written = _write_adapters(base, adapter, finals, scales, out_dtype, overwrite, metadata)
    seconds = time.perf_counter() - started
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    outputs = [MergeResult(output=str(final), method=m.name, params={**m.recipe(), "as_adapter": True},
                           dtype=out_dtype or "auto", device="cpu", tensors=tensors, shards=1, bytes_read=read,
                           bytes_written=n, seconds=round(seconds, 4),
                           throughput_bytes_per_s=round((read + n) / max(seconds, 1e-9), 1), peak_rss_bytes=rss,
                           warnings=list(m.warnings))
               for final, m, n in zip(finals, mergers, written)]
    messages = list(dict.fromkeys(msg for m in mergers for msg in m.warnings))
    return SweepResult(output=str(root), method=method, weights=list(weights), outputs=outputs, tensors=tensors,
                       bytes_read=read, bytes_written=sum(written), seconds=round(seconds, 4),
                       throughput_bytes_per_s=round((read + sum(written)) / max(seconds, 1e-9), 1),
                       peak_rss_bytes=rss, warnings=messages)


def _write_adapters(base: str | os.PathLike, adapter: Path, finals: list[Path], scales: list[float],
                    out_dtype: str | None, overwrite: bool,
                    metadata: list[dict[str, str]]) -> tuple[int, int, list[int]]:
    """Write one adapter per scale into ``finals``; returns (tensors, bytes read, bytes written per output)."""
    check_output_not_input(finals[0].parent, [base, adapter])
    _check_targets(finals, overwrite)
    base_ckpt = Checkpoint.open(base)
    try:
        opened = open_adapter(adapter, base_ckpt, out_dtype)  # the merge's own checks: fits the base, supported
        targeted = set(opened.targeted)
        opened.close()
        source = read_safetensors_header(adapter / ADAPTER_WEIGHTS_NAME)
        try:
            parts = _parts(source, base_ckpt, adapter, out_dtype, targeted)
            stagings: list[Path] = []
            try:
                for final in finals:
                    stagings.append(reserve_staging(final, "adapter"))
                _write_all(parts, source, base_ckpt, scales, [s / ADAPTER_WEIGHTS_NAME for s in stagings], metadata)
                for staging, c in zip(stagings, scales):
                    _copy_companions(adapter, staging, c)
                    write_adapter_manifest(staging, len(parts), sum(p.nbytes for p in parts))
                for staging, final in zip(stagings, finals):
                    replace_output(staging, final, overwrite)  # only a previous safeblend output is replaced
                fsync_dir(finals[0].parent)
            except BaseException:
                for staging in stagings:
                    shutil.rmtree(staging, ignore_errors=True)
                raise
        finally:
            source.close()
    finally:
        base_ckpt.close()
    read = sum(p.source.nbytes + (p.base.nbytes if p.base else 0) for p in parts)
    return len(parts), read, [sum(p.stat().st_size for p in final.iterdir()) for final in finals]


def _check_targets(finals: list[Path], overwrite: bool) -> None:
    root = finals[0].parent
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{root}: cannot create the sweep directory: {exc.strerror or exc}") from exc
    for final in finals:
        check_replaceable(final, overwrite)


def _parts(source, base: Checkpoint, adapter: Path, out_dtype: str | None, targeted: set[str]) -> list[_Part]:
    """Classify every tensor of the source adapter (the same reading ``safeblend.lora`` merges with).

    A blended full tensor is stored in the merge's output dtype, except where a LoRA term is
    added on top of it (a LoRA bias on a trained bias, an embedding LoRA over its stored base
    layer): rounded to 16 bits there, it would be rounded twice; it is kept in fp32 instead.
    """
    _, replacements = _classify(source, read_adapter_config(adapter))
    replaced = {info.name: name for name, info in replacements.items()}
    layout = canonical_lookup(base.tensors)  # the base saved in another transformers layout
    parts = []
    for info in sorted(source.tensors.values(), key=lambda t: t.start):
        if info.name in replaced:
            target = base.tensors[_base_name(replaced[info.name], base, source.path, info.name, layout)]
            dtype = out_dtype or target.dtype.name
            if target.name in targeted and DTYPES[dtype].itemsize < 4:
                dtype = "F32"
            parts.append(_Part(info.name, info, "blend", target, dtype))
        else:
            parts.append(_Part(info.name, info, "copy", dtype=info.dtype.name))
    return parts


def _header(parts: list[_Part], metadata: dict[str, str]) -> bytes:
    """A safetensors header for the parts, in order, padded to 8 bytes."""
    entries: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for part in parts:
        entries[part.name] = {"dtype": part.dtype, "shape": list(part.source.shape),
                              "data_offsets": [offset, offset + part.nbytes]}
        offset += part.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _write_all(parts: list[_Part], source, base: Checkpoint, scales: list[float], paths: list[Path],
               metadata: list[dict[str, str]]) -> None:
    """Write every output file in one pass over the parts, a chunk of elements at a time."""
    handles = [open(p, "wb") for p in paths]
    try:
        for handle, md in zip(handles, metadata):
            handle.write(_header(parts, {"format": "pt", **md}))
        for part in parts:
            info = part.source
            step = _CHUNK_ELEMENTS
            for first in range(0, max(info.numel, 1), step):
                count = min(step, info.numel - first)
                if count <= 0:
                    break
                if part.action == "copy":
                    data = source.byte_view(info.start + first * info.dtype.itemsize, count * info.dtype.itemsize)
                    for handle in handles:
                        handle.write(data)
                    continue
                base_file = base.file_of(part.base)
                b = base_file.view(part.base, first, count).astype(np.float64)
                delta = source.view(info, first, count).astype(np.float64) - b
                for handle, c in zip(handles, scales):
                    handle.write((b + c * delta).astype(DTYPES[part.dtype].numpy).tobytes())
                # Copies made: drop the inputs' pages from the resident set (a modules_to_save
                # LM head is as large as the base's).
                base_file.release(part.base.start + first * part.base.dtype.itemsize, count * part.base.dtype.itemsize)
                source.release(info.start + first * info.dtype.itemsize, count * info.dtype.itemsize)
        for handle in handles:
            handle.flush()
            os.fsync(handle.fileno())
    finally:
        for handle in handles:
            handle.close()


def scaled_config(config: dict[str, Any], c: float) -> dict[str, Any]:
    """The adapter config whose LoRA scaling is c times the source's: α and every alpha_pattern entry × c.

    >>> scaled_config({"r": 8, "lora_alpha": 16, "alpha_pattern": {"q_proj": 4}}, 0.5)
    {'r': 8, 'lora_alpha': 8.0, 'alpha_pattern': {'q_proj': 2.0}}
    """
    scaled = dict(config)
    scaled["lora_alpha"] = c * float(config.get("lora_alpha", 8))  # PEFT's default α is 8
    if config.get("alpha_pattern"):
        scaled["alpha_pattern"] = {k: c * float(v) for k, v in config["alpha_pattern"].items()}
    return scaled


def _copy_companions(adapter: Path, staging: Path, c: float) -> None:
    config = json.loads((adapter / ADAPTER_CONFIG_NAME).read_text(encoding="utf-8"))  # read_adapter_config checked it
    write_text_durably(staging / ADAPTER_CONFIG_NAME, json.dumps(scaled_config(config, c), indent=2) + "\n")
    for path in companion_files(adapter):
        shutil.copyfile(path, staging / path.name)


def write_adapter_manifest(directory: Path, tensors: int, total: int) -> None:
    """safeblend.json: the adapter file's size and SHA-256 and the other files' SHA-256."""
    weights = directory / ADAPTER_WEIGHTS_NAME
    manifest = {
        "safeblend_manifest": MANIFEST_VERSION,
        "safeblend_version": __version__,
        "kind": "peft-lora-adapter",
        "tensors": tensors,
        "total_size": total,
        "shards": [{"file": weights.name, "size": weights.stat().st_size, "sha256": file_sha256(weights)}],
        "files": {p.name: file_sha256(p) for p in sorted(directory.iterdir())
                  if p.is_file() and p.name not in (weights.name, MANIFEST_NAME)},
    }
    write_text_durably(directory / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")


