"""vLLM's pooling API, as `serve` speaks it: what verl's reward loop and vLLM pooling users send.

  POST /classify, /v1/classify  {"model", "input" | "messages", "use_activation", ...}
                                -> {"id": "classify-...", "object": "list", "created", "model",
                                    "data": [{"index", "label", "probs": [value], "num_classes": 1}], "usage"}
  POST /pooling                 the same inputs -> "data": [{"index", "object": "pooling", "data": [value]}]
  GET  /v1/models               {"object": "list", "data": [model card]}

Shapes follow vLLM's protocol (vllm/entrypoints/pooling/*/protocol.py, engine/protocol.py). `input` is
a string, a list of strings, token ids or a list of token-id lists, each an already templated
conversation read as /get_reward reads its queries (chat.encode_text / encode_ids); `messages` is
one conversation, templated as `score` templates it. WorldPM has one output, so as in vLLM for a
one-class model the value is sigmoid(reward) with the activation on (vLLM's default) and the raw
reward with it off (`use_activation: false`, what verl sends); the old `activation` and `softmax`
switches are read when `use_activation` is absent. `truncate_prompt_tokens: N` keeps the last N
tokens (where the reward is read); -1 means the model's limit. `add_special_tokens`, `user`,
`priority` and `request_id` are accepted; the checkpoint's template decides special tokens.
Errors take vLLM's shape: {"error": {"message", "type", "param", "code"}} (serve/http.py).
"""

from __future__ import annotations

import math
import time
import uuid

from ..chat import ConversationError, check_scored_conversation, encode_conversation, encode_ids, encode_text
from ..packing import Group
from ..scorer import ConversationTooLong
from .http import HTTPError, parse_json, too_many

ACTIVATION_KEYS = ("use_activation", "activation", "softmax")  # the first one given decides


def _bad(message: str, param: str | None = None) -> HTTPError:
    return HTTPError(400, message, "BadRequestError", param=param)


def _inputs(scorer, data: dict, max_items: int) -> list[list[int]]:
    """Token ids of each item of `input`, or of the one conversation in `messages`."""
    tok = scorer.tokenizer
    if ("input" in data) == ("messages" in data):
        raise _bad("expected exactly one of 'input' (templated text or token ids) and 'messages'", "input")
    try:
        if "messages" in data:
            conv = check_scored_conversation(data["messages"], "messages")
            return [encode_conversation(tok, conv)]
        items = data["input"]
        if isinstance(items, str) or (isinstance(items, list) and items and isinstance(items[0], int)):
            items = [items]
        if not isinstance(items, list):
            raise _bad(f"input: expected a string, a list of strings, token ids or a list of token-id lists, found "
                       f"{type(items).__name__}", "input")
        if len(items) > max_items:
            raise too_many(len(items), "inputs", max_items)
        return [encode_text(tok, x, f"input[{i}]") if isinstance(x, str) else encode_ids(tok, x, f"input[{i}]")
                for i, x in enumerate(items)]
    except ConversationError as e:
        raise _bad(str(e), "messages" if "messages" in data else "input") from None


def _truncate(scorer, encoded: list[list[int]], n) -> list[list[int]]:
    if n is None:
        try:
            return [scorer.fit(ids, f"input[{i}]") for i, ids in enumerate(encoded)]
        except ConversationTooLong as e:
            raise _bad(f"{e}; or send truncate_prompt_tokens", "input") from None
    if isinstance(n, bool) or not isinstance(n, int) or n < -1 or n == 0:
        raise _bad(f"truncate_prompt_tokens: expected a positive integer or -1, found {n!r}", "truncate_prompt_tokens")
    if n > scorer.max_length:
        raise _bad(f"truncate_prompt_tokens: {n} is more than the model reads ({scorer.max_length} tokens)",
                   "truncate_prompt_tokens")
    keep = scorer.max_length if n == -1 else n
    return [ids[-keep:] for ids in encoded]


def activation(data: dict) -> bool:
    for key in ACTIVATION_KEYS:
        value = data.get(key)
        if value is not None:
            if not isinstance(value, bool):
                raise _bad(f"{key}: expected true or false, found {value!r}", key)
            return value
    return True


def prepare(scorer, body: bytes, max_items: int, model: str, pooling: bool, request_id: str | None):
    """/classify and /pooling: (groups, finish)."""
    data = parse_json(body)
    if not isinstance(data, dict):
        raise _bad(f"body: expected a JSON object, found {type(data).__name__}")
    if data.get("model") not in (None, "", model):
        raise HTTPError(404, f"The model `{data['model']}` does not exist.", "NotFoundError", param="model")
    if pooling and data.get("task") not in (None, "classify"):
        raise _bad(f"task: this server pools with 'classify' (one reward per input), found {data['task']!r}", "task")
    if pooling and data.get("encoding_format", "float") != "float":
        raise _bad(f"encoding_format: only 'float' is served, found {data['encoding_format']!r}", "encoding_format")
    sigmoid = activation(data)
    encoded = _truncate(scorer, _inputs(scorer, data, max_items), data.get("truncate_prompt_tokens"))
    groups = [Group(None, [ids]) for ids in encoded]
    tokens = sum(map(len, encoded))
    rid = f"{'pool' if pooling else 'classify'}-{request_id or uuid.uuid4().hex}"

    def finish(scores):
        values = [s[0] for s in scores]
        if sigmoid:
            values = [1 / (1 + math.exp(-v)) if v >= 0 else math.exp(v) / (1 + math.exp(v)) for v in values]
        items = ([{"index": i, "object": "pooling", "data": [v]} for i, v in enumerate(values)] if pooling else
                 [{"index": i, "label": "LABEL_0", "probs": [v], "num_classes": 1} for i, v in enumerate(values)])
        return {"id": rid, "object": "list", "created": int(time.time()), "model": model, "data": items,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                          "prompt_tokens_details": None}}

    return groups, finish


def models(model: str, root: str, max_length: int) -> dict:
    now = int(time.time())
    return {"object": "list", "data": [{
        "id": model, "object": "model", "created": now, "owned_by": "worldpm-lite", "root": root, "parent": None,
        "max_model_len": max_length,
        "permission": [{"id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission", "created": now,
                        "allow_create_engine": False, "allow_sampling": False, "allow_logprobs": False,
                        "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                        "organization": "*", "group": None, "is_blocking": False}]}]}
