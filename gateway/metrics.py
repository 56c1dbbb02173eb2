"""Prometheus counters and histograms in the text exposition format (no client library needed)."""

from __future__ import annotations

import threading
from collections.abc import Callable

_BUCKETS = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    """The gateway's metrics; thread-safe, rendered on ``GET /metrics``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._hist: dict[str, tuple[list[int], list[float]]] = {}
        self._help: dict[str, tuple[str, str]] = {}
        self._gauges: dict[str, Callable[[], float]] = {}
        self.describe("shifter_gateway_lookups_total", "counter", "Image lookups by result.")
        self.describe("shifter_gateway_pulls_total", "counter", "Finished pulls by outcome.")
        self.describe("shifter_gateway_requests_total", "counter", "HTTP requests by route and status.")
        self.describe("shifter_gateway_pull_seconds", "histogram", "Wall time of pulls, queue to READY.")
        self.describe("shifter_gateway_conversion_seconds", "histogram", "Wall time of image builds.")

    def describe(self, name: str, kind: str, text: str) -> None:
        self._help[name] = (kind, text)

    def gauge(self, name: str, text: str, read: Callable[[], float]) -> None:
        """A gauge whose value is read when scraped (e.g. the queue depth)."""
        self.describe(name, "gauge", text)
        self._gauges[name] = read

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counters[key] = self._counters.get(key, 0.0) + amount

    def observe(self, name: str, seconds: float) -> None:
        with self._lock:
            counts, sums = self._hist.setdefault(name, ([0] * (len(_BUCKETS) + 1), [0.0]))
            for i, bound in enumerate(_BUCKETS):
                if seconds <= bound:
                    counts[i] += 1
            counts[-1] += 1
            sums[0] += seconds

    def value(self, name: str, **labels: str) -> float:
        return self._counters.get((name, tuple(sorted(labels.items()))), 0.0)

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            counters = dict(self._counters)
            hist = {k: (list(v[0]), v[1][0]) for k, v in self._hist.items()}
        for name, (kind, text) in sorted(self._help.items()):
            lines.append(f"# HELP {name} {text}")
            lines.append(f"# TYPE {name} {kind}")
            if kind == "counter":
                for (cname, labels), value in sorted(counters.items()):
                    if cname == name:
                        lines.append(f"{name}{_labels(dict(labels))} {value:g}")
            elif kind == "histogram":
                counts, total = hist.get(name, ([0] * (len(_BUCKETS) + 1), 0.0))
                for bound, count in zip(_BUCKETS, counts, strict=False):
                    lines.append(f'{name}_bucket{{le="{bound:g}"}} {count}')
                lines.append(f'{name}_bucket{{le="+Inf"}} {counts[-1]}')
                lines.append(f"{name}_sum {total:g}")
                lines.append(f"{name}_count {counts[-1]}")
            elif kind == "gauge" and name in self._gauges:
                try:
                    lines.append(f"{name} {float(self._gauges[name]()):g}")
                except Exception:  # a broken gauge must not break the scrape
                    lines.append(f"{name} NaN")
        return "\n".join(lines) + "\n"
