"""The edge server of bench_fleet.py: `dimec serve edge PACKAGE --sources FILE`, with the model's time per text
held at `--service-ms` (its real forward pass, padded with a sleep).

Why: on a small shared machine the edge, the cloud, twelve clients and other people's jobs fight over two
cores, and the edge's service time would then measure that fight, not the scheduler. A fixed service time
(a slower edge box) that costs no CPU while it waits keeps the figure about queueing; the model still runs
for real on every text, so answers and accuracy are the model's.

    python benchmarks/fleet_edge.py PACKAGE --sources FILE --port P [--service-ms 40] [--threads 1]
"""

from __future__ import annotations

import argparse
import threading
import time


class PaddedModel:
    """A TierModel whose requests take at least `service_ms` per text. The server runs every request as a
    plan: `start` (the embedding layer, text requests only), then `continue_from` for each stage; the pad is
    added after a stage, counting from the request's start (per thread: one request at a time each)."""

    def __init__(self, model, service_ms: float) -> None:
        self._model, self.service_s = model, service_ms / 1e3
        self._began = threading.local()

    def __getattr__(self, name):
        return getattr(self._model, name)

    def start(self, batch):
        self._began.t = time.perf_counter()
        return self._model.start(batch)

    def continue_from(self, hidden, mask, layer, exit_index):
        began = getattr(self._began, "t", None) or time.perf_counter()
        out = self._model.continue_from(hidden, mask, layer, exit_index)
        time.sleep(max(0.0, self.service_s * len(hidden) - (time.perf_counter() - began)))
        self._began.t = None
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package")
    parser.add_argument("--sources", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--service-ms", type=float, default=40.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch
    import uvicorn

    from dimec.runtime.tier import TierModel
    from dimec.serving.servers.server import create_app
    from dimec.serving.servers.sources import SourceTable

    torch.set_num_threads(args.threads)
    model = PaddedModel(TierModel(args.package), args.service_ms)
    app = create_app(None, "edge", None, model=model, sources=SourceTable.load(args.sources))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
