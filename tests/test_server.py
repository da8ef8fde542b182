"""The OpenAI-compatible server on the embedded model: the official client, streaming, batching
several sessions in one pass without cross-talk, bad input, disconnects, the queue."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from test_server_support import (  # noqa: F401
    LONG,
    assert_openai_error,
    one_torch_thread,
    read_tokens,
    served,
    wait_for,
)
from test_server_support import health as get_health
from test_server_support import wait_idle as wait_http_idle

from hogwild.cli import main
from hogwild.engine.engine import Engine

BUDGET = 12


@pytest.fixture(scope="module")
def server(model):
    with served(model, max_sessions=4, queue_size=4) as server:
        yield server


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def health(server) -> dict:
    return get_health(server.http)


def wait_idle(server, timeout: float = 60.0) -> dict:
    return wait_http_idle(server.http, timeout)


def ask(client, problem: str, budget: int = BUDGET, **kwargs):
    return client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": problem}], max_tokens=budget,
        temperature=0, seed=0, extra_body={"hogwild": {"workers": 2}}, **kwargs,
    )


def test_models_and_health(server):
    models = server.http.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "SmolLM2-135M-Instruct"
    assert health(server)["status"] == "ok"
    page = server.http.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "worker" in page.text


def test_openai_client_non_streaming(server, client):
    response = ask(client, "What is 12 * 7?")
    extra = response.model_extra["hogwild"]
    assert response.object == "chat.completion" and response.model == "SmolLM2-135M-Instruct"
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == (extra["answer"] or "")
    assert response.choices[0].finish_reason in ("stop", "length")
    assert response.usage.completion_tokens == extra["tokens_generated"] > 0
    assert response.usage.prompt_tokens > 0
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    assert extra["forward_passes"] <= BUDGET and extra["layout"] == "combined"
    assert [w["name"] for w in extra["workers"]] == ["Alice", "Bob"]
    assert extra["workers"][0]["text"].startswith("**Alice [1]:** Hi, I'm Alice.")
    for step in extra["history"]:
        assert step["worker"] in ("Alice", "Bob") and step["step"] >= 1 and step["text"]
    assert wait_idle(server)["cache_bytes"] == server.idle_bytes


def test_openai_client_streaming(server, client):
    chunks = list(ask(client, "What is 12 * 7?", stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].model_extra["hogwild"]["workers"] == ["Alice", "Bob"]
    streamed = {"Alice": "", "Bob": ""}
    steps, content, result, finish, usage = [], "", None, None, None
    for chunk in chunks:
        assert chunk.object == "chat.completion.chunk" and chunk.id == chunks[0].id
        extra = (chunk.model_extra or {}).get("hogwild") or {}
        for event in extra.get("events", []):
            if event["type"] == "step_start":
                streamed[event["worker"]] += event["text"]
            elif event["type"] == "token":
                streamed[event["worker"]] += event["text"]
            elif event["type"] == "step":
                steps.append((event["worker"], event["step"], event["text"]))
        result = extra.get("result", result)
        if chunk.choices:
            content += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    assert result is not None and finish in ("stop", "length")
    assert content == (result["answer"] or "")
    # Every worker's tokens arrived as they were generated, and add up to the final transcript.
    assert all(streamed.values())
    assert streamed == {w["name"]: w["text"] for w in result["workers"]}
    assert steps == [(h["worker"], h["step"], h["text"]) for h in result["history"]]
    assert usage.completion_tokens == result["tokens_generated"]
    with server.http.stream("POST", "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "What is 2 + 2?"}], "max_tokens": 2, "stream": True,
    }) as raw:
        lines = [line for line in raw.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_concurrent_sessions_batch_without_cross_talk(server, client, model, monkeypatch):
    """Four 2-worker requests run in shared passes; each gets exactly what it would get alone."""
    passes = []
    forward = server.engine.runner.forward

    def recording_forward(steps, *args, **kwargs):
        passes.append([[(b.id, b.name) for b in step.view] for step in steps])
        return forward(steps, *args, **kwargs)

    monkeypatch.setattr(server.engine.runner, "forward", recording_forward)
    problems = ["What is 12 * 7?", "What is 3 + 5?", "How many legs do two cats have?", "What is 100 / 4?"]
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda p: ask(client, p), problems))
    monkeypatch.undo()
    assert wait_idle(server)["cache_bytes"] == server.engine.runner.cache.nbytes() == server.idle_bytes

    assert max(len(rows) for rows in passes) == 8  # the workers of all four sessions in one pass
    # Blocks read together in some row form one session: each such group holds exactly one prompt.
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    names = {}
    for rows in passes:
        for view in rows:
            names.update(view)
            for block_id, _ in view[1:]:
                parent[find(block_id)] = find(view[0][0])
    prompts_per_group: dict[int, int] = {}
    for block_id, name in names.items():
        prompts_per_group[find(block_id)] = prompts_per_group.get(find(block_id), 0) + (name == "prompt")
    assert sorted(prompts_per_group.values()) == [1] * len(prompts_per_group)
    assert len(prompts_per_group) == 4

    reference = Engine(model)  # its own cache; the server is idle now
    for problem, response in zip(problems, responses, strict=True):
        alone = reference.solve(problem, workers=2, budget=BUDGET, seed=0)
        extra = response.model_extra["hogwild"]
        assert extra["workers"] == [{"name": w.name, "text": w.text} for w in alone.workers]
        assert extra["history"] == [{"worker": h.worker, "step": h.step, "text": h.text} for h in alone.history]
        assert response.choices[0].message.content == (alone.answer or "")


def test_a_failing_session_does_not_take_the_batch_down(server, client, monkeypatch):
    """A pass that fails for one session's rows fails that request (500); the others go on."""
    forward, tokenizer = server.engine.runner.forward, server.engine.model.tokenizer
    faults = []

    def faulty_forward(steps, *args, **kwargs):
        for step in steps:  # decode passes only: the views of prefill and headers are shorter
            if len(step.view) >= 5 and "XYZZY" in tokenizer.decode(step.view[0].token_ids):
                faults.append(len(steps))
                raise RuntimeError("injected fault")
        return forward(steps, *args, **kwargs)

    before = wait_idle(server)
    monkeypatch.setattr(server.engine.runner, "forward", faulty_forward)
    with server.http.stream("POST", "/v1/chat/completions", json=LONG) as good:
        lines = good.iter_lines()
        read_tokens(lines, 2)
        with pytest.raises(openai.InternalServerError, match="forward pass failed"):
            ask(client, "XYZZY: what is 2 + 2?", 6)
        read_tokens(lines, 4)  # the good session goes on
    monkeypatch.undo()
    assert faults == [4, 2]  # in the pass shared by both sessions, then in its retry alone
    after = wait_idle(server)
    assert after["failed"] == before["failed"] + 1 and after["cancelled"] == before["cancelled"] + 1
    assert after["cache_bytes"] == server.idle_bytes


BAD = [
    (b"{not json", "not valid JSON"),
    (b'["a list"]', "invalid request"),
    (b"{}", "messages"),
    (b'{"messages": []}', "at least one message"),
    (b'{"messages": [{"role": "system", "content": "hi"}]}', "user message"),
    (b'{"messages": [{"role": "user", "content": "   "}]}', "problem is empty"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "hogwild": {"workers": 0}}', "between 1 and 16"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "hogwild": {"workers": 17}}', "between 1 and 16"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "hogwild": {"workers": "two"}}', "hogwild.workers"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', "at least 1"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}', "at least 1"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}', "beyond the context"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4100}', "beyond the context"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "hogwild": {"layout": "zigzag"}}', "unknown layout"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": -1}', "temperature"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": 0}', "top_p"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "n": 2}', "n must be 1"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "hogwild": {"wrokers": 2}}', "hogwild.wrokers"),
]


@pytest.mark.parametrize("body, message", BAD, ids=[m for _, m in BAD])
def test_bad_input_gets_400_and_the_server_stays_up(server, body, message):
    response = server.http.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"
    assert health(server)["status"] == "ok"


def test_bad_input_through_the_openai_client(server, client):
    with pytest.raises(openai.BadRequestError, match="unknown layout"):
        client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], extra_body={"hogwild": {"layout": "spiral"}}
        )
    assert ask(client, "What is 1 + 1?", budget=2).choices[0].message.content is not None


def test_disconnect_mid_stream_cancels_and_frees_the_cache(server):
    before = wait_idle(server)
    with server.http.stream("POST", "/v1/chat/completions", json=LONG) as response:
        read_tokens(response.iter_lines(), 6)
        during = health(server)
        assert during["live_sessions"] == 1 and during["cache_bytes"] > server.idle_bytes
    # The client is gone: the session is cancelled and its blocks are freed at once.
    after = wait_idle(server, timeout=30)
    assert after["cache_bytes"] == server.engine.runner.cache.nbytes() == server.idle_bytes
    assert after["cancelled"] == before["cancelled"] + 1 and after["finished"] == before["finished"]


def test_non_streaming_client_that_gives_up_cancels(server):
    before = wait_idle(server)
    body = {**LONG, "stream": False}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(5, read=2.5))
    after = wait_idle(server, timeout=30)
    assert after["cache_bytes"] == server.idle_bytes and after["cancelled"] == before["cancelled"] + 1


def test_requests_beyond_the_slots_wait_and_beyond_the_queue_get_503(model, monkeypatch):
    with served(model, max_sessions=1, queue_size=1) as small:  # the module's server is idle meanwhile
        http, gate, forward = small.http, threading.Event(), small.engine.runner.forward
        monkeypatch.setattr(small.engine.runner, "forward", lambda *a, **k: gate.wait(60) and forward(*a, **k))
        try:  # the first session holds the one slot (its first pass waits on the gate)
            with http.stream("POST", "/v1/chat/completions", json=LONG) as first:
                assert first.status_code == 200
                wait_for(lambda: get_health(http)["live_sessions"] == 1, 10, "the first request to be live")
                with http.stream("POST", "/v1/chat/completions", json=LONG) as second:
                    assert second.status_code == 200 and get_health(http)["queued"] == 1
                    third = http.post("/v1/chat/completions", json=LONG)
                    assert assert_openai_error(third, 503)["code"] == "server_busy"  # with Retry-After
        finally:
            gate.set()
        stats = wait_http_idle(http, 30)
        assert stats["cache_bytes"] == small.engine.runner.cache.nbytes() == small.idle_bytes
        assert stats["cancelled"] == 2


@pytest.mark.parametrize("option, value", [
    ("--max-sessions", "0"), ("--queue-size", "-1"), ("--port", "70000"), ("--drain-seconds", "-1"),
    ("--max-body-mb", "0"), ("--threads", "0"),
])
def test_serve_command_rejects_bad_options(capsys, option, value):
    assert main(["serve", option, value]) == 2
    assert option in capsys.readouterr().err
