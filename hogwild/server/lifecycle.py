"""Running the app under uvicorn with a graceful, bounded shutdown.

The first SIGTERM or SIGINT puts the server into *draining*: new requests get 503 (with
Retry-After), ``/health`` says ``draining``, and the running and queued requests go on for up to
``drain_seconds``. Then, or at once on a second signal, the ones left end with an error (a stream
gets an error chunk and ``[DONE]``; a plain request a 503), and uvicorn shuts down. A third signal
quits without waiting. The process then exits with status 0.

``server_config`` makes the uvicorn configuration with the connection guards of ``connections``
(a deadline for each request to arrive, a cap on open connections).

``fail`` (the tensor-parallel group's ``on_failure`` hook: a rank is gone) ends every request at
once (503 ``engine_failed``; a stream gets an error chunk and ``[DONE]``), refuses new ones and
shuts uvicorn down; ``hogwild serve`` then exits with status 1.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI

from .connections import ConnectionLimits, protocol
from .scheduler import Scheduler

log = logging.getLogger(__name__)

DEFAULT_DRAIN_SECONDS = 30.0
DEFAULT_LIMITS = ConnectionLimits()
GRACE_AFTER_ABORT_S = 10  # uvicorn's own limit on closing connections once every request has ended


def server_config(app: FastAPI, limits: ConnectionLimits = DEFAULT_LIMITS, **options) -> uvicorn.Config:
    """uvicorn's configuration for ``app`` with the connection guards of ``limits``; ``options``
    go to ``uvicorn.Config`` (host, port, log_level, ...)."""
    return uvicorn.Config(app, http=protocol(limits), timeout_keep_alive=limits.keep_alive_s, **options)


class DrainingServer(uvicorn.Server):
    """uvicorn, draining the scheduler before it shuts down (see the module's docstring)."""

    def __init__(self, config: uvicorn.Config, scheduler: Scheduler, drain_seconds: float = DEFAULT_DRAIN_SECONDS):
        config.timeout_graceful_shutdown = config.timeout_graceful_shutdown or GRACE_AFTER_ABORT_S
        super().__init__(config)
        self.scheduler = scheduler
        self.drain_seconds = drain_seconds
        self.signals = 0
        self.drain_deadline: float | None = None
        self.exiting = False
        self.failed: str | None = None

    def fail(self, message: str) -> None:
        """The engine cannot run any more (any thread): end the requests, then exit (see the module)."""
        self.failed = message
        self.scheduler.fail(message)
        self.exiting = self.should_exit = True

    def handle_exit(self, sig, frame) -> None:
        """A signal (or a test standing in for one): only counted here; the draining happens in
        ``on_tick``, on the event loop. The signal is not raised again once the server is down:
        a drained server exits with status 0."""
        self.signals += 1
        if self.signals >= 3:
            self.exiting = self.should_exit = self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.signals and not self.exiting:
            now = time.monotonic()
            if self.drain_deadline is None:
                log.warning("hogwild: draining: no new requests; running ones may finish for up to %.0f s "
                            "(a second Ctrl-C or SIGTERM ends them now)", self.drain_seconds)
                self.drain_deadline = now + self.drain_seconds
                self.scheduler.drain()
            if self.signals >= 2 or now >= self.drain_deadline:
                reason = "a second signal" if self.signals >= 2 else f"the {self.drain_seconds:g} s drain time ran out"
                self.scheduler.abort(f"the server is shutting down ({reason}); the request was ended")
            if self.scheduler.idle:
                self.exiting = self.should_exit = True
        return await super().on_tick(counter)


@dataclass
class Running:
    url: str
    server: DrainingServer
    thread: threading.Thread


@contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", port: int = 0, drain_seconds: float = DEFAULT_DRAIN_SECONDS,
            timeout: float = 30.0, limits: ConnectionLimits = DEFAULT_LIMITS) -> Iterator[Running]:
    """Run ``app`` (from ``create_app``) with uvicorn in a background thread (tests, benchmarks);
    ``handle_exit`` on the yielded server stands in for a signal."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    config = server_config(app, limits, log_level="warning", lifespan="on")
    server = DrainingServer(config, app.state.hogwild.scheduler, drain_seconds)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        name = f"[{host}]" if ":" in host else host
        yield Running(f"http://{name}:{sock.getsockname()[1]}", server, thread)
    finally:
        server.scheduler.abort("the server is shutting down")
        server.exiting = server.should_exit = True
        thread.join(timeout)
        sock.close()


@contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run ``app`` with uvicorn in a background thread; yields its base URL."""
    with running(app, host, port) as server:
        yield server.url
