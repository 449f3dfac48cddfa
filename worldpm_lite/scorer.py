"""Scorer: conversations in, one WorldPM reward per conversation out, in input order."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .chat import ENDOFTEXT, encode_conversation, load_tokenizer
from .checkpoint import Checkpoint
from .data import with_response
from .devices import check_device
from .model import WorldPM, load_model
from .plan import auto_device_map, check_visible, gpu_capacity
from .qlinear import GPTQLinear

TRUNCATION = ("error", "left")
# padded tokens per forward pass: GPUs want large batches; on a CPU smaller ones stay in cache
# (bench/test_throughput.py: 2048 scored 22% faster than 8192 on the 2-core box)
DEFAULT_TOKEN_BUDGET = {"cpu": 2048, "cuda": 8192}
DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
               "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


class ConversationTooLong(ValueError):
    pass


@dataclass(frozen=True)
class Comparison:
    score_a: float
    score_b: float

    @property
    def prob_a(self) -> float:
        """Bradley-Terry probability that A is preferred: sigmoid(score_a - score_b)."""
        return 1.0 / (1.0 + math.exp(self.score_b - self.score_a))

    @property
    def preferred(self) -> str:
        return "a" if self.score_a >= self.score_b else "b"


@dataclass(frozen=True)
class Ranking:
    scores: list[float]  # in the order the responses were given

    @property
    def order(self) -> list[int]:
        """Indices of the responses, best first."""
        return sorted(range(len(self.scores)), key=lambda i: -self.scores[i])

    @property
    def best(self) -> int:
        return self.order[0]


def plan_batches(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Indices grouped into batches, longest first, each at most token_budget padded tokens
    (a sequence longer than the budget gets a batch of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        # sorted longest first, so a batch's first element sets its padded length
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= token_budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


class Scorer:
    """Scores conversations with a WorldPM model.

    token_budget: padded tokens per forward pass (batch size x longest sequence); default 8192 on
    a GPU, 2048 on the CPU.
    truncation: "error" (default) refuses a conversation longer than max_length tokens;
    "left" drops its oldest tokens and keeps the end, where the reward is read.
    """

    def __init__(self, model: WorldPM, tokenizer, *, token_budget: int | None = None,
                 truncation: str = "error", max_length: int | None = None):
        if truncation not in TRUNCATION:
            raise ValueError(f"truncation: expected one of {TRUNCATION}, found {truncation!r}")
        if token_budget is None:
            token_budget = DEFAULT_TOKEN_BUDGET["cpu" if model.input_device.type == "cpu" else "cuda"]
        if token_budget < 1:
            raise ValueError(f"token_budget: expected a positive integer, found {token_budget}")
        limit = model.config.max_position_embeddings
        if max_length is not None and not 2 <= max_length <= limit:
            raise ValueError(f"max_length: expected 2..{limit} (max_position_embeddings), found {max_length}")
        self.model, self.tokenizer = model, tokenizer
        self.token_budget, self.truncation = token_budget, truncation
        self.max_length = max_length or limit
        self.pad_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "auto", dtype: torch.dtype | str | None = None,
                        max_memory: dict | None = None, backend: str = "auto", quant: str | None = None,
                        **kwargs) -> Scorer:
        """Load a bf16 or GPTQ checkpoint directory.

        device: "auto" (default): every visible GPU, whole decoder layers placed in order under each
        GPU's free memory (or `max_memory`, e.g. {0: "22GiB", 1: "22GiB"}) minus a reserve for the
        activations of `token_budget` tokens, on as few GPUs as hold them, balanced; the CPU when no
        GPU is visible. Or "cpu", "cuda", "cuda:N".
        Each tensor goes from its shard straight to its device.
        dtype defaults to float32 on CPU and bfloat16 on GPU. backend: for GPTQ linears and the
        tail, "auto" (Triton on GPUs, torch on CPU), "torch" or "triton". quant: "bnb-nf4" or
        "bnb-int8" quantizes a bf16 checkpoint's decoder linears with bitsandbytes while loading."""
        if isinstance(dtype, str):
            if dtype not in DTYPE_NAMES:
                raise ValueError(f"dtype: expected one of {sorted(DTYPE_NAMES)}, found {dtype!r}")
            dtype = DTYPE_NAMES[dtype]
        device = check_device(device)
        ckpt = Checkpoint(path)
        device_map = device
        if device == "auto":
            if max_memory is not None:
                check_visible(gpu_capacity(max_memory))
            device_map = auto_device_map(ckpt, dtype or torch.bfloat16, max_memory,
                                         kwargs.get("token_budget") or DEFAULT_TOKEN_BUDGET["cuda"], quant)
        elif max_memory is not None:
            raise ValueError("max_memory: only used with device='auto' on a machine with GPUs")
        first = torch.device("cuda" if isinstance(device_map, dict) else device_map)
        if dtype is None:
            dtype = torch.float32 if first.type == "cpu" else torch.bfloat16
        return cls(load_model(ckpt, dtype, device_map, backend, quant), load_tokenizer(path), **kwargs)

    @property
    def backend(self) -> str:
        """What runs the model, in words (also logged by the CLI)."""
        m = self.model
        devices = sorted({str(p.device) for p in m.parameters()})
        quant = next((q for q in m.modules() if isinstance(q, GPTQLinear)), None)
        dtype = str(m.score[0].weight.dtype).removeprefix("torch.")
        bnb = next((type(q).__name__ for q in m.modules() if type(q).__module__.startswith("bitsandbytes")), None)
        weights = (quant.describe() if quant is not None else f"bitsandbytes {bnb} linears (quantized while loading)"
                   if bnb else f"dense {dtype} linears")
        tail = "Triton fused tail" if m.tail_backend == "triton" else "torch tail"
        return f"{weights}; {tail}; {dtype} compute on {', '.join(devices)}"

    def encode(self, conversations: list) -> list[list[int]]:
        encoded = []
        for n, conv in enumerate(conversations):
            ids = encode_conversation(self.tokenizer, conv)
            if len(ids) > self.max_length:
                if self.truncation == "error":
                    raise ConversationTooLong(
                        f"conversation {n} has {len(ids)} tokens; the model reads at most {self.max_length} "
                        "(pass truncation='left' / --truncate to keep the last tokens)")
                ids = ids[-self.max_length:]
            encoded.append(ids)
        return encoded

    @torch.inference_mode()
    def score_ids(self, encoded: list[list[int]], progress=None) -> list[float]:
        scores = [0.0] * len(encoded)
        for batch in plan_batches([len(ids) for ids in encoded], self.token_budget):
            width = len(encoded[batch[0]])
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)  # [B, T], right-padded
            for row, i in enumerate(batch):
                ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
            last = torch.tensor([len(encoded[i]) - 1 for i in batch])  # [B] the <|endoftext|> positions
            with warnings.catch_warnings():  # bitsandbytes int8 says this on every call with fp32/bf16 inputs
                warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
                out = self.model(ids, last).tolist()
            for i, s in zip(batch, out):
                scores[i] = s
            if progress is not None:
                progress.update(len(batch))
        return scores

    def score(self, conversations: list, progress=None) -> list[float]:
        """One score per conversation (a list of {"role", "content"} messages), in input order."""
        return self.score_ids(self.encode(conversations), progress)

    def compare(self, prompt, response_a: str, response_b: str) -> Comparison:
        """Score two responses to the same prompt (a string or a list of prior messages)."""
        a, b = self.score([with_response(prompt, r, "response") for r in (response_a, response_b)])
        return Comparison(a, b)

    def rank(self, prompt, responses: list[str]) -> Ranking:
        """Score several responses to one prompt; `.order` lists them best first."""
        return Ranking(self.score([with_response(prompt, r, f"responses[{i}]") for i, r in enumerate(responses)]))
