"""How many request bytes a tier holds at once: the bound on a server's memory under many (or hostile)
clients. `server._Guard` acquires a request's bytes before it reads its body (the declared Content-Length, or
chunk by chunk when none is declared) and releases them when the answer has been sent, so the bytes held
cover the body, its decoded copy and the model's work on it. Over the bound the request is refused at once
(429 with Retry-After), before a byte of its body is read.

    held(all requests)        <= max_inflight_bytes          (server-wide)
    held(requests of source)  <= max_source_inflight_bytes   (per source, i.e. per token)

Requests to paths without a token (/healthz, /metrics) count under the source "" (anonymous).
"""

from __future__ import annotations

import threading
from collections import Counter


class InFlight:
    def __init__(self, total: int, per_source: int) -> None:
        self.total, self.per_source = total, per_source
        self.held = 0
        self.by_source: Counter[str] = Counter()
        self._lock = threading.Lock()

    def acquire(self, source: str, nbytes: int) -> bool:
        """Hold `nbytes` more for `source`; False (nothing held) if that would go over a bound."""
        with self._lock:
            if self.held + nbytes > self.total or self.by_source[source] + nbytes > self.per_source:
                return False
            self.held += nbytes
            self.by_source[source] += nbytes
            return True

    def release(self, source: str, nbytes: int) -> None:
        with self._lock:
            self.held -= nbytes
            self.by_source[source] -= nbytes
            if self.by_source[source] <= 0:
                del self.by_source[source]  # bounded: only sources with requests in flight are kept
