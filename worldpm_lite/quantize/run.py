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
    file_sha256,
    write_json_atomic,
)
from worldpm_lite.devices import check_device

from .calibration import builtin_calibration, file_calibration, fingerprint
from .gptq import QuantConfig
from .pack import dequantize_packed, pack
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


@dataclass(frozen=True)
class QuantizeSettings:
    """What `quantize` does; the CLI takes its defaults from here. Defaults suit WorldPM-72B."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_order: bool = False
    method: str = "gptq"  # or "rtn": round-to-nearest on the same grid, the no-calibration baseline
    samples: int = 128
    seq_len: int = 2048
    calibration: str | None = None  # a JSONL file in any format `score` reads; None: built-in ShareGPT set
    device: str = "auto"  # GPU 0 when a GPU is visible, else the CPU

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"bits: expected 4 or 8 (what the GPTQ checkpoint format packs), found {self.bits}")
        self.quant_config()  # validates group_size
        if self.method not in ("gptq", "rtn"):
            raise ValueError(f"method: expected 'gptq' or 'rtn', found {self.method!r}")
        if self.samples < 1 or self.seq_len < 16:
            raise ValueError(f"samples >= 1 and seq_len >= 16 expected, found {self.samples} and {self.seq_len}")

    def quant_config(self) -> QuantConfig:
        return QuantConfig(bits=self.bits, group_size=self.group_size, sym=self.sym, act_order=self.act_order)

    def spec(self) -> GPTQSpec:
        return GPTQSpec(bits=self.bits, group_size=self.group_size, desc_act=self.act_order, sym=self.sym)


@dataclass
class Progress:
    fingerprint: str
    layers_done: int = 0
    layers: list[dict] = field(default_factory=list)  # per-layer log entries
    sources: dict = field(default_factory=dict)  # source shard -> [bytes, mtime ns] (source_stamps)


def source_stamps(src_dir: Path, shards) -> dict[str, list[int]]:
    """Each source shard's size and modification time (ns). Reading every byte of a 143 GB source to
    hash it would take minutes; a replaced or rewritten shard changes one of these."""
    return {f: [st.st_size, st.st_mtime_ns] for f in sorted(set(shards)) for st in [(src_dir / f).stat()]}


def changed_sources(src_dir: Path, saved: dict, now: dict) -> list[str]:
    """The shards whose stamps differ between an interrupted run and now, in words."""
    out = []
    for f in sorted(set(saved) | set(now)):
        a, b = saved.get(f), now.get(f)
        if a is None or b is None:
            out.append(f"{src_dir / f} ({'new' if a is None else 'gone'} since the run started)")
        elif a != b:
            out.append(f"{src_dir / f} (size {a[0]} -> {b[0]} bytes, modification time {a[1]} -> {b[1]} ns)")
    return out


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
        raise ValueError(f"--out {out}: is the source; the source is never modified")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists (pass --overwrite to replace it)")
    staging = out.parent / f".{out.name}.partial"
    if staging.exists() and not resume:
        raise FileExistsError(f"{staging}: an interrupted run is there (pass --resume to continue it, or delete it)")

    calibration = _calibration(settings, src_dir)
    # Every tensor is checked finite as it is read (the layers' as each is loaded). The ones outside
    # the layers are checked now, before anything is written: a damaged final norm must not wait
    # for every layer to be quantized. The embedding is read (and checked) by embed.
    hidden = embed(src, calibration)
    for name in src.names():
        if not name.startswith("model.layers.") and name != "model.embed_tokens.weight":
            check_finite(src, name, src.tensor(name))
    src.release()
    sources = source_stamps(src_dir, src.weight_map.values())
    # the device as resolved: a GPU's run (its batches and arithmetic) has other bytes than a CPU's
    run_id = fingerprint([[file_sha256(src_dir / "config.json")],
                          [json.dumps(asdict(settings) | {"device": device}, sort_keys=True)],
                          [fingerprint(calibration)], [json.dumps(sources, sort_keys=True)]])
    progress = Progress(run_id, sources=sources)
    if staging.exists():
        saved = json.loads((staging / PROGRESS).read_text()) if (staging / PROGRESS).exists() else {}
        if saved.get("fingerprint") != run_id:
            changed = changed_sources(src_dir, saved["sources"], sources) if saved.get("sources") else []
            if changed:
                raise ValueError(f"{staging}: was started from another source checkpoint: {'; '.join(changed)}; "
                                 "delete it or rerun with the original source")
            raise ValueError(f"{staging}: was started with other settings, source or calibration; "
                             "delete it or rerun with the original ones")
        progress = Progress(**saved)
        log(f"resuming after layer {progress.layers_done} of {src.config.num_hidden_layers}")
    else:
        staging.mkdir(parents=True)
        write_json_atomic(staging / PROGRESS, asdict(progress))

    n_layers = src.config.num_hidden_layers
    total = n_layers + 1  # one shard per layer, the last one for embeddings, final norm and head
    cfg = settings.quant_config()
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
                t0 = time.time()
                before = run_layer(layer, hidden[:8], rope, batch_tokens)
                quantized, reports = quantize_layer(layer, hidden, rope, cfg, prefix=f"model.layers.{i}.",
                                                    rtn_only=settings.method == "rtn", batch_tokens=batch_tokens)
                after = run_layer(layer, hidden[:8], rope, batch_tokens)
                rel = (sum(((a - b) ** 2).sum() for a, b in zip(after, before)) /
                       sum((b ** 2).sum() for b in before)).item()
                _save_atomic(_layer_tensors(src, i, quantized, settings.bits), shard)
                progress.layers.append({"layer": i, "seconds": round(time.time() - t0, 3), "output_rel_error": rel,
                                        "linears": [{"name": r.name, "error": r.gptq_error, "rtn_error": r.rtn_error}
                                                    for r in reports]})
                progress.layers_done = i + 1
                write_json_atomic(staging / PROGRESS, asdict(progress))
            run_layer(layer, hidden, rope, batch_tokens, in_place=True)  # the next layer's inputs
            del layer
            return_freed_memory()
            if layer_bar is not None:
                layer_bar.update(1)

    rest = {n: check_finite(src, n, src.tensor(n)) for n in src.names() if not n.startswith("model.layers.")}
    _save_atomic(rest, staging / shard_name(n_layers, total))
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
    config["quantization_config"] = settings.spec().to_dict()
    write_json_atomic(staging / "config.json", config)
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            shutil.copy2(src_dir / name, staging / name)
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
