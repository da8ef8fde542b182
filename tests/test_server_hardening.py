"""Issue 14's findings as regression tests, on the embedded model in-process: strict request types,
every error in OpenAI's shape on a connection that stays open, size limits, /health counting a
request at once, 503 with Retry-After, the Host allow-list, the API key, /docs, the draining
shutdown, and streams that add up to the final transcript."""

from __future__ import annotations

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from test_server_support import (  # noqa: F401
    LONG,
    assert_openai_error,
    events_of,
    health,
    http_request,
    one_torch_thread,
    raw_exchange,
    read_tokens,
    served,
    wait_for,
    wait_idle,
)

from hogwild.engine.events import DoneEvent, PassEvent, Result, StepStartEvent, TokenEvent, WorkerText
from hogwild.server import app as app_module
from hogwild.server.app import create_app, running
from hogwild.server.scheduler import final_events
from hogwild.server.security import allowed_hosts, host_name

HI_ONLY = '"messages": [{"role": "user", "content": "hi"}]'
HI = HI_ONLY + ', "max_tokens": 2'


def request(fields: str, base: str = HI) -> str:
    """A request body: ``base`` (a user message, and max_tokens 2 by default) and ``fields``."""
    return "{" + base + ", " + fields + "}"

SHORT = {"messages": [{"role": "user", "content": "What is 2 + 2?"}], "max_tokens": 3}


@pytest.fixture(scope="module")
def server(model):
    with served(model, max_sessions=2, queue_size=2) as server:
        yield server


# -- strict types; every error is JSON and the connection stays usable -----------------------------
STRICT = [
    (request('"temperature": NaN'), "temperature: Input should be a finite number"),
    (request('"temperature": Infinity'), "temperature: Input should be a finite number"),
    (request('"temperature": -Infinity'), "temperature: Input should be a finite number"),
    (request('"temperature": 1e400'), "temperature: Input should be a finite number"),
    (request('"temperature": "NaN"'), "temperature: Input should be a valid number"),
    (request('"temperature": 2.5'), "temperature: Input should be less than or equal to 2"),
    (request('"top_p": NaN'), "top_p: Input should be a finite number"),
    (request('"top_p": 1.5'), "top_p: Input should be less than or equal to 1"),
    (request('"seed": 18446744073709551616'), "seed: Input should be less than or equal to 18446744073709551615"),
    (request('"seed": -1180591620717411303424'), "seed: Input should be greater than or equal to 0"),
    (request('"seed": 1.5'), "seed: Input should be a valid integer"),
    ('{"messages": [{"role": "user", "content": "hi \\ud800"}]}', "lone surrogate (U+D800"),
    ('{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}', "lone surrogate"),
    ('{"messages": [{"role": "\\ud800", "content": "hi"}]}', "messages.0.role: Value error, the text holds a lone"),
    ('{"model": "\\udbff", ' + HI + "}", "model: Value error"),
    (request('"max_tokens": "8"', HI_ONLY), "max_tokens: Input should be a valid integer"),
    (request('"max_tokens": 8.0', HI_ONLY), "max_tokens: Input should be a valid integer"),
    (request('"max_tokens": true', HI_ONLY), "max_tokens: Input should be a valid integer"),
    (request('"max_tokens": 9223372036854775808', HI_ONLY), "max_tokens: Input should be less than or equal to"),
    (request('"max_tokens": 9223372036854775807', HI_ONLY), "beyond the context"),
    (request('"stream": "yes"'), "stream: Input should be a valid boolean"),
    (request('"stream": 1'), "stream: Input should be a valid boolean"),
    (request('"stream_options": {"include_usage": "true"}'), "stream_options.include_usage: Input should be a valid"),
    (request('"hogwild": {"workers": "2"}'), "hogwild.workers: Input should be a valid integer"),
    (request('"hogwild": {"workers": 2.0}'), "hogwild.workers: Input should be a valid integer"),
    (request('"hogwild": {"workers": true}'), "hogwild.workers: Input should be a valid integer"),
    (request('"hogwild": {"\\ud800": 1}'), "hogwild"),
    (request('"n": "1"'), "n: Input should be a valid integer"),
    ('{"messages": [{"role": "user", "content": 7}]}', "messages.0.content"),
    ('{"messages": "hi"}', "messages: Input should be a valid list"),
    (request('"max_tokens": 1' + "0" * 5000, HI_ONLY), "error parsing the body"),
    (request('"x": ' + "[" * 5000 + "]" * 5000), "error parsing the body"),
]


@pytest.mark.parametrize("body, message", STRICT, ids=[m[:40] for _, m in STRICT])
def test_bad_input_is_a_json_400_on_a_connection_that_stays_open(server, body, message):
    raw = body.encode()
    (status, headers, answer), (after, _, stats) = raw_exchange(
        server.url, [http_request("POST", "/v1/chat/completions", raw), http_request("GET", "/health")]
    )
    response = httpx.Response(status, headers=headers, content=answer)
    assert_openai_error(response, 400, message)
    assert headers.get("connection") != "close" and after == 200 and json.loads(stats)["status"] == "ok"


@pytest.mark.parametrize("body, content_type, message", [
    (b'{"messages": [{"role": "user", "content": "hi \xff"}]}', "application/json", "error parsing the body"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', "text/plain", "must be JSON"),
    (b"", "application/json", "body: Field required"),
])
def test_bodies_that_are_not_json_requests(server, body, content_type, message):
    response = server.http.post("/v1/chat/completions", content=body, headers={"Content-Type": content_type})
    assert_openai_error(response, 400, message)


def test_the_openai_client_gets_a_400_and_does_not_retry(server):
    sent = []
    http = httpx.Client(event_hooks={"request": [sent.append]})
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=2, http_client=http)
    # (the client itself refuses to send NaN, infinities or lone surrogates: the raw tests send them)
    cases = [{"seed": 2**64}, {"seed": -(2**70)}, {"extra_body": {"max_tokens": "8"}}, {"top_p": 0.0}]
    for kwargs in cases:
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], **kwargs)
    assert len(sent) == len(cases)  # one request each: a 400 is final


def test_an_unexpected_error_is_a_json_500_on_a_connection_that_stays_open(server, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("injected bug")

    monkeypatch.setattr(app_module, "prepare_session", broken)
    body = json.dumps(SHORT).encode()
    (status, headers, answer), (after, _, stats) = raw_exchange(
        server.url, [http_request("POST", "/v1/chat/completions", body), http_request("GET", "/health")]
    )
    error = assert_openai_error(httpx.Response(status, headers=headers, content=answer), 500, "internal error")
    assert "injected" not in error["message"]  # the details stay in the log
    assert after == 200 and json.loads(stats)["queued"] == 0  # its place was given back


def test_size_limits_refuse_at_once(server):
    huge_problem = {"messages": [{"role": "user", "content": "apple " * 500_000}], "max_tokens": 2}
    t0 = time.monotonic()
    assert_openai_error(server.http.post("/v1/chat/completions", json=huge_problem), 400, "cannot hold it")
    ignored = {**SHORT, "junk": "x" * 20_000_000}
    assert_openai_error(server.http.post("/v1/chat/completions", json=ignored), 413, "larger than 4194304 bytes")

    def chunks():  # no Content-Length: the limit counts the bytes as they come
        yield b'{"messages": [{"role": "user", "content": "hi"}], "junk": "'
        for _ in range(50):
            yield b"x" * 100_000
        yield b'"}'

    chunked = server.http.post("/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert_openai_error(chunked, 413, "larger than")
    # Rare characters take several tokens each: the count stops early, without tokenizing it all.
    cjk = {"messages": [{"role": "user", "content": "\u9f98\u4e00" * 300_000}], "max_tokens": 2}
    holds = f"the model's context holds {server.engine.model.max_positions}"
    assert_openai_error(server.http.post("/v1/chat/completions", json=cjk), 400, holds)
    assert time.monotonic() - t0 < 8
    assert health(server.http)["queued"] == 0 and server.http.post("/v1/chat/completions", json=SHORT).is_success


# -- /health tells the truth --------------------------------------------------------------------
def test_health_counts_a_request_from_acceptance(server, monkeypatch):
    """While the scheduler is stuck in a pass, a new request shows as queued at once, and an
    admitted one as live (not only after the next pass)."""
    gate = threading.Event()
    forward = server.engine.runner.forward

    def held(steps, *args, **kwargs):
        gate.wait(60)
        return forward(steps, *args, **kwargs)

    monkeypatch.setattr(server.engine.runner, "forward", held)
    post = lambda: httpx.post(server.url + "/v1/chat/completions", json=SHORT, timeout=120)  # noqa: E731
    with ThreadPoolExecutor(3) as pool:
        try:
            first = pool.submit(post)  # counted at once, and live from admission (its pass is held)
            wait_for(lambda: (h := health(server.http))["live_sessions"] + h["queued"] == 1, 0.5, "the request")
            wait_for(lambda: health(server.http)["live_sessions"] == 1, 5, "the first request to be live")
            sent = time.monotonic()
            others = [pool.submit(post), pool.submit(post)]
            stats = wait_for(lambda: (h := health(server.http))["queued"] == 2 and h, 0.5, "two queued requests")
            assert time.monotonic() - sent < 0.5 and stats["live_sessions"] == 1
        finally:
            gate.set()
        assert [f.result().status_code for f in [first, *others]] == [200, 200, 200]
    assert wait_idle(server.http)["cache_bytes"] == server.idle_bytes


# -- the Host allow-list, the API key and /docs -------------------------------------------------
def test_allowed_hosts():
    assert allowed_hosts("127.0.0.1") == {"localhost", "127.0.0.1", "::1"}
    assert allowed_hosts("0.0.0.0", ["Box.lan", " "]) == {"localhost", "127.0.0.1", "::1", "box.lan"}
    assert allowed_hosts("192.168.1.5") == {"localhost", "127.0.0.1", "::1", "192.168.1.5"}
    assert allowed_hosts("::", ["*"]) is None
    names = ["localhost:8000", "[::1]:8000", "::1", "LOCALHOST.", "example.test", None]
    assert [host_name(h) for h in names] == ["localhost", "::1", "::1", "localhost", "example.test", ""]


@pytest.fixture(scope="module")
def guarded(server):
    """A second server, with an API key and one extra Host name (the module's server is idle)."""
    app = create_app(server.engine, hosts=allowed_hosts("127.0.0.1", ["example.test"]), api_key="sekrit-key")
    with running(app) as srv:
        yield srv


@pytest.mark.parametrize("host, status", [
    ("evil.example", 400), ("evil.example:80", 400), ("127.0.0.2", 400), ("localhost.evil.example", 400),
    ("localhost:1234", 200), ("127.0.0.1", 200), ("[::1]:1234", 200), ("example.test:8000", 200),
])
def test_only_allowed_hosts_are_answered(guarded, host, status):
    (got, headers, body), (after, _, _) = raw_exchange(
        guarded.url, [http_request("GET", "/health", host=host), http_request("GET", "/health")]
    )
    if status == 400:
        error = assert_openai_error(httpx.Response(got, headers=headers, content=body), 400, repr(host_name(host)))
        assert error["code"] == "invalid_host"
    assert got == status and after == 200


def test_the_api_key_guards_the_api(guarded):
    with httpx.Client(base_url=guarded.url, timeout=60) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit-key"}):
            for response in (http.get("/v1/models", headers=headers), http.post("/v1/chat/completions", json=SHORT)):
                assert assert_openai_error(response, 401)["code"] == "invalid_api_key"
                assert response.headers["www-authenticate"] == "Bearer"
        assert http.get("/health").status_code == 200 and http.get("/").status_code == 200  # public
        assert_openai_error(http.get("/docs"), 404)
        assert_openai_error(http.get("/openapi.json"), 404)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=guarded.url + "/v1", api_key="wrong", max_retries=0).models.list()
    client = openai.OpenAI(base_url=guarded.url + "/v1", api_key="sekrit-key", max_retries=0, timeout=120)
    reply = client.chat.completions.create(model="m", messages=SHORT["messages"], max_tokens=2)
    assert reply.object == "chat.completion" and reply.model_extra["hogwild"]["forward_passes"] <= 2


def test_docs_only_when_asked(server):
    with running(create_app(server.engine, docs=True)) as srv, httpx.Client(base_url=srv.url) as http:
        assert "text/html" in http.get("/docs").headers["content-type"]
        schema = http.get("/openapi.json").json()
    request = schema["components"]["schemas"]["ChatRequest"]["properties"]
    assert request["temperature"]["anyOf"][0] == {"type": "number", "maximum": 2.0, "minimum": 0.0}
    seed = request["seed"]["anyOf"][0]
    assert seed["type"] == "integer" and seed["minimum"] == 0 and float(seed["maximum"]) == float(2**64 - 1)


# -- shutdown: drain, then end the rest with an error chunk --------------------------------------
def stream_in_thread(url: str, body: dict) -> tuple[threading.Thread, list[str], threading.Event]:
    """Read a stream in a thread; ``started`` is set once a token arrived."""
    lines: list[str] = []
    started = threading.Event()

    def read():
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line:
                    lines.append(line)
                if any(e["type"] == "token" for e in events_of(line)):
                    started.set()

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    assert started.wait(60), lines
    return thread, lines, started


def error_of(lines: list[str]) -> dict | None:
    errors = [json.loads(line[6:])["error"] for line in lines if line.startswith('data: {"error"')]
    return errors[0] if errors else None


def test_sigterm_drains_running_requests_and_refuses_new_ones(server):
    engine = server.engine
    app = create_app(engine)
    with running(app, drain_seconds=60) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        reader, lines, _ = stream_in_thread(srv.url, {**SHORT, "max_tokens": 10, "stream": True})
        srv.server.handle_exit(signal.SIGTERM, None)
        draining = wait_for(lambda: (r := http.get("/health")).json()["status"] == "draining" and r, 2, "draining")
        assert draining.status_code == 503
        refused = http.post("/v1/chat/completions", json=SHORT)
        assert assert_openai_error(refused, 503, "shutting down")["code"] == "server_shutting_down"
        reader.join(60)
        srv.thread.join(30)
    assert not reader.is_alive() and not srv.thread.is_alive()  # drained, then the server ended
    assert lines[-1] == "data: [DONE]" and error_of(lines) is None
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")
    assert engine.runner.cache.nbytes() == server.idle_bytes


@pytest.mark.parametrize("signals, drain_seconds", [(1, 1.0), (2, 60.0)], ids=["drain-time-out", "second-signal"])
def test_shutdown_ends_the_rest_with_an_error_chunk(server, signals, drain_seconds):
    engine = server.engine
    app = create_app(engine)
    with running(app, drain_seconds=drain_seconds) as srv:
        reader, lines, _ = stream_in_thread(srv.url, LONG)
        t0 = time.monotonic()
        for sig in (signal.SIGTERM, signal.SIGINT)[:signals]:
            srv.server.handle_exit(sig, None)
        reader.join(30)
        ended = time.monotonic() - t0
        srv.thread.join(30)
    assert not reader.is_alive() and not srv.thread.is_alive()
    assert ended < drain_seconds + 5 if signals == 1 else ended < 5
    assert error_of(lines)["code"] == "server_shutting_down" and lines[-1] == "data: [DONE]"
    assert engine.runner.cache.nbytes() == server.idle_bytes


# -- streams add up to the final transcript -----------------------------------------------------
def test_final_events_drop_an_unwritten_step_and_keep_held_back_text():
    result = Result("4", "Alice", [WorkerText("Alice", "**Alice [1]:** Hi, I'm Alice. ab\ufffd"),
                                   WorkerText("Bob", "**Bob [1]:** Hi.\n\n")],
                    [], 3, 6, 0.1, "m", "combined")
    streamed = {"Alice": ["**Alice [1]:** Hi, I'm Alice.", " ab"], "Bob": ["**Bob [1]:** Hi."]}
    events = [TokenEvent("Alice", 0, 7, ""), TokenEvent("Bob", 1, 8, "\n\n"),
              StepStartEvent("Bob", 1, 2, "**Bob [2]:**")]
    kept = final_events(events, streamed, result)
    assert kept == [TokenEvent("Alice", 0, 7, "\ufffd"), TokenEvent("Bob", 1, 8, "\n\n")]


def test_a_step_opened_in_the_last_pass_is_not_streamed(server):
    """With this problem and budget a worker opens a step (header only) in the very last pass:
    the transcript leaves it out, and so must the stream."""
    problem, budget = "What is 12 * 7?", 5
    passes, current = [], []
    for event in server.engine.stream(problem, workers=2, budget=budget, seed=0):
        if isinstance(event, DoneEvent):
            result = event.result
        elif isinstance(event, PassEvent):
            passes.append(current)
            current = []
        else:
            current.append(event)
    opened_last = [e for e in passes[-1] + current if isinstance(e, StepStartEvent)]
    texts = {w.name: w.text for w in result.workers}
    assert any(not texts[e.worker].endswith(e.text) for e in opened_last), "the case is not exercised"

    body = {"messages": [{"role": "user", "content": problem}], "max_tokens": budget, "seed": 0, "stream": True}
    with server.http.stream("POST", "/v1/chat/completions", json=body) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    streamed = dict.fromkeys(texts, "")
    for chunk in chunks:
        for event in chunk.get("hogwild", {}).get("events", []):
            if event["type"] in ("step_start", "token"):
                streamed[event["worker"]] += event["text"]
    final = chunks[-1]["hogwild"]["result"]
    assert streamed == {w["name"]: w["text"] for w in final["workers"]} == texts
