"""Calibration token ids: WorldPM-templated conversations, cut to a length from the left so the
final <|endoftext|> (where the reward is read) stays in."""

from __future__ import annotations

import hashlib
import json

from worldpm_lite.chat import encode_conversation
from worldpm_lite.data import read_requests, sharegpt_conversations

MIN_TOKENS = 16


def _take(tokenizer, conversations, samples: int, seq_len: int) -> list[list[int]]:
    out = []
    for conv in conversations:
        ids = encode_conversation(tokenizer, conv)
        if len(ids) >= MIN_TOKENS:
            out.append(ids[-seq_len:])
            if len(out) == samples:
                break
    return out


def builtin_calibration(tokenizer, samples: int, seq_len: int) -> list[list[int]]:
    """Real ShareGPT conversations (whole multi-turn ones), in file order."""
    out = _take(tokenizer, sharegpt_conversations(), samples, seq_len)
    if len(out) < samples:
        raise ValueError(f"the built-in set has only {len(out)} usable conversations; asked for {samples}")
    return out


def file_calibration(path: str, tokenizer, samples: int, seq_len: int) -> list[list[int]]:
    """Conversations from a JSONL file in any format `score` reads (a pair gives both responses)."""
    conversations = [c for r in read_requests(path) for c in r.conversations]
    out = _take(tokenizer, conversations, samples, seq_len)
    if not out:
        raise ValueError(f"{path}: no conversation of at least {MIN_TOKENS} tokens")
    return out


def fingerprint(calibration: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(calibration).encode()).hexdigest()
