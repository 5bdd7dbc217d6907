"""Prometheus metrics of `serve`: requests, tokens, tokens/s, errors, and per-node memory."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily, Metric
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
        runner = GaugeMetricFamily(
            "exoctl_runner_memory_bytes", "memory a runner holds", labels=["node", "model", "instance"]
        )
        for status in self.statuses():
            name = status.node.name
            up.add_metric([name], 1.0 if status.up else 0.0)
            if status.profile:
                total.add_metric([name], status.profile.ram_total)
                available.add_metric([name], status.profile.ram_available)
                rss.add_metric([name], status.profile.rss)
            for r in status.runners:
                runner.add_metric([name, r.model_id, r.instance_id], r.memory_bytes)
        yield from (up, total, available, rss, runner)


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
        self.completion_tokens.labels(model).inc(result.completion_tokens)
        self.tokens_per_second.labels(model).set(result.timings.decode_tokens_per_s)
