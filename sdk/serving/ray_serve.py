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
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import NextokenError

__all__ = ["serve_ray", "replica_deployment"]


def _ray():
    try:
        import ray
        from ray import serve
    except ImportError:
        raise NextokenError("scaling out needs Ray Serve: pip install 'nextoken[ray]'") from None
    return ray, serve


def replica_deployment(package: str, *, replicas: int = 2, threads: int = 1, max_batch: int = 8,
                       api_key: str | None = None, model_name: str | None = None, device: str = "auto",
                       scheduler_options: dict[str, Any] | None = None, spin: bool | None = None,
                       tf32: bool | None = None) -> Any:
    """A bound Ray Serve application: ``replicas`` copies of one engine + scheduler + app each
    (``scheduler_options``: more :class:`~nextoken.Scheduler` arguments, e.g. ``kv_backend``;
    ``spin``, ``tf32``: as :class:`~nextoken.Engine` takes them)."""
    options = dict(scheduler_options or {})
    _, serve = _ray()
    name = model_name or Path(package).resolve().name

    @serve.ingress()
    class NextokenReplica:
        def __init__(self) -> None:
            from ..engine import Engine
            from ..scheduler import Scheduler
            from .server import create_app

            self.engine = Engine(package, device=device, threads=threads, spin=spin, tf32=tf32)
            self.scheduler = Scheduler(self.engine, max_batch=max_batch, **options).start()
            self._asgi = create_app(self.scheduler, name, api_key=api_key)

        def __serve_build_asgi_app__(self):
            return self._asgi

        def __del__(self) -> None:
            scheduler = getattr(self, "scheduler", None)
            if scheduler is not None:
                scheduler.close()

    deployment = serve.deployment(NextokenReplica, name="nextoken", num_replicas=replicas,
                                  ray_actor_options={"num_cpus": threads})
    return deployment.bind()


def serve_ray(package: str, *, host: str = "127.0.0.1", port: int = 8000, replicas: int = 2, threads: int = 1,
              max_batch: int = 8, api_key: str | None = None, model_name: str | None = None, device: str = "auto",
              address: str | None = None, blocking: bool = True, scheduler_options: dict[str, Any] | None = None,
              spin: bool | None = None, tf32: bool | None = None) -> None:
    """Start (or join, with ``address``) Ray, and serve ``package`` from ``replicas`` replicas on ``host:port``."""
    ray, serve = _ray()
    package = str(Path(package).resolve())
    if not ray.is_initialized():
        if address:
            ray.init(address=address)
        else:
            ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(replica_deployment(package, replicas=replicas, threads=threads, max_batch=max_batch, api_key=api_key,
                                 model_name=model_name, device=device, scheduler_options=scheduler_options,
                                 spin=spin, tf32=tf32),
              name="nextoken", route_prefix="/", blocking=blocking)
