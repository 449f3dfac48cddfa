"""Calibration token ids, built the way scoring sees text: whole WorldPM-templated conversations
that start with the system turn and end with <|endoftext|> (where the reward is read), of the
lengths they naturally have.

A conversation longer than `seq_len` is cut after its last assistant reply that still fits, so
it stays a whole conversation. Conversations whose first exchange alone is too long are used only
when there are not enough others, as their last `seq_len` tokens (which still end with
<|endoftext|>). bench/tiny_robustness.py compares this with taking the last `seq_len` tokens of
every conversation (the earlier default).
"""

from __future__ import annotations

import hashlib
import json

from worldpm_lite.chat import encode_conversation
from worldpm_lite.data import read_requests, sharegpt_conversations
from worldpm_lite.errors import InputError

MIN_TOKENS = 16


def whole_conversation(tokenizer, conversation: list[dict], seq_len: int) -> list[int] | None:
    """Token ids of the longest prefix of `conversation` that ends with an assistant reply and fits
    `seq_len` tokens; None when not even the first one fits."""
    ends = [i + 1 for i, m in enumerate(conversation) if m["role"] == "assistant"] or [len(conversation)]
    best = None
    for end in ends:  # prefixes grow: stop at the first one that no longer fits
        ids = encode_conversation(tokenizer, conversation[:end])
        if len(ids) > seq_len:
            break
        best = ids
    return best


def last_tokens(tokenizer, conversation: list[dict], seq_len: int) -> list[int]:
    """The last `seq_len` tokens of the whole conversation (the earlier default, kept for comparison)."""
    return encode_conversation(tokenizer, conversation)[-seq_len:]


def _take(tokenizer, conversations, samples: int, seq_len: int, cut=whole_conversation,
          scan: int | None = None) -> list[list[int]]:
    """Up to `samples` conversations cut by `cut`, from the first `scan` (None: all); those `cut`
    refuses (too long) make up any shortfall, in order, as their last `seq_len` tokens."""
    out, too_long = [], []
    for n, conv in enumerate(conversations):
        if scan is not None and n >= scan:
            break
        ids = cut(tokenizer, conv, seq_len)
        if ids is None:
            if len(too_long) < samples:
                too_long.append(conv)
        elif len(ids) >= MIN_TOKENS:
            out.append(ids)
            if len(out) == samples:
                return out
    for conv in too_long:
        ids = last_tokens(tokenizer, conv, seq_len)
        if len(ids) >= MIN_TOKENS:
            out.append(ids)
            if len(out) == samples:
                break
    return out


def builtin_calibration(tokenizer, samples: int, seq_len: int, cut=whole_conversation) -> list[list[int]]:
    """Real ShareGPT conversations, in file order."""
    out = _take(tokenizer, sharegpt_conversations(), samples, seq_len, cut, scan=max(2000, 20 * samples))
    if len(out) < samples:
        raise InputError(f"the built-in set has only {len(out)} usable conversations; asked for {samples}")
    return out


def file_calibration(path: str, tokenizer, samples: int, seq_len: int) -> list[list[int]]:
    """Conversations from a JSONL file in any format `score` reads (a pair gives both responses)."""
    conversations = [c for r in read_requests(path) for c in r.conversations]
    out = _take(tokenizer, conversations, samples, seq_len)
    if not out:
        raise InputError(f"{path}: no conversation of at least {MIN_TOKENS} tokens")
    return out


def fingerprint(calibration: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(calibration).encode()).hexdigest()
