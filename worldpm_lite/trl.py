"""A WorldPM reward function for TRL's GRPOTrainer and RLOOTrainer (the optional extra `[trl]`).

    from worldpm_lite.trl import WorldPMReward
    trainer = GRPOTrainer(model=policy, reward_funcs=[WorldPMReward("WorldPM-72B-gptq4")], ...)
    trainer = GRPOTrainer(..., reward_funcs=[WorldPMReward("http://scorer:8000", api_key=KEY)])  # a `serve`

TRL calls a reward function with keyword arguments: `prompts` and `completions` (plain strings, or
lists of messages in its conversational format), `completion_ids`, the dataset's other columns and
`trainer_state`; it wants one float per completion and names the function by `__name__` in its logs
(`rewards/<name>/mean`). A plain-text prompt is the user's turn and its completion the assistant's
reply; a conversational prompt is the messages the completion follows. The completions of one prompt
(GRPO's group) are scored as a ranking, so the prompt runs once for all of them: in process through a
Scorer, or remotely through `serve`'s /v1/score with a timeout and retries.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UsageError
from .hub import is_hub_id

if TYPE_CHECKING:
    import httpx

NAME = "worldpm"
RETRY = (429, 502, 503, 504)  # busy, restarting or behind a proxy that lost it: another try may succeed
RETRY_AFTER = (429, 503)  # the statuses whose Retry-After (seconds) says when to try again
MAX_WAIT = 60.0  # the longest wait between two tries, the backoff's or a Retry-After's


class WorldPMReward:
    """A TRL reward function: one float per completion, from WorldPM in process or from a running `serve`.

    model_or_url: a checkpoint directory (loaded with Scorer.from_pretrained(**scorer_args)), a Scorer,
        or the http(s) URL of a running `worldpm-lite serve`, which is sent POST URL/v1/score.
    name: the function's __name__, which TRL's logs show (rewards/<name>/mean).
    api_key: sent as "Authorization: Bearer <api_key>" (serve --api-key).
    max_items: the most conversations one post carries (serve's --max-items is 512); a call with more
        makes several posts in turn, each with its own tries.
    timeout: seconds (180) one try may go without progress: httpx's connect, write and read timeouts,
        each this long. The read timeout includes the server's queueing and scoring, since its answer
        comes when the scores are done: a post that takes longer to score times out.
    retries: how many tries a post gets in all (5). Tried again: a 429, 502, 503 or 504 and a transport
        error (connection refused or reset, a timeout): the server is busy, restarting or out of reach.
        Not tried again, as the same request would fail the same way: a 500 (e.g. a non-finite score,
        model_error) raises a RuntimeError at once, any other 4xx (a bad request, a wrong key) a
        UsageError (a ValueError), each naming the status and the server's error message.
    Between tries it waits 1, 2, 4, 8, ... s, or on a 429 or 503 the seconds of the server's Retry-After
    (an HTTP date is not read), each wait at most MAX_WAIT = 60 s. After the last try a RuntimeError
    names the URL, the tries, the time waited and the last problem.
    Worst case, a post fails after about retries x timeout plus the waits: with the defaults 5 x 180 s
    + (1 + 2 + 4 + 8) s = 915 s, about 15 minutes, or up to 5 x 180 + 4 x 60 = 1140 s when the server
    asks for long Retry-After waits (a try whose connect is itself slow can take up to one more
    `timeout`). A server that refuses connections fails the post after 15 s of waits.
    transport: the httpx transport to send through (default: a new connection pool per post), e.g.
        httpx.HTTPTransport(uds=...), or a test's httpx.MockTransport; it is the caller's to close.
    sleep: how to wait between tries (default time.sleep); a test passes a recorder.
    The in-process path (a Scorer or a directory) has no timeout and no retries."""

    def __init__(self, model_or_url, *, name: str = NAME, timeout: float = 180.0, retries: int = 5,
                 api_key: str | None = None, max_items: int = 256, transport: httpx.BaseTransport | None = None,
                 sleep: Callable[[float], object] | None = None, **scorer_args):
        from .scorer import Scorer

        if retries < 1 or timeout <= 0:
            raise UsageError(f"retries >= 1 and timeout > 0 expected, found {retries} and {timeout}")
        self.__name__ = name
        self.timeout, self.retries, self.api_key, self.max_items = timeout, retries, api_key, max_items
        self.transport, self.sleep = transport, sleep
        self.scorer = self.url = None
        if isinstance(model_or_url, Scorer):
            self.scorer = model_or_url
        elif str(model_or_url).startswith(("http://", "https://")):
            self.url = str(model_or_url).rstrip("/")
        elif Path(model_or_url).is_dir() or is_hub_id(str(model_or_url).partition("@")[0]):
            self.scorer = Scorer.from_pretrained(model_or_url, **scorer_args)
        else:
            raise UsageError(f"model_or_url: expected a checkpoint directory, a hub id, a Scorer or an http(s) URL "
                             f"of a worldpm-lite serve, found {model_or_url!r}")

    def __repr__(self) -> str:
        return f"WorldPMReward({self.url or 'in-process Scorer'}, name={self.__name__!r})"

    def __call__(self, prompts: list, completions: list, **kwargs) -> list[float]:
        if len(prompts) != len(completions):
            raise UsageError(f"prompts and completions: expected as many of each, found {len(prompts)} and "
                             f"{len(completions)}")
        requests, members = [], []  # one ranking request per distinct prompt, and the completions it holds
        index: dict[str, int] = {}
        for n, (p, c) in enumerate(zip(prompts, completions)):
            key = json.dumps(p, sort_keys=True)
            if key not in index:
                index[key] = len(requests)
                requests.append({"prompt": p, "responses": []})
                members.append([])
            requests[index[key]]["responses"].append(_reply(c, n))
            members[index[key]].append(n)
        scores = self._rank(requests)
        rewards = [0.0] * len(prompts)
        for ns, ss in zip(members, scores):
            for n, s in zip(ns, ss):
                rewards[n] = s
        return rewards

    def _rank(self, requests: list[dict]) -> list[list[float]]:
        if self.scorer is not None:
            from .data import prompt_messages, with_response

            groups = [self.scorer.group([with_response(r["prompt"], x, f"completions[{i}]")
                                         for i, x in enumerate(r["responses"])], prompt_messages(r["prompt"], "prompt"))
                      for r in requests]
            return self.scorer.score_groups(groups)
        out, chunk, size = [], [], 0
        for r in requests:  # several posts when one would carry more than `max_items` conversations
            if chunk and size + len(r["responses"]) > self.max_items:
                out += self._post(chunk)
                chunk, size = [], 0
            chunk.append(r)
            size += len(r["responses"])
        return [r["scores"] for r in out + self._post(chunk)]

    def _post(self, requests: list[dict]) -> list[dict]:
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        client = httpx.Client(transport=self.transport, headers=headers, timeout=self.timeout)
        try:
            return self._tries(client, requests)
        finally:
            if self.transport is None:  # a transport passed in is the caller's to close
                client.close()

    def _tries(self, client, requests: list[dict]) -> list[dict]:
        import httpx

        sleep = self.sleep or time.sleep
        wait, waited = 1.0, 0.0
        for attempt in range(1, self.retries + 1):
            try:
                r = client.post(f"{self.url}/v1/score", json=requests)
            except httpx.TransportError as e:  # refused, reset, timed out: the service may be restarting
                problem, delay = f"{type(e).__name__}: {e}", wait
            else:
                if r.status_code == 200:
                    return r.json()
                message = _error_message(r)
                if r.status_code not in RETRY:  # a 500 (e.g. a non-finite score) or a 4xx: the same next time
                    error = UsageError if 400 <= r.status_code < 500 else RuntimeError  # the request's fault or not
                    raise error(f"{self.url}/v1/score answered {r.status_code}: {message}")
                problem = f"{r.status_code}: {message}"
                after = _retry_after(r) if r.status_code in RETRY_AFTER else None
                delay = wait if after is None else after
            if attempt == self.retries:
                tries = "1 try" if attempt == 1 else f"{attempt} tries ({waited:g} s of waits between them)"
                raise RuntimeError(f"{self.url}/v1/score: gave up after {tries}; the last: {problem}")
            sleep(delay)
            waited += delay
            wait = min(2 * wait, MAX_WAIT)
        raise AssertionError("unreachable")


def _reply(completion, n: int) -> str:
    """The assistant's text of one completion: a string, or TRL's conversational [{"role": "assistant", ...}]."""
    if isinstance(completion, str):
        return completion
    if (isinstance(completion, list) and completion and isinstance(completion[-1], dict)
            and completion[-1].get("role") == "assistant" and isinstance(completion[-1].get("content"), str)):
        return "".join(m.get("content") or "" for m in completion if m.get("role") == "assistant")
    raise UsageError(f"completions[{n}]: expected a string or a list of messages ending with the assistant's, found "
                     f"{type(completion).__name__}")


def _retry_after(r) -> float | None:
    """The seconds r's Retry-After asks to wait, at most MAX_WAIT; None when it has none in seconds
    (an HTTP date is not read: the backoff is used then)."""
    try:
        seconds = float(r.headers.get("Retry-After", ""))
    except ValueError:
        return None
    return min(seconds, MAX_WAIT) if seconds >= 0 else None  # NaN is not >= 0


def _error_message(r) -> str:
    try:
        return r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return r.text[:200]
