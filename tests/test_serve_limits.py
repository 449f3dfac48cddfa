"""What RL rollouts need of `serve`: a queue bounded by the tokens it holds (held, bounded, refused past the
bound with Retry-After, every request answered once its client tries again), requests whose client left
never scored, prompts shared across requests with exactly each request's own score, the API key in the
path for clients that cannot send headers, closed by default, and an OpenAPI schema that tells the truth.
Every wait is for an event (a metric, a file), never a sleep."""

import asyncio
import logging
import random
import threading
import time

import httpx
import pytest
from test_serve import chat, metric_values, running, templated, text

from worldpm_lite.scorer import Scorer
from worldpm_lite.serve.app import create_app

DEADLINE = 180


def held_scorer(small_dir):
    """A scorer whose worker waits at its first round until `opened` is set (the queue fills meanwhile)."""
    scorer = Scorer.from_pretrained(small_dir, device="cpu")
    opened, entered, run, rounds = threading.Event(), threading.Event(), scorer.run, []

    def held(groups):
        groups = list(groups)
        rounds.append(sum(len(g.parts) for g in groups))
        entered.set()
        assert opened.wait(DEADLINE)
        yield from run(groups)
    scorer.run = held
    return scorer, opened, entered, rounds


def wait_for(what, ready):
    deadline = time.monotonic() + DEADLINE
    while not (value := ready()):
        assert time.monotonic() < deadline, f"{what}: not within {DEADLINE} s"
        time.sleep(0.02)
    return value


@pytest.fixture(scope="module")
def scorer(small_dir):
    return Scorer.from_pretrained(small_dir, device="cpu")


def test_a_queue_bounded_by_tokens_refuses_past_the_bound_and_answers_every_retried_request(small_dir, scorer):
    """300 single-sample OpenRLHF requests against a 2,000-token queue: the queue never holds more than
    its bound; the requests past it get 503 + Retry-After and are counted; each client tries again (as
    OpenRLHF does, 1 s apart, here at once) until answered; every reward is exactly the Scorer's."""
    rng = random.Random(11)
    convs = [chat(text(rng, 2, 8), text(rng, 2, 25)) for _ in range(300)]
    want = scorer.score(convs)
    held, opened, entered, _ = held_scorer(small_dir)
    app = create_app(held, max_queue_tokens=2000, max_wait=0)
    with running(app) as u, httpx.Client(base_url=u, timeout=60) as c:
        peak, refused = [0], []

        async def rollout():
            async with httpx.AsyncClient(base_url=u, timeout=DEADLINE,
                                         limits=httpx.Limits(max_connections=400)) as ac:
                async def one(i):
                    while True:
                        r = await ac.post("/get_reward", json={"query": [templated(convs[i])], "labels": [i]})
                        if r.status_code != 503:
                            return r
                        assert int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["type"] == "overloaded"
                        refused.append(i)
                        if not opened.is_set():  # the model is held: wait for it to go on, then try again
                            await asyncio.to_thread(opened.wait, DEADLINE)

                async def watch():  # hold the model until the queue is full and some were refused
                    while not (entered.is_set() and refused):
                        m = metric_values((await ac.get("/metrics")).text)
                        peak[0] = max(peak[0], m["worldpm_queue_tokens"])
                        await asyncio.sleep(0.02)
                    m = metric_values((await ac.get("/metrics")).text)
                    peak[0] = max(peak[0], m["worldpm_queue_tokens"])
                    assert m["worldpm_queue_oldest_wait_seconds"] > 0
                    opened.set()
                return (await asyncio.gather(watch(), *(one(i) for i in range(len(convs)))))[1:]

        responses = asyncio.run(rollout())
        metrics = metric_values(c.get("/metrics").text)
        health = c.get("/health").json()
    assert [r.status_code for r in responses] == [200] * len(convs)
    assert [r.json()["rewards"] for r in responses] == [[w] for w in want]  # none lost, none swapped
    assert 0 < peak[0] <= 2000 and health["queue"]["max_tokens"] == 2000
    assert metrics['worldpm_refused_total{reason="tokens"}'] == len(refused) > 0
    assert metrics["worldpm_queue_tokens"] == 0


def test_a_request_larger_than_the_whole_queue_is_413(scorer):
    with running(create_app(scorer, max_queue_tokens=10)) as u:
        r = httpx.post(f"{u}/v1/score", json={"messages": chat("hello there", "general kenobi")}, timeout=60)
    assert r.status_code == 413 and "--max-queue-tokens" in r.json()["error"]["message"]


def test_a_request_whose_client_left_is_not_scored(small_dir, scorer):
    """The client gives up (OpenRLHF after 180 s) while the model is busy with another request: its
    request, still queued, is taken out when the disconnect comes through ASGI's receive channel."""
    held, opened, entered, rounds = held_scorer(small_dir)
    conv = chat("tips", "keep a schedule")
    with running(create_app(held, max_wait=0)) as u, httpx.Client(base_url=u, timeout=60) as c:
        first = {}
        t = threading.Thread(target=lambda: first.update(r=httpx.post(f"{u}/v1/score", json={"messages": conv},
                                                                       timeout=DEADLINE)))
        t.start()
        assert entered.wait(DEADLINE)  # the worker holds the first request

        async def leave():  # sends a second request, waits until it is queued, then hangs up
            async with httpx.AsyncClient(base_url=u) as ac:
                task = asyncio.create_task(ac.post("/v1/score", json={"messages": chat("bye", "gone")}, timeout=60))
                while metric_values((await ac.get("/metrics")).text)["worldpm_queue_depth"] < 1:
                    await asyncio.sleep(0.02)
                task.cancel()
        asyncio.run(leave())
        wait_for("the abandoned request counted", lambda: metric_values(c.get("/metrics").text).get(
            "worldpm_abandoned_total", 0) == 1)
        assert metric_values(c.get("/metrics").text)["worldpm_queue_depth"] == 0  # taken out at once
        opened.set()
        t.join(DEADLINE)
        assert first["r"].json()["score"] == scorer.score([conv])[0]
        assert c.post("/v1/score", json={"messages": conv}).status_code == 200  # the service goes on
    assert rounds == [1, 1]  # the first request, then the last: the abandoned one never reached the model


def test_requests_with_one_prompt_compute_it_once_and_score_as_alone(small_dir, scorer):
    """GRPO's n samples of one prompt arrive as n requests (OpenRLHF: one sample each, the prompt in
    `prompts`; verl: /classify texts). Merged into one round, the prompt runs once, and every score is
    the bits the request gets alone."""
    long = "Explain why the sky looks blue at noon and red at sunset, step by step. " * 3 + "Please be brief about it."
    convs = [chat(long, f"Answer {i}: {'yes ' * i}") for i in range(8)]
    alone = [scorer.score([c])[0] for c in convs]
    held, opened, entered, rounds = held_scorer(small_dir)
    prompt = templated(convs[0][:1]) + "<|im_start|>assistant\n"
    with running(create_app(held, max_wait=0)) as u, httpx.Client(base_url=u, timeout=60) as c:
        warm = threading.Thread(target=lambda: httpx.post(f"{u}/v1/score", json={"messages": chat("a", "b")},
                                                          timeout=DEADLINE))
        warm.start()
        assert entered.wait(DEADLINE)
        got = {}

        def send(i):
            if i % 2:
                got[i] = httpx.post(f"{u}/get_reward", json={"query": [templated(convs[i])], "prompts": [prompt]},
                                    timeout=DEADLINE).json()["rewards"][0]
            else:
                got[i] = httpx.post(f"{u}/classify", json={"input": templated(convs[i]), "use_activation": False},
                                    timeout=DEADLINE).json()["data"][0]["probs"][0]
        threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        wait_for("all eight queued", lambda: metric_values(c.get("/metrics").text)["worldpm_queue_depth"] == 8)
        opened.set()
        for t in threads + [warm]:
            t.join(DEADLINE)
        metrics = metric_values(c.get("/metrics").text)
    assert [got[i] for i in range(8)] == alone  # exactly, /get_reward and /classify alike
    prompt_tokens = len(scorer.single(scorer.encode([convs[0]])[0]).prompt)
    assert prompt_tokens >= 64 and rounds == [1, 8]  # the eight in one round
    assert metrics["worldpm_shared_prompt_tokens_total"] == 7 * prompt_tokens  # seven did not run it


def test_the_key_in_the_path_is_checked_and_shown_nowhere(scorer, caplog):
    key, conv = "p4th-k3y", templated(chat("hi", "hello there"))
    with running(create_app(scorer, api_key=key)) as u:
        ok = httpx.post(f"{u}/k/{key}/get_reward", json={"query": [conv]}, timeout=60)
        assert ok.status_code == 200 and ok.json()["rewards"] == scorer.score_texts([conv])
        for wrong in (f"/k/{key}x/get_reward", "/k/get_reward", f"/k/{key[:-1]}/get_reward", "/get_reward"):
            r = httpx.post(u + wrong, json={"query": [conv]}, timeout=60)
            assert r.status_code == 401 and key not in r.text, wrong
        assert httpx.get(f"{u}/k/{key}/v1/models").status_code == 200
        metrics = httpx.get(f"{u}/metrics").text
        assert key not in metrics and 'endpoint="/get_reward"' in metrics
        # closed by default: only /health and /metrics answer without the key
        for path in ("/docs", "/openapi.json", "/redoc", "/nope", "/v1/models"):
            assert httpx.get(u + path).status_code == 401, path
        assert httpx.get(f"{u}/openapi.json", headers={"Authorization": f"Bearer {key}"}).json()["info"]
        assert httpx.get(f"{u}/k/{key}/docs").status_code == 404  # the interactive pages are off
        assert key not in httpx.get(f"{u}/health").text
    assert key not in caplog.text


def test_a_500_says_internal_error_with_an_id_and_the_detail_goes_to_the_log(small_dir, caplog):
    broken = Scorer.from_pretrained(small_dir, device="cpu")

    def fails(groups):
        raise KeyError("/secret/path/on/disk")
    broken.run = fails
    with running(create_app(broken)) as u, caplog.at_level(logging.ERROR, logger="worldpm_lite.serve"):
        r = httpx.post(f"{u}/v1/score", json={"messages": chat("hi", "hello")}, timeout=60)
    err = r.json()["error"]
    rid = r.headers["X-Request-Id"]
    assert r.status_code == 500 and err["type"] == "internal_error" and err["message"].startswith("internal error")
    assert rid in err["message"] and "secret" not in r.text and "KeyError" not in r.text
    assert rid in caplog.text and "/secret/path/on/disk" in caplog.text


def test_the_openapi_schema_tells_the_truth(scorer):
    with running(create_app(scorer)) as u:
        schema = httpx.get(f"{u}/openapi.json").json()
    paths = schema["paths"]
    for path in ("/get_reward", "/v1/score", "/classify", "/v1/classify", "/pooling"):
        op = paths[path]["post"]
        assert op["requestBody"]["required"] and "schema" in op["requestBody"]["content"]["application/json"]
        assert {"400", "413", "500", "503"} <= set(op["responses"]), path
        assert ("404" if path in ("/classify", "/v1/classify", "/pooling") else "422") in op["responses"]
    assert "text/plain" in paths["/metrics"]["get"]["responses"]["200"]["content"]
    assert paths["/get_reward"]["post"]["requestBody"]["content"]["application/json"]["schema"]["required"] == [
        "query"]
