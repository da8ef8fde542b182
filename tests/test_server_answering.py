"""Answer while thinking through the server (``"hogwild": {"async": true}``), on the embedded model:
the writer's tokens stream as ``content`` while the thinker's still stream as ``reasoning_content``,
in the order they were generated; the finisher answers at the budget when the writer never starts;
a client that goes away frees the session; an async request batched beside a hogwild one gets what
it gets alone; bad values are refused by name.

The probes are scripted (``engine.probe_policy``): SmolLM2 is no reasoning model and would keep
its writer waiting; they come every 4 passes (not 20) to keep the runs short.
"""

from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from test_server_support import assert_openai_error, one_torch_thread, served, wait_idle  # noqa: F401

from hogwild import DoneEvent, Engine, TokenEvent
from hogwild.server.answering import StopCut

PROBLEM = "What is 12 * 7?"
BUDGET = 12  # forward passes: the writer starts after the first probe, at pass 4


def always_yes(i: int, p_yes: float, p_no: float) -> bool:
    return True


def always_no(i: int, p_yes: float, p_no: float) -> bool:
    return False


def probing_often(engine: Engine) -> Engine:
    engine.answering = dataclasses.replace(engine.answering, probe_every=4)
    return engine


@pytest.fixture(scope="module")
def server(model):
    with served(model, max_sessions=2, queue_size=2) as server:
        probing_often(server.engine)
        yield server


@pytest.fixture(scope="module")
def reference(model) -> Engine:
    """An engine of its own, for runs alone through the Python API."""
    return probing_often(Engine(model))


@pytest.fixture(scope="module")
def alone(reference) -> list:
    """The events of PROBLEM answered alone with always-yes probes."""
    events = list(reference.stream_answer(PROBLEM, thinkers=1, budget=BUDGET, seed=0, probe_policy=always_yes))
    assert isinstance(events[-1], DoneEvent)
    return events


def body(budget: int, stream: bool = False, **hogwild) -> dict:
    return {"messages": [{"role": "user", "content": PROBLEM}], "max_tokens": budget, "seed": 0, "stream": stream,
            "stream_options": {"include_usage": True} if stream else None, "hogwild": {"async": True, **hogwild}}


def sse(server, request: dict, path: str = "/v1/chat/completions") -> list[dict | str]:
    """The chunks of a stream, parsed; ``[DONE]`` as the string."""
    with server.http.stream("POST", path, json=request) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines]


def merged(pieces: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Adjacent pieces of the same field joined (chunks may group tokens differently)."""
    out: list[tuple[str, str]] = []
    for key, text in pieces:
        if out and out[-1][0] == key:
            out[-1] = (key, out[-1][1] + text)
        elif text:
            out.append((key, text))
    return out


def test_always_yes_streams_the_answer_while_the_thinker_thinks(server, alone, monkeypatch):
    monkeypatch.setattr(server.engine, "probe_policy", always_yes)
    chunks = sse(server, body(BUDGET, stream=True))
    assert chunks[-1] == "[DONE]"
    first, *middle, final, usage = chunks[:-1]
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first["hogwild"] == {"async": True, "thinkers": 1, "budget": BUDGET}
    pieces, events = [], []
    for chunk in middle:
        assert chunk["object"] == "chat.completion.chunk" and chunk["id"] == first["id"]
        assert chunk["choices"][0]["finish_reason"] is None
        delta = chunk["choices"][0]["delta"]
        assert len(delta) <= 1, delta  # one field per chunk: the order of the two is the order of the events
        pieces += list(delta.items())
        events += chunk.get("hogwild", {}).get("events", [])
    fields = [key for key, _ in pieces]
    assert "content" in fields and "reasoning_content" in fields
    last_thought = len(fields) - 1 - fields[::-1].index("reasoning_content")
    assert fields.index("content") < last_thought  # the answer began while the thinker still thought

    result = final["hogwild"]["result"]
    assert final["choices"][0]["finish_reason"] in ("stop", "length") and final["choices"][0]["delta"] == {}
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == result["tokens_generated"] > 0
    assert usage["usage"]["prompt_tokens"] > 0
    content = "".join(text for key, text in pieces if key == "content")
    thoughts = "".join(text for key, text in pieces if key == "reasoning_content")
    assert [w["name"] for w in result["workers"]] == ["Alice", "Writer"]
    assert thoughts == result["workers"][0]["text"]
    assert content.startswith(result["workers"][1]["text"])  # then the finisher's \boxed{} when it answered
    assert result["answering"]["first_answer_passes"] is not None and result["forward_passes"] <= BUDGET
    types = [e["type"] for e in events]
    assert types[0] == "mode" and "probe" in types and "first_answer_token" in types and types[-1] == "answer"

    # The same run alone, through the Python API: the same tokens in the same order.
    expected = [("content" if e.role == "writer" else "reasoning_content", e.text)
                for e in alone if isinstance(e, TokenEvent)]
    solo = alone[-1].result
    writer_text = solo.answering["text"]
    boxed = f"\\boxed{{{solo.answer}}}" if solo.answered_by == "finisher" else ""
    assert content.startswith(writer_text) and content[len(writer_text) :].strip() == boxed
    assert merged(pieces) == merged([*expected, ("content", content[len(writer_text) :])])
    assert wait_idle(server.http)["cache_bytes"] == server.idle_bytes


def test_always_no_the_finisher_answers_at_the_budget(server, monkeypatch):
    monkeypatch.setattr(server.engine, "probe_policy", always_no)
    response = server.http.post("/v1/chat/completions", json=body(6))
    assert response.status_code == 200, response.text
    reply = response.json()
    choice, extra = reply["choices"][0], reply["hogwild"]
    assert extra["answered_by"] == "finisher" and extra["forward_passes"] == 6 and extra["layout"] == "answering"
    assert extra["workers"][1] == {"name": "Writer", "text": ""}  # the writer never started
    assert choice["message"]["content"] == f"\\boxed{{{extra['answer']}}}" and choice["finish_reason"] == "length"
    assert choice["message"]["reasoning_content"] == extra["workers"][0]["text"] != ""
    metrics = extra["answering"]
    assert metrics["first_answer_passes"] is None and metrics["answer_tokens"] == 0
    assert 1 <= metrics["probe_passes"] <= 6 and extra["thinkers"] == 1


def test_a_client_that_goes_away_frees_the_session(server, monkeypatch):
    monkeypatch.setattr(server.engine, "probe_policy", always_no)  # the thinkers think on: a long run
    before = wait_idle(server.http)
    with server.http.stream("POST", "/v1/chat/completions", json=body(1000, stream=True, thinkers=2)) as response:
        thoughts = 0
        for line in response.iter_lines():
            thoughts += '"reasoning_content"' in line
            if thoughts >= 4:
                break
        during = server.http.get("/health").json()
        assert during["live_sessions"] == 1 and during["cache_bytes"] > server.idle_bytes
    after = wait_idle(server.http, timeout=30)
    assert after["cache_bytes"] == server.engine.runner.cache.nbytes() == server.idle_bytes
    assert after["cancelled"] == before["cancelled"] + 1 and after["finished"] == before["finished"]


def test_an_async_request_batched_beside_a_hogwild_one_gets_what_it_gets_alone(server, reference, alone,
                                                                              monkeypatch):
    monkeypatch.setattr(server.engine, "probe_policy", always_yes)
    passes = []
    forward = server.engine.runner.forward

    def recording_forward(steps, *args, **kwargs):
        passes.append({block.name for step in steps for block in step.view})
        return forward(steps, *args, **kwargs)

    monkeypatch.setattr(server.engine.runner, "forward", recording_forward)
    hogwild = {"messages": [{"role": "user", "content": "What is 3 + 5?"}], "max_tokens": 4, "seed": 0,
               "hogwild": {"workers": 2}}
    with ThreadPoolExecutor(2) as pool:
        answering, solved = pool.map(lambda b: server.http.post("/v1/chat/completions", json=b).json(),
                                     [body(BUDGET), hogwild])
    monkeypatch.undo()
    assert any({"thinker prompt", "prompt"} <= names for names in passes)  # one pass held rows of both
    assert wait_idle(server.http)["cache_bytes"] == server.idle_bytes

    solo = reference.solve("What is 3 + 5?", workers=2, budget=4, seed=0)
    assert solved["hogwild"]["workers"] == [{"name": w.name, "text": w.text} for w in solo.workers]
    assert solved["choices"][0]["message"]["content"] == (solo.answer or "")
    result = alone[-1].result
    assert answering["hogwild"]["workers"] == [{"name": w.name, "text": w.text} for w in result.workers]
    assert answering["choices"][0]["message"]["content"].startswith(result.answering["text"])
    assert answering["hogwild"]["answer"] == result.answer


def test_stop_cuts_the_streamed_answer_of_a_text_completion(server, alone, monkeypatch):
    """Text completions stream the writer's text as ``text`` and the thoughts as ``reasoning_content``;
    ``stop`` cuts the answer, never the thoughts."""
    monkeypatch.setattr(server.engine, "probe_policy", always_yes)
    result = alone[-1].result
    written = result.answering["text"]
    assert len(written.lstrip()) > 8, written
    stop = written.lstrip()[4:8]
    request = {"prompt": PROBLEM, "max_tokens": BUDGET, "seed": 0, "stream": True, "stop": stop,
               "hogwild": {"async": True}}
    chunks = sse(server, request, "/v1/completions")
    assert chunks[-1] == "[DONE]" and all(c["object"] == "text_completion" for c in chunks[:-1])
    choices = [c["choices"][0] for c in chunks[:-1]]
    assert "".join(c["text"] for c in choices) == written[: written.index(stop)]
    assert "".join(c.get("reasoning_content", "") for c in choices) == result.workers[0].text
    assert choices[-1]["finish_reason"] == "stop"


HI = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.mark.parametrize("request_body, message", [
    ({**HI, "hogwild": {"async": True, "thinkers": 9}}, "hogwild.thinkers: Input should be less than or equal to 8"),
    ({**HI, "hogwild": {"async": True, "thinkers": -1}}, "hogwild.thinkers: Input should be greater than or equal"),
    ({**HI, "hogwild": {"async": True, "thinkers": "2"}}, "hogwild.thinkers"),
    ({**HI, "hogwild": {"async": True, "thinkers": 1.0}}, "hogwild.thinkers"),
    ({**HI, "hogwild": {"async": "yes"}}, "hogwild.async: Input should be a valid boolean"),
    ({**HI, "hogwild": {"async": 1}}, "hogwild.async: Input should be a valid boolean"),
    ({**HI, "hogwild": {"thinkers": 2}}, "hogwild.thinkers: applies only with hogwild.async"),
    ({**HI, "hogwild": {"async": True, "workers": 4}}, "hogwild.workers: applies only without hogwild.async"),
    ({**HI, "hogwild": {"async": True, "collab_stats": True}}, "hogwild.collab_stats"),
    ({**HI, "max_tokens": 0, "hogwild": {"async": True}}, "at least 1"),
    ({**HI, "max_tokens": 5000, "hogwild": {"async": True}}, "beyond the context"),
    ({**HI, "n": 2, "hogwild": {"async": True}}, "n must be 1"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                   {"role": "user", "content": "and?"}], "hogwild": {"async": True}}, "no conversation context"),
])
def test_bad_values_are_refused_by_name(server, request_body, message):
    assert_openai_error(server.http.post("/v1/chat/completions", json=request_body), 400, message)


def test_stop_holds_back_what_could_begin_a_stop_sequence():
    cut = StopCut(("END", "zz"))
    assert [cut.feed(p) for p in ["ab", "cE", "N", "x", "y", "E", "ND more", "after"]] == [
        "ab", "c", "", "ENx", "y", "", "", ""]
    assert cut.sent == "abcENxy" and cut.stopped
