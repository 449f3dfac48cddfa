"""worldpm_lite.trl.WorldPMReward's remote calls: what it retries (429, 502, 503, 504, connection errors,
timeouts), what it does not (a 500, any other 4xx), Retry-After, and the error after the last try. A fake
server (httpx.MockTransport) answers; the waits are recorded, never slept."""

import json
import re

import httpx
import pytest

from worldpm_lite.errors import UsageError
from worldpm_lite.serve.http import error_body
from worldpm_lite.trl import WorldPMReward

URL = "http://scorer:8000"
PROMPTS, COMPLETIONS = ["q", "q", "r"], ["a", "b", "c"]
NOT_FINITE = "the score of conversation 0 is not finite (nan)"


def answer(status: int, message: str = "", retry_after: str | None = None, kind: str = "overloaded"):
    """One answer of the fake server: an error as `serve` sends it on /v1/score."""
    code, body = error_body(status, kind, message or f"an answer {status}", path="/v1/score")
    return httpx.Response(code, json=body, headers={"Retry-After": retry_after} if retry_after else None)


def fake(*answers, **kwargs):
    """(reward, posts): a WorldPMReward whose server gives `answers` in turn (an httpx.Response, an exception
    to raise, or "scores": one score per response), the requests it got and the waits between them."""
    posts, sleeps, queue = [], [], list(answers)

    def handle(request: httpx.Request) -> httpx.Response:
        posts.append(request)
        a = queue.pop(0)
        if isinstance(a, Exception):
            raise a
        if a == "scores":
            return httpx.Response(200, json=[{"scores": [0.5 + i for i, _ in enumerate(r["responses"])]}
                                             for r in json.loads(request.content)])
        return a
    reward = WorldPMReward(URL, transport=httpx.MockTransport(handle), sleep=sleeps.append, **kwargs)
    return reward, posts, sleeps


def test_a_500_is_not_retried():
    reward, posts, sleeps = fake(answer(500, NOT_FINITE, kind="model_error"), "scores")
    with pytest.raises(RuntimeError, match="^" + re.escape(f"{URL}/v1/score answered 500: {NOT_FINITE}")) as e:
        reward(prompts=PROMPTS, completions=COMPLETIONS)
    assert not isinstance(e.value, ValueError)  # the server's fault, not the request's
    assert len(posts) == 1 and sleeps == []


def test_a_500_after_a_503_fails_at_once():
    reward, posts, sleeps = fake(answer(503, retry_after="2"), answer(500, "boom", kind="internal_error"), "scores")
    with pytest.raises(RuntimeError, match="answered 500: boom"):
        reward(prompts=PROMPTS, completions=COMPLETIONS)
    assert len(posts) == 2 and sleeps == [2.0]


@pytest.mark.parametrize("status", [400, 401, 404, 413, 422])
def test_a_4xx_other_than_429_is_not_retried(status):
    reward, posts, sleeps = fake(answer(status, "messages[0].role: expected user", kind="invalid_request"), "scores")
    with pytest.raises(UsageError, match=rf"answered {status}: messages\[0\]\.role: expected user"):
        reward(prompts=PROMPTS, completions=COMPLETIONS)
    assert len(posts) == 1 and sleeps == []


def test_503_then_200_waits_as_retry_after_says():
    reward, posts, sleeps = fake(answer(503, "the queue is full", retry_after="3"), "scores")
    assert reward(prompts=PROMPTS, completions=COMPLETIONS) == [0.5, 1.5, 0.5]
    assert len(posts) == 2 and sleeps == [3.0]
    assert posts[0].content == posts[1].content  # the same request again


def test_each_retryable_status_waits_retry_after_or_the_backoff():
    # Retry-After is honoured on 429 and 503; 502 and 504 (a proxy's answers) wait 1, 2, 4, 8 s
    reward, posts, sleeps = fake(answer(429, retry_after="7"), answer(502, retry_after="30"), answer(504),
                                 answer(503, retry_after="0.5"), "scores")
    assert reward(prompts=PROMPTS, completions=COMPLETIONS) == [0.5, 1.5, 0.5]
    assert len(posts) == 5 and sleeps == [7.0, 2.0, 4.0, 0.5]


@pytest.mark.parametrize("value, wait", [("3600", 60.0), ("-5", 1.0), ("soon", 1.0), ("nan", 1.0),
                                         ("Wed, 21 Oct 2015 07:28:00 GMT", 1.0)])
def test_retry_after_is_capped_and_a_value_that_is_no_seconds_is_the_backoff(value, wait):
    reward, posts, sleeps = fake(answer(503, retry_after=value), "scores")
    assert reward(prompts=PROMPTS, completions=COMPLETIONS) == [0.5, 1.5, 0.5]
    assert sleeps == [wait]


def test_connection_errors_and_timeouts_are_retried():
    reward, posts, sleeps = fake(httpx.ConnectError("connection refused"), httpx.ReadTimeout("timed out"),
                                 httpx.RemoteProtocolError("server disconnected"), "scores")
    assert reward(prompts=PROMPTS, completions=COMPLETIONS) == [0.5, 1.5, 0.5]
    assert len(posts) == 4 and sleeps == [1.0, 2.0, 4.0]


def test_after_the_last_try_the_error_names_the_url_the_tries_and_the_last_problem():
    reward, posts, sleeps = fake(*[answer(503, "the queue is full (9 requests waiting)", retry_after="1")] * 4,
                                 httpx.ConnectTimeout("timed out"), "scores")
    with pytest.raises(RuntimeError) as e:
        reward(prompts=PROMPTS, completions=COMPLETIONS)
    assert str(e.value) == (f"{URL}/v1/score: gave up after 5 tries (4 s of waits between them); "
                            "the last: ConnectTimeout: timed out")
    assert len(posts) == 5 and sleeps == [1.0] * 4
    reward, posts, sleeps = fake(*[answer(429, "slow down")] * 2, retries=2)
    with pytest.raises(RuntimeError, match=r"gave up after 2 tries \(1 s of waits between them\); the last: "
                                           r"429: slow down$"):
        reward(prompts=PROMPTS, completions=COMPLETIONS)


def test_the_backoff_stops_growing_at_a_minute():
    reward, posts, sleeps = fake(*[httpx.ConnectError("connection refused")] * 9, retries=9)
    with pytest.raises(RuntimeError, match=r"gave up after 9 tries \(183 s of waits between them\); the last: "
                                           r"ConnectError: connection refused$"):
        reward(prompts=PROMPTS, completions=COMPLETIONS)
    assert sleeps == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    reward, posts, sleeps = fake(answer(503, "shutting down", retry_after="5"), retries=1)
    with pytest.raises(RuntimeError, match=r"gave up after 1 try; the last: 503: shutting down$"):
        reward(prompts=PROMPTS, completions=COMPLETIONS)
    assert len(posts) == 1 and sleeps == []
