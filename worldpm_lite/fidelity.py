"""Fidelity: how closely candidate models' scores follow a reference's on the same data.

Every model scores the same token sequences (a candidate whose tokenizer files differ from the
reference's is refused). The data file is streamed through `score`'s machinery once per model, each
model's results kept in the report folder (scores-K.jsonl) and resumable; only the scores, one
float per conversation, are held in memory. Metrics per candidate, against the reference:
  pairwise agreement   share of compared pairs the candidate orders as the reference does; the
                       pairs are those inside each request (a chosen/rejected pair, all pairs of a
                       ranking), or, when the data holds only single conversations, all pairs of them
  ... above margin     the same over pairs whose reference scores differ by more than `margin`
  ... clear pairs      the same over pairs whose reference margin exceeds CLEAR_FLOOR x the
                       reference's score std: scale-free, so it means the same for any model
  label accuracy       share of chosen/rejected pairs where chosen scores higher (also for the reference)
  Spearman, Pearson    of the scores; Kendall tau per ranking prompt, averaged
  mean / max |error|   of the scores, also over the reference's score std (scale-free); scale and
                       offset of the least-squares fit candidate = a * ref + b
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np

from .checkpoint import Checkpoint, model_identity, write_json_atomic
from .data import Request
from .errors import InputError, NotFound, OutputExists, UsageError
from .hub import is_hub_id, resolve
from .options import RuntimeOptions

CLEAR_FLOOR = 0.1  # a reference preference counts as clear above 0.1 x its score std
MAX_ALL_PAIRS = 2_000_000  # single conversations only: all pairs up to this many, else a fixed random sample
SAME_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # must match the reference's


@dataclass(frozen=True)
class Candidate:
    path: str
    quant: str | None = None  # "bnb-nf4" / "bnb-int8": a bf16 checkpoint quantized while loading

    @classmethod
    def parse(cls, text: str) -> Candidate:
        """'DIR', or 'bnb-nf4:DIR' / 'bnb-int8:DIR'."""
        for quant in ("bnb-nf4", "bnb-int8"):
            if text.startswith(quant + ":"):
                return cls(text[len(quant) + 1:], quant)
        return cls(text)

    @property
    def label(self) -> str:
        name = self.path if is_hub_id(self.path.partition("@")[0]) else Path(self.path).name or self.path
        return f"{name} ({self.quant})" if self.quant else name


def _shapes(requests) -> list[tuple[str, int]]:
    """(kind, conversations) of each request: Request objects or such tuples already (`stream.scan`)."""
    return [(r.kind, len(r.conversations)) if isinstance(r, Request) else r for r in requests]


def compared_pairs(requests: list, seed: int = 0) -> np.ndarray:
    """[P, 2] indices into the flattened conversations, ordered (first, second)."""
    pairs, k = [], 0
    for _, n in _shapes(requests):
        pairs += [(k + i, k + j) for i, j in combinations(range(n), 2)]
        k += n
    if pairs:
        return np.array(pairs, dtype=np.int64)
    if k * (k - 1) // 2 <= MAX_ALL_PAIRS:
        i, j = np.triu_indices(k, 1)
        return np.stack([i, j], axis=1).astype(np.int64)
    rng = np.random.default_rng(seed)
    i, j = rng.integers(0, k, MAX_ALL_PAIRS), rng.integers(0, k, MAX_ALL_PAIRS)
    keep = i != j
    return np.stack([i[keep], j[keep]], axis=1)


def label_pairs(requests: list) -> np.ndarray:
    """[L, 2] (chosen, rejected) indices of the pair requests."""
    out, k = [], 0
    for kind, n in _shapes(requests):
        if kind == "pair":
            out.append((k, k + 1))
        k += n
    return np.array(out, dtype=np.int64).reshape(-1, 2)


def rankings(requests: list) -> list[np.ndarray]:
    out, k = [], 0
    for kind, n in _shapes(requests):
        if kind == "ranking" and n >= 3:
            out.append(np.arange(k, k + n))
        k += n
    return out


def compare(ref: np.ndarray, cand: np.ndarray, requests: list, margin: float) -> dict:
    """Every metric of `cand` against `ref` (one score per flattened conversation); requests:
    Request objects or their (kind, conversations) shapes."""
    from scipy import stats

    pairs = compared_pairs(requests)
    d_ref = ref[pairs[:, 0]] - ref[pairs[:, 1]]
    d_cand = cand[pairs[:, 0]] - cand[pairs[:, 1]]
    decided = d_ref != 0  # a tie in the reference has no preference to agree with
    agree = np.sign(d_ref) == np.sign(d_cand)
    wide = np.abs(d_ref) > margin
    labels = label_pairs(requests)
    taus = [stats.kendalltau(ref[idx], cand[idx]).statistic for idx in rankings(requests)]
    err = cand - ref
    std = float(ref.std()) if len(ref) > 1 else 0.0
    clear = np.abs(d_ref) > CLEAR_FLOOR * std if std > 0 else np.zeros(len(d_ref), dtype=bool)
    scale, offset = np.polyfit(ref, cand, 1) if len(ref) > 1 and np.ptp(ref) > 0 else (float("nan"), float("nan"))
    constant = len(ref) < 2 or np.ptp(ref) == 0 or np.ptp(cand) == 0
    return {
        "pairs": int(decided.sum()),
        "pairwise_agreement": float(agree[decided].mean()) if decided.any() else None,
        "pairs_above_margin": int(wide.sum()),
        "pairwise_agreement_above_margin": float(agree[wide].mean()) if wide.any() else None,
        "clear_pairs": int(clear.sum()),
        "pairwise_agreement_clear": float(agree[clear].mean()) if clear.any() else None,
        "label_pairs": len(labels),
        "label_accuracy": float((cand[labels[:, 0]] > cand[labels[:, 1]]).mean()) if len(labels) else None,
        "spearman": None if constant else float(stats.spearmanr(ref, cand).statistic),
        "pearson": None if constant else float(stats.pearsonr(ref, cand).statistic),
        "ranking_prompts": len(taus),
        "kendall_tau_per_prompt": float(np.nanmean(taus)) if taus else None,
        "mean_abs_error": float(np.abs(err).mean()),
        "max_abs_error": float(np.abs(err).max()),
        "reference_std": std,
        "mean_abs_error_over_std": float(np.abs(err).mean() / std) if std > 0 else None,
        "max_abs_error_over_std": float(np.abs(err).max() / std) if std > 0 else None,
        "fit_scale": float(scale),
        "fit_offset": float(offset),
    }


def check_same_tokenizer(reference: Path, candidate: Path) -> None:
    for name in SAME_TOKENIZER_FILES:
        a, b = reference / name, candidate / name
        if a.exists() and (not b.exists() or a.read_bytes() != b.read_bytes()):
            raise InputError(f"{candidate}: {name} differs from the reference's ({a}); fidelity compares models "
                             "that read the same tokens")


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def markdown(report: dict) -> str:
    keys = [("pairwise_agreement", "pairwise agreement"),
            ("pairwise_agreement_above_margin", f"agreement, reference margin > {report['margin']}"),
            ("pairwise_agreement_clear", f"agreement, reference margin > {CLEAR_FLOOR} x its std"),
            ("label_accuracy", "label accuracy"), ("spearman", "Spearman"), ("pearson", "Pearson"),
            ("kendall_tau_per_prompt", "Kendall tau per prompt"), ("mean_abs_error", "mean abs error"),
            ("max_abs_error", "max abs error"), ("mean_abs_error_over_std", "mean abs error / reference std"),
            ("max_abs_error_over_std", "max abs error / reference std"), ("fit_scale", "fit scale a"),
            ("fit_offset", "fit offset b")]
    cands = report["candidates"]
    lines = ["# Fidelity report\n", f"reference: `{report['reference']}`  ",
             f"data: `{report['data']}`: {report['requests']} requests, {report['conversations']} conversations, "
             f"{report['pairs']} compared pairs ({report['pairs_above_margin']} with reference margin > "
             f"{report['margin']}), {report['label_pairs']} labelled pairs  ",
             f"reference label accuracy: {_fmt(report['reference_label_accuracy'])}\n",
             "| metric | " + " | ".join(c["label"] for c in cands) + " |",
             "| --- |" + " --- |" * len(cands)]
    lines += [f"| {title} | " + " | ".join(_fmt(c["metrics"][k]) for c in cands) + " |" for k, title in keys]
    lines += ["", "Fit: candidate score = a x reference score + b. Plots: `scatter.png`, `errors.png`.", ""]
    return "\n".join(lines)


def plots(ref: np.ndarray, scores: dict[str, np.ndarray], out: Path) -> None:
    from matplotlib.figure import Figure  # the object API: no pyplot, no global backend switch

    n = len(scores)
    fig = Figure(figsize=(4.2 * n, 4.2), layout="constrained")
    lo, hi = min(ref.min(), *(s.min() for s in scores.values())), max(ref.max(), *(s.max() for s in scores.values()))
    for ax, (label, s) in zip(fig.subplots(1, n, squeeze=False)[0], scores.items()):
        ax.scatter(ref, s, s=5, alpha=0.5)
        ax.plot([lo, hi], [lo, hi], color="gray", linewidth=0.8)
        ax.set(title=label, xlabel="reference score", ylabel="candidate score")
    fig.savefig(out / "scatter.png", dpi=100)
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for label, s in scores.items():
        ax.hist(s - ref, bins=60, alpha=0.5, label=label)
    ax.set(xlabel="candidate - reference score", ylabel="conversations", title="score errors")
    ax.legend()
    fig.savefig(out / "errors.png", dpi=100)


def write_report(report: dict, ref: np.ndarray, scores: dict[str, np.ndarray], out: str | Path,
                 overwrite: bool = False) -> Path:
    """report.json, report.md, scatter.png, errors.png into `out`'s staging folder (which also holds
    each model's scores), renamed into place whole (an existing `out` is refused unless overwrite)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExists(f"{out}: already exists (pass --overwrite to replace it)")
    if not out.parent.is_dir():
        raise NotFound(f"{out}: folder {out.parent} does not exist")
    tmp = staging_dir(out)
    tmp.mkdir(exist_ok=True)
    (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (tmp / "report.md").write_text(markdown(report))
    plots(ref, scores, tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def staging_dir(report: str | Path) -> Path:
    out = Path(report)
    return out.with_name(f".{out.name}.partial")


def flat_scores(path: Path) -> np.ndarray:
    """One score per conversation from a `score` results file, in input order."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            out += [r["score"]] if "score" in r else [r["chosen_score"], r["rejected_score"]] \
                if "chosen_score" in r else r["scores"]
    return np.array(out, dtype=np.float64)


def run_fidelity(reference: str, candidates: list[Candidate], data: str, *, margin: float = 0.5,
                 scorer_args: RuntimeOptions | dict | None = None, staging: str | Path, resume: bool = False,
                 progress: bool = True, log=print, placed=None) -> tuple[dict, np.ndarray, dict[str, np.ndarray]]:
    """Score the JSONL file `data` with the reference and every candidate, streaming (each model's
    results go to `staging`/scores-K.jsonl, resumable like `score`); the report dict and the scores.
    scorer_args: how every model runs (RuntimeOptions, or a dict of its fields; a candidate's own quant
    replaces its quant); placed: Scorer.from_pretrained's log, for the line saying where each loads."""
    from .scorer import Scorer
    from .stream import refuse_other_settings, scan, score_file, score_settings

    if not candidates:
        raise UsageError("candidates: expected at least one")
    options = RuntimeOptions.of(scorer_args)
    local = {m: resolve(m, log=log) for m in [reference, *(c.path for c in candidates)]}  # hub ids downloaded
    ref_ckpt = Checkpoint(local[reference])
    for c in candidates:
        cfg = Checkpoint(local[c.path]).config  # validates the directory before any scoring starts
        if (cfg.hidden_size, cfg.vocab_size) != (ref_ckpt.config.hidden_size, ref_ckpt.config.vocab_size):
            log(f"note: {c.path} has another architecture than the reference (hidden {cfg.hidden_size}, "
                f"vocab {cfg.vocab_size}): comparing scores of different models")
        check_same_tokenizer(local[reference], local[c.path])  # every model reads the same tokens
    shapes = scan(data)
    names = [c.label for c in candidates]
    if len(set(names)) < len(names):  # two folders with the same name: tell them apart by path
        names = [f"{c.path} ({c.quant})" if c.quant else c.path for c in candidates]
    staging = Path(staging)
    if staging.exists() and not resume:
        raise OutputExists(f"{staging}: an interrupted fidelity run is there (pass --resume to continue it, or "
                              "delete it)")
    staging.mkdir(exist_ok=True)
    models = [(Candidate(reference), "reference")] + list(zip(candidates, names))
    results = []
    for k, (c, label) in enumerate(models):
        out, stamp = staging / f"scores-{k}.jsonl", staging / f"scores-{k}.model.json"
        model = {**model_identity(local[c.path]), "quant": c.quant}  # a finished model's scores are its weights'
        if out.exists() and stamp.exists():
            refuse_other_settings(json.loads(stamp.read_text()), model, stamp, str(staging), log)
        if not out.exists():
            write_json_atomic(stamp, model)
            scorer = Scorer.from_pretrained(local[c.path], options, quant=c.quant, log=placed)
            log(f"{label}: {scorer.backend}")
            score_file(scorer, data, str(out), score_settings(scorer, local[c.path]), resume=resume, log=log,
                       progress=progress)
            del scorer
        results.append(flat_scores(out))
    ref, scores = results[0], dict(zip(names, results[1:]))
    labels = label_pairs(shapes)
    pairs = compared_pairs(shapes)
    d_ref = ref[pairs[:, 0]] - ref[pairs[:, 1]]
    report = {
        "reference": str(reference), "data": str(data), "margin": margin, "requests": len(shapes),
        "conversations": len(ref), "pairs": int((d_ref != 0).sum()),
        "pairs_above_margin": int((np.abs(d_ref) > margin).sum()), "label_pairs": len(labels),
        "reference_label_accuracy": float((ref[labels[:, 0]] > ref[labels[:, 1]]).mean()) if len(labels) else None,
        "scores": {"reference": "scores-0.jsonl"} | {name: f"scores-{k + 1}.jsonl" for k, name in enumerate(names)},
        "candidates": [{"label": name, "path": c.path, "quant": c.quant,
                        "metrics": compare(ref, scores[name], shapes, margin)} for c, name in zip(candidates, names)],
    }
    return report, ref, scores
