"""The service's routes, written once: `serve --help`, the start-up line, the OpenAPI summaries and
the app's route registration all read this table (and a test checks the README lists every path).
A new route or protocol starts here. Imports nothing (`--help` stays fast)."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    protocol: str  # a key of PROTOCOLS: who calls it, and whose error shape it answers in
    summary: str  # the OpenAPI summary


@dataclass(frozen=True)
class Protocol:
    name: str  # as the start-up line names it, after the protocol's routes
    help: str  # what `serve --help` says after the protocol's first route ("{also}": its other routes; "\n" breaks)
    vllm_errors: bool = False  # errors in vLLM's shape (serve/http.py) instead of ours


PROTOCOLS = {
    "openrlhf": Protocol("OpenRLHF", '{"query": [text], "prompts": [..], "labels": [..]}\n-> {"rewards": [...], '
                         '"scores": [...], "extra_logs": {}}\nOpenRLHF\'s remote reward model (--remote_rm_url '
                         "URL/get_reward): each query is the whole conversation as the chat template renders it (not "
                         "templated again; <|endoftext|> padding at either end dropped, one appended); queries with "
                         "equal prompts share their common prefix"),
    "vllm": Protocol("vLLM's pooling API", "vLLM's pooling API ({also}),\nwhat verl's reward loop sends: {\"input\": "
                     "text | [text] | ids, \"use_activation\": false} or {\"messages\": [...]} -> data[i].probs = "
                     "[reward]; with the activation on (vLLM's default): sigmoid(reward)", vllm_errors=True),
    "ours": Protocol("", "score's request objects, one or a list -> its result objects"),
    "health": Protocol("", "model, backend, devices, limits, queue (never needs the API key)"),
    "metrics": Protocol("", "Prometheus text (never needs the API key)"),
}

ROUTES = (
    Route("POST", "/get_reward", "openrlhf",
          'OpenRLHF remote reward model: {"query": [text, ...]} -> {"rewards": [...]}'),
    Route("POST", "/classify", "vllm", 'vLLM\'s classify API: {"input" | "messages", "use_activation"} -> '
          "data[i].probs = [value]"),
    Route("POST", "/v1/classify", "vllm", "the same as /classify"),
    Route("POST", "/pooling", "vllm", "vLLM's pooling API (task classify): data[i].data = [value]"),
    Route("GET", "/v1/models", "vllm", "vLLM's model list: the one model served"),
    Route("POST", "/v1/score", "ours", "score's request objects (one or a list) -> its result objects"),
    Route("GET", "/health", "health", "loaded, backend, devices, limits, queue"),
    Route("GET", "/metrics", "metrics", "Prometheus text: requests, conversations, tokens, batches, latency, queue"),
)
OPEN = ("/health", "/metrics")  # never behind the API key
VLLM_PATHS = tuple(r.path for r in ROUTES if PROTOCOLS[r.protocol].vllm_errors)


def _groups() -> list[list[Route]]:
    """Consecutive routes of one protocol."""
    out: list[list[Route]] = []
    for r in ROUTES:
        if out and out[-1][0].protocol == r.protocol:
            out[-1].append(r)
        else:
            out.append([r])
    return out


def _spelled(routes: list[Route], method: str | None = None) -> str:
    """'/classify, /v1/classify, /pooling, GET /v1/models': the method named where it changes."""
    words = []
    for r in routes:
        words.append(r.path if r.method == method else f"{r.method} {r.path}")
        method = r.method
    return ", ".join(words)


def startup_line() -> str:
    """'POST /get_reward (OpenRLHF), POST /classify, ... (vLLM's pooling API), POST /v1/score, GET /health, ...'"""
    parts = []
    for group in _groups():
        name = PROTOCOLS[group[0].protocol].name
        parts.append(_spelled(group) + (f" ({name})" if name else ""))
    return ", ".join(parts)


def help_text(width: int = 90) -> str:
    """The routes for `serve --help`: each protocol's first route, then what it takes and answers."""
    lines = []
    for group in _groups():
        first = group[0]
        text = PROTOCOLS[first.protocol].help.replace("{also}", "also " + _spelled(group[1:], first.method))
        body = []
        for part in text.split("\n"):
            body += textwrap.wrap(part, width - 20)
        lines.append(f"  {first.method:<4} {first.path:<12} {body[0]}")
        lines += [" " * 20 + line for line in body[1:]]
    return "\n".join(lines)
