"""A property-based request fuzzer (hypothesis) against a live server on a tiny random-weight
model: wrong types, non-finite numbers, huge integers, odd unicode (lone surrogates included),
nesting, sizes, raw bytes. Whatever it sends: never a 5xx, every error is JSON in OpenAI's shape,
an accepted stream ends with ``[DONE]`` and no error, ``/health`` answers within 1 s all along,
and afterwards the server still solves a normal request and holds no session."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from test_server_support import (  # noqa: F401
    assert_openai_error,
    one_torch_thread,
    served,
    tiny_model,
    wait_for,
    wait_idle,
)

FUZZ = settings(max_examples=120, deadline=None, database=None, phases=[Phase.generate, Phase.shrink],
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    """The server, and a thread that times /health every 50 ms while the module runs."""
    with served(tiny_model(model, tmp_path_factory.mktemp("tiny")), max_sessions=4, queue_size=32) as server:
        server.health, stop = [], threading.Event()  # (seconds, status) of each /health

        def poll():
            with httpx.Client(base_url=server.url, timeout=30) as http:
                while not stop.is_set():
                    t0 = time.monotonic()
                    status = http.get("/health").status_code
                    server.health.append((time.monotonic() - t0, status))
                    time.sleep(0.05)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        yield server
        stop.set()
        poller.join(30)


# -- what requests are made of ------------------------------------------------------------------
ODD_TEXT = st.one_of(
    st.text(max_size=40),
    st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3),  # lone surrogates
    st.sampled_from(["", " ", "\x00", "\u202e\u0301", "\ufeff", "\U0001f916" * 50, "e\u0301" * 30, "\r\n\t"]),
)
NUMBERS = st.one_of(
    st.integers(), st.integers(min_value=-(2**80), max_value=2**80), st.floats(),  # NaN and infinities too
    st.sampled_from([2**63, 2**64, 2**64 - 1, -(2**63) - 1, -(2**70), 1e400, -1e400, 0.0, -0.0, 5e-324]),
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, ODD_TEXT)
JUNK = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ODD_TEXT, inner, max_size=3),
                    max_leaves=6)
TEXT = st.text(max_size=60)  # no lone surrogates: those are junk
VALID = st.fixed_dictionaries(
    {"messages": st.tuples(st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "assistant"]),
                                                            "content": TEXT}), max_size=2),
                           st.fixed_dictionaries({"role": st.just("user"), "content": TEXT | st.sampled_from(
                               ["What is 2 + 2?", "ab " * 30_000, "\u9f98" * 12_000])})).map(lambda m: [*m[0], m[1]]),
     "max_tokens": st.integers(1, 3),  # budgets of 1..3 passes: what is accepted costs milliseconds
     "stream": st.booleans()},
    optional={
        "model": TEXT, "temperature": st.floats(0, 2), "top_p": st.floats(0, 1, exclude_min=True),
        "seed": st.integers(0, 2**64 - 1), "n": st.just(1),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}), "user": TEXT,
        "hogwild": st.fixed_dictionaries({}, optional={
            "workers": st.integers(1, 4), "layout": st.sampled_from(["combined", "contiguous", "interleaved",
                                                                      "independent"]),
            "collab_every": st.integers(0, 8), "top_k": st.integers(0, 50)}),
    },
)
# Where a mutation may put junk (or a wrong value of the right type), in a valid request.
PATHS = [("max_tokens",), ("max_completion_tokens",), ("temperature",), ("top_p",), ("seed",), ("stream",), ("n",),
         ("model",), ("messages",), ("messages", -1), ("messages", -1, "role"), ("messages", -1, "content"),
         ("stream_options",), ("stream_options", "include_usage"), ("hogwild",), ("hogwild", "workers"),
         ("hogwild", "layout"), ("hogwild", "collab_every"), ("hogwild", "top_k"), ("hogwild", "wrokers"),
         ("tools",)]
PARTS = st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]) | ODD_TEXT,
                                        "text": ODD_TEXT | JUNK}), max_size=3)


def _child(node, part):
    """``node[part]`` where the path still leads somewhere (a dict, or a non-empty list indexed by
    an int), else None: an earlier mutation may have replaced a parent by junk of any type."""
    if isinstance(node, dict):
        return node.setdefault(part, {})
    if isinstance(node, list) and node and isinstance(part, int):
        return node[part]
    return None


@st.composite
def requests(draw) -> tuple[dict, bool]:
    """A valid request with 0 to 3 of its fields replaced by junk (or removed); and whether it
    was left valid."""
    body = draw(VALID)
    mutations = draw(st.lists(st.sampled_from(PATHS), max_size=3, unique=True))
    for path in mutations:
        *parents, key = path
        node = body
        for part in parents:  # an earlier mutation may have put junk on the way
            node = _child(node, part)
        if not (isinstance(node, dict) or isinstance(node, list) and node and isinstance(key, int)):
            continue  # junk on the way: nothing left to mutate at this path
        value = draw(st.one_of(JUNK, PARTS, st.just(DELETE)) if key == "content" else st.one_of(JUNK, st.just(DELETE)))
        if value is DELETE:
            node.pop(key, None) if isinstance(node, dict) else node.pop(key)
        elif key == "max_tokens" and (value is None or (type(value) is int and value > 3)):
            node[key] = 10**9  # keep budgets small (null means the default: 512 passes)
        else:
            node[key] = value
    if body.get("max_tokens") is None:
        body["max_tokens"] = 3
    return body, not mutations


DELETE = object()


def check(server, response: httpx.Response, lines: list[str]) -> None:
    """The properties every answer must have."""
    event(f"HTTP {response.status_code}" + (" stream" if lines else ""))
    assert response.status_code < 500, (response.status_code, response.text)
    if response.status_code != 200:
        assert_openai_error(response, response.status_code)
    elif lines:  # a stream: chunks, then [DONE], never an error
        assert lines[-1] == "data: [DONE]" and all(x.startswith("data: ") for x in lines), lines[-3:]
        chunks = [json.loads(x[6:]) for x in lines[:-1]]
        assert all("error" not in c for c in chunks), chunks[-1]
        assert chunks[-1]["object"] == "chat.completion.chunk"
    else:
        assert response.json()["object"] == "chat.completion"


def send(server, body: bytes, content_type: str = "application/json") -> int:
    headers = {"Content-Type": content_type}
    with server.http.stream("POST", "/v1/chat/completions", content=body, headers=headers) as response:
        streaming = response.headers.get("content-type", "").startswith("text/event-stream")
        lines = [x for x in response.iter_lines() if x] if streaming else []
        if not streaming:
            response.read()
    check(server, response, lines)
    return response.status_code


@FUZZ
@given(case=requests())
def test_fuzzed_requests(server, case):
    body, valid = case
    status = send(server, json.dumps(body, allow_nan=True).encode())
    if valid and body["messages"][-1]["content"].strip() and len(body["messages"][-1]["content"]) < 8000:
        assert status == 200, body  # a valid request is served


RAW = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(str.encode),
    requests().map(lambda r: json.dumps(r[0], allow_nan=True)).flatmap(  # JSON, cut and spliced
        lambda text: st.tuples(st.integers(0, len(text)), st.binary(max_size=8)).map(
            lambda cut: text[: cut[0]].encode() + cut[1])),
    st.integers(1, 3000).map(lambda depth: b'{"messages": ' + b"[" * depth + b"]" * depth + b"}"),
    st.integers(1, 3000).map(lambda depth: b'{"hogwild": ' + b'{"a": ' * depth + b"1" + b"}" * depth + b"}"),
    # long invalid lists and many-key objects (up to the 4 MiB body limit), where the server takes them
    st.tuples(st.sampled_from([b"1", b'"x"', b"{}", b"[]", b'{"role": 5}', b"null"]), st.integers(1, 400_000),
              st.sampled_from([b'{"messages": [%s]}', b'{"messages": [{"role": "user", "content": [%s]}]}',
                               b'{"messages": [{"role": "user", "content": "hi"}], "stop": [%s]}',
                               b'{"messages": [{"role": "user", "content": "hi"}], "tools": [%s]}'])).map(
        lambda t: t[2] % b",".join([t[0]] * t[1])),
    st.tuples(st.integers(1, 200_000), st.sampled_from([b'{"hogwild": {%s}}', b'{"messages": [{%s}]}', b"{%s}"])).map(
        lambda t: t[1] % b",".join(b'"k%d": 1' % i for i in range(t[0]))),
    st.sampled_from([b"", b"null", b"[]", b"\xef\xbb\xbf{}", b'{"messages": [{"role": "user", "content": "\xff"}]}']),
)


@FUZZ
@given(body=RAW, content_type=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded",
                                               "application/json; charset=latin-1", "multipart/form-data"]))
def test_fuzzed_bytes(server, body, content_type):
    send(server, body, content_type)


def test_after_the_fuzzing_the_server_is_healthy_and_still_solves(server):
    """Runs after the fuzzers (file order): /health answered within 1 s all along, nothing is left
    running, and a normal request gets its answer."""
    stats = wait_idle(server.http, 60)
    assert stats["status"] == "ok" and stats["cache_bytes"] == server.idle_bytes and stats["failed"] == 0
    wait_for(lambda: server.health, 5, "a /health answer")
    assert max(server.health) < (1, 0) and {status for _, status in server.health} == {200}, max(server.health)
    body = {"messages": [{"role": "user", "content": "What is 2 + 2?"}], "max_tokens": 4,
            "hogwild": {"workers": 2}}
    reply = server.http.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200 and reply.json()["hogwild"]["forward_passes"] <= 4
    assert [w["name"] for w in reply.json()["hogwild"]["workers"]] == ["Alice", "Bob"]
