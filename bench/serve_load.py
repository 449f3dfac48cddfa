"""Load on `worldpm-lite serve`: requests/s and p50/p99 latency with 1, 8, 32 and 64 concurrent
clients, and the Scorer called directly one request at a time (no HTTP) as the floor.

    python bench/serve_load.py [--model DIR] [--requests 320] [--repeats 2] [--max-wait-ms 5] [--smoke]
    python bench/serve_load.py --replicas 1,2     # Ray Serve (serve --replicas), 1 then 2 replicas (0: one process)

The server runs as users run it (`python -m worldpm_lite serve ... --port 0`, a subprocess) on the
small model (default: the trained one of `make-tiny`, seed 0); the clients are keep-alive
connections on asyncio streams in this process (see Connection), which on a 2-core machine still
take some CPU time from the server. Each request is one real ShareGPT first exchange as `/v1/score` {"messages": ...}
(default), or with --reward eight of them as one `/get_reward` call. Levels alternate over
--repeats rounds; each level sends --requests requests (one client: a quarter of that). Every
answer is checked against the Scorer's score for its conversation (exactly equal). Target (issue 13):
32 clients >= 3x the requests/s of one at a time. The Scorer called directly, one request at a time
and all at once, shows how much batching itself gains on this machine for these requests.
With --openrlhf each request is one sample, as OpenRLHF's client sends them from every rollout at once,
at 1 and 256 clients. With --replicas 1,2 the server is `serve --replicas` (worldpm_lite.serve.replicas) on a
local Ray cluster of this machine's cores, once per replica count, the cores shared evenly (each of N
replicas reserves cores/N CPUs and runs cores//N torch threads): requests/s at 1 vs 2 replicas. --smoke:
the same logic with a few seconds of load (one repeat, 1 and 32 clients, 64 requests). Writes
bench/results/serve_load[-short][-reward][-openrlhf][-replicas][-smoke].json.

What a 2-core machine can show with --replicas: that requests spread over both replicas (each one's
batches in /metrics), what the hop from the front to a replica (a Serve handle call) costs per request,
and that answers stay exact. What it cannot: scaling. Two replicas share the two cores that one replica
with two threads has, beside the front and this load generator, so any gain of 2 over 1 here is how
much better two single-threaded models use two cores than one two-threaded model; N replicas pay off
with a core set (or GPUs) each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import torch

from worldpm_lite.chat import encode_conversation
from worldpm_lite.data import sharegpt_conversations
from worldpm_lite.scorer import Scorer
from worldpm_lite.tiny import tiny_model_dir

MAX_TOKENS = 512


def start(model: str, max_wait_ms: float, replicas: int = 0) -> tuple[subprocess.Popen, str]:
    """`worldpm-lite serve`, or `serve --replicas N` sharing this machine's cores."""
    cmd = [sys.executable, "-m", "worldpm_lite", "serve"]
    if replicas:
        cmd += ["--replicas", str(replicas), "--cpus-per-replica", f"{max(1, os.cpu_count() // replicas)}"]
    proc = subprocess.Popen(cmd + ["--model", model, "--device", "cpu", "--port", "0", "--max-wait-ms",
                                   str(max_wait_ms)], stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if line.startswith("serving "):
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # its later logs never block it
            return proc, re.search(r"http://[\d.]+:\d+", line).group(0)
    raise RuntimeError(f"the server did not start (exit {proc.wait()})")


class Connection:
    """One keep-alive HTTP/1.1 connection on asyncio streams. httpx's AsyncClient costs so much CPU per
    request that on this 2-core box it tops out near 200 requests/s with 32 connections on a no-op
    endpoint; this client leaves the CPU to the server it measures."""

    def __init__(self, reader, writer, host: str):
        self.reader, self.writer, self.host = reader, writer, host

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        status = int((await self.reader.readline()).split()[1])
        length = 0
        while (line := await self.reader.readline()) != b"\r\n":
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)


async def load(url: str, bodies: list[tuple[str, bytes, object]], clients: int, n: int):
    """n requests from `clients` concurrent connections; (requests/s, sorted latencies, answers)."""
    host, port = url.removeprefix("http://").split(":")
    latencies, answers = [], {}
    todo = list(range(n))

    async def client():
        conn = Connection(*await asyncio.open_connection(host, int(port)), host)
        while todo:
            i = todo.pop()
            path, body, _ = bodies[i % len(bodies)]
            t = time.perf_counter()
            status, data = await conn.post(path, body)
            latencies.append(time.perf_counter() - t)
            if status != 200:
                raise RuntimeError(f"{path}: HTTP {status}: {data[:300]!r}")
            answers[i] = json.loads(data)
        conn.writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return n / (time.perf_counter() - t0), sorted(latencies), answers


def pct(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def measure(url: str, bodies: list, levels: tuple, args) -> list[dict]:
    """Every level, --repeats times, each answer checked; the runs."""
    runs = []
    for r in range(args.repeats):
        for clients in levels:
            n = args.requests // 4 if clients == 1 else args.requests
            rps, lat, answers = asyncio.run(load(url, bodies, clients, n))
            for i, a in answers.items():
                expect = bodies[i % len(bodies)][2]
                rewarded = args.reward or args.openrlhf
                assert (a["rewards"] if rewarded else [a["score"]]) == (expect if rewarded else [expect])
            runs.append({"repeat": r, "clients": clients, "requests": n, "requests_per_s": rps,
                         "p50_ms": pct(lat, 0.5) * 1000, "p99_ms": pct(lat, 0.99) * 1000})
            print(f"repeat {r} clients {clients:>2}: {rps:6.1f} req/s  p50 {runs[-1]['p50_ms']:6.0f} ms  "
                  f"p99 {runs[-1]['p99_ms']:6.0f} ms", flush=True)
    return runs


def merged_per_round(metrics: str) -> float:
    """Requests merged into one round of batches, on average (over every replica's series)."""
    total = {"sum": 0.0, "count": 0.0}
    for kind, value in re.findall(r"^worldpm_batched_requests_(sum|count)(?:\{[^}]*\})? (\S+)$", metrics, re.M):
        total[kind] += float(value)
    return total["sum"] / total["count"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory (default: the small trained model, seed 0)")
    ap.add_argument("--requests", type=int, default=320)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--reward", action="store_true", help="/get_reward with 8 queries per request")
    ap.add_argument("--openrlhf", type=int, nargs="?", const=0, help="OpenRLHF's pattern: one sample per /get_reward "
                    "request ({query: [q], prompts: [p], labels: [l]}) from 1 and 256 clients at once; with N (e.g. "
                    "8192): N such requests in flight at once, sent as OpenRLHF's own client sends them "
                    "(bench/rl_traffic.py)")
    ap.add_argument("--grpo", action="store_true", help="GRPO-shaped traffic (8 samples of ~1,500-token prompts) "
                    "with prompt sharing on vs off (bench/rl_traffic.py)")
    ap.add_argument("--short", action="store_true", help="each exchange cut to the prompt's first 60 characters "
                    "and the reply's first 120 (about 55 tokens): where a CPU gains most from batching")
    ap.add_argument("--replicas", help="comma-separated replica counts, e.g. 1,2: serve --replicas (Ray Serve) "
                    "instead of single-process serve, once per count (0: single-process serve, for comparison)")
    ap.add_argument("--smoke", action="store_true", help="a few seconds of load: one repeat, 1 and 32 clients "
                    "(1 and 256 with --openrlhf), 64 requests")
    ap.add_argument("--out", help="default: bench/results/serve_load[-short][-reward][-openrlhf][-replicas][-smoke]"
                    ".json")
    args = ap.parse_args()
    if args.openrlhf or args.grpo:
        import rl_traffic  # bench/ is this script's folder

        model = args.model or str(tiny_model_dir(0))
        result = (rl_traffic.openrlhf_in_flight(model, 64 if args.smoke else args.openrlhf, args.smoke)
                  if args.openrlhf else rl_traffic.grpo(model, args.smoke))
        name = f"serve_load-openrlhf-{args.openrlhf}" if args.openrlhf else "serve_load-grpo"
        rl_traffic.write(Path(args.out or Path(__file__).parent / "results" / f"{name}{'-smoke' * args.smoke}.json"),
                         {"machine": platform.processor() or platform.machine(), "model": model, **result})
        raise SystemExit(0 if result["pass"] else 1)
    counts = [int(n) for n in args.replicas.split(",")] if args.replicas else [0]
    if min(counts) < 0:
        ap.error(f"--replicas: expected counts of at least 0, found {args.replicas}")
    if args.smoke:
        args.requests, args.repeats = 64, 1
    model = args.model or str(tiny_model_dir(0))
    scorer = Scorer.from_pretrained(model, device="cpu")
    convs = []
    for conv in sharegpt_conversations():
        if args.short:
            conv = [{"role": m["role"], "content": m["content"][:cut]} for m, cut in zip(conv, (60, 120))]
        ids = encode_conversation(scorer.tokenizer, conv[:2])
        if len(ids) <= min(MAX_TOKENS, scorer.max_length):
            convs.append(conv[:2])
        if len(convs) == 160:
            break
    want = scorer.score(convs)
    queries = [scorer.tokenizer.apply_chat_template([{"role": "system", "content": ""}, *c], tokenize=False)
               for c in convs]  # the trainer's view: each conversation as the chat template renders it
    if args.openrlhf:
        bodies = [("/get_reward", json.dumps({"query": [q], "prompts": [c[0]["content"]], "labels": [None]}).encode(),
                   [w]) for q, c, w in zip(queries, convs, want)]
    elif args.reward:
        bodies = [("/get_reward", json.dumps({"query": queries[k:k + 8]}).encode(), want[k:k + 8])
                  for k in range(0, len(convs), 8)]
    else:
        bodies = [("/v1/score", json.dumps({"messages": c}).encode(), want[k]) for k, c in enumerate(convs)]
    tokens = sum(len(ids) for ids in scorer.encode(convs)) / len(bodies)
    print(f"{len(bodies)} distinct requests, {tokens:.0f} tokens each on average ({torch.get_num_threads()} threads)")

    direct = []  # the Scorer itself, one request at a time, no HTTP
    for k in range(10 if args.smoke else 40):
        k %= len(bodies)
        t = time.perf_counter()
        scorer.score(convs[k * 8:k * 8 + 8] if args.reward and not args.openrlhf else [convs[k]])
        direct.append(time.perf_counter() - t)
    direct.sort()
    t = time.perf_counter()
    scorer.score(convs)  # and all at once: the most batching can give on this machine
    batched = len(bodies) / (time.perf_counter() - t)
    print(f"Scorer.score directly, one request at a time: {1 / (sum(direct) / len(direct)):.1f} req/s, "
          f"p50 {pct(direct, 0.5) * 1000:.0f} ms; all {len(bodies)} in one call: {batched:.1f} req/s")

    levels = (1, 256) if args.openrlhf else (1, 32) if args.smoke else (1, 8, 32, 64)
    top = 256 if args.openrlhf else 32
    runs, per_round = [], {}
    for replicas in counts:
        if args.replicas:
            print(f"serve --replicas {replicas} (Ray Serve)" if replicas else "serve (one process)", flush=True)
        proc, url = start(model, args.max_wait_ms, replicas)
        try:
            runs += [{"replicas": replicas, **run} if args.replicas else run
                     for run in measure(url, bodies, levels, args)]
            per_round[replicas] = merged_per_round(httpx.get(f"{url}/metrics").text)
        finally:
            proc.terminate()
            proc.wait(120)
    if args.replicas:
        return replicated_summary(args, runs, per_round, top, model, bodies[0][0], tokens)
    per_round = per_round[0]
    best = {c: max(x["requests_per_s"] for x in runs if x["clients"] == c) for c in levels}
    ratio = [x["requests_per_s"] / next(y["requests_per_s"] for y in runs if y["clients"] == 1 and
                                         y["repeat"] == x["repeat"]) for x in runs if x["clients"] == top]
    print(f"{top} clients vs one at a time (best of each): {best[top] / best[1]:.2f}x; per repeat: "
          + ", ".join(f"{v:.2f}x" for v in ratio) + ("" if args.openrlhf else " (target >= 3x)"))
    print(f"requests merged per round, on average: {per_round:.1f}")
    out = output_path(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "model": model, "endpoint": bodies[0][0], "tokens_per_request": tokens, "max_wait_ms": args.max_wait_ms,
        "short": args.short, "direct_requests_per_s": 1 / (sum(direct) / len(direct)),
        "direct_p50_ms": pct(direct, 0.5) * 1000, "direct_all_at_once_requests_per_s": batched,
        "runs": runs, f"ratio_{top}_vs_1": best[top] / best[1], f"ratio_{top}_vs_1_per_repeat": ratio,
        "mean_requests_per_round": per_round,
    }, indent=1))
    print(f"wrote {out}")


def output_path(args) -> Path:
    return Path(args.out or Path(__file__).parent / "results" / (
        "serve_load" + "-short" * args.short + "-reward" * args.reward + "-openrlhf" * args.openrlhf
        + "-replicas" * bool(args.replicas) + "-smoke" * args.smoke + ".json"))


def replicated_summary(args, runs: list[dict], per_round: dict, top: int, model: str, endpoint: str,
                       tokens: float) -> None:
    """Best requests/s at `top` clients per replica count, against the first count's."""
    best = {n: max(x["requests_per_s"] for x in runs if x["replicas"] == n and x["clients"] == top) for n in per_round}
    first = next(iter(best))
    name = {n: f"{n} replicas" if n else "one process" for n in best}
    for n, rps in best.items():
        print(f"{name[n]}, {top} clients: {rps:.1f} req/s (best of {args.repeats}), {rps / best[first]:.2f}x "
              f"{name[first]}; requests merged per round {per_round[n]:.1f}")
    out = output_path(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "machine": platform.processor() or platform.machine(), "cores": os.cpu_count(), "model": model,
        "endpoint": endpoint, "tokens_per_request": tokens, "max_wait_ms": args.max_wait_ms, "short": args.short,
        "smoke": args.smoke,
        "runs": runs, f"best_requests_per_s_at_{top}": {str(n): v for n, v in best.items()},
        "mean_requests_per_round": {str(n): v for n, v in per_round.items()},
    }, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
