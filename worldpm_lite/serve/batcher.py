"""Dynamic batching: concurrent callers' requests merged into the scorer's batches.

One worker thread owns the model. A caller submits one request's work (a list of Groups) and gets a
Future. The worker takes the oldest waiting request, then keeps taking requests in arrival order
while they fit ROUND_BATCHES token budgets per pipeline stage (a prompt already in the round counted
once: requests with one prompt compute it once, packing.merge_prompts), and runs what it took through
`Scorer.run` (packed batches that start at request boundaries). Each Future resolves as soon as its own groups
are scored, so a small request is not held back by a large one behind it in the same round.

While its round is below the budget the worker waits, at most `max_wait` seconds, only for requests
already on their way: callers announce one with `coming()` while they read and tokenize it. A lone
caller therefore never waits for company that is not there.

On the CPU a conversation's score does not depend on the batch it lands in (see WorldPM.head), so
every caller gets exactly the numbers `Scorer.score` gives for its request alone.

The queue is bounded by what it holds, in tokens (max_queue_tokens: a memory budget), with a request
count as a backstop: past either, `submit` raises QueueFull with a retry delay estimated from the
measured throughput. A request larger than the whole token bound is TooLarge. A request whose caller has
gone before the worker took it is taken out (`abandon`) and never scored. `close` takes no new
requests, scores every queued one, then stops.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from ..packing import Group, merge_prompts, stages
from ..scorer import DoesNotFit, NonFiniteScore, Step

ROUND_BATCHES = 4


class QueueFull(RuntimeError):
    def __init__(self, retry_after: int, depth: int, tokens: int, reason: str):
        self.retry_after, self.reason = retry_after, reason  # reason: "tokens" or "requests", the bound met
        super().__init__(f"the queue is full ({depth} requests, {tokens} tokens waiting); retry in about "
                         f"{retry_after} s")


class TooLarge(RuntimeError):
    """One request holds more tokens than the whole queue may."""


class Closed(RuntimeError):
    pass


@dataclass(eq=False)
class Job:
    groups: list[Group]
    future: Future = field(default_factory=Future)
    queued: float = field(default_factory=time.monotonic)
    scores: dict = field(default_factory=dict)  # group index in the job -> scores
    work: int = field(init=False)  # tokens the model runs for it, alone
    prompts: list[tuple[int, int]] = field(init=False)  # (hash, length) of its groups' shareable prompts

    def __post_init__(self):
        self.work = sum(g.work for g in self.groups)
        self.prompts = [(hash(tuple(g.prompt)), len(g.prompt)) for g in self.groups
                        if g.prompt is not None and not g.every_token]

    def cost(self, prompts: set[int]) -> int:
        """Tokens it adds to a round whose groups have these prompts (those run once for all)."""
        return self.work - sum(n for h, n in self.prompts if h in prompts)


class Batcher:
    """max_wait: seconds the worker waits for requests on their way while its round is below the budget.
    max_queue_tokens, max_queue: tokens (the model's work) and requests waiting (not yet taken by the
    worker) before submit refuses. on_step(step, requests): called by the worker after each batch, with
    the requests of its round after the round's first batch (0 after the others). on_shared(tokens): the
    prompt tokens a round did not run because requests shared them."""

    def __init__(self, scorer, max_wait: float = 0.005, max_queue: int = 65536,
                 on_step: Callable[[Step, int], None] | None = None, max_queue_tokens: int = 1 << 40,
                 on_shared: Callable[[int], None] | None = None):
        if max_wait < 0 or max_queue < 1 or max_queue_tokens < 1:
            raise ValueError(f"max_wait >= 0, max_queue >= 1 and max_queue_tokens >= 1 expected, found {max_wait}, "
                             f"{max_queue}, {max_queue_tokens}")
        self.scorer, self.max_wait, self.max_queue, self.on_step = scorer, max_wait, max_queue, on_step
        self.max_queue_tokens, self.on_shared = max_queue_tokens, on_shared  # on_shared(prompt tokens not run)
        self.queued_tokens = 0  # the work of the waiting jobs
        # a round takes ROUND_BATCHES token budgets of work a pipeline stage: room for the requests with one
        # prompt to meet (GRPO's samples of a 1,500-token prompt are more than one CPU budget of 2,048)
        self.round_budget = ROUND_BATCHES * scorer.token_budget * (len(stages(scorer.model)) if scorer.pipeline else 1)
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._coming = 0  # requests being read and tokenized: worth waiting for
        self._rate = 0.0  # tokens per second of recent rounds (model work), for Retry-After
        self._thread = threading.Thread(target=self._loop, name="worldpm-batcher", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        """Requests waiting for the worker."""
        return len(self._queue)

    def oldest_wait(self) -> float:
        """Seconds the oldest waiting request has waited (0 when none waits)."""
        with self._cond:
            return time.monotonic() - self._queue[0].queued if self._queue else 0.0

    @contextlib.contextmanager
    def coming(self):
        """Around reading and tokenizing a request that will be submitted: the worker waits for it."""
        with self._cond:
            self._coming += 1
        try:
            yield
        finally:
            with self._cond:
                self._coming -= 1
                self._cond.notify()

    def submit(self, groups: list[Group]) -> Future:
        """Queue one request's groups; the Future gives their scores (one list per group, in order)."""
        job = Job(groups)
        if job.work > self.max_queue_tokens:
            raise TooLarge(f"body: {job.work} tokens to score; this server queues at most {self.max_queue_tokens} "
                           "(--max-queue-tokens): split the request")
        with self._cond:
            if self._closing:
                raise Closed("the service is shutting down")
            full = ("requests" if len(self._queue) >= self.max_queue else
                    "tokens" if self.queued_tokens + job.work > self.max_queue_tokens else None)
            if full:
                raise QueueFull(self._retry_after(), len(self._queue), self.queued_tokens, full)
            self._queue.append(job)
            self.queued_tokens += job.work
            self._cond.notify()
        return job.future

    def abandon(self, future: Future) -> bool:
        """The caller of `future` has gone: if its request still waits, take it out (it is not scored) and
        say True; False when the worker has it already."""
        with self._cond:
            job = next((j for j in self._queue if j.future is future), None)
            if job is None:
                return False
            self._queue.remove(job)
            self.queued_tokens -= job.work
            job.future.cancel()
            return True

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, finish the queued ones, stop the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)

    def _retry_after(self) -> int:
        """Seconds until the queue's work is done at the measured rate (1 before anything is measured)."""
        return max(1, math.ceil(self.queued_tokens / self._rate)) if self._rate > 0 else 1

    def _take(self) -> list[Job] | None:
        """The next round's requests (None when closing and nothing is left)."""
        with self._cond:
            jobs: list[Job] = []
            work, deadline, prompts = 0, None, set()
            while True:
                while self._queue and (not jobs or work + self._queue[0].cost(prompts) <= self.round_budget):
                    job = self._queue.popleft()
                    self.queued_tokens -= job.work
                    if job.future.set_running_or_notify_cancel():  # False: its caller has gone
                        jobs.append(job)
                        work += job.cost(prompts)
                        prompts.update(h for h, _ in job.prompts)
                if jobs and (self._queue or work >= self.round_budget or self._closing or not self._coming):
                    return jobs
                if not jobs and self._closing:
                    return None
                if jobs:
                    deadline = deadline or time.monotonic() + self.max_wait
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return jobs
                    self._cond.wait(left)
                else:
                    self._cond.wait()

    def _loop(self) -> None:
        while (jobs := self._take()) is not None:
            while jobs:
                jobs = self._round(jobs)

    def _round(self, jobs: list[Job]) -> list[Job]:
        """Score the jobs' groups, those of any jobs with the same prompt tokens merged (the prompt runs
        once; no score changes: packing.merge_prompts); returns the jobs to run again (after a bad
        request was taken out)."""
        owner = [(job, n) for job in jobs for n in range(len(job.groups))]
        groups, members = merge_prompts([job.groups[n] for job, n in owner])
        if self.on_shared is not None:
            self.on_shared(sum(len(g.prompt) * (len({i for i, _ in m}) - 1) for g, m in zip(groups, members)
                               if g.prompt is not None))
        t0, steps = time.monotonic(), 0
        try:
            for step in self.scorer.run(groups):
                for g, scores in step.results:
                    parts: dict[int, dict[int, float]] = {}
                    for (i, j), score in zip(members[g], scores):
                        parts.setdefault(i, {})[j] = score
                    for i, by_part in parts.items():
                        job, n = owner[i]
                        job.scores[n] = [by_part[j] for j in range(len(by_part))]
                        if len(job.scores) == len(job.groups):
                            job.future.set_result([job.scores[k] for k in range(len(job.groups))])
                if self.on_step is not None:  # the round's requests with its first batch, 0 with the others
                    self.on_step(step, 0 if steps else len(jobs))
                steps += 1
        except (NonFiniteScore, DoesNotFit) as e:  # shown to the requests that met it; the rest go again
            met = members[e.group] if isinstance(e, DoesNotFit) else [members[e.group][e.part]]
            bad = {id(owner[i][0]): owner[i][0] for i, _ in met}
            for job in bad.values():
                job.future.set_exception(e)
            rest = [j for j in jobs if id(j) not in bad and not j.future.done()]
            for j in rest:
                j.scores.clear()
            return rest
        except Exception as e:  # noqa: BLE001 - e.g. out of GPU memory: every caller of the round hears of it
            for j in jobs:
                if not j.future.done():
                    j.future.set_exception(e)
            return []
        seconds, work = time.monotonic() - t0, sum(j.work for j in jobs)  # every group of the round is done
        if seconds > 0 and work:
            self._rate = work / seconds if self._rate == 0 else 0.8 * self._rate + 0.2 * work / seconds
        return []
