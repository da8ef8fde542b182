"""Helpers shared by the server tests (this module holds no tests): /health polling, raw
exchanges over one keep-alive connection, stream reading, and a tiny random-weight model that
makes a forward pass cost milliseconds (for the fuzzer and the soak test)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from urllib.parse import urlsplit

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from hogwild import load_model
from hogwild.engine.engine import Engine
from hogwild.server.app import create_app, running


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The server's process also runs the event loop and the clients: leave them a core (OpenMP
    threads spinning on an oversubscribed CPU slow a pass down tenfold and more). A test module
    that imports it gets it for all its tests."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


LONG = {"messages": [{"role": "user", "content": "Count to one thousand."}], "max_tokens": 2000, "stream": True}


@contextmanager
def served(model, max_sessions: int = 4, queue_size: int = 4, kv_memory: int | None = None,
           **options) -> Iterator[SimpleNamespace]:
    """A server for an engine of its own (with a K/V pool of ``kv_memory`` bytes) in a thread,
    with a client: ``url``, ``http``, ``engine``, ``srv`` (from ``running``) and ``idle_bytes``,
    the K/V bytes it holds idle."""
    engine = Engine(model, kv_memory=kv_memory)
    app = create_app(engine, max_sessions, queue_size, **options)
    with running(app) as srv, httpx.Client(base_url=srv.url, timeout=120) as http:
        yield SimpleNamespace(url=srv.url, http=http, engine=engine, srv=srv, idle_bytes=health(http)["cache_bytes"])


def health(http: httpx.Client) -> dict:
    return http.get("/health").json()


def wait_idle(http: httpx.Client, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = health(http)
        if stats["live_sessions"] == 0 and stats["queued"] == 0:
            return stats
        assert time.monotonic() < deadline, f"the server did not become idle: {stats}"
        time.sleep(0.05)


def wait_for(predicate, timeout: float, what: str, step: float = 0.02):
    """Poll ``predicate`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(step)
    return value


def assert_openai_error(response: httpx.Response, status: int, text: str = "") -> dict:
    """The response is an error in OpenAI's shape with this status; returns its ``error``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error"), error
    assert text in error["message"], error
    if status == 503:
        assert int(response.headers["retry-after"]) > 0
    return error


def events_of(line: str) -> list[dict]:
    """The hogwild events of one ``data:`` line of a stream."""
    if not line.startswith("data: {"):
        return []
    return json.loads(line[6:]).get("hogwild", {}).get("events", [])


def read_tokens(lines, n: int) -> None:
    """Read a stream's lines until ``n`` token events have arrived."""
    seen = 0
    while seen < n:
        seen += sum(e["type"] == "token" for e in events_of(next(lines)))


def raw_exchange(url: str, requests: list[bytes], timeout: float = 30.0) -> list[tuple[int, dict, bytes]]:
    """Send raw HTTP/1.1 requests one after another over ONE connection; returns (status,
    headers, body) of each response. The connection must stay open between them."""
    parts = urlsplit(url)
    answers = []
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        buffer = b""
        for request in requests:
            sock.sendall(request)
            while b"\r\n\r\n" not in buffer:
                chunk = sock.recv(65536)
                assert chunk, f"the server closed the connection; answers so far: {answers}"
                buffer += chunk
            head, buffer = buffer.split(b"\r\n\r\n", 1)
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:])}
            length = int(headers["content-length"])
            while len(buffer) < length:
                chunk = sock.recv(65536)
                assert chunk, "the server closed the connection mid-body"
                buffer += chunk
            answers.append((int(lines[0].split()[1]), headers, buffer[:length]))
            buffer = buffer[length:]
    return answers


def http_request(method: str, path: str, body: bytes = b"", host: str = "127.0.0.1",
                 content_type: str = "application/json") -> bytes:
    """A raw HTTP/1.1 request (keep-alive)."""
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
    return head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body


def tiny_model(model, folder):
    """A 2-layer random-weight Llama with the embedded model's tokenizer and context: every
    request and error path of the real one, at a few milliseconds a pass."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=model.model.config.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=model.max_positions,
        tie_word_embeddings=True,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    return load_model(str(folder))
