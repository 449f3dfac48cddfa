"""Frozen, validated settings, importable without torch: the command line takes its defaults from here
and hands these objects on, so each value is checked once, in one place.

  RuntimeOptions   how a model runs: what the CLI, a Ray worker, a Serve replica and `fidelity` hand
                   to Scorer.from_pretrained
  ServeOptions     the HTTP service's limits and API key (serve.app.create_app)
  QuantConfig      the GPTQ core's parameters (quantize/gptq.py)
  QuantizeSettings what `quantize` does (quantize/run.py)
  TrainConfig      how `make-tiny` trains the small model (tiny.py)
  Offload          which decoder layers stream from host memory (offload.py runs it)

A bad value is a UsageError naming the field, what was expected and what was found.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from .errors import UsageError

DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
BACKENDS = ("auto", "torch", "triton")
BNB = {"bnb-nf4": 4, "bnb-int8": 8}  # bitsandbytes, quantized while loading a bf16 checkpoint
TRUNCATION = ("error", "left")
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gib": 1 << 30,
          "t": 1 << 40, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """'24GiB' -> bytes. Units: B, KB/MB/GB/TB (powers of 10), KiB/MiB/GiB/TiB or K/M/G/T (powers of 2)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise UsageError(f"memory size {text!r}: expected a number with a unit, like 24GiB or 80GB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _fail(name: str, expected: str, found) -> UsageError:
    return UsageError(f"{name}: expected {expected}, found {found!r}")


def _count(name: str, value, low: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _fail(name, f"an integer >= {low}" + (" or None" if optional else ""), value)


def _number(name: str, value, low: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low:
        raise _fail(name, f"a number >= {low:g}", value)


def _flags(obj, *names: str) -> None:
    for name in names:
        if not isinstance(getattr(obj, name), bool):
            raise _fail(name, "true or false", getattr(obj, name))


def _set(obj, name: str, value) -> None:
    object.__setattr__(obj, name, value)  # a frozen dataclass normalizing its own field


def of(cls, options=None, **overrides):
    """An instance of the settings class `cls` from an instance, a dict of its fields or None, with
    `overrides` applied; an unknown name is a UsageError listing the known ones."""
    base = dataclasses.asdict(options) if dataclasses.is_dataclass(options) else dict(options or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(base) - known | set(overrides) - known)
    if unknown:
        raise UsageError(f"{cls.__name__}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**(base | overrides))


@dataclass(frozen=True)
class Offload:
    """Which decoder layers stream (the rest stay resident) and how many ring buffers they pass through."""

    streamed: tuple[int, ...]
    ring: int = 2

    def __post_init__(self):
        _set(self, "streamed", tuple(self.streamed))
        if isinstance(self.ring, bool) or not isinstance(self.ring, int) or self.ring < 1:
            raise UsageError(f"offload ring: expected at least 1 buffer, found {self.ring}")
        if len(set(self.streamed)) != len(self.streamed) or any(not isinstance(i, int) or i < 0
                                                                for i in self.streamed):
            raise UsageError(f"offload streamed layers: expected distinct layer indices, found {self.streamed}")


def gpu_sizes(value) -> dict[int, int] | None:
    """max_memory as {GPU index: bytes}: from "22GiB,22GiB", or a dict keyed by 0, "0" or "cuda:0"
    whose values are bytes or sizes like "22GiB"."""
    if value is None:
        return None
    if isinstance(value, str):
        value = dict(enumerate(value.split(",")))
    if not isinstance(value, dict):
        raise _fail("max_memory", "sizes per GPU such as '22GiB,22GiB' or {0: '22GiB'}", value)
    out = {}
    for key, size in value.items():
        index = str(key).removeprefix("cuda:")
        if not index.isdigit():
            raise UsageError(f"max_memory: keys are GPU indices (0, 1, ... or 'cuda:N'), found {key!r}")
        out[int(index)] = size if isinstance(size, int) and not isinstance(size, bool) else parse_size(size)
    if not out:
        raise UsageError("max_memory: expected at least one GPU, found none")
    return out


@dataclass(frozen=True)
class RuntimeOptions:
    """How a model runs (Scorer.from_pretrained; the CLI flags of every scoring command).

    device      "auto" (every visible GPU, the CPU when there is none), "cpu", "cuda" or "cuda:N"
    dtype       compute dtype by name (float32, bfloat16, float16; a torch dtype is read by its name);
                None: float32 on the CPU, bfloat16 on GPUs
    backend     GPTQ linears and the tail: auto (Triton on GPUs, torch on the CPU), torch or triton
    quant       "bnb-nf4" / "bnb-int8": a bf16 checkpoint quantized by bitsandbytes while loading
    token_budget  tokens per forward pass; None: 8192 on GPUs, 2048 on the CPU (or the streamed plan's)
    max_memory  {GPU index: bytes} to plan with instead of the free memory (also "22GiB,22GiB")
    truncation  "error" refuses a conversation longer than the model reads; "left" keeps its end
    packing, share_prompts, pipeline   packed batches; a shared prompt run once; GPU stages overlapped
    offload     None: stream layers from host memory only when they do not fit; True: always plan a
                streamed split (on the CPU every layer streams); False: never; or an Offload
    host_memory bytes (or "64GiB") the streamed layers may take; None: what is available now
    threads     torch threads of a Ray worker or replica process (set where it loads the model)
    """

    device: str = "auto"
    dtype: str | None = None
    backend: str = "auto"
    quant: str | None = None
    token_budget: int | None = None
    max_memory: dict | None = None
    truncation: str = "error"
    packing: bool = True
    share_prompts: bool = True
    pipeline: bool = True
    offload: bool | Offload | None = None
    host_memory: int | None = None
    threads: int | None = None

    of = classmethod(of)

    def __post_init__(self):
        if not isinstance(self.device, str) or not DEVICE.fullmatch(self.device):
            _set(self, "device", str(self.device))  # a torch.device reads as its text
            if not DEVICE.fullmatch(self.device):
                raise UsageError(f"device {self.device!r}: expected auto (every visible GPU; the CPU when there is "
                                 "none), cpu, cuda or cuda:N")
        if self.dtype is not None:
            name = str(self.dtype).removeprefix("torch.")
            if name not in DTYPE_NAMES:
                raise _fail("dtype", f"one of {sorted(DTYPE_NAMES)}", self.dtype)
            _set(self, "dtype", DTYPE_NAMES[name])
        if self.backend not in BACKENDS:
            raise _fail("backend", f"one of {BACKENDS}", self.backend)
        if self.quant is not None and self.quant not in BNB:
            raise _fail("quant", f"one of {sorted(BNB)} or None", self.quant)
        _count("token_budget", self.token_budget, 1, optional=True)
        _set(self, "max_memory", gpu_sizes(self.max_memory))
        if self.truncation not in TRUNCATION:
            raise _fail("truncation", f"one of {TRUNCATION}", self.truncation)
        _flags(self, "packing", "share_prompts", "pipeline")
        if self.offload not in (None, True, False) and not isinstance(self.offload, Offload):
            raise _fail("offload", "None, True, False or an Offload", self.offload)
        if isinstance(self.host_memory, str):
            _set(self, "host_memory", parse_size(self.host_memory))
        _count("host_memory", self.host_memory, 1, optional=True)
        _count("threads", self.threads, 1, optional=True)


# Host memory a queued token holds with its share of its request (the id as a Python int in a list, the
# parsed groups, the connection): bench/serve_load.py --openrlhf 8192 measured 155 B a token in flight.
QUEUE_BYTES_PER_TOKEN = 256
QUEUE_MEMORY_SHARE = 0.25  # of the host memory available at start, the default budget of the queue


@dataclass(frozen=True)
class ServeOptions:
    """The HTTP service's limits (serve.app.create_app; `serve`'s flags).

    max_items: conversations or queries per request. max_queue_tokens: tokens the queue may hold
    (requests read and tokenized, waiting for the model) before new ones get 503 + Retry-After; None:
    a quarter of the host memory available at start, at QUEUE_BYTES_PER_TOKEN a token. max_queue:
    requests it may hold, a backstop behind the token bound. max_wait: seconds a batch below the token
    budget waits for requests on their way. max_body: bytes of the largest request body.
    served_model_names: the names a request's `model` may give and answers report (the first), as
    vLLM's --served-model-name; empty: the model folder's name. api_key: required on every route but
    /health and /metrics (never shown: not in the repr)."""

    max_items: int = 512
    max_queue_tokens: int | None = None
    max_queue: int = 65536
    max_wait: float = 0.005
    max_body: int = 64 << 20
    served_model_names: tuple[str, ...] = ()
    api_key: str | None = field(default=None, repr=False)

    of = classmethod(of)

    def __post_init__(self):
        _count("max_items", self.max_items, 1)
        _count("max_queue_tokens", self.max_queue_tokens, 1, optional=True)
        _count("max_queue", self.max_queue, 1)
        _number("max_wait", self.max_wait, 0)
        _count("max_body", self.max_body, 1)
        _set(self, "served_model_names", tuple(self.served_model_names))
        if not all(isinstance(n, str) and n for n in self.served_model_names):
            raise _fail("served_model_names", "non-empty names", self.served_model_names)
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise UsageError("api_key: expected a non-empty string or None")
        if self.api_key is not None and ("/" in self.api_key or not self.api_key.isprintable()):
            raise UsageError("api_key: expected printable characters and no '/' (it may travel in a URL's path)")


BITS = (2, 3, 4, 8)  # the checkpoint format packs 4 and 8; 2 and 3 serve as worse-quantizer controls


@dataclass(frozen=True)
class QuantConfig:
    """The GPTQ core's parameters (quantize/gptq.py)."""

    bits: int = 4
    group_size: int = 128  # -1: one group per row (per-channel)
    sym: bool = True
    act_order: bool = False  # desc_act: quantize columns in order of decreasing Hessian diagonal
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal (GPTQ section 4, "Cholesky Reformulation")
    block_size: int = 128  # columns per lazy batch (section 4, "Lazy Batch-Updates")

    def __post_init__(self):
        if self.bits not in BITS:
            raise UsageError(f"bits: expected one of {BITS}, found {self.bits}")
        if self.group_size != -1 and (self.group_size < 1 or self.group_size % 32):
            raise UsageError(f"group_size: expected -1 or a positive multiple of 32, found {self.group_size}")
        if not 0 < self.damp < 1:
            raise UsageError(f"damp: expected a fraction in (0, 1), found {self.damp}")
        if self.block_size < 1:
            raise UsageError(f"block_size: expected a positive integer, found {self.block_size}")

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def groups(self, in_features: int) -> int:
        g = in_features if self.group_size == -1 else self.group_size
        if in_features % g:
            raise ValueError(f"in_features {in_features} is not a multiple of group_size {g}")
        return in_features // g


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
            raise UsageError(f"bits: expected 4 or 8 (what the GPTQ checkpoint format packs), found {self.bits}")
        self.quant_config()  # validates group_size
        if self.method not in ("gptq", "rtn"):
            raise UsageError(f"method: expected 'gptq' or 'rtn', found {self.method!r}")
        if self.samples < 1 or self.seq_len < 16:
            raise UsageError(f"samples >= 1 and seq_len >= 16 expected, found {self.samples} and {self.seq_len}")

    def quant_config(self) -> QuantConfig:
        return QuantConfig(bits=self.bits, group_size=self.group_size, sym=self.sym, act_order=self.act_order)


@dataclass(frozen=True)
class TrainConfig:
    """How `make-tiny` trains the small model (tiny.py); the CLI takes its defaults from here."""

    seed: int = 0
    pairs: int = 4800  # built from the first conversations that fit max_tokens
    heldout: int = 500
    max_tokens: int = 128  # longest encoded conversation kept (prompt + response)
    steps: int = 300
    batch_pairs: int = 16
    # Peak learning rate. Recipe 2 used 3e-3: the residual stream ran away (norm ~850 after layer 0
    # at every token), the last token's attention went one-hot, 8-bit noise moved single scores by
    # 0.6, and whether word order was learnt at all depended on the machine's float kernels.
    lr: float = 1e-3
    weight_decay: float = 0.1  # decoupled (AdamW), on weight matrices only: never on norm gains or biases
    train_embeddings: bool = True
    # Stand-ins for another machine's arithmetic, for robustness checks (bench/tiny_robustness.py):
    init_jitter: float = 0.0  # std of Gaussian noise added to the initial weights
    shuffle_seed: int | None = None  # seed of the batch order (default: seed + 1)

    def __post_init__(self):
        if self.heldout >= self.pairs:
            raise UsageError(f"heldout ({self.heldout}) must be smaller than pairs ({self.pairs})")
        for name in ("pairs", "steps", "batch_pairs", "max_tokens"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name}: expected a positive integer")
        if not 0 < self.lr < 1 or self.weight_decay < 0:
            raise UsageError(f"lr in (0, 1) and weight_decay >= 0 expected, found {self.lr} and {self.weight_decay}")
