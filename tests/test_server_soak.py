"""A bounded soak test (about a minute and a half) on a tiny random-weight model: rounds of mixed
valid, invalid, cancelled and concurrent requests. Nothing ever gets a 5xx; after each round no
session is live and the K/V bytes are back to idle; the process's memory (RSS) does not grow from
round to round beyond noise, and no session or job object outlives its request. The same client
threads and connections serve every round, so that the client's own memory stays put.

Measured on the 2-core CPU: 27 rounds of 24 requests in 75 s; RSS 667 MiB after the first round,
674 MiB from round 17 on."""

from __future__ import annotations

import gc
import json
import random
import statistics
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest
from test_server_support import LONG, events_of, one_torch_thread, served, tiny_model, wait_idle  # noqa: F401

from hogwild.engine.session import Session
from hogwild.server.scheduler import Job

SOAK_SECONDS = 75  # rounds start until then
MIN_ROUNDS = 5
WARM_UP_ROUNDS = 2
MB = 1 << 20
MESSAGES = [{"role": "user", "content": "What is 12 * 7?"}]
BAD = [
    b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
    b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}',
    b'{"messages": [{"role": "user", "content": "hi"}], "seed": 18446744073709551616}',
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "8"}',
    b'{"messages": [{"role": "user", "content": "hi"}], "hogwild": {"workers": 99}}',
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}',
    b"{not json",
    json.dumps({"messages": [{"role": "user", "content": "apple " * 400_000}]}).encode(),  # 2.4 MB problem
    json.dumps({"messages": MESSAGES, "junk": "x" * (5 * MB)}).encode(),  # over the body limit
]


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    with served(tiny_model(model, tmp_path_factory.mktemp("tiny")), max_sessions=4, queue_size=32) as server:
        yield server


def valid(rng: random.Random) -> dict:
    return {"messages": MESSAGES, "max_tokens": rng.randint(2, 12), "seed": rng.randrange(2**64),
            "temperature": rng.choice([0, 0.7, 1.3]),
            "hogwild": {"workers": rng.randint(1, 4), "layout": rng.choice(["combined", "interleaved", "independent"])}}


def stream(http: httpx.Client, body) -> int:
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        lines = [x for x in r.iter_lines() if x]
    assert lines[-1] == "data: [DONE]" and not any(x.startswith('data: {"error"') for x in lines), lines[-3:]
    return r.status_code


def complete(http: httpx.Client, body) -> int:
    return http.post("/v1/chat/completions", json=body).status_code


def cancel_stream(http: httpx.Client, body) -> int:
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if any(e["type"] == "token" for e in events_of(line)):
                break
    return r.status_code


def give_up(http: httpx.Client, body) -> int:
    try:
        return http.post("/v1/chat/completions", json=body, timeout=httpx.Timeout(10, read=0.3)).status_code
    except httpx.ReadTimeout:
        return 0  # the client went away: the server cancels


def bad(http: httpx.Client, body) -> int:
    return http.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}).status_code


def round_of_requests(http: httpx.Client, pool: ThreadPoolExecutor, rng: random.Random) -> list[int]:
    """One round: everything at once over the client threads; returns every status."""
    calls = [(stream, valid(rng)) for _ in range(6)] + [(complete, valid(rng)) for _ in range(4)]
    calls += [(cancel_stream, LONG) for _ in range(3)] + [(give_up, {**LONG, "stream": False}) for _ in range(2)]
    calls += [(bad, body) for body in BAD]
    rng.shuffle(calls)
    return list(pool.map(lambda call: call[0](http, call[1]), calls))


@pytest.mark.slow
def test_soak(server):
    gc.collect()
    before = weakref.WeakSet(o for o in gc.get_objects() if type(o) in (Session, Job))
    rng, process = random.Random(14), psutil.Process()
    rss, statuses, start = [], [], time.monotonic()
    pool, http = ThreadPoolExecutor(8), server.http  # the same client threads and connections each round
    while len(rss) < MIN_ROUNDS or time.monotonic() - start < SOAK_SECONDS:
        statuses += round_of_requests(http, pool, rng)
        stats = wait_idle(server.http, 60)
        assert stats["cache_bytes"] == server.idle_bytes == server.engine.runner.cache.nbytes(), stats
        rss.append(process.memory_info().rss)
    pool.shutdown()
    assert all(s < 500 for s in statuses), sorted(set(statuses))
    assert statuses.count(200) >= 13 * len(rss) and statuses.count(0) == 2 * len(rss)
    final = wait_idle(server.http)
    assert final["failed"] == 0 and final["live_sessions"] == final["queued"] == 0
    assert final["finished"] == 10 * len(rss) and final["cancelled"] == 5 * len(rss)
    # No session or job of these requests outlives its request (objects that earlier tests in this
    # process left behind are not the server's: ``before``). /health can report a request done a
    # moment before the scheduler thread and the event loop have dropped their last local
    # references to it: wait for that (a leak never goes away, so it still fails here).
    for _ in range(50):
        gc.collect()
        left = [o for o in gc.get_objects() if type(o) in (Session, Job) and o not in before]
        if not left:
            break
        time.sleep(0.1)
    assert not left
    # Memory: after the warm-up rounds, no growth beyond noise, neither in total nor as a trend.
    later = [r / MB for r in rss[WARM_UP_ROUNDS - 1 :]]
    slope = statistics.linear_regression(range(len(later)), later).slope
    assert max(later) - later[0] < 32 and slope < 2, f"RSS by round (MiB): {[round(x) for x in later]}"
