"""Start and stop tier servers on loopback: uvicorn in a thread (tests, in-process tools) or `dimec serve`
as a subprocess (serve-all, profile, benchmarks). Every wait is bounded."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from dimec.errors import TierUnavailableError

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout_s: float, alive=lambda: True) -> dict:
    """Poll GET /healthz until it answers 200 (or `alive()` turns false, or time runs out)."""
    deadline = time.monotonic() + timeout_s
    error = "not started"
    while time.monotonic() < deadline and alive():
        try:
            response = httpx.get(f"{url}/healthz", timeout=1.0)
            if response.status_code == 200:
                return response.json()
            error = f"HTTP {response.status_code}"
        except httpx.TransportError as exc:
            error = type(exc).__name__
        time.sleep(0.1)
    raise TierUnavailableError(f"server at {url} did not become healthy within {timeout_s:g} s ({error})")


class ThreadServer:
    """uvicorn serving `app` from a background thread of this process."""

    def __init__(self, app, host: str = LOOPBACK, port: int | None = None) -> None:
        import uvicorn

        self.host, self.port = host, port or free_port(host)
        self.app = app
        self._config = lambda: uvicorn.Config(app, host=self.host, port=self.port, log_level="warning",
                                              lifespan="off", timeout_graceful_shutdown=2)
        self.server = None
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 30) -> ThreadServer:
        import uvicorn

        self.server = uvicorn.Server(self._config())
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise TierUnavailableError(f"uvicorn did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self, timeout_s: float = 10) -> None:
        if self.server is not None and self.thread is not None:
            self.server.should_exit = True
            self.thread.join(timeout_s)
        self.server = self.thread = None

    def __enter__(self) -> ThreadServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class ProcessServer:
    """`dimec serve TIER PACKAGE` in a subprocess; the token goes through the environment, not argv."""

    def __init__(self, tier: str, package: str | Path, token: str, host: str = LOOPBACK, port: int | None = None,
                 threads: int | None = 1, extra_args: list[str] | None = None) -> None:
        self.tier, self.package, self.token = tier, Path(package), token
        self.host, self.port = host, port or free_port(host)
        self.threads, self.extra_args = threads, list(extra_args or [])
        self.proc: subprocess.Popen | None = None
        fd, name = tempfile.mkstemp(prefix=f"dimec-{tier}-", suffix=".log")
        os.close(fd)
        self.log_path = Path(name)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ProcessServer:
        """Launch without waiting (start several, then `wait` on each: their imports overlap)."""
        cmd = [sys.executable, "-m", "dimec.cli", "serve", self.tier, str(self.package), "--host", self.host,
               "--port", str(self.port), *self.extra_args]
        if self.threads:
            cmd += ["--threads", str(self.threads)]
        env = {**os.environ, "DIMEC_TOKEN": self.token, "TOKENIZERS_PARALLELISM": "false"}
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        return self

    def wait(self, timeout_s: float = 120) -> ProcessServer:
        """Until /healthz answers; on failure the server's own output says why."""
        try:
            wait_healthy(self.url, timeout_s, alive=lambda: self.proc is not None and self.proc.poll() is None)
        except TierUnavailableError:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            self.stop()
            raise TierUnavailableError(f"the {self.tier} server did not start on {self.url}:\n{tail}") from None
        return self

    def stop(self, timeout_s: float = 10) -> None:
        """SIGTERM (uvicorn finishes in-flight requests), then SIGKILL if it takes too long."""
        if self.proc is None:
            return
        self.log_path.unlink(missing_ok=True)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout_s)
        self.proc = None

    def kill(self) -> None:
        """Abrupt stop (no graceful shutdown), for fault tests."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> ProcessServer:
        return self.start().wait()

    def __exit__(self, *exc) -> None:
        self.stop()
