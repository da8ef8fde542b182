"""Issue 21's ways to stall the server, as regression tests on a tiny random-weight model: list
bombs up to the body limit refused in well under a second while a stream keeps flowing and
/health answers (memory back within 100 MB), requests that never finish arriving closed within
the bound, a cap on open connections, and an empty API key refused at start."""

from __future__ import annotations

import json
import socket
import threading
import time
from urllib.parse import urlsplit

import httpx
import psutil
import pytest
from test_server_support import LONG, assert_openai_error, events_of, one_torch_thread, tiny_model  # noqa: F401

from hogwild.cli import main
from hogwild.engine.engine import Engine
from hogwild.server.app import create_app, running
from hogwild.server.bodies import LIMITS, count_items
from hogwild.server.connections import ConnectionLimits

MB = 1 << 20
TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def engine(model, tmp_path_factory):
    return Engine(tiny_model(model, tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def server(engine):
    app = create_app(engine, max_sessions=2, queue_size=4)
    with running(app, limits=ConnectionLimits(request_timeout_s=TIMEOUT_S, max_connections=16)) as srv:
        yield srv


def under(limit: int, head: bytes, item: bytes, tail: bytes) -> bytes:
    """``head`` + as many ``item``s as fit in ``limit`` bytes + ``tail`` (the last item without its comma)."""
    count = (limit - len(head) - len(tail)) // len(item)
    return head + item * count + tail


BOMBS = {  # up to the 4 MiB body limit; the shapes of issue 21's findings
    "2M invalid messages": under(4 * MB, b'{"max_tokens": 2, "messages": [', b"1,", b'1]}'),
    "1M content parts": under(4 * MB, b'{"messages": [{"role": "user", "content": [', b"1,", b'1]}]}'),
    "300k keys in hogwild": b'{"hogwild": {' + b",".join(b'"k%d": 1' % i for i in range(300_000)) + b"}}",
    "300k role objects": under(4 * MB, b'{"messages": [', b'{"role": 5},', b'{"role": 5}]}'),
    "1M strings": under(4 * MB, b'{"messages": [{"role": "user", "content": "hi"}], "stop": [', b'"a",', b'"a"]}'),
    "1M empty objects": under(4 * MB, b'{"messages": [', b"{},", b"{}]}"),
    "2049 messages": json.dumps({"messages": [{"role": "user", "content": "hi"}] * 2049}).encode(),
    "65 keys": json.dumps({"messages": [{"role": "user", "content": "hi"}],
                           "metadata": {f"k{i}": 1 for i in range(65)}}).encode(),
    "deep lists": b'{"messages": ' + b"[" * 3000 + b"]" * 3000 + b"}",
}


def test_count_items_reads_bytes_only():
    tricky = b'{"a": [1, 2, 3], "b": {"c": "x,y,[z{\\"\\\\"}}'
    assert json.loads(tricky)["b"]["c"] == 'x,y,[z{"\\'
    assert count_items(tricky, 100) == 10  # few: the quick upper bound
    assert count_items(tricky, 5) == 6  # more than the limit: exact (3 commas, 1 "[", 2 "{" outside strings)
    text = json.dumps({"messages": [{"role": "user", "content": "1, 2, [3], {4}" * 10_000}]}).encode()
    assert count_items(text, 100) == 4  # 30,000 commas in one string: only "{", "[", "{" and "," count
    assert count_items(b"[" + b'"a",' * 1000 + b'"a"]', 100) > 100


def test_list_bombs_are_refused_at_once_while_a_stream_flows(server):
    process = psutil.Process()
    with httpx.Client(base_url=server.url, timeout=30) as http:
        http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
        rss_before = process.memory_info().rss
        chunks: list[float] = []
        stop = threading.Event()

        def read():
            with httpx.stream("POST", server.url + "/v1/chat/completions", json=LONG, timeout=60) as response:
                for line in response.iter_lines():
                    if events_of(line):
                        chunks.append(time.monotonic())
                    if stop.is_set():
                        return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            deadline = time.monotonic() + 60
            while not chunks:
                assert time.monotonic() < deadline, "the stream did not start"
                time.sleep(0.02)
            t_start = time.monotonic()
            health = []
            for name, body in BOMBS.items():
                assert len(body) <= 4 * MB, name
                t0 = time.monotonic()
                response = http.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
                elapsed = time.monotonic() - t0
                error = assert_openai_error(response, 400)
                assert elapsed < 0.5, (name, elapsed, error)
                t0 = time.monotonic()
                assert http.get("/health").status_code == 200
                health.append(time.monotonic() - t0)
            t_end = time.monotonic()
        finally:
            stop.set()
        reader.join(60)
    during = [t for t in chunks if t_start <= t <= t_end]
    gaps = [b - a for a, b in zip(chunks, chunks[1:]) if t_start <= b <= t_end]
    assert len(during) >= 5 and max(gaps) < 0.5, (len(during), max(gaps, default=None))
    assert max(health) < 0.5, health
    assert process.memory_info().rss - rss_before < 100 * MB


@pytest.mark.parametrize("body, message", [
    (BOMBS["2M invalid messages"], f"more than {LIMITS.max_items} list items"),
    (BOMBS["2049 messages"], "messages: a list of 2049 items; at most 2048"),
    (BOMBS["65 keys"], "metadata: an object of 65 keys; at most 64"),
    (BOMBS["deep lists"], "error parsing the body"),
    (b'{"messages": [1, {"role": 5}, "x"]}', "messages.0"),  # the first bad item only
])
def test_what_the_refusal_says(server, body, message):
    response = httpx.post(server.url + "/v1/chat/completions", content=body,
                          headers={"Content-Type": "application/json"}, timeout=30)
    error = assert_openai_error(response, 400, message)
    assert "messages.1" not in error["message"]


def raw_socket(url: str) -> socket.socket:
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    return sock


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_requests_that_never_finish_arriving_are_closed(server):
    post = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    partial = {
        "silent": b"",
        "half the headers": b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n",
        "half the body": post + b'Content-Length: 100\r\n\r\n{"messages": [',
    }
    socks = {name: raw_socket(server.url) for name in partial}
    t0 = time.monotonic()
    for name, data in partial.items():
        socks[name].sendall(data)
    answers = {name: read_all(sock) for name, sock in socks.items()}  # each ends when the server closes it
    elapsed = time.monotonic() - t0
    for sock in socks.values():
        sock.close()
    assert TIMEOUT_S * 0.9 < elapsed < TIMEOUT_S + 2, elapsed
    assert answers["silent"] == b""
    for name in ("half the headers", "half the body"):
        assert answers[name].startswith(b"HTTP/1.1 408 "), (name, answers[name][:200])
        assert b'"error"' in answers[name] and b"Connection: close" in answers[name]
    with httpx.Client(base_url=server.url) as http:  # a request that arrives in time is not hurried
        assert http.get("/health").status_code == 200
        time.sleep(TIMEOUT_S * 1.5)
        assert http.get("/health").status_code == 200


def test_a_cap_on_open_connections(server):
    socks = [raw_socket(server.url) for _ in range(16)]
    try:
        time.sleep(0.2)
        refused = raw_socket(server.url)
        answer = read_all(refused)
        refused.close()
        assert answer.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 2" in answer, answer[:200]
        assert b"too many open connections" in answer
    finally:
        for sock in socks:
            sock.close()
    time.sleep(0.2)
    assert httpx.get(server.url + "/health").status_code == 200  # the places are free again


@pytest.mark.parametrize("flags, env, message", [
    (["--api-key", ""], {}, "--api-key is empty"),
    (["--api-key", "  "], {"HOGWILD_API_KEY": "set"}, "--api-key is empty"),
    (["--api-key", " key"], {}, "whitespace"),
    ([], {"HOGWILD_API_KEY": " "}, "$HOGWILD_API_KEY is empty"),
])
def test_an_empty_api_key_is_refused_at_start(flags, env, message, monkeypatch, capsys):
    monkeypatch.delenv("HOGWILD_API_KEY", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    t0 = time.monotonic()
    assert main(["serve", "--random-config", "tiny-qwen2", *flags]) == 2
    assert time.monotonic() - t0 < 5  # before any model is loaded
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
