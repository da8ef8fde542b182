"""The server on a tiny random-weight model with a small K/V pool: a session that does not fit
next to the running one waits in the queue and runs once it finished; one that could never fit
the whole pool gets 400 at once; collaboration stats stream as "who reads whom" events."""

from __future__ import annotations

import json
import threading
import time

import pytest
from test_server_support import (  # noqa: F401
    assert_openai_error,
    events_of,
    health,
    one_torch_thread,
    served,
    tiny_model,
    wait_for,
    wait_idle,
)

from hogwild.engine.engine import Engine
from hogwild.engine.session import SolveConfig

PROBLEM = "What is 12 * 7?"
BUDGET = 40
PASS_DELAY_S = 0.02  # each pass of the tiny model takes at least this long: a run lasts about a second


@pytest.fixture(scope="module")
def tiny(model, tmp_path_factory):
    return tiny_model(model, tmp_path_factory.mktemp("tiny"))


def body(budget: int = BUDGET, **hogwild) -> dict:
    return {"messages": [{"role": "user", "content": PROBLEM}], "max_tokens": budget, "stream": True,
            "hogwild": {"workers": 2, **hogwild}}


def read_stream(http, payload: dict, out: list) -> None:
    with http.stream("POST", "/v1/chat/completions", json=payload) as r:
        out.append(r.status_code)
        out.extend(line for line in r.iter_lines() if line)


def test_a_full_pool_makes_a_new_session_wait_and_an_oversize_one_gets_400(tiny, monkeypatch):
    bound = Engine(tiny).session(PROBLEM, SolveConfig(2, "combined", BUDGET)).token_bound()
    bytes_per_token = Engine(tiny, kv_memory=1 << 20).runner.cache.bytes_per_token
    with served(tiny, max_sessions=4, queue_size=4, kv_memory=bytes_per_token * bound * 3 // 2) as srv:
        capacity = srv.engine.runner.cache.capacity_tokens
        assert bound <= capacity < 2 * bound  # one session fits, two do not
        forward = srv.engine.runner.forward

        def slow_forward(*args, **kwargs):
            time.sleep(PASS_DELAY_S)
            return forward(*args, **kwargs)

        monkeypatch.setattr(srv.engine.runner, "forward", slow_forward)
        first, second = [], []
        threads = [threading.Thread(target=read_stream, args=(srv.http, body(), out)) for out in (first, second)]
        threads[0].start()
        wait_for(lambda: health(srv.http)["live_sessions"] == 1, 30, "the first session to run")
        threads[1].start()
        waiting = wait_for(lambda: (h := health(srv.http))["queued"] == 1 and h, 30, "the second to queue")
        assert waiting["live_sessions"] == 1, waiting
        for t in threads:
            t.join(120)
        for out in (first, second):
            assert out[0] == 200 and out[-1] == "data: [DONE]", out[-3:]
            assert not any(line.startswith('data: {"error"') for line in out[1:]), out[-3:]
            finals = [json.loads(x[6:]) for x in out[1:] if x.startswith("data: {") and '"finish_reason": "' in x]
            assert finals and finals[-1]["hogwild"]["result"]["forward_passes"] >= 1
        stats = wait_idle(srv.http)
        assert stats["finished"] == 2 and stats["failed"] == 0, stats
        assert stats["max_batch_rows"] == 2, stats  # never both sessions (2 workers each) in one pass
        assert stats["cache_bytes"] == srv.idle_bytes

        t0 = time.perf_counter()
        oversize = srv.http.post("/v1/chat/completions", json={**body(3 * BUDGET), "stream": False})
        error = assert_openai_error(oversize, 400, str(capacity))
        assert error["code"] == "kv_cache_too_small" and "K/V cache" in error["message"], error
        assert time.perf_counter() - t0 < 5
        after = health(srv.http)
        assert after["queued"] == after["live_sessions"] == 0 and after["failed"] == 0, after


def collab_events(out: list) -> list[dict]:
    """The collaboration events of a stream read by ``read_stream`` (its status first)."""
    lines = out
    return [e for line in lines[1:] for e in events_of(line) if e["type"] == "collaboration"]


def test_collab_stats_stream_who_reads_whom(tiny):
    with served(tiny, max_sessions=2, queue_size=2) as srv:
        on, off = [], []
        threads = [threading.Thread(target=read_stream, args=(srv.http, payload, out)) for payload, out in (
            ({**body(8, collab_stats=True), "seed": 1}, on), ({**body(8, workers=3), "seed": 1}, off))]
        for t in threads:  # batched together: only one of the two asked for the stats
            t.start()
        for t in threads:
            t.join(120)
        assert on[0] == off[0] == 200 and on[-1] == off[-1] == "data: [DONE]"
        assert collab_events(off) == []
        names = json.loads(on[1][6:])["hogwild"]["workers"]
        events = collab_events(on)
        result = json.loads(next(x for x in on[1:] if '"result": {' in x)[6:])["hogwild"]["result"]
        assert 1 <= len(events) <= result["forward_passes"]
        for event in events:
            assert event["names"] == names == ["Alice", "Bob"]
            assert len(event["matrix"]) == 2 and all(len(row) == 2 for row in event["matrix"])
            for reader, row in zip(names, event["matrix"], strict=True):
                shares = event["shares"][reader]
                total = shares["prompt"] + shares["history"] + shares["protocol"] + shares["own"]
                assert abs(total + sum(shares["others"].values()) - 1) < 1e-3, shares
                assert row[names.index(reader)] == round(shares["own"], 4)
                other = next(n for n in names if n != reader)
                assert row[names.index(other)] == round(shares["others"][other], 4)
        assert set(result["collaboration"]["attention"]) == set(names)
        assert wait_idle(srv.http)["failed"] == 0
        plain = srv.http.post("/v1/chat/completions", json={**body(4), "stream": False}).json()
        assert set(plain["hogwild"]["collaboration"]) == {"duplication"}


def test_a_lost_tensor_parallel_rank_ends_the_requests_with_503_and_stops_the_server(tiny, monkeypatch):
    import torch.distributed as dist

    from hogwild.distributed import TPGroup

    with served(tiny, max_sessions=1, queue_size=2) as srv:
        # Rank 0's group without torchrun: its control channel fails as it does when a rank is gone.
        group = TPGroup.__new__(TPGroup)
        group.rank, group.timeout, group.control, group.failed = 0, 0.4, None, None
        group._lock, group._stopped, group._last_sent = threading.Lock(), False, 0.0
        calls = []
        group.on_failure = lambda message: calls.append(message) or srv.srv.server.scheduler.fail(message)
        forward = srv.engine.runner.forward
        monkeypatch.setattr(srv.engine.runner, "forward", lambda *a, **k: time.sleep(PASS_DELAY_S) or forward(*a, **k))
        running, queued = [], []
        threads = [threading.Thread(target=read_stream, args=(srv.http, body(2000), out)) for out in (running, queued)]
        threads[0].start()
        wait_for(lambda: health(srv.http)["live_sessions"] == 1, 30, "the first session to run")
        threads[1].start()
        wait_for(lambda: health(srv.http)["queued"] == 1, 30, "the second to queue")

        def gone(*args, **kwargs):
            raise RuntimeError("Connection closed by peer")

        monkeypatch.setattr(dist, "broadcast_object_list", gone)
        group._heartbeat()  # pings, finds the rank gone, calls the hook once and returns
        assert len(calls) == 1 and "rank is gone" in calls[0] and group.failed == calls[0]
        for t in threads:
            t.join(30)
        for out in (running, queued):
            assert out[0] == 200 and out[-1] == "data: [DONE]", out[-3:]
            error = json.loads(out[-2][6:])["error"]
            assert error["code"] == "engine_failed" and error["type"] == "server_error", error
        refused = srv.http.post("/v1/chat/completions", json=body(4))
        assert assert_openai_error(refused, 503, "rank is gone")["code"] == "engine_failed"  # with Retry-After
        status = srv.http.get("/health")
        assert status.status_code == 503 and status.json()["status"] == "failed"

        t0 = time.monotonic()
        srv.srv.server.fail(calls[0])  # what ``hogwild serve`` sets as the hook: the above, then exit
        srv.srv.thread.join(20)
        assert not srv.srv.thread.is_alive() and srv.srv.server.failed == calls[0]
        assert time.monotonic() - t0 < 20
