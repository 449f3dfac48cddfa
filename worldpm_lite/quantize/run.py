"""`worldpm-lite quantize`: a WorldPM checkpoint in, a standard GPTQ checkpoint out, one decoder
layer in memory at a time.

Work happens in a staging directory beside the output (`.NAME.partial`): one shard per decoder
layer, written atomically as each layer finishes, and `progress.json` saying how far it got.
`resume=True` replays the finished layers from their shards (to rebuild the next layer's
inputs exactly) and goes on; the bytes come out the same as an uninterrupted run. It refuses other
settings or calibration, and a source shard whose size or modification time changed. Only when every
shard, the index, config.json and the tokenizer files are written is the staging directory
renamed to the output: a crash never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from worldpm_lite.chat import TOKENIZER_FILES, load_tokenizer
from worldpm_lite.checkpoint import (
    INDEX_FILE,
    LINEARS,
    PACKED,
    Checkpoint,
    CheckpointError,
    GPTQSpec,
    changed_weights,
    file_sha256,
    weight_stamps,
    write_json_atomic,
)
from worldpm_lite.devices import check_device
from worldpm_lite.errors import InputError, OutputExists, UsageError
from worldpm_lite.options import QuantizeSettings

from .calibration import builtin_calibration, file_calibration, fingerprint
from .gptq_format import dequantize_packed, pack
from .pipeline import (
    BATCH_TOKENS,
    LayerReader,
    check_finite,
    embed,
    keep_on_device,
    make_rope,
    quantize_layer,
    return_freed_memory,
    run_layer,
)

PROGRESS = "progress.json"
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4}
LOG = "quantize_log.json"


@dataclass
class Progress:
    fingerprint: str
    layers_done: int = 0
    layers: list[dict] = field(default_factory=list)  # per-layer log entries
    sources: dict = field(default_factory=dict)  # source shard -> [bytes, mtime ns] (checkpoint.weight_stamps)


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp, metadata={"format": "pt"})
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def shard_name(k: int, total: int) -> str:
    return f"model-{k + 1:05d}-of-{total:05d}.safetensors"


def _layer_tensors(src: Checkpoint, i: int, quantized: dict, bits: int) -> dict[str, torch.Tensor]:
    """Layer i as stored: packed linears, the original biases and norms in the source dtype."""
    prefix = f"model.layers.{i}."
    out = {}
    for name, q in quantized.items():
        for key, t in pack(q.q.cpu(), q.scales.cpu(), q.zeros.cpu(), q.g_idx.cpu(), bits).items():
            out[f"{prefix}{name}.{key}"] = t
    for name in src.names():
        if name.startswith(prefix) and not (name.endswith(".weight") and name[len(prefix):-7] in LINEARS):
            out[name] = check_finite(src, name, src.tensor(name))  # norms and q/k/v biases
    return out


def _replay_layer(layer, shard: Path, i: int, bits: int) -> None:
    """Put the quantized weights stored in a finished shard back into `layer`."""
    t = load_file(shard)
    for name in LINEARS:
        base = f"model.layers.{i}.{name}"
        w = dequantize_packed(*(t[f"{base}.{k}"] for k in PACKED), bits)
        lin = layer.get_submodule(name)
        lin.weight.data = w.to(device=lin.weight.device, dtype=lin.weight.dtype)


def _calibration(settings: QuantizeSettings, src_dir: Path):
    tokenizer = load_tokenizer(src_dir)
    if settings.calibration:
        return file_calibration(settings.calibration, tokenizer, settings.samples, settings.seq_len)
    return builtin_calibration(tokenizer, settings.samples, settings.seq_len)


def _progress(staging: Path, run_id: str, sources: dict, src_dir: Path, layers: int, log) -> Progress:
    """The interrupted run's progress in `staging`, checked to be this run's; or a new staging folder."""
    if not staging.exists():
        staging.mkdir(parents=True)
        progress = Progress(run_id, sources=sources)
        write_json_atomic(staging / PROGRESS, asdict(progress))
        return progress
    saved = json.loads((staging / PROGRESS).read_text()) if (staging / PROGRESS).exists() else {}
    if saved.get("fingerprint") != run_id:
        changed = changed_weights(src_dir, saved["sources"], sources) if saved.get("sources") else []
        if changed:
            raise InputError(f"{staging}: was started from another source checkpoint: {'; '.join(changed)}; "
                             "delete it or rerun with the original source")
        raise InputError(f"{staging}: was started with other settings, source or calibration; "
                         "delete it or rerun with the original ones")
    progress = Progress(**saved)
    log(f"resuming after layer {progress.layers_done} of {layers}")
    return progress


def _quantize_layer(src, layer, i: int, hidden, rope, settings: QuantizeSettings, batch_tokens, shard: Path) -> dict:
    """GPTQ (or RTN) layer i in place, its shard written; its log entry (with the relative change of its
    output on the first 8 calibration sequences)."""
    t0 = time.time()
    before = run_layer(layer, hidden[:8], rope, batch_tokens)
    quantized, reports = quantize_layer(layer, hidden, rope, settings.quant_config(), prefix=f"model.layers.{i}.",
                                        rtn_only=settings.method == "rtn", batch_tokens=batch_tokens)
    after = run_layer(layer, hidden[:8], rope, batch_tokens)
    rel = (sum(((a - b) ** 2).sum() for a, b in zip(after, before)) / sum((b ** 2).sum() for b in before)).item()
    _save_atomic(_layer_tensors(src, i, quantized, settings.bits), shard)
    return {"layer": i, "seconds": round(time.time() - t0, 3), "output_rel_error": rel,
            "linears": [{"name": r.name, "error": r.gptq_error, "rtn_error": r.rtn_error} for r in reports]}


def _write_rest(src, src_dir: Path, staging: Path, settings: QuantizeSettings, total: int) -> int:
    """The last shard (embeddings, final norm, head), the index, config.json and the tokenizer files;
    the bytes of every tensor written."""
    rest = {n: check_finite(src, n, src.tensor(n)) for n in src.names() if not n.startswith("model.layers.")}
    _save_atomic(rest, staging / shard_name(total - 1, total))
    weight_map, size = {}, 0
    for k in range(total):  # from the shard headers: nothing is loaded
        shard = staging / shard_name(k, total)
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                weight_map[name] = shard.name
                size += math.prod(sl.get_shape()) * DTYPE_BYTES[sl.get_dtype()]
    index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
    write_json_atomic(staging / INDEX_FILE, index)
    config = {k: v for k, v in src.raw_config.items() if k != "auto_map"}
    config["quantization_config"] = GPTQSpec(bits=settings.bits, group_size=settings.group_size,
                                             desc_act=settings.act_order, sym=settings.sym).to_dict()
    write_json_atomic(staging / "config.json", config)
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            shutil.copy2(src_dir / name, staging / name)
    return size


@torch.no_grad()  # activations must not carry autograd graphs from layer to layer
def quantize_checkpoint(src_dir, out_dir, settings: QuantizeSettings, resume: bool = False, overwrite: bool = False,
                        log=print, layer_bar=None) -> dict:
    """Quantize `src_dir` into `out_dir`; returns the summary also written to quantize_log.json."""
    start = time.time()
    device = check_device(settings.device)
    device = "cuda" if device == "auto" else device
    src_dir, out = Path(src_dir), Path(out_dir)
    src = Checkpoint(src_dir)
    if src.quant is not None:
        raise CheckpointError(f"{src_dir}: already quantized ({src.quant.bits}-bit GPTQ); quantize a bf16 checkpoint")
    if out.resolve() == src_dir.resolve():
        raise UsageError(f"--out {out}: is the source; the source is never modified")
    if out.exists() and not overwrite:
        raise OutputExists(f"{out}: already exists (pass --overwrite to replace it)")
    staging = out.parent / f".{out.name}.partial"
    if staging.exists() and not resume:
        raise OutputExists(f"{staging}: an interrupted run is there (pass --resume to continue it, or delete it)")

    calibration = _calibration(settings, src_dir)
    # Every tensor is checked finite as it is read (the layers' as each is loaded). The ones outside
    # the layers are checked now, before anything is written: a damaged final norm must not wait
    # for every layer to be quantized. The embedding is read (and checked) by embed.
    hidden = embed(src, calibration)
    for name in src.names():
        if not name.startswith("model.layers.") and name != "model.embed_tokens.weight":
            check_finite(src, name, src.tensor(name))
    src.release()
    sources = weight_stamps(src_dir)
    # the device as resolved: a GPU's run (its batches and arithmetic) has other bytes than a CPU's
    run_id = fingerprint([[file_sha256(src_dir / "config.json")],
                          [json.dumps(asdict(settings) | {"device": device}, sort_keys=True)],
                          [fingerprint(calibration)], [json.dumps(sources, sort_keys=True)]])
    n_layers = src.config.num_hidden_layers
    progress = _progress(staging, run_id, sources, src_dir, n_layers, log)
    total = n_layers + 1  # one shard per layer, the last one for embeddings, final norm and head
    rope = make_rope(src, device)
    if layer_bar is not None:
        layer_bar.reset(total=n_layers)
    batch_tokens = BATCH_TOKENS.get(torch.device(device).type)
    with LayerReader(src, device) as layers:
        for i in range(n_layers):
            layer = layers.take(i)  # layer i + 1 is read meanwhile
            hidden = keep_on_device(hidden, layer)
            shard = staging / shard_name(i, total)
            if i < progress.layers_done:
                _replay_layer(layer, shard, i, settings.bits)
            else:
                progress.layers.append(_quantize_layer(src, layer, i, hidden, rope, settings, batch_tokens, shard))
                progress.layers_done = i + 1
                write_json_atomic(staging / PROGRESS, asdict(progress))
            run_layer(layer, hidden, rope, batch_tokens, in_place=True)  # the next layer's inputs
            del layer
            return_freed_memory()
            if layer_bar is not None:
                layer_bar.update(1)

    size = _write_rest(src, src_dir, staging, settings, total)
    src_bytes = sum((src_dir / f).stat().st_size for f in set(src.weight_map.values()))
    summary = {"settings": asdict(settings), "calibration_sequences": len(calibration),
               "calibration_tokens": sum(map(len, calibration)), "seconds": round(time.time() - start, 2),
               "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
               "source_weight_bytes": src_bytes, "output_weight_bytes": size, "layers": progress.layers}
    write_json_atomic(staging / LOG, summary)
    (staging / PROGRESS).unlink()
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    Checkpoint(out)  # what we wrote must read back as a valid GPTQ checkpoint
    return summary
