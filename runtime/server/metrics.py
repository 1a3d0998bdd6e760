"""Prometheus metrics on a private registry per app (two apps in one process never collide).

Request-level figures (outcomes, latencies, tokens) are recorded as requests end; engine gauges
(queues, KV cache, prefix cache) are read from ``engine.stats()`` at scrape time.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edgellm.outputs import RequestOutput

logger = logging.getLogger(__name__)

OUTCOMES = ("stop", "length", "abort", "rejected", "error")
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)


class EngineCollector(Collector):
    """Gauges and counters read from the engine when Prometheus scrapes."""

    def __init__(self, stats: Callable[[], Any], model: str) -> None:
        self._stats, self._model = stats, model

    def collect(self) -> Iterator[Metric]:
        try:
            s = self._stats()
        except Exception as e:  # noqa: BLE001 - a scrape must not fail because the engine is gone
            logger.warning("engine stats unavailable: %s", e)
            return
        labels, value = ["model_name"], [self._model]

        def gauge(name: str, doc: str, v: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(value, v)
            return g

        def counter(name: str, doc: str, v: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(value, v)
            return c

        yield gauge("edgellm_num_requests_running", "Sequences in the running batch.", s.num_running)
        yield gauge("edgellm_num_requests_waiting", "Sequences waiting to be scheduled.", s.num_waiting)
        yield gauge("edgellm_kv_cache_usage_perc", "Fraction of KV cache blocks held by live sequences.",
                    s.kv_cache_usage)
        rate = s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else 0.0
        yield gauge("edgellm_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / looked up.",
                    rate)
        yield counter("edgellm_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      s.prefix_cache_queries)
        yield counter("edgellm_prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                      s.prefix_cache_hits)
        yield counter("edgellm_num_preemptions", "Sequences preempted (recomputed later).", s.num_preemptions)
        yield counter("edgellm_spec_decode_num_draft_tokens", "Speculative draft tokens verified.",
                      s.spec_draft_tokens)
        yield counter("edgellm_spec_decode_num_accepted_tokens", "Speculative draft tokens the model agreed with.",
                      s.spec_accepted_tokens)


class ServerMetrics:
    """The server's metrics; ``observe`` one request as it ends, ``render`` for ``/metrics``."""

    content_type = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self, stats: Callable[[], Any], model: str) -> None:
        self.registry = CollectorRegistry()
        r, labels = self.registry, ["model_name"]
        self.model = model
        self.requests = Counter("edgellm_requests", "Engine requests by outcome: stop, length, abort "
                                "(client went away), rejected (bad input), error.",
                                labels + ["outcome"], registry=r)
        self.prompt_tokens = Counter("edgellm_prompt_tokens", "Prompt tokens of finished requests.",
                                     labels, registry=r)
        self.generation_tokens = Counter("edgellm_generation_tokens", "Tokens generated.", labels, registry=r)
        self.ttft = Histogram("edgellm_time_to_first_token_seconds", "Arrival to first token.", labels,
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("edgellm_time_per_output_token_seconds", "Mean time between output tokens "
                              "after the first, per request.", labels, buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("edgellm_e2e_request_latency_seconds", "Arrival to last output.", labels,
                             buckets=_LATENCY_BUCKETS, registry=r)
        for outcome in OUTCOMES:  # every series exists (at 0) from the start, so rates work at once
            self.requests.labels(model, outcome)
        for series in (self.prompt_tokens, self.generation_tokens, self.ttft, self.tpot, self.e2e):
            series.labels(model)
        r.register(EngineCollector(stats, model))

    def observe(self, out: RequestOutput | None, outcome: str) -> None:
        """Record one engine request that ended with ``outcome``; ``out`` is its last output, if any."""
        self.requests.labels(self.model, outcome).inc()
        if out is None:
            return
        m = out.metrics
        self.prompt_tokens.labels(self.model).inc(out.usage.prompt_tokens)
        self.generation_tokens.labels(self.model).inc(out.usage.completion_tokens)
        if m.ttft is not None:
            self.ttft.labels(self.model).observe(m.ttft)
        self.e2e.labels(self.model).observe((m.finished_time or time.time()) - m.arrival_time)
        first = out.outputs[0] if out.outputs else None
        if first and first.first_token_time and first.last_token_time and len(first.token_ids) > 1:
            tpot = (first.last_token_time - first.first_token_time) / (len(first.token_ids) - 1)
            self.tpot.labels(self.model).observe(tpot)

    def render(self) -> bytes:
        return generate_latest(self.registry)
