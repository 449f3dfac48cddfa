"""vLLM's pooling API, as `serve` speaks it: what verl's reward loop and vLLM pooling users send.

  POST /classify, /v1/classify  {"model", "input" | "messages", "use_activation", ...}
                                -> {"id": "classify-...", "object": "list", "created", "model",
                                    "data": [{"index", "label", "probs": [value], "num_classes": 1}], "usage"}
  POST /pooling                 the same inputs, "task": "token_classify" (the default: vLLM serves this
                                architecture as a token reward model) -> "data": [{"index", "object":
                                "pooling", "data": [[r_0], ..., [r_T]]}], a reward at every token (the
                                last is /classify's); "task": "classify" -> "data": [value]
  GET  /v1/models               {"object": "list", "data": [a model card per served name]}

Shapes follow vLLM's protocol (vllm/entrypoints/pooling/*/protocol.py, engine/protocol.py). `input` is
a string, a list of strings, token ids or a list of token-id lists, each an already templated
conversation read as /get_reward reads its queries (chat.encode_text / encode_ids); `messages` is
one conversation, templated as `score` templates it. WorldPM has one output, so as in vLLM for a
one-class model the value is sigmoid(reward) with the activation on (vLLM's default) and the raw
reward with it off (`use_activation: false`, what verl sends); the old `activation` and `softmax`
switches are read when `use_activation` is absent. `truncate_prompt_tokens: N` keeps the last N
tokens (where the reward is read); -1 means the model's limit. `add_special_tokens`, `user` and
`priority` are accepted (the checkpoint's template decides special tokens); the answer's id is
"pooling-" or "classify-" and the X-Request-Id header, else the body's `request_id`, else a random id.
A request may name any of the served model names (--served-model-name; the answers report the first).
Errors take vLLM's shape: {"error": {"message", "type", "param", "code"}} (serve/http.py).
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import replace

from ..chat import ConversationError, check_scored_conversation, encode_conversation, encode_ids, encode_text
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


TASKS = ("token_classify", "classify")  # /pooling: one reward per token (vLLM's default here), or one per input
REMOVED_TASKS = {"score": "`score` task was removed; use `classify` instead.",
                 "encode": "`encode` task was removed; use `token_embed` or `token_classify` instead."}


def _sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v)) if v >= 0 else math.exp(v) / (1 + math.exp(v))


def _task(data: dict) -> str:
    """/pooling's task: token_classify unless the body says classify (what vLLM answers for others)."""
    task = data.get("task")
    if task in REMOVED_TASKS:
        raise _bad(REMOVED_TASKS[task], "task")
    if task is not None and task not in TASKS:
        raise _bad(f"Unsupported task: {task!r} Supported tasks: {TASKS}", "task")
    if "normalize" in data:
        raise _bad("Parameter `normalize` was removed; use `use_activation` instead.", "normalize")
    if data.get("dimensions") is not None:
        raise _bad("dimensions is currently not supported", "dimensions")
    if data.get("encoding_format", "float") != "float":
        raise _bad(f"encoding_format: only 'float' is served, found {data['encoding_format']!r}", "encoding_format")
    return task or "token_classify"


def prepare(scorer, body: bytes, max_items: int, names: tuple[str, ...], pooling: bool, request_id: str | None):
    """/classify and /pooling: (groups, finish). names: the served model names a request may give (the
    first is the one answers report; the --model argument as given is accepted too); request_id: the
    X-Request-Id header, which names the answer before the body's request_id does."""
    data = parse_json(body)
    if not isinstance(data, dict):
        raise _bad(f"body: expected a JSON object, found {type(data).__name__}")
    if data.get("model") not in (None, "", *names):
        raise HTTPError(404, f"The model `{data['model']}` does not exist.", "NotFoundError", param="model")
    every = pooling and _task(data) == "token_classify"
    if not isinstance(data.get("request_id", ""), str):
        raise _bad(f"request_id: expected a string, found {type(data['request_id']).__name__}", "request_id")
    sigmoid = activation(data)
    encoded = _truncate(scorer, _inputs(scorer, data, max_items), data.get("truncate_prompt_tokens"))
    groups = [replace(scorer.single(ids), every_token=every) for ids in encoded]
    tokens = sum(map(len, encoded))
    rid = f"{'pooling' if pooling else 'classify'}-{request_id or data.get('request_id') or uuid.uuid4().hex}"

    def finish(scores):
        values = [s[0] for s in scores]  # per input: one reward, or one per token (every)
        if every:
            out = [[[_sigmoid(v) if sigmoid else v] for v in per_token] for per_token in values]
            items = [{"index": i, "object": "pooling", "data": v} for i, v in enumerate(out)]
        else:
            values = [_sigmoid(v) if sigmoid else v for v in values]
            items = ([{"index": i, "object": "pooling", "data": [v]} for i, v in enumerate(values)] if pooling else
                     [{"index": i, "label": "LABEL_0", "probs": [v], "num_classes": 1} for i, v in enumerate(values)])
        return {"id": rid, "object": "list", "created": int(time.time()), "model": names[0], "data": items,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                          "prompt_tokens_details": None}}

    return groups, finish


def models(names: tuple[str, ...], max_length: int) -> dict:
    """vLLM's model list: one card per served name (no path: the root is the first name)."""
    now = int(time.time())
    return {"object": "list", "data": [{
        "id": name, "object": "model", "created": now, "owned_by": "worldpm-lite", "root": names[0], "parent": None,
        "max_model_len": max_length,
        "permission": [{"id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission", "created": now,
                        "allow_create_engine": False, "allow_sampling": False, "allow_logprobs": False,
                        "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                        "organization": "*", "group": None, "is_blocking": False}]} for name in names]}
