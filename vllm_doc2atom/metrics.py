"""Prometheus metrics, exposed on vLLM's own /metrics (same default or multiprocess registry)."""

from __future__ import annotations

from functools import lru_cache
from types import SimpleNamespace


@lru_cache(maxsize=1)
def metrics() -> SimpleNamespace:
    from prometheus_client import Counter, Histogram

    return SimpleNamespace(
        requests=Counter("doc2atom_requests", "Requests that named an atom bank, by outcome",
                         ["outcome"]),  # routed | refused | error
        adapter_cache=Counter("doc2atom_adapter_cache", "Composed-adapter lookups", ["result"]),  # hit | miss
        atoms=Histogram("doc2atom_atoms_per_request", "Atoms composed into a request's adapter",
                        buckets=(0, 1, 2, 4, 8, 16, 32, 64)),
        route_seconds=Histogram("doc2atom_route_seconds", "Question encoding + stage-1/2 routing time",
                                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)),
        compose_seconds=Histogram("doc2atom_compose_seconds",
                                  "Compose + write + register time of a composed adapter (cache misses)",
                                  buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)),
    )
