"""The server's Prometheus metrics, in a registry of its own (several servers may share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """What `GET /metrics` reports; names follow vLLM's where it has one."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.running = Gauge("llamakit_requests_running", "Completions holding a KV-cache slot", registry=r)
        self.waiting = Gauge("llamakit_requests_waiting", "Completions waiting for a KV-cache slot", registry=r)
        self.slots_in_use = Gauge("llamakit_kv_cache_slots_in_use", "KV-cache slots held by completions", registry=r)
        self.slots_total = Gauge("llamakit_kv_cache_slots", "KV-cache slots in all (--max-batch-size)", registry=r)
        self.prompt_tokens = Counter("llamakit_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.generation_tokens = Counter("llamakit_generation_tokens", "Tokens generated", registry=r)
        self.requests = Counter("llamakit_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.time_to_first_token = Histogram("llamakit_time_to_first_token_seconds",
                                             "From a completion's arrival to its first token", buckets=LATENCY_BUCKETS,
                                             registry=r)
        self.time_per_output_token = Histogram("llamakit_time_per_output_token_seconds",
                                               "Between consecutive tokens of one completion",
                                               buckets=LATENCY_BUCKETS, registry=r)
