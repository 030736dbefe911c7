"""The same three tiers on Ray Serve, for scale-out (optional extra: `pip install "ray[serve]"`).

Each tier is one Ray Serve application whose replicas build exactly the FastAPI app of server.py (same
TierModel, auth, limits, metrics), so nothing about a tier is implemented twice:

    /edge/v1/classify, /cloud/v1/classify   the tier servers (create_app)
    /mobile/v1/classify                     a mobile gateway (create_gateway_app around a MobileClient)
                                            that offloads to /edge and /cloud through Ray's own proxy

Ray binds loopback only here: `ray.init(_node_ip_address="127.0.0.1")` with
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (otherwise Ray may pick another address and hang), HTTP on 127.0.0.1.

    python -m dimec.serving.deploy.ray_app RUN_DIR_or_EXPORT_DIR [--port 8000]    (token: env DIMEC_TOKEN)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path
from typing import Any

from dimec.errors import DimecError
from dimec.serving.deploy.export import ensure_package
from dimec.serving.servers.batched import TierBatcher
from dimec.serving.servers.batcher import BatchingConfig, Item, run_isolated
from dimec.serving.servers.scheduling import Done
from dimec.serving.servers.server import Limits
from dimec.tiers import TIERS

# Replicas per tier follow the load: the cloud gets the most headroom (it runs every layer), the
# mobile gateway the least (it stands in for many phones doing their own work).
AUTOSCALING: dict[str, dict[str, Any]] = {
    "mobile": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8},
    "edge": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 4},
    "cloud": {"min_replicas": 1, "max_replicas": 8, "target_ongoing_requests": 2},
}


def start_ray(num_cpus: int | None = None, http_port: int = 8000) -> None:
    """A local Ray cluster and Serve's HTTP proxy, both on loopback."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(_node_ip_address="127.0.0.1", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})


class RayBatcher(TierBatcher):
    """Dynamic batching by Ray Serve's own `@serve.batch` (max_batch_size, batch_wait_timeout_s) in a tier
    replica: the same items and batched forward pass as the FastAPI server's (batched.py), requests of
    different kinds in one Ray batch run as one forward pass per kind. Ray's queue is first come, first
    served: priority classes and deadlines are the dimec batcher's only (docs/serving.md)."""

    def __init__(self, service, config: BatchingConfig) -> None:
        from ray import serve

        self.service, self.config = service, config.validate()

        async def run_items(items: list[Item]) -> list[tuple[Any, BaseException | None]]:
            return await asyncio.get_running_loop().run_in_executor(None, self._run_grouped, items)

        self._batched = serve.batch(max_batch_size=config.max_batch,
                                    batch_wait_timeout_s=config.max_wait_ms / 1e3)(run_items)

    def _run_grouped(self, items: list[Item]) -> list[tuple[Any, BaseException | None]]:
        start = time.monotonic()
        outcome: dict[int, tuple[Any, BaseException | None]] = {}
        for key in dict.fromkeys(i.key for i in items):
            group = [i for i in items if i.key == key]
            for item, result in zip(group, run_isolated(self.run, group), strict=True):
                outcome[id(item)] = result
        compute_ms = (time.monotonic() - start) * 1e3
        return [(Done(outcome[id(i)][0], (start - i.arrived) * 1e3, compute_ms), outcome[id(i)][1]) for i in items]

    async def submit(self, item: Item) -> Done:
        item.arrived = time.monotonic()
        done, error = await self._batched(item)
        if error is not None:
            raise error
        return done

    def close(self) -> None:
        pass


def tier_application(tier: str, package: str | Path, token: str, limits: Limits | None = None,
                     autoscaling: dict[str, Any] | None = None, num_cpus: float = 0.5,
                     edge_url: str | None = None, cloud_url: str | None = None, backend: str = "torch",
                     routing: str = "router", batching: BatchingConfig | None = None):
    """A bound Serve application for one tier; the app is built on each replica (a closure, not a pickled
    model). `batching`: edge and cloud batch across requests with Ray Serve's @serve.batch (RayBatcher)."""
    from ray import serve

    package = str(package)
    if tier == "mobile":
        def build():
            from dimec.serving.phone.client import MobileClient
            from dimec.serving.servers.server import create_gateway_app

            client = MobileClient(package, edge_url, cloud_url, token, backend=backend, routing=routing)
            return create_gateway_app(client, token, limits)
    else:
        def build():
            from dimec.serving.phone.remote import HttpRemote
            from dimec.serving.servers.server import create_app

            # the edge forwards plans that go on to the cloud through Serve's proxy
            forward = HttpRemote("cloud", cloud_url, token) if tier == "edge" and cloud_url else None
            app = create_app(package, tier, token, limits, forward=forward)
            if batching is not None:
                app.state.fleet.batcher = RayBatcher(app.state.service, batching)
            return app

    # a batch can only fill if the replica takes that many requests at once (Serve's default is 5)
    ongoing = {"max_ongoing_requests": 2 * batching.max_batch} if batching is not None and tier != "mobile" else {}
    deployment = serve.deployment(serve.ingress(build)(), name=f"dimec-{tier}",
                                  autoscaling_config=autoscaling or AUTOSCALING[tier],
                                  ray_actor_options={"num_cpus": num_cpus}, **ongoing)
    return deployment.bind()


def deploy_three_tiers(path: str | Path, token: str, http_port: int = 8000, limits: Limits | None = None,
                       num_cpus: float = 0.5, autoscaling: dict[str, dict[str, Any]] | None = None,
                       backend: str = "torch", batching: BatchingConfig | None = None) -> dict[str, str]:
    """Deploy edge, cloud, then the mobile gateway; returns each tier's base URL."""
    from ray import serve

    autoscaling = {**AUTOSCALING, **(autoscaling or {})}
    base = f"http://127.0.0.1:{http_port}"
    urls = {tier: f"{base}/{tier}" for tier in TIERS}
    apps = {}
    for tier in ("edge", "cloud", "mobile"):
        package = ensure_package(path, tier, backend if tier == "mobile" else None, log=print)
        apps[tier] = tier_application(tier, package, token, limits, autoscaling[tier], num_cpus,
                                      urls["edge"], urls["cloud"], backend, batching=batching)
    if hasattr(serve, "run_many"):  # Ray >= 2.4x: the replicas of all tiers start side by side
        serve.run_many([serve.RunTarget(app, name=f"dimec-{tier}", route_prefix=f"/{tier}")
                        for tier, app in apps.items()])
    else:
        for tier, app in apps.items():
            serve.run(app, name=f"dimec-{tier}", route_prefix=f"/{tier}")
    return urls


def shutdown() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dimec.serving.deploy.ray_app", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="run directory or `dimec export` folder")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--num-cpus", type=float, default=0.5, help="CPUs reserved per replica")
    parser.add_argument("--batching", action="store_true", help="edge and cloud batch across requests (@serve.batch)")
    parser.add_argument("--batch-max", type=int, default=BatchingConfig.max_batch, help="texts per batch")
    parser.add_argument("--batch-wait-ms", type=float, default=BatchingConfig.max_wait_ms, help="batch wait, ms")
    args = parser.parse_args(argv)
    token = os.environ.get("DIMEC_TOKEN")
    if not token:
        parser.error("set DIMEC_TOKEN (the bearer token of every tier)")
    if not 1 <= args.port <= 65535 or not args.num_cpus > 0:
        parser.error("--port must be in 1..65535 and --num-cpus above 0")
    try:
        batching = BatchingConfig.checked(max_batch=args.batch_max, max_wait_ms=args.batch_wait_ms) \
            if args.batching else None
    except DimecError as exc:
        parser.error(exc.message)
    start_ray(http_port=args.port)
    try:
        for tier, url in deploy_three_tiers(args.path, token, args.port, num_cpus=args.num_cpus,
                                            batching=batching).items():
            print(f"{tier:<6} {url}/v1/classify", flush=True)
        while True:
            time.sleep(3600)
    except DimecError as exc:  # one line, as the dimec command line does
        parser.exit(2, f"{parser.prog}: error: {exc.message}\n" + (f"  hint: {exc.hint}\n" if exc.hint else ""))
    except KeyboardInterrupt:
        pass
    finally:
        shutdown()


if __name__ == "__main__":
    main()
