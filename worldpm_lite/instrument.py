"""The small model as a measuring instrument for quantization.

What CI checks with it must measure the quantizer, not the luck of one training run, so:
  - every metric is scale-free (errors over the reference's score spread; agreement only where
    the reference's preference is clear of the noise floor);
  - the held-out output error of each decoder layer, GPTQ against round-to-nearest at equal bits,
    checks the algorithm itself where score-level metrics saturate;
  - negative controls (3-bit round-to-nearest; GPTQ fed a wrong Hessian) run through the same
    gates and must fail them, so a gate that can no longer fail is noticed.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .checkpoint import Checkpoint, write_checkpoint
from .model import WorldPM


def permuted_hessian(seed: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    """A wrong Hessian with the true one's spectrum: rows and columns in a random order, so GPTQ
    pushes each column's rounding error onto columns it is not correlated with."""

    def transform(h: torch.Tensor) -> torch.Tensor:
        perm = torch.randperm(h.shape[0], generator=torch.Generator().manual_seed(seed)).to(h.device)
        return h[perm][:, perm]

    return transform


@torch.no_grad()
def dense_variant(src_dir: str | Path, out_dir: str | Path, calibration: list[list[int]], bits: int,
                  method: str = "gptq", hessian_transform: Callable | None = None, group_size: int = 128) -> Path:
    """A dense fp32 copy of `src_dir` whose decoder linears hold their quantized-then-dequantized
    weights: any bit width (3-bit controls too), any Hessian, scored like a bf16 checkpoint."""
    from .chat import TOKENIZER_FILES  # what `quantize` copies beside its output
    from .options import QuantConfig
    from .quantize.pipeline import stream_layers

    src_dir, out = Path(src_dir), Path(out_dir)
    ckpt = Checkpoint(src_dir)
    tensors = {n: ckpt.tensor(n).float() for n in ckpt.names()}
    cfg = QuantConfig(bits=bits, group_size=group_size)
    for i, quantized, _, _ in stream_layers(ckpt, calibration, cfg, rtn_only=method == "rtn",
                                            hessian_transform=hessian_transform):
        for name, q in quantized.items():
            tensors[f"model.layers.{i}.{name}.weight"] = q.dequantize()
    staged = write_checkpoint(out.with_name(f".{out.name}.staged"), ckpt.config, tensors)
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            shutil.copy2(src_dir / name, staged / name)
    os.replace(staged, out)
    return out


@torch.inference_mode()
def layer_errors(reference: WorldPM, candidate: WorldPM, sequences: list[list[int]], batch: int = 32) -> list[float]:
    """Held-out output error of each decoder layer of `candidate` relative to what the layer adds:
    sum ||cand_i(x) - ref_i(x)||^2 / sum ||ref_i(x) - x||^2 over every token, where x is the
    reference's input to layer i (so errors do not compound from layer to layer).

    Sequences of similar length run together, right-padded: attention is causal, so padding never
    reaches a real token, and padded positions are left out of both sums."""
    n = len(reference.model.layers)
    err, size = np.zeros(n), np.zeros(n)
    order = sorted(range(len(sequences)), key=lambda k: len(sequences[k]))
    for start in range(0, len(order), batch):
        seqs = [sequences[k] for k in order[start: start + batch]]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        real = torch.zeros(len(seqs), width, 1, dtype=torch.bool)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s)
            real[r, : len(s)] = True
        x = reference.model.embed_tokens(ids.to(reference.input_device))  # [B, T, h]
        real = real.to(x.device)
        pos = torch.arange(width, device=x.device).unsqueeze(0)
        rope = reference.model.rotary_emb(x, pos)
        for i, (ref, cand) in enumerate(zip(reference.model.layers, candidate.model.layers)):
            y = ref(x, attention_mask=None, position_ids=pos, position_embeddings=rope)
            y_cand = cand(x.to(cand.input_layernorm.weight.dtype), attention_mask=None, position_ids=pos,
                          position_embeddings=rope)
            err[i] += ((y_cand.float() - y.float()) * real).pow(2).sum().item()
            size[i] += ((y.float() - x.float()) * real).pow(2).sum().item()
            x = y
    return (err / size).tolist()


# The CI gates, set from bench/tiny_robustness.py (six small models: seeds 0-2, 1 vs 2 threads, a
# 1e-6 jitter of the initial weights, another batch order; the spread is in bench/RESULTS.md).
# Metric names are those of fidelity.compare; each gate is (">=" or "<=", limit).
GATES_8BIT = {"pairwise_agreement": (">=", 0.995), "spearman": (">=", 0.9995),
              "max_abs_error_over_std": ("<=", 0.05)}
GATES_4BIT = {"pairwise_agreement_clear": (">=", 0.99), "spearman": (">=", 0.998),
              "mean_abs_error_over_std": ("<=", 0.02)}
# GPTQ's held-out output error in every decoder layer at most this fraction of round-to-nearest's
# at equal bits: the algorithm's own claim, measured where it acts.
LAYER_ERROR_RATIO = 0.5


def gate_failures(metrics: dict, gates: dict) -> list[str]:
    """The gates `metrics` (one candidate's, from fidelity.compare) misses, in words."""
    out = []
    for key, (op, limit) in gates.items():
        value = metrics.get(key)
        ok = value is not None and (value >= limit if op == ">=" else value <= limit)
        if not ok:
            out.append(f"{key} {value if value is None else round(value, 5)} (gate {op} {limit})")
    return out


def layer_gate_failures(gptq_errors: list[float], rtn_errors: list[float],
                        ratio: float = LAYER_ERROR_RATIO) -> list[str]:
    """Layers where GPTQ's held-out error is not below `ratio` x round-to-nearest's."""
    return [f"layer {i}: held-out error {g:.3g} vs round-to-nearest {r:.3g} (gate <= {ratio} x)"
            for i, (g, r) in enumerate(zip(gptq_errors, rtn_errors)) if not g <= ratio * r]
