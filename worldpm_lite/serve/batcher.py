"""Dynamic batching: concurrent callers' requests merged into the scorer's batches.

One worker thread owns the model. A caller submits one request's work (a list of Groups) and gets a
Future. The worker takes the oldest waiting request, then keeps taking requests in arrival order
while they fit one token budget per pipeline stage, and runs what it took through `Scorer.run`
(packed batches that start at request boundaries). Each Future resolves as soon as its own groups
are scored, so a small request is not held back by a large one behind it in the same round.

While its round is below the budget the worker waits, at most `max_wait` seconds, only for requests
already on their way: callers announce one with `coming()` while they read and tokenize it. A lone
caller therefore never waits for company that is not there.

On the CPU a conversation's score does not depend on the batch it lands in (see WorldPM.head), so
every caller gets exactly the numbers `Scorer.score` gives for its request alone.

The queue is bounded in requests: `submit` raises QueueFull with a retry delay estimated from the
measured throughput. `close` takes no new requests, scores every queued one, then stops.
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

from ..packing import Group, stages
from ..scorer import DoesNotFit, NonFiniteScore, Step


class QueueFull(RuntimeError):
    def __init__(self, retry_after: int, depth: int):
        self.retry_after = retry_after
        super().__init__(f"the queue is full ({depth} requests waiting); retry in about {retry_after} s")


class Closed(RuntimeError):
    pass


@dataclass(eq=False)
class Job:
    groups: list[Group]
    future: Future = field(default_factory=Future)
    scores: dict = field(default_factory=dict)  # group index in the job -> scores
    work: int = field(init=False)  # tokens the model runs for it

    def __post_init__(self):
        self.work = sum(g.work for g in self.groups)


class Batcher:
    """max_wait: seconds the worker waits for requests on their way while its round is below the budget.
    max_queue: requests waiting (not yet taken by the worker) before submit refuses.
    on_step(step, requests): called by the worker after each batch, with the requests in its round."""

    def __init__(self, scorer, max_wait: float = 0.005, max_queue: int = 1024,
                 on_step: Callable[[Step, int], None] | None = None):
        if max_wait < 0 or max_queue < 1:
            raise ValueError(f"max_wait >= 0 and max_queue >= 1 expected, found {max_wait}, {max_queue}")
        self.scorer, self.max_wait, self.max_queue, self.on_step = scorer, max_wait, max_queue, on_step
        self.round_budget = scorer.token_budget * (len(stages(scorer.model)) if scorer.pipeline else 1)
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
        with self._cond:
            if self._closing:
                raise Closed("the service is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(self._retry_after(), len(self._queue))
            self._queue.append(job)
            self._cond.notify()
        return job.future

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, finish the queued ones, stop the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)

    def _retry_after(self) -> int:
        work = sum(j.work for j in self._queue)
        return max(1, math.ceil(work / self._rate)) if self._rate > 0 else 1

    def _take(self) -> list[Job] | None:
        """The next round's requests (None when closing and nothing is left)."""
        with self._cond:
            jobs: list[Job] = []
            work, deadline = 0, None
            while True:
                while self._queue and (not jobs or work + self._queue[0].work <= self.round_budget):
                    job = self._queue.popleft()
                    if job.future.set_running_or_notify_cancel():  # False: its caller has gone
                        jobs.append(job)
                        work += job.work
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
        """Score the jobs' groups; returns the jobs to run again (after a bad request was taken out)."""
        owner = [(job, n) for job in jobs for n in range(len(job.groups))]
        t0 = time.monotonic()
        try:
            for step in self.scorer.run(g for job in jobs for g in job.groups):
                for g, scores in step.results:
                    job, n = owner[g]
                    job.scores[n] = scores
                    if len(job.scores) == len(job.groups):
                        job.future.set_result([job.scores[i] for i in range(len(job.groups))])
                if self.on_step is not None:
                    self.on_step(step, len(jobs))
        except (NonFiniteScore, DoesNotFit) as e:  # shown to the request that met it; the rest go again
            bad = owner[e.group][0]
            bad.future.set_exception(e)
            rest = [j for j in jobs if j is not bad and not j.future.done()]
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
