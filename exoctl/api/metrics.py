"""Prometheus metrics of `serve`: requests, tokens, tokens/s, errors, and per-node memory."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from exoctl.cluster.views import NodeStatus
from exoctl.wire.answer import Completion


class NodeCollector(Collector):
    """Asks the nodes at scrape time, so the figures are never stale."""

    def __init__(self, statuses: Callable[[], list[NodeStatus]]) -> None:
        self.statuses = statuses

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("exoctl_node_up", "1 if the node's worker answers", labels=["node"])
        total = GaugeMetricFamily("exoctl_node_ram_total_bytes", "RAM of the node", labels=["node"])
        available = GaugeMetricFamily("exoctl_node_ram_available_bytes", "RAM available", labels=["node"])
        rss = GaugeMetricFamily(
            "exoctl_node_worker_rss_bytes", "resident memory of the worker", labels=["node"]
        )
        labels = ["node", "model", "instance"]
        runner = GaugeMetricFamily("exoctl_runner_memory_bytes", "memory a runner holds", labels=labels)
        cached = GaugeMetricFamily(
            "exoctl_prefix_cache_bytes", "memory a runner's cached prefixes hold", labels=labels
        )
        budget = GaugeMetricFamily(
            "exoctl_prefix_cache_budget_bytes",
            "what placement reserved for a runner's cached prefixes",
            labels=labels,
        )
        hits = CounterMetricFamily(
            "exoctl_prefix_cache_hits", "sequences a runner started from a cached prefix", labels=labels
        )
        reused = CounterMetricFamily(
            "exoctl_prefix_cache_reused_tokens",
            "prompt positions a runner copied from cached prefixes instead of running",
            labels=labels,
        )
        lookups = CounterMetricFamily(
            "exoctl_prefix_cache_lookups",
            "requests an instance's head looked up a cached prefix for",
            labels=["model", "instance"],
        )
        evictions = CounterMetricFamily(
            "exoctl_prefix_cache_evictions",
            "cached prefixes an instance's head evicted for room or memory",
            labels=["model", "instance"],
        )
        spec_labels = ["model", "instance", "drafter"]
        spec_passes = CounterMetricFamily(
            "exoctl_decode_passes",
            "decode passes of an instance with a drafter (plain and verifying)",
            labels=spec_labels,
        )
        spec_tokens = CounterMetricFamily(
            "exoctl_decode_pass_tokens",
            "tokens those decode passes gave (over passes: tokens per pass)",
            labels=spec_labels,
        )
        drafted = CounterMetricFamily(
            "exoctl_speculative_drafted_tokens",
            "tokens a drafter guessed for verification",
            labels=spec_labels,
        )
        accepted = CounterMetricFamily(
            "exoctl_speculative_accepted_tokens", "guessed tokens the target accepted", labels=spec_labels
        )
        for status in self.statuses():
            name = status.node.name
            up.add_metric([name], 1.0 if status.up else 0.0)
            if status.profile:
                total.add_metric([name], status.profile.ram_total)
                available.add_metric([name], status.profile.ram_available)
                rss.add_metric([name], status.profile.rss)
            for r in status.runners:
                key = [name, r.model_id, r.instance_id]
                runner.add_metric(key, r.memory_bytes)
                cached.add_metric(key, r.prefix.bytes)
                budget.add_metric(key, r.prefix.budget_bytes)
                hits.add_metric(key, r.prefix.hits)
                reused.add_metric(key, r.prefix.reused_tokens)
                if r.head_prefix is not None:
                    lookups.add_metric([r.model_id, r.instance_id], r.head_prefix.lookups)
                    evictions.add_metric([r.model_id, r.instance_id], r.head_prefix.evictions)
                if r.speculation is not None:
                    key = [r.model_id, r.instance_id, r.speculation.drafter]
                    spec_passes.add_metric(key, r.speculation.passes)
                    spec_tokens.add_metric(key, r.speculation.tokens)
                    drafted.add_metric(key, r.speculation.drafted)
                    accepted.add_metric(key, r.speculation.accepted)
        yield from (up, total, available, rss, runner, cached, budget, hits, reused, lookups, evictions)
        yield from (spec_passes, spec_tokens, drafted, accepted)


class Metrics:
    def __init__(self, statuses: Callable[[], list[NodeStatus]]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "exoctl_http_requests", "HTTP requests", ["path", "status"], registry=self.registry
        )
        self.errors = Counter("exoctl_errors", "requests that failed", ["type"], registry=self.registry)
        self.prompt_tokens = Counter(
            "exoctl_prompt_tokens", "prompt tokens processed", ["model"], registry=self.registry
        )
        self.cached_tokens = Counter(
            "exoctl_cached_prompt_tokens",
            "prompt tokens read from a cached prefix instead of computed",
            ["model"],
            registry=self.registry,
        )
        self.completion_tokens = Counter(
            "exoctl_completion_tokens", "tokens generated", ["model"], registry=self.registry
        )
        self.tokens_per_second = Gauge(
            "exoctl_decode_tokens_per_second",
            "decode speed of the last completed chat",
            ["model"],
            registry=self.registry,
        )
        self.registry.register(NodeCollector(statuses))

    def completed(self, model: str, result: Completion) -> None:
        self.prompt_tokens.labels(model).inc(result.prompt_tokens)
        self.cached_tokens.labels(model).inc(result.cached_tokens)
        self.completion_tokens.labels(model).inc(result.completion_tokens)
        self.tokens_per_second.labels(model).set(result.timings.decode_tokens_per_s)
