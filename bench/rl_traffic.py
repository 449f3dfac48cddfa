"""RL traffic against `worldpm-lite serve` (bench/serve_load.py --openrlhf N, --grpo): the server as users
run it (a subprocess), on the small trained model, on the CPU.

--openrlhf N: N single-sample /get_reward requests in flight at once, each sent the way OpenRLHF 0.11.2's
client sends it (openrlhf/utils/agent.py, SingleTurnAgentExecutor._fetch_rewards_via_http: a new aiohttp
session per try, ClientTimeout(total=180), 5 tries 1 s apart, then the reward is None): a GRPO rollout of
N / 8 prompts x 8 samples of real ShareGPT exchanges, each query the templated conversation and its
`prompts` entry the templated prompt. Reported: rewards/s against the Scorer's own rate on the same texts
all at once (score_texts, prompts shared as the server shares them), p50/p99 latency, the server's peak
RSS against its RSS before the load, refusals (503s seen by the clients and counted by /metrics), lost
rewards, and whether every reward is exactly the Scorer's. Targets (issue 30): >= 0.8x the Scorer's
rate, 0 refusals, none lost.

--grpo: GRPO-shaped traffic (8 samples a prompt, prompts of ~1,500 tokens, answers of ~300, one request
each as OpenRLHF sends them) at the same server with prompt sharing on (the default) and off
(--no-shared-prompts), in one run: rewards/s of each. Target (issue 30): sharing >= 2x.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
import time

ASSISTANT = "<|im_start|>assistant\n"


def templated(messages: list[dict]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
                   for m in [{"role": "system", "content": ""}, *messages])


def rollout(tokenizer, prompts: int, samples: int, prompt_tokens: tuple[int, int], answer_tokens: int
            ) -> tuple[list[str], list[str]]:
    """(queries, prompts): `prompts` real ShareGPT first questions of about prompt_tokens (lo, hi) tokens,
    `samples` answers each (real replies, cut to a share of answer_tokens from a third to all)."""
    from worldpm_lite.data import sharegpt_conversations

    queries, given = [], []
    pool = []
    for conv in sharegpt_conversations():
        question, reply = conv[0]["content"], conv[1]["content"]
        q_ids, r_ids = tokenizer.encode(question), tokenizer.encode(reply)
        lo, hi = prompt_tokens
        if len(q_ids) < lo:
            pool.append(question)  # short questions, joined below to make long prompts when needed
            if sum(len(tokenizer.encode(p)) for p in pool) < lo:
                continue
            question, pool = "\n\n".join(pool), []
            q_ids = tokenizer.encode(question)
        if len(r_ids) < answer_tokens:
            continue
        question = tokenizer.decode(q_ids[:hi])
        prompt = templated([{"role": "user", "content": question}]) + ASSISTANT
        for k in range(samples):
            cut = answer_tokens * (k + 1 + samples // 2) // (samples + samples // 2)  # a third to all of it
            queries.append(prompt + tokenizer.decode(r_ids[:cut]) + "<|im_end|>\n")
            given.append(prompt)
        if len(queries) == prompts * samples:
            return queries, given
    raise RuntimeError("not enough ShareGPT conversations for the rollout")


def start(model: str, *flags: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "worldpm_lite", "serve", "--model", model, "--device", "cpu",
                             "--port", "0", *flags], stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if line.startswith("serving "):
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, re.search(r"http://[\d.]+:\d+", line).group(0)
    raise RuntimeError(f"the server did not start (exit {proc.wait()})")


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


class Peak(threading.Thread):
    """The largest RSS of a process, sampled every 50 ms until stopped."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, rss(pid), threading.Event()

    def run(self):
        while not self.stop.wait(0.05):
            self.peak = max(self.peak, rss(self.pid))


async def openrlhf_client(url: str, queries: list[str], prompts: list[str]) -> list[dict]:
    """Every request at once, each as OpenRLHF's _fetch_rewards_via_http sends it; per request: the reward
    (None when lost), its latency, and the statuses of its tries."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=180)

    async def one(i: int) -> dict:
        data = {"query": [queries[i]], "prompts": [prompts[i]], "labels": [None]}
        statuses, t0 = [], time.perf_counter()
        for _ in range(5):  # try_max_times=5
            try:
                async with aiohttp.ClientSession(timeout=timeout) as session:
                    async with session.post(f"{url}/get_reward", json=data) as response:
                        statuses.append(response.status)
                        response.raise_for_status()
                        body = await response.json()
                        return {"reward": body["rewards"][0], "seconds": time.perf_counter() - t0,
                                "statuses": statuses}
            except aiohttp.ClientError as e:  # OpenRLHF logs it and tries again a second later
                statuses.append(type(e).__name__)
            await asyncio.sleep(1)
        return {"reward": None, "seconds": time.perf_counter() - t0, "statuses": statuses}

    return await asyncio.gather(*(one(i) for i in range(len(queries))))


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def openrlhf_in_flight(model: str, n: int, smoke: bool) -> dict:
    import httpx

    from worldpm_lite.scorer import Scorer

    scorer = Scorer.from_pretrained(model, device="cpu")
    queries, prompts = rollout(scorer.tokenizer, max(1, n // 8), 8, (20, 200), 60 if smoke else 200)
    scorer.score_texts(queries[:16], prompts[:16])  # warm-up
    t0 = time.perf_counter()
    want = scorer.score_texts(queries, prompts)
    scorer_rate = len(queries) / (time.perf_counter() - t0)
    tokens = sum(map(len, scorer.encode_texts(queries)))
    print(f"{len(queries)} samples ({tokens:,} tokens); the Scorer alone, all at once: {scorer_rate:,.1f} rewards/s",
          flush=True)
    del scorer
    proc, url = start(model)
    try:
        before = rss(proc.pid)
        peak = Peak(proc.pid)
        peak.start()
        t0 = time.perf_counter()
        results = asyncio.run(openrlhf_client(url, queries, prompts))
        wall = time.perf_counter() - t0
        peak.stop.set()
        peak.join()
        text = httpx.get(f"{url}/metrics").text
    finally:
        proc.terminate()
        proc.wait(120)
    rewards = [r["reward"] for r in results]
    refusals = sum(s == 503 for r in results for s in r["statuses"])
    out = {"samples": len(queries), "tokens": tokens, "scorer_rewards_per_s": scorer_rate,
           "served_rewards_per_s": len(queries) / wall, "ratio": len(queries) / wall / scorer_rate,
           "p50_s": pct([r["seconds"] for r in results], 0.5), "p99_s": pct([r["seconds"] for r in results], 0.99),
           "lost": sum(r is None for r in rewards), "refusals_seen": refusals,
           "refusals_counted": metric(text, "worldpm_refused_total"), "exact": rewards == want,
           "tries_beyond_the_first": sum(len(r["statuses"]) - 1 for r in results),
           "server_rss_before_GiB": before / 2**30, "server_rss_peak_GiB": peak.peak / 2**30,
           "rss_growth_bytes_per_token": (peak.peak - before) / tokens,
           "shared_prompt_tokens": metric(text, "worldpm_shared_prompt_tokens_total")}
    out["pass"] = out["ratio"] >= 0.8 and refusals == 0 and out["lost"] == 0 and out["exact"]
    print(f"served: {out['served_rewards_per_s']:,.1f} rewards/s ({out['ratio']:.2f}x the Scorer's; target >= 0.8x), "
          f"p50 {out['p50_s']:.1f} s, p99 {out['p99_s']:.1f} s; refusals {refusals}, lost {out['lost']}, exact "
          f"{out['exact']}; server RSS {out['server_rss_before_GiB']:.2f} -> {out['server_rss_peak_GiB']:.2f} GiB "
          f"({out['rss_growth_bytes_per_token']:.0f} B per token in flight); {'PASS' if out['pass'] else 'FAIL'}")
    return out


def grpo(model: str, smoke: bool) -> dict:
    """The same GRPO-shaped rollout against the server with prompt sharing on and off."""
    from worldpm_lite.scorer import Scorer

    scorer = Scorer.from_pretrained(model, device="cpu")
    prompts_n, shape = (2, ((100, 120), 40)) if smoke else (16, ((1400, 1600), 300))
    queries, prompts = rollout(scorer.tokenizer, prompts_n, 8, *shape)
    want = scorer.score_texts(queries, prompts)
    tokens = sum(map(len, scorer.encode_texts(queries)))
    del scorer
    out = {"samples": len(queries), "tokens": tokens}
    for name, flags in (("shared", ()), ("not_shared", ("--no-shared-prompts",))):
        proc, url = start(model, *flags)
        try:
            asyncio.run(openrlhf_client(url, queries[:8], prompts[:8]))  # warm-up
            t0 = time.perf_counter()
            results = asyncio.run(openrlhf_client(url, queries, prompts))
            out[f"{name}_rewards_per_s"] = len(queries) / (time.perf_counter() - t0)
            got = [r["reward"] for r in results]
            out[f"{name}_max_difference"] = max(abs(a - b) for a, b in zip(got, want))
        finally:
            proc.terminate()
            proc.wait(120)
        print(f"  sharing {'on' if name == 'shared' else 'off'}: {out[f'{name}_rewards_per_s']:.2f} rewards/s, max "
              f"|reward - the Scorer's| {out[f'{name}_max_difference']:.1e}", flush=True)
    out["ratio"] = out["shared_rewards_per_s"] / out["not_shared_rewards_per_s"]
    out["pass"] = out["ratio"] >= 2.0 and out["shared_max_difference"] == 0.0
    print(f"GRPO-shaped ({prompts_n} prompts x 8, {tokens / len(queries):.0f} tokens a sample): sharing "
          f"{out['ratio']:.2f}x (target >= 2x), shared rewards exactly the Scorer's: "
          f"{out['shared_max_difference'] == 0.0}; {'PASS' if out['pass'] else 'FAIL'}")
    return out


def write(path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
