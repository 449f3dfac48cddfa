"""The service's Prometheus metrics, in a registry of their own (none global)."""

from __future__ import annotations

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
POWERS = tuple(2.0 ** k for k in range(17))


class Metrics:
    """queue: the Batcher's gauges as functions (depth, tokens, oldest wait), read when scraped."""

    def __init__(self, queue_depth, queue_tokens, oldest_wait):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("worldpm_requests", "HTTP requests answered", ["endpoint", "code"], registry=r)
        self.latency = Histogram("worldpm_request_seconds", "time from request to response", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.conversations = Counter("worldpm_conversations", "conversations scored", registry=r)
        self.tokens = Counter("worldpm_tokens", "tokens of the conversations scored", registry=r)
        self.batch_tokens = Histogram("worldpm_batch_tokens", "tokens completed per model batch", buckets=POWERS,
                                      registry=r)
        self.batch_conversations = Histogram("worldpm_batch_conversations", "conversations completed per model "
                                             "batch", buckets=POWERS, registry=r)
        self.round_requests = Histogram("worldpm_batched_requests", "HTTP requests merged into one round of "
                                        "batches", buckets=POWERS, registry=r)
        self.in_flight = Gauge("worldpm_in_flight_requests", "HTTP requests being answered", registry=r)
        self.refused = Counter("worldpm_refused", "requests answered 503 because the queue was full, by the bound "
                               "met (tokens or requests)", ["reason"], registry=r)
        self.abandoned = Counter("worldpm_abandoned", "requests whose client left before the model took them: "
                                 "never scored", registry=r)
        self.shared_tokens = Counter("worldpm_shared_prompt_tokens", "prompt tokens computed once for several "
                                     "requests of a round (the tokens each further request did not run)", registry=r)
        Gauge("worldpm_queue_depth", "requests waiting for the model", registry=r).set_function(queue_depth)
        Gauge("worldpm_queue_tokens", "tokens waiting for the model", registry=r).set_function(queue_tokens)
        Gauge("worldpm_queue_oldest_wait_seconds", "how long the oldest waiting request has waited",
              registry=r).set_function(oldest_wait)

    def on_step(self, step, requests: int) -> None:
        n = sum(len(s) for _, s in step.results)
        self.conversations.inc(n)
        self.tokens.inc(step.tokens)
        self.batch_tokens.observe(step.tokens)
        self.batch_conversations.observe(n)
        if requests:  # once a round
            self.round_requests.observe(requests)
