"""`worldpm-lite serve` on 127.0.0.1 with the small model: served scores equal the Scorer's exactly,
many concurrent clients get their own results, every kind of bad input gets a clear 4xx, a full
queue gets 503 + Retry-After, a bad score fails only its own request, SIGTERM drains."""

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
import uvicorn

from worldpm_lite.cli import main
from worldpm_lite.scorer import NonFiniteScore, Scorer
from worldpm_lite.serve.app import bind, create_app
from worldpm_lite.serve.batcher import Batcher

WORDS = ("sleep tea walk early screen light dark cool room habit week rest quiet mind body read "
         "morning night coffee noon run water").split()


def text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def chat(user: str, reply: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def templated(conv: list[dict]) -> str:
    """A conversation as a trainer sends it to /get_reward (Qwen's ChatML, no <|endoftext|>)."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
                   for m in [{"role": "system", "content": ""}, *conv])


@contextlib.contextmanager
def serving(app):
    """The app under uvicorn on a free 127.0.0.1 port, in a thread; yields its URL and the server."""
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", server
    finally:
        server.should_exit = True
        thread.join(30)


@contextlib.contextmanager
def running(app):
    with serving(app) as (url, _):
        yield url


@pytest.fixture(scope="module")
def scorer(small_dir):
    return Scorer.from_pretrained(small_dir, device="cpu")


@pytest.fixture(scope="module")
def url(scorer):
    with running(create_app(scorer, max_items=8, max_body=64 << 10)) as u:
        yield u


def gather(url: str, posts: list[tuple[str, object]], clients: int, headers: dict | None = None
           ) -> list[httpx.Response]:
    """POST each (path, json) with `clients` concurrent connections; responses in input order."""
    async def go():
        out = [None] * len(posts)
        queue = list(enumerate(posts))
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as c:
            async def client():
                while queue:
                    i, (path, body) = queue.pop()
                    out[i] = await c.post(path, content=json.dumps(body))
            await asyncio.gather(*(client() for _ in range(clients)))
        return out
    return asyncio.run(go())


def test_served_scores_equal_the_scorer_exactly(url, scorer):
    rng = random.Random(1)
    convs = [chat(text(rng, 1, 12), text(rng, 1, 40)) for _ in range(24)]
    pairs = [(text(rng, 1, 10), text(rng, 1, 25), text(rng, 1, 25)) for _ in range(6)]
    ranks = [(text(rng, 1, 10), [text(rng, 1, 20) for _ in range(rng.randint(2, 5))]) for _ in range(4)]
    queries = [templated(c) for c in convs[:8]]
    posts = [("/v1/score", {"messages": c, "id": f"m{i}"}) for i, c in enumerate(convs)]
    posts += [("/v1/score", {"prompt": p, "chosen": a, "rejected": b}) for p, a, b in pairs]
    posts += [("/v1/score", [{"prompt": p, "responses": rs}, {"messages": convs[0]}]) for p, rs in ranks]
    posts += [("/get_reward", {"query": queries}),
              ("/get_reward", {"query": queries[:4] * 2, "prompts": ["a", "b", "a", "b"] * 2})]
    got = [r.json() for r in gather(url, posts, clients=16)]
    assert all("error" not in g for g in got), got

    want = scorer.score(convs)  # all at once: other batches than the server formed
    assert [g["score"] for g in got[:24]] == want
    assert [g["id"] for g in got[:24]] == [f"m{i}" for i in range(24)]
    for g, (p, a, b) in zip(got[24:30], pairs):
        c = scorer.compare(p, a, b)
        assert (g["chosen_score"], g["rejected_score"]) == (c.score_a, c.score_b)
        assert g["preferred"] == ("chosen" if c.score_a >= c.score_b else "rejected")
    for g, (p, rs) in zip(got[30:34], ranks):
        assert g[0]["scores"] == scorer.rank(p, rs).scores and g[1]["score"] == want[0]
    assert got[34]["rewards"] == scorer.score_texts(queries) == want[:8]  # the same tokens as templating does
    assert got[35]["rewards"] == scorer.score_texts(queries[:4] * 2, ["a", "b", "a", "b"] * 2)
    assert max(abs(a - b) for a, b in zip(got[35]["rewards"], want[:4] * 2)) < 1e-5  # prompts shared


def test_64_clients_20_requests_each_all_answered_none_swapped(url, scorer):
    rng = random.Random(2)
    convs = [chat(text(rng, 1, 8), text(rng, 1, 30)) for _ in range(40)]
    want = scorer.score(convs)
    posts = [("/v1/score", {"id": n, "messages": convs[n % 40]}) for n in range(64 * 20)]
    before = httpx.get(f"{url}/metrics").text
    responses = gather(url, posts, clients=64)
    assert all(r.status_code == 200 for r in responses)
    got = [r.json() for r in responses]
    assert [g["id"] for g in got] == list(range(64 * 20))
    assert [g["score"] for g in got] == [want[n % 40] for n in range(64 * 20)]

    after = metric_values(httpx.get(f"{url}/metrics").text)
    assert after['worldpm_requests_total{code="200",endpoint="/v1/score"}'] - metric_values(before).get(
        'worldpm_requests_total{code="200",endpoint="/v1/score"}', 0) == 64 * 20
    # merged: fewer rounds than requests
    assert after["worldpm_batched_requests_sum"] / after["worldpm_batched_requests_count"] > 2
    assert after["worldpm_queue_depth"] == 0 and after["worldpm_in_flight_requests"] == 0


def metric_values(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


LONG = chat("tips", " ".join(["sleep"] * 200))
BAD = [
    ("/v1/score", b'{"messages": [', 400, "not valid JSON"),
    ("/v1/score", b'\xff\xfe{}', 400, "not UTF-8"),
    ("/v1/score", b'[]', 422, "non-empty list"),
    ("/v1/score", b'"hello"', 422, "request object"),
    ("/v1/score", {"prompt": "x"}, 422, "neither 'chosen'/'rejected' nor 'responses'"),
    ("/v1/score", {"prompt": "x", "chosen": "a"}, 422, "without 'rejected'"),
    ("/v1/score", {"messages": "hi"}, 422, "expected a non-empty list of messages"),
    ("/v1/score", [{"messages": chat("a", "b")}, {"prompt": "x", "chosen": 3, "rejected": "a"}], 422,
     "request[1]: chosen: expected a string, found int"),
    ("/v1/score", {"messages": [{"role": "user", "content": "hi"}]}, 422, "must be the assistant's reply"),
    ("/v1/score", {"messages": [{"role": "robot", "content": "hi"}]}, 422, "messages[0].role"),
    ("/v1/score", {"prompt": "x", "responses": ["a"] * 9}, 413, "9 conversations; this server takes at most 8"),
    ("/v1/score", {"messages": LONG}, 422, "request conversation 0 has 2"),
    ("/v1/score", {"messages": chat("a", "b" * 70000)}, 413, "this server takes at most 65536"),
    ("/get_reward", {}, 422, "query: expected a non-empty list of strings"),
    ("/get_reward", {"query": "text"}, 422, "found str"),
    ("/get_reward", {"query": ["ok", 5]}, 422, "query[1]: expected a string, found int"),
    ("/get_reward", {"query": ["<|endoftext|>"]}, 422, "query[0]: expected the templated conversation's text"),
    ("/get_reward", {"query": ["a"] * 9}, 413, "9 queries"),
    ("/get_reward", {"query": ["a", "b"], "prompts": ["p"]}, 422, "prompts: expected a list of 2 strings"),
    ("/get_reward", {"query": [templated(LONG)]}, 422, "query[0] has 2"),
    ("/get_reward", [1, 2], 422, "body: expected an object"),
]


@pytest.mark.parametrize("path,body,code,message", BAD, ids=[f"{p}-{m[:30]}" for p, _, _, m in BAD])
def test_bad_input_gets_a_clear_4xx(url, path, body, code, message):
    r = httpx.post(url + path, content=body if isinstance(body, bytes) else json.dumps(body))
    assert r.status_code == code, r.text
    err = r.json()["error"]
    assert err["code"] == code and message in err["message"], err
    if "has 2" in message:
        assert "tokens; the model reads at most 96" in err["message"]


def test_health_names_the_backend_and_devices(url):
    h = httpx.get(f"{url}/health").json()
    assert h["status"] == "ok" and h["loaded"] and h["devices"] == ["cpu"]
    assert "float32 compute on cpu" in h["backend"] and h["max_length"] == 96 and h["max_items"] == 8


def gate(scorer, opened: threading.Event, entered: threading.Event):
    """The scorer's run, held until `opened` is set (to fill the queue while the worker is busy)."""
    run = scorer.run

    def held(groups):
        entered.set()
        assert opened.wait(30)
        yield from run(groups)
    scorer.run = held
    return scorer


def test_full_queue_answers_503_with_retry_after(small_dir, scorer):
    opened, entered = threading.Event(), threading.Event()
    held = gate(Scorer.from_pretrained(small_dir, device="cpu"), opened, entered)
    app = create_app(held, max_queue=1, max_wait=0)
    conv = chat("tips", "keep a schedule")
    with running(app) as u, httpx.Client(base_url=u, timeout=60) as c:
        results = {}

        def post(k):
            results[k] = httpx.post(f"{u}/v1/score", json={"messages": conv}, timeout=60)
        first = threading.Thread(target=post, args=(1,))
        first.start()
        assert entered.wait(30)  # the worker holds the first request
        second = threading.Thread(target=post, args=(2,))
        second.start()
        while metric_values(c.get("/metrics").text)["worldpm_queue_depth"] < 1:
            time.sleep(0.01)
        full = c.post("/get_reward", json={"query": [templated(conv)]})
        assert full.status_code == 503 and full.json()["error"]["type"] == "overloaded"
        assert int(full.headers["Retry-After"]) >= 1
        opened.set()
        first.join(30)
        second.join(30)
        assert [results[k].json()["score"] for k in (1, 2)] == scorer.score([conv]) * 2


def test_a_non_finite_score_fails_only_its_own_request(small_dir, scorer):
    poisoned = Scorer.from_pretrained(small_dir, device="cpu")
    token = poisoned.tokenizer.encode(" habit", add_special_tokens=False)
    assert len(token) == 1
    with torch.no_grad():
        poisoned.model.model.embed_tokens.weight[token[0]] = float("inf")
    good = [chat("tips", "keep a schedule"), chat("more", "drink water early")]
    batcher = Batcher(poisoned, max_wait=0.5)
    try:
        futures = [batcher.submit([poisoned.group([c])]) for c in (good[0], chat("tips", "one habit"), good[1])]
        assert [futures[i].result(30)[0] for i in (0, 2)] == [[s] for s in scorer.score(good)]
        with pytest.raises(NonFiniteScore):
            futures[1].result(30)
    finally:
        batcher.close()


def test_port_in_use_is_a_clear_error(small_dir, capsys):
    sock = bind("127.0.0.1", 0)
    try:
        assert main(["serve", "--model", str(small_dir), "--device", "cpu", "--port",
                     str(sock.getsockname()[1])]) == 2
    finally:
        sock.close()
    assert "cannot listen there" in capsys.readouterr().err


# The service in a subprocess whose model waits for a file before its first batch: the test decides
# when scoring may start, so every request can be in flight when SIGTERM arrives, however slow the machine.
HELD_SERVE = r"""
import os, sys, threading
from worldpm_lite.cli import main
from worldpm_lite.scorer import Scorer

release, run = sys.argv[1], Scorer.run
released = threading.Event()

def held(self, groups):
    while not released.wait(0.01):
        if os.path.exists(release):
            released.set()
    yield from run(self, groups)

Scorer.run = held
sys.exit(main(sys.argv[2:]))
"""


def test_sigterm_answers_requests_in_flight_then_exits(small_dir, scorer, tmp_path):
    """What the service promises on SIGTERM: every request it accepted before the signal gets its
    full 200 answer, a connection attempted after it is refused, and the process exits 0."""
    release, key = tmp_path / "release", "k-7f3a9c"  # the API key from the environment: required, never logged
    proc = subprocess.Popen([sys.executable, "-c", HELD_SERVE, str(release), "serve", "--model", str(small_dir),
                             "--device", "cpu", "--port", "0", "--log-level", "info", "--access-log"],
                            stderr=subprocess.PIPE, stdout=(tmp_path / "stdout").open("w"), text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "WORLDPM_LITE_API_KEY": key})
    try:
        logged = []
        for line in proc.stderr:
            logged.append(line)
            if line.startswith("serving "):
                u = re.search(r"http://[\d.]+:\d+", line).group(0)
                break
        else:
            pytest.fail("the server did not start")
        rng = random.Random(3)
        convs = [chat(text(rng, 5, 15), text(rng, 20, 40)) for _ in range(32)]
        clients = 48
        outcome: dict = {}  # client -> ("answer", response, when) or ("error", exception)

        def post(i):
            try:
                # half with the key in a header, half in the path (OpenRLHF's way: it sends no headers)
                where = f"{u}/k/{key}/v1/score" if i % 2 else f"{u}/v1/score"
                r = httpx.post(where, json=[{"messages": c} for c in convs], timeout=300,
                               headers={} if i % 2 else {"Authorization": f"Bearer {key}"})
                outcome[i] = ("answer", r, time.monotonic())
            except Exception as e:  # noqa: BLE001 - recorded and asserted on below, never lost in a thread
                outcome[i] = ("error", e)
        threads = [threading.Thread(target=post, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        # The event the signal waits for: every request accepted and in flight (none can finish yet).
        deadline = time.monotonic() + 120
        while metric_values(httpx.get(f"{u}/metrics").text)["worldpm_in_flight_requests"] < clients:
            assert time.monotonic() < deadline, "the requests did not all reach the server"
            assert not outcome, outcome  # nothing may fail or finish while the model is held
            time.sleep(0.01)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 60
        while True:  # the listener closes once the signal is handled; until then /health still answers
            try:
                httpx.get(f"{u}/health", timeout=10)
            except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
                # a connection after the signal: refused, or reset when the kernel had queued it on the
                # listener just as it closed (seen with both cores busy): either way, not served
                break
            assert time.monotonic() < deadline, "still accepting connections 60 s after SIGTERM"
            time.sleep(0.01)
        assert not outcome  # the accepted requests are still waiting for the model, not dropped
        release.write_text("go")
        for t in threads:
            t.join(300)
        assert not any(t.is_alive() for t in threads)
        assert {i: o[1] for i, o in outcome.items() if o[0] == "error"} == {}
        assert [outcome[i][1].status_code for i in range(clients)] == [200] * clients
        assert all(outcome[i][2] > signalled for i in range(clients))  # every one answered while draining
        want = scorer.score(convs)
        assert all([x["score"] for x in outcome[i][1].json()] == want for i in range(clients))
        assert proc.wait(120) == 0
        logged.append(proc.stderr.read())
        log = "".join(logged)
        assert "stopped after answering every request in flight" in log and "API key required" in log
        log += (tmp_path / "stdout").read_text()  # uvicorn's access log
        assert key not in log and log.count('"POST /v1/score HTTP/1.1" 200') == clients  # the path's key left out
    finally:
        proc.kill()
        proc.wait()


def test_score_texts_reads_templated_text_as_the_template_makes_it(scorer):
    conv = chat("Tips for better sleep?", "Keep a fixed schedule.")
    padded = "<|endoftext|>" * 3 + templated(conv) + "<|endoftext|>" * 2  # a left- and right-padded policy batch
    assert scorer.encode_texts([templated(conv), padded]) == scorer.encode([conv]) * 2
    assert scorer.score_texts([padded]) == scorer.score([conv])
    # a prompt of at least SHARE_MIN tokens runs once for the texts that start with it, whoever they came with
    long = "Tips for better sleep? " * 12
    convs = [chat(long, "Keep a schedule."), chat("short", "idk"), chat(long, "Dark room.")]
    texts = [templated(c) for c in convs]
    prompt = templated(convs[0][:1]) + "<|im_start|>assistant\n"  # the prompt as a policy was given it
    groups, order = scorer.text_groups(texts, [prompt, "q", prompt])
    assert order == [0, 2, 1] and groups[0].prompt is not None and groups[1].prompt is None
    assert len(groups[0].parts) == 2 and len(groups[0].prompt) >= 64
    alone = [scorer.score_texts([t]) for t in texts]  # each alone: the same bits as shared
    assert scorer.score_texts(texts, [prompt, "q", prompt]) == [a[0] for a in alone] == scorer.score(convs)


def test_keep_alive_responses_are_not_held_by_nagle(scorer):
    """Without TCP_NODELAY on the accepted sockets, each keep-alive response waited ~40 ms for the
    client's delayed ACK (measured: 44 ms per /health; 1.5 ms with it). Checked as the socket option
    itself on the server's side of a live keep-alive connection, not as a latency."""
    with serving(create_app(scorer)) as (url, server), httpx.Client(base_url=url) as c:
        assert c.get("/health").status_code == 200
        assert c.get("/health").status_code == 200  # the same connection, kept alive
        accepted = [conn.transport.get_extra_info("socket") for conn in server.server_state.connections]
        assert len(accepted) == 1
        assert accepted[0].getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_the_worker_waits_only_for_requests_on_their_way(scorer):
    rounds = []
    batcher = Batcher(scorer, max_wait=120.0, on_step=lambda step, requests: rounds.append(requests))
    a, b = (scorer.group([chat("tips", r)]) for r in ("keep a schedule", "dark room"))
    try:
        t = time.monotonic()
        batcher.submit([a]).result(300)  # a lone caller: nobody announced, so no 120 s wait
        assert time.monotonic() - t < 60 and rounds == [1]
        with batcher.coming():  # b is being read: the worker holds a's round for it
            first = batcher.submit([a])
            deadline = time.monotonic() + 60
            while not first.running():  # the worker has taken a's request into its round
                assert time.monotonic() < deadline
                time.sleep(0.01)
            second = batcher.submit([b])
        assert first.result(300) == [scorer.score([chat("tips", "keep a schedule")])]
        assert second.result(300) == [scorer.score([chat("tips", "dark room")])] and rounds == [1, 2]
    finally:
        batcher.close()


def test_serve_without_the_extra_says_how_to_install_it(small_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed
    assert main(["serve", "--model", str(small_dir), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "uvicorn is not installed" in err and "pip install 'worldpm-lite[serve]'" in err
