"""`serve --replicas` (worldpm_lite.serve.replicas) on the session's local Ray cluster: two CPU replicas of
the small model behind one address answer exactly what the Scorer gives and both do work, a replica
killed with requests in flight loses none of them and is restarted, SIGTERM drains every replica.

One deployment serves the whole module: serve_replicated in a subprocess (it blocks until SIGTERM)
that joins this session's cluster. Its replicas score only while no `hold` file exists, so a test
decides when requests may finish and never guesses at timing."""

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from helpers import wait_for
from test_serve import chat, gather, metric_values, text

from worldpm_lite.cli import main
from worldpm_lite.scorer import Scorer
from worldpm_lite.serve.app import bind
from worldpm_lite.serve.replicas import ServeError, serve_replicated

# serve_replicated with replicas that wait while the file argv[1] exists (like test_serve's HELD_SERVE:
# the replica class is swapped before deploying, and Ray ships this subclass to the replicas by value)
HELD_REPLICAS = r"""
import os, sys, time
from worldpm_lite.serve import replicas as ray_serve

hold = sys.argv[1]

class Held(ray_serve.Replica):
    async def __init__(self, *args):
        await super().__init__(*args)
        run = self.scorer.run

        def held(groups):
            while os.path.exists(hold):
                time.sleep(0.01)
            yield from run(groups)
        self.scorer.run = held

ray_serve.Replica = Held
ray_serve.serve_replicated(sys.argv[2], 2, {"device": "cpu", "threads": 1}, {"max_items": 16, "api_key": sys.argv[4]},
                           "127.0.0.1", 0, cpus_per_replica=0.5, ray_address=sys.argv[3],
                           log=lambda m: print(m, file=sys.stderr, flush=True))
"""
DEADLINE = 180  # seconds any awaited event may take on a loaded 2-core machine
KEY = "k-3e9d1f"
AUTH = {"Authorization": f"Bearer {KEY}"}


@dataclass
class Service:
    url: str
    proc: subprocess.Popen
    hold: Path
    log: Path


@pytest.fixture(scope="module")
def scorer(small_dir):
    return Scorer.from_pretrained(small_dir, device="cpu")


@pytest.fixture(scope="module")
def service(ray_cluster, small_dir, tmp_path_factory, request):
    import ray
    from ray import serve

    d = tmp_path_factory.mktemp("replicas")
    log = d / "stderr"
    proc = subprocess.Popen([sys.executable, "-c", HELD_REPLICAS, str(d / "hold"), str(small_dir),
                             ray.get_runtime_context().gcs_address, KEY], stderr=log.open("w"),
                            stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    request.getfixturevalue("scorer")  # loads while the replicas do

    def started():
        if proc.poll() is not None:
            pytest.fail(f"serve_replicated exited ({proc.returncode}):\n{log.read_text()}")
        return re.search(r"^serving .* on (http://[\d.]+:\d+)", log.read_text(), re.M)
    try:
        yield Service(wait_for("the service starts", started).group(1), proc, d / "hold", log)
    finally:
        (d / "hold").unlink(missing_ok=True)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                serve.shutdown()  # its Serve would outlive it on this session's cluster


def per_replica(url: str, name: str, **labels) -> dict[str, float]:
    """{replica id: value} of one series of the service's /metrics."""
    want = {f'{k}="{v}"' for k, v in labels.items()}
    out = {}
    for key, value in metric_values(httpx.get(f"{url}/metrics", timeout=60).text).items():
        head, _, rest = key.partition("{")
        parts = set(rest.rstrip("}").split(","))
        if head == name and want <= parts:
            out[re.search(r'replica="([^"]+)"', rest).group(1)] = value
    return out


def post_all(url: str, bodies: list, outcome: dict) -> list[threading.Thread]:
    """One thread per body, each POSTing it to /v1/score (again after a 503 with Retry-After);
    outcome[i] = ("answer", response, when, tries) or ("error", exception)."""
    def post(i):
        try:
            for tries in range(1, 11):  # noqa: B007 - recorded below
                r = httpx.post(f"{url}/v1/score", json=bodies[i], headers=AUTH, timeout=300)
                if r.status_code != 503 or "retry-after" not in r.headers:
                    break
            outcome[i] = ("answer", r, time.monotonic(), tries)
        except Exception as e:  # noqa: BLE001 - asserted on below, never lost in a thread
            outcome[i] = ("error", e)
    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    return threads


def held_in_flight(url: str, n: int) -> dict[str, float]:
    """Wait until `n` requests are in flight on the replicas (held there), each replica holding
    some; returns requests in flight per replica."""
    def ready():
        in_flight = per_replica(url, "worldpm_in_flight_requests")
        return in_flight if sum(in_flight.values()) == n and len(in_flight) == 2 and min(in_flight.values()) else None
    return wait_for(f"{n} requests held on both replicas", ready)


def refused(url: str) -> bool:
    try:
        httpx.get(f"{url}/health", timeout=60)
    except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
        return True  # refused, or reset as the listener closed with it queued: not served
    return False


def test_64_clients_get_the_scorers_scores_and_both_replicas_work(service, scorer):
    rng = random.Random(11)
    convs = [chat(text(rng, 1, 8), text(rng, 1, 30)) for _ in range(40)]
    want = scorer.score(convs)
    before = per_replica(service.url, "worldpm_requests_total", code="200", endpoint="/v1/score")
    posts = [("/v1/score", {"id": n, "messages": convs[n % 40]}) for n in range(64 * 2)]
    posts += [("/get_reward", {"query": [scorer.tokenizer.apply_chat_template(
        [{"role": "system", "content": ""}, *c], tokenize=False) for c in convs[:8]]})]
    responses = gather(service.url, posts, clients=64, headers=AUTH)
    assert [r.status_code for r in responses] == [200] * len(posts)
    got = [r.json() for r in responses]
    assert [g["id"] for g in got[:-1]] == list(range(64 * 2))
    assert [g["score"] for g in got[:-1]] == [want[n % 40] for n in range(64 * 2)]
    assert got[-1]["rewards"] == want[:8]

    after = per_replica(service.url, "worldpm_requests_total", code="200", endpoint="/v1/score")
    done = {r: after[r] - before.get(r, 0) for r in after}
    assert len(done) == 2 and min(done.values()) > 0 and sum(done.values()) == 64 * 2, done
    health = httpx.get(f"{service.url}/health").json()
    assert health["devices"] == ["cpu"] and health["max_items"] == 16 and len(health["replicas"]) == 2
    assert sorted(r["replica"] for r in health["replicas"]) == sorted(done)


def test_the_same_auth_errors_limits_and_routes_as_single_process(service):
    with httpx.Client(base_url=service.url, headers=AUTH) as c:
        big = c.post("/v1/score", json={"prompt": "x", "responses": ["a"] * 17})
        assert big.status_code == 413 and "takes at most 16" in big.json()["error"]["message"]
        bad = c.post("/classify", content=b'{"messages": [')
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "BadRequestError"  # vLLM's shape
        assert c.get("/nope").json()["error"]["type"] == "not_found"
        assert c.get("/v1/models").json()["data"][0]["object"] == "model"
    denied = httpx.post(f"{service.url}/v1/score", json={"messages": chat("a", "b")})
    assert denied.status_code == 401 and denied.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{service.url}/v1/models").json()["error"]["code"] == 401
    assert httpx.get(f"{service.url}/health").status_code == 200  # open, as in one process


def test_a_replica_killed_with_requests_in_flight_loses_none_and_comes_back(service, scorer):
    rng = random.Random(12)
    convs = [chat(text(rng, 1, 8), text(rng, 5, 30)) for _ in range(24)]
    want = scorer.score(convs)
    replicas = {r["replica"]: r["pid"] for r in httpx.get(f"{service.url}/health").json()["replicas"]}
    failovers = metric_values(httpx.get(f"{service.url}/metrics").text)["worldpm_replica_failovers_total"]
    service.hold.touch()
    outcome: dict = {}
    threads = post_all(service.url, [{"messages": c} for c in convs], outcome)
    held = held_in_flight(service.url, len(convs))
    victim = min(held)
    os.kill(replicas[victim], signal.SIGKILL)  # holding its requests: none of them can have finished
    service.hold.unlink()
    for t in threads:
        t.join(DEADLINE)
    assert not any(t.is_alive() for t in threads)
    assert {i: o[1] for i, o in outcome.items() if o[0] == "error"} == {}
    assert [outcome[i][1].status_code for i in range(len(convs))] == [200] * len(convs)
    assert [outcome[i][1].json()["score"] for i in range(len(convs))] == want
    assert [outcome[i][3] for i in range(len(convs))] == [1] * len(convs)  # no 503 to retry: failover inside
    resent = metric_values(httpx.get(f"{service.url}/metrics").text)["worldpm_replica_failovers_total"] - failovers
    assert resent >= held[victim], (resent, held)  # the victim's requests were scored elsewhere

    def restarted():  # Serve starts a new replica in the victim's place
        now = {r["replica"] for r in httpx.get(f"{service.url}/health").json()["replicas"]}
        return len(now) == 2 and victim not in now
    wait_for("a new replica in the killed one's place", restarted)


def test_sigterm_answers_every_request_held_on_every_replica_then_exits(service, scorer):
    rng = random.Random(13)
    convs = [chat(text(rng, 5, 15), text(rng, 20, 40)) for _ in range(4)]
    want = scorer.score(convs)
    clients = 32
    service.hold.touch()
    outcome: dict = {}
    threads = post_all(service.url, [[{"messages": c} for c in convs]] * clients, outcome)
    held_in_flight(service.url, clients)
    signalled = time.monotonic()
    service.proc.send_signal(signal.SIGTERM)
    wait_for("the listener closes after SIGTERM", lambda: refused(service.url))
    assert not outcome  # held on the replicas, not dropped
    service.hold.unlink()
    for t in threads:
        t.join(DEADLINE)
    assert not any(t.is_alive() for t in threads)
    assert {i: o[1] for i, o in outcome.items() if o[0] == "error"} == {}
    assert [outcome[i][1].status_code for i in range(clients)] == [200] * clients
    assert all(outcome[i][2] > signalled for i in range(clients))
    assert all([x["score"] for x in outcome[i][1].json()] == want for i in range(clients))
    assert service.proc.wait(DEADLINE) == 0
    logged = service.log.read_text()
    assert "stopped after answering every request in flight" in logged
    assert "API key required" in logged and KEY not in logged


def test_clear_errors_before_anything_starts(small_dir, capsys):
    assert main(["serve", "--model", str(small_dir), "--replicas", "0"]) == 2
    assert "--replicas: expected at least 1" in capsys.readouterr().err
    sock = bind("127.0.0.1", 0)
    try:
        assert main(["serve", "--model", str(small_dir), "--replicas", "2", "--port",
                     str(sock.getsockname()[1])]) == 2
        assert "cannot listen there" in capsys.readouterr().err
    finally:
        sock.close()


def test_without_ray_it_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(ServeError, match=re.escape("pip install 'worldpm-lite[ray]'")):
        serve_replicated("model", 2, {}, {}, "127.0.0.1", 0)

