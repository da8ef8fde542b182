"""``hogwild serve`` as a real process: its flags (the API key from the environment, an extra Host
name), a multi-MB problem and a 20 MB body refused at once while a stream goes on and /health
answers, the process's memory after them, and SIGTERM draining the requests in flight."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import httpx
import psutil
import pytest
from test_server_support import LONG, assert_openai_error, events_of, wait_for, wait_idle

KEY = "env-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = {"Content-Type": "application/json"}
MB = 1 << 20


@contextmanager
def serve_process(*flags: str) -> Iterator[SimpleNamespace]:
    """``hogwild serve`` on a free port, one torch thread, the API key in the environment."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HOGWILD_API_KEY": KEY}
    command = [sys.executable, "-m", "hogwild.cli", "serve", "--port", str(port), "--threads", "1", *flags]
    output = tempfile.TemporaryFile("w+")  # not a pipe: a full pipe would stall the server
    proc = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"

    def log() -> str:
        output.seek(0)
        return output.read()

    try:
        with httpx.Client(base_url=url, timeout=60, headers=AUTH) as http:

            def up() -> bool:
                assert proc.poll() is None, log()
                try:
                    return http.get("/health").status_code == 200
                except httpx.TransportError:
                    return False

            wait_for(up, 180, "hogwild serve to start", step=0.2)
            yield SimpleNamespace(proc=proc, url=url, http=http, memory=psutil.Process(proc.pid).memory_info, log=log)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        output.close()


@pytest.fixture(scope="module")
def server():
    with serve_process("--allowed-hosts", "example.test,other.test", "--max-sessions", "2") as server:
        yield server


class StreamReader(threading.Thread):
    """Reads a stream, noting when each chunk arrived and every line."""

    def __init__(self, url: str, body: dict):
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.arrivals: list[float] = []
        self.lines: list[str] = []
        self.tokens = threading.Event()
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.stream("POST", self.url + "/v1/chat/completions", json=self.body, headers=AUTH, timeout=120) as r:
            for line in r.iter_lines():
                if not line:
                    continue
                self.arrivals.append(time.monotonic())
                self.lines.append(line)
                if any(e["type"] == "token" for e in events_of(line)):
                    self.tokens.set()
                if self.stop.is_set():
                    return

    def error(self) -> dict | None:
        errors = [json.loads(x[6:])["error"] for x in self.lines if x.startswith('data: {"error"')]
        return errors[0] if errors else None


def test_flags_reach_the_server(server):
    with httpx.Client(base_url=server.url, timeout=30) as bare:
        assert bare.get("/health").status_code == 200  # public
        assert assert_openai_error(bare.get("/v1/models"), 401)["code"] == "invalid_api_key"
        assert bare.get("/v1/models", headers=AUTH).json()["data"][0]["id"] == "SmolLM2-135M-Instruct"
        assert bare.get("/health", headers={"Host": "other.test:8000"}).status_code == 200
        rebound = bare.get("/health", headers={"Host": "rebound.example"})
        assert assert_openai_error(rebound, 400)["code"] == "invalid_host"
        assert_openai_error(bare.get("/docs"), 404)
        forged = bare.get("/health", headers={"Host": "127.0.0.1:8000@evil.example"})
        assert assert_openai_error(forged, 400)["code"] == "invalid_host"
    assert "authentication is on" in server.log()  # the key came from $HOGWILD_API_KEY


def test_huge_requests_are_refused_at_once_and_leave_no_memory_behind(server):
    stream = StreamReader(server.url, LONG)
    stream.start()
    latencies: list[float] = []
    polling = threading.Event()

    def poll_health():
        while not polling.is_set():
            t0 = time.monotonic()
            server.http.get("/health")
            latencies.append(time.monotonic() - t0)
            time.sleep(0.1)

    try:
        assert stream.tokens.wait(60), stream.lines
        poller = threading.Thread(target=poll_health, daemon=True)
        poller.start()
        before = server.memory().rss
        bodies = [  # a 3 MB problem, a 20 MB body in an ignored field, 1.8 MB of rare characters
            (400, {"messages": [{"role": "user", "content": "apple " * 500_000}], "max_tokens": 2}),
            (413, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "user": "x" * (20 * MB)}),
            (400, {"messages": [{"role": "user", "content": "\u9f98\u4e00" * 300_000}], "max_tokens": 2}),
        ]
        start, grew = time.monotonic(), []
        for status, body in bodies:
            raw = json.dumps(body, ensure_ascii=False).encode()
            t0 = time.monotonic()
            response = server.http.post("/v1/chat/completions", content=raw, headers=JSON)
            assert time.monotonic() - t0 < 2, f"{len(raw)} bytes took {time.monotonic() - t0:.1f} s"
            assert_openai_error(response, status)
            grew.append(server.memory().rss - before)
        end = time.monotonic()
        wait_for(lambda: any(t > end for t in stream.arrivals), 10, "the stream to go on")
        polling.set()
        poller.join(10)
    finally:
        stream.stop.set()
        polling.set()
    stream.join(30)
    # The stream kept receiving chunks the whole time, and /health kept answering.
    during = [start] + [t for t in stream.arrivals if start <= t] + [end]
    assert max(b - a for a, b in zip(during, during[1:])) < 2.5, during
    assert latencies and max(latencies) < 1, latencies
    assert max(grew) < 100 * MB, [g / MB for g in grew]
    wait_idle(server.http)
    assert server.memory().rss - before < 100 * MB


def test_sigterm_drains_requests_in_flight():
    """The short request finishes within the drain time; the long one is ended after it, with an
    error chunk and [DONE]; new requests get 503 meanwhile; the process exits with status 0."""
    with serve_process("--drain-seconds", "10", "--max-sessions", "2") as server:
        short = StreamReader(server.url, {**LONG, "max_tokens": 3})
        long = StreamReader(server.url, LONG)
        for reader in (long, short):
            reader.start()
            assert reader.tokens.wait(60), reader.lines
        server.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        draining = wait_for(lambda: (r := server.http.get("/health")).status_code == 503 and r, 5, "draining")
        assert draining.json()["status"] == "draining"
        refused = server.http.post("/v1/chat/completions", json={**LONG, "stream": False})
        assert assert_openai_error(refused, 503, "shutting down")["code"] == "server_shutting_down"
        short.join(60)
        long.join(60)
        assert server.proc.wait(30) == 0, server.log()
        assert time.monotonic() - signalled < 30
    assert short.error() is None and short.lines[-1] == "data: [DONE]"
    assert json.loads(short.lines[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")
    assert long.error()["code"] == "server_shutting_down" and long.lines[-1] == "data: [DONE]"
    assert long.arrivals[-1] - signalled > 9  # it ran on through the drain time
