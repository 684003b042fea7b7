"""Scale-out on Ray Serve (extra ``ray``): one engine per replica, each with its own scheduler and
the same FastAPI app as ``nextoken serve``.

    nextoken serve PACKAGE --ray --replicas 2 [--threads 1] [--host 127.0.0.1] [--port 8000]

Each replica loads the package, runs its own continuous-batching :class:`~nextoken.Scheduler`
(not ``@serve.batch``, which cannot add requests to a running batch, nor ``ray.serve.llm``, which
is built for vLLM) and answers through the app of :func:`nextoken.serving.server.create_app`; Ray's HTTP
proxy spreads requests over the replicas. A replica reserves as many CPUs as its engine has
intra-op threads.

On a multi-node cluster: ``ray start --head`` on one node and ``ray start --address HEAD:6379`` on
the others, every node with nextoken and the package at the same path, then
``nextoken serve PACKAGE --ray --ray-address HEAD:6379 --replicas N`` from any node. Ray's own
services (GCS, dashboard, object manager) listen on all interfaces by default: on a single host
this module starts Ray bound to 127.0.0.1 with the dashboard off; on a cluster, start the nodes
with ``--node-ip-address`` on a private interface, ``--dashboard-host 127.0.0.1`` (or
``--include-dashboard false``) and firewall the Ray ports (6379, 8265, 10001 and the worker port
range) to the cluster's own addresses.

Metrics: each replica serves its own ``GET /metrics`` (through the proxy, whichever replica answers),
and mirrors the same numbers into Ray's metrics export every ``metrics_interval`` seconds
(:class:`RayMetricsMirror`), where every sample carries the replica's ``deployment``, ``replica`` and
``application`` tags and Ray's ``ray_`` prefix: ``ray_nextoken_requests_total``,
``ray_nextoken_time_to_first_token_seconds_bucket``, ... Ray serves them on each node at
``http://NODE:METRICS_PORT/metrics`` (``nextoken serve --ray --ray-metrics-port 8080`` on one host,
``ray start --metrics-export-port 8080`` on a cluster's nodes): scrape that address on every node.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import NextokenError
from ..metrics import families

__all__ = ["RayMetricsMirror", "replica_deployment", "serve_ray"]

log = logging.getLogger("nextoken")


def _ray():
    try:
        import ray
        from ray import serve
    except ImportError:
        raise NextokenError("scaling out needs Ray Serve: pip install 'nextoken[ray]'") from None
    return ray, serve


class RayMetricsMirror:
    """Copies a scheduler's metrics into Ray's metrics export every ``interval`` seconds, under the
    names, docs and labels of ``GET /metrics`` (:func:`nextoken.metrics.families`). Counters move by
    what changed since the last copy; a histogram by its new observations per bucket, so Ray's
    buckets and count equal the scheduler's (Ray estimates every histogram's sum from its buckets'
    midpoints, so its ``_sum`` is approximate).
    ``ray.serve.metrics`` adds the replica's tags inside a Serve replica."""

    def __init__(self, scheduler: Any, interval: float = 5.0) -> None:
        self.scheduler = scheduler
        self.interval = interval
        self._metrics: dict[str, Any] = {}
        self._last: dict[tuple[str, tuple[str, ...]], Any] = {}
        self._stop = threading.Event()

    def start(self) -> "RayMetricsMirror":
        """Copy every ``interval`` seconds from a daemon thread, until :meth:`close`."""
        threading.Thread(target=self._run, name="nextoken-ray-metrics", daemon=True).start()
        return self

    def close(self) -> None:
        """Stop copying."""
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.copy()
            except Exception as e:  # the mirror must never take serving down
                log.warning("copying metrics to Ray failed (%s); trying again in %ss", e, self.interval)

    def copy(self) -> None:
        """One copy of what changed since the last."""
        from ray.serve import metrics as ray_metrics

        for family in families(self.scheduler.metrics()):
            metric: Any = self._metrics.get(family.name)
            for labels, value in family.samples:
                if family.kind == "histogram":
                    bounds = [float(b) for b, _ in value["buckets"][:-1]]
                if metric is None:
                    if family.kind == "histogram":
                        metric = ray_metrics.Histogram(
                            family.name,
                            family.doc,
                            boundaries=bounds,
                            tag_keys=family.labels,  # type: ignore[arg-type]  # ray means any tuple of names
                        )
                    else:
                        kind = ray_metrics.Counter if family.kind == "counter" else ray_metrics.Gauge
                        metric = kind(family.name, family.doc, tag_keys=family.labels)  # type: ignore[arg-type]
                    self._metrics[family.name] = metric
                tags = dict(zip(family.labels, labels)) or None
                key = (family.name, labels)
                if family.kind == "gauge":
                    metric.set(value, tags=tags)
                elif family.kind == "counter":
                    if value > self._last.get(key, 0):
                        metric.inc(value - self._last.get(key, 0), tags=tags)
                        self._last[key] = value
                else:
                    counts = [n for _, n in value["buckets"]]
                    for v in in_buckets(bounds, counts, self._last.get(key, [0] * len(counts))):
                        metric.observe(v, tags=tags)
                    self._last[key] = counts


def in_buckets(bounds: Sequence[float], now: Sequence[int], before: Sequence[int]) -> list[float]:
    """A value inside its bucket for each observation a histogram gained from ``before`` to ``now``
    (cumulative counts per upper bound in ``bounds``, then ``+Inf``): the bucket's upper bound, or
    just past the last bound."""
    values = [*bounds, math.nextafter(bounds[-1], math.inf)]
    gained = [(n - m) - (p - q) for n, m, p, q in zip(now, [0, *now[:-1]], before, [0, *before[:-1]])]
    return [v for v, n in zip(values, gained) for _ in range(n)]


def replica_deployment(
    package: str,
    *,
    replicas: int = 2,
    max_batch: int = 8,
    model_name: str | None = None,
    engine_options: dict[str, Any] | None = None,
    scheduler_options: dict[str, Any] | None = None,
    options: Any = None,
    metrics_interval: float = 5.0,
) -> Any:
    """A bound Ray Serve application: ``replicas`` copies of one engine + scheduler + app each,
    made as ``nextoken serve`` makes its one (``engine_options``: :class:`~nextoken.Engine`
    arguments, ``threads`` the CPUs each replica asks of Ray; ``scheduler_options``: more
    :class:`~nextoken.Scheduler` arguments; ``options``: the app's
    :class:`~nextoken.serving.server.ServeOptions`; ``metrics_interval``: seconds between two
    copies of each replica's metrics into Ray's metrics export)."""
    if not metrics_interval > 0:
        raise NextokenError(f"metrics_interval must be a positive number of seconds, not {metrics_interval!r}")
    replica_engine: dict[str, Any] = {"threads": 1, **(engine_options or {})}
    replica_scheduler: dict[str, Any] = dict(scheduler_options or {})
    _, serve = _ray()
    name = model_name or Path(package).resolve().name

    @serve.ingress()
    class NextokenReplica:
        def __init__(self) -> None:
            from ..engine import Engine
            from ..scheduler import Scheduler
            from .server import create_app

            self.engine = Engine(package, **replica_engine)
            self.scheduler = Scheduler(self.engine, max_batch=max_batch, **replica_scheduler).start()
            self._asgi = create_app(self.scheduler, name, options)
            self.metrics = RayMetricsMirror(self.scheduler, metrics_interval).start()

        def __serve_build_asgi_app__(self):
            return self._asgi

        def __del__(self) -> None:
            if getattr(self, "metrics", None) is not None:
                self.metrics.close()
            scheduler = getattr(self, "scheduler", None)
            if scheduler is not None:
                scheduler.close()

    deployment = serve.deployment(
        NextokenReplica,
        name="nextoken",
        num_replicas=replicas,
        ray_actor_options={"num_cpus": replica_engine["threads"] or 1},
    )
    return deployment.bind()


def serve_ray(
    package: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    replicas: int = 2,
    max_batch: int = 8,
    model_name: str | None = None,
    address: str | None = None,
    blocking: bool = True,
    engine_options: dict[str, Any] | None = None,
    scheduler_options: dict[str, Any] | None = None,
    options: Any = None,
    metrics_port: int | None = None,
    metrics_interval: float = 5.0,
) -> None:
    """Start (or join, with ``address``) Ray, and serve ``package`` from ``replicas`` replicas on
    ``host:port`` (``metrics_port``: where a Ray started here serves its metrics export; a cluster's
    nodes take ``ray start --metrics-export-port``; the rest: :func:`replica_deployment`'s)."""
    ray, serve = _ray()
    package = str(Path(package).resolve())
    if not ray.is_initialized():
        if address:
            ray.init(address=address)
        else:
            ray.init(
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                configure_logging=False,
                _metrics_export_port=metrics_port,
            )
    serve.start(http_options={"host": host, "port": port})
    serve.run(
        replica_deployment(
            package,
            replicas=replicas,
            max_batch=max_batch,
            model_name=model_name,
            engine_options=engine_options,
            scheduler_options=scheduler_options,
            options=options,
            metrics_interval=metrics_interval,
        ),
        name="nextoken",
        route_prefix="/",
        blocking=blocking,
    )
