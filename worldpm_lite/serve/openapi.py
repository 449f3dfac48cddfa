"""What the OpenAPI schema says of each route: its request body's JSON schema and every status it
answers, in the route's error shape (ours or vLLM's), so that generated clients and schema-driven
tests see what the service really does. /metrics is Prometheus text. Imports no torch."""

from __future__ import annotations

MESSAGES = {"type": "array", "minItems": 1, "items": {
    "type": "object", "required": ["role", "content"],
    "properties": {"role": {"enum": ["system", "user", "assistant"]}, "content": {"type": "string"}}},
    "description": "a conversation; the last message is the assistant's reply (the reward is read after it)"}
PROMPT = {"oneOf": [{"type": "string", "description": "one user turn"}, MESSAGES]}
SCORE_REQUEST = {"oneOf": [
    {"type": "object", "required": ["messages"], "properties": {"messages": MESSAGES, "id": {}}},
    {"type": "object", "required": ["prompt", "chosen", "rejected"],
     "properties": {"prompt": PROMPT, "chosen": {"type": "string"}, "rejected": {"type": "string"}, "id": {}}},
    {"type": "object", "required": ["prompt", "responses"],
     "properties": {"prompt": PROMPT, "responses": {"type": "array", "minItems": 1, "items": {"type": "string"}},
                    "id": {}}}]}
TEXTS = {"type": "array", "minItems": 1, "items": {"type": "string"}}
TOKEN_IDS = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
VLLM_INPUT = {"oneOf": [{"type": "string"}, TEXTS, TOKEN_IDS, {"type": "array", "minItems": 1, "items": TOKEN_IDS}],
              "description": "already templated conversations (text or token ids)"}
VLLM_COMMON = {"model": {"type": "string"}, "use_activation": {"type": "boolean"},
               "truncate_prompt_tokens": {"type": "integer", "minimum": -1}, "request_id": {"type": "string"},
               "add_special_tokens": {"type": "boolean"}, "user": {"type": "string"}, "priority": {"type": "integer"}}
VLLM_REQUEST = {"oneOf": [{"type": "object", "required": ["input"], "properties": {"input": VLLM_INPUT, **VLLM_COMMON}},
                          {"type": "object", "required": ["messages"],
                           "properties": {"messages": MESSAGES, **VLLM_COMMON}}]}
POOLING_REQUEST = {"oneOf": [{**alt, "properties": {**alt["properties"], "task": {
    "enum": ["token_classify", "classify"], "default": "token_classify"},
    "encoding_format": {"enum": ["float"]}}} for alt in VLLM_REQUEST["oneOf"]]}
REQUESTS = {
    "/get_reward": {"type": "object", "required": ["query"], "properties": {
        "query": {**TEXTS, "description": "whole conversations as the chat template renders them"},
        "prompts": {**TEXTS, "description": "each query's prompt: queries with the same prompt compute it once"},
        "labels": {"type": "array", "description": "ignored"}}},
    "/v1/score": {"oneOf": [SCORE_REQUEST, {"type": "array", "minItems": 1, "items": SCORE_REQUEST}]},
    "/classify": VLLM_REQUEST, "/v1/classify": VLLM_REQUEST, "/pooling": POOLING_REQUEST}
OURS_ERROR = {"type": "object", "properties": {"error": {"type": "object", "properties": {
    "code": {"type": "integer"}, "type": {"type": "string"}, "message": {"type": "string"}}}}}
VLLM_ERROR = {"type": "object", "properties": {"error": {"type": "object", "properties": {
    "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
    "code": {"type": "integer"}}}}}
STATUSES = {400: "not JSON or not UTF-8 (vLLM's routes: any invalid field)", 401: "missing or wrong API key",
            404: "another model than the served names (vLLM's routes)", 413: "too many items, too large a body, "
            "more tokens than the queue or the GPU holds", 422: "a missing or wrongly typed field, a conversation "
            "over the model's length", 500: "a non-finite score (the checkpoint), or an internal error with a "
            "request id", 503: "the queue is full or the service is shutting down (with Retry-After)"}


def describe(route, protocol, closed: bool) -> dict:
    """add_api_route's openapi_extra, responses and response_class for `route` of `protocol`."""
    if route.path == "/metrics":
        from fastapi.responses import PlainTextResponse

        return {"response_class": PlainTextResponse,
                "responses": {200: {"description": "Prometheus text exposition format"}}}
    if route.path == "/health":
        return {"responses": {200: {"description": "loaded, backend, devices, limits, queue"}}}
    error = {"content": {"application/json": {"schema": VLLM_ERROR if protocol.vllm_errors else OURS_ERROR}}}
    codes = ([401] if closed else []) + ([] if route.path not in REQUESTS else
                                         [400, 413, 500, 503] + ([404] if protocol.vllm_errors else [422]))
    out = {"responses": {c: {"description": STATUSES[c], **error} for c in sorted(codes)}}
    if route.path in REQUESTS:
        out["openapi_extra"] = {"requestBody": {"required": True, "content": {"application/json": {
            "schema": REQUESTS[route.path]}}}}
    return out
