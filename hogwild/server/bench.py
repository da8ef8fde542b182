"""Continuous batching, measured: the same requests one after another, then all at once.

``python -m hogwild.server.bench`` starts the server in-process on a free port, sends a warm-up
request, then the same N requests (distinct problems, greedy) sequentially and concurrently, in
``--rounds`` rounds (the order alternates), and reports the wall times and the ratio concurrent /
sequential of each round and their median (the issue asks for at most 0.6 with four 2-worker
requests). It also checks that each
concurrent transcript equals its sequential one: batching must not change what a session writes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

PROBLEMS = (
    "What is 12 * 7?",
    "A train travels 60 km in 45 minutes. What is its speed in km/h?",
    "How many positive divisors does 36 have?",
    "Solve for x: 3x + 5 = 20.",
    "What is the sum of the first ten odd numbers?",
    "A rectangle has a perimeter of 30 and a width of 5. What is its area?",
    "What is 2 to the power of 10?",
    "What is the greatest common divisor of 84 and 126?",
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hogwild.server.bench", description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--budget", type=int, default=64, help="max_tokens (forward passes) per request")
    p.add_argument("--rounds", type=int, default=1, help="alternating sequential/concurrent rounds")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--model", default=None)
    args = p.parse_args(argv)

    import httpx
    import torch

    from .. import Engine
    from .app import create_app, serve_in_thread

    if args.threads:
        torch.set_num_threads(args.threads)
    problems = [PROBLEMS[i % len(PROBLEMS)] for i in range(args.requests)]
    engine = Engine.from_pretrained(args.model)
    app = create_app(engine, max_sessions=args.requests, queue_size=args.requests)

    def body(problem: str, budget: int) -> dict:
        return {
            "model": engine.model.name, "messages": [{"role": "user", "content": problem}], "max_tokens": budget,
            "temperature": 0, "seed": 0, "hogwild": {"workers": args.workers},
        }

    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=None) as client:

        def ask(problem: str, budget: int = args.budget) -> dict:
            response = client.post("/v1/chat/completions", json=body(problem, budget))
            response.raise_for_status()
            return response.json()

        ask(problems[0], 4)  # warm-up

        def one_by_one() -> tuple[float, list[dict]]:
            t0 = time.perf_counter()
            out = [ask(q) for q in problems]
            return time.perf_counter() - t0, out

        def all_at_once() -> tuple[float, list[dict]]:
            t0 = time.perf_counter()
            with ThreadPoolExecutor(len(problems)) as pool:
                out = list(pool.map(ask, problems))
            return time.perf_counter() - t0, out

        sequential, concurrent, same = [], [], True
        for round_ in range(args.rounds):  # alternate the order, so that drifting load hits both alike
            if round_ % 2 == 0:
                (t_seq, alone), (t_conc, together) = one_by_one(), all_at_once()
            else:
                (t_conc, together), (t_seq, alone) = all_at_once(), one_by_one()
            sequential.append(t_seq)
            concurrent.append(t_conc)
            same &= all(a["hogwild"]["workers"] == b["hogwild"]["workers"] for a, b in zip(alone, together))
        stats = client.get("/health").json()

    ratios = [c / q for c, q in zip(concurrent, sequential)]
    ratio = statistics.median(ratios)
    report = {
        "model": engine.model.name, "requests": args.requests, "workers": args.workers, "budget": args.budget,
        "torch_threads": torch.get_num_threads(), "sequential_s": [round(t, 2) for t in sequential],
        "concurrent_s": [round(t, 2) for t in concurrent], "ratios": [round(r, 3) for r in ratios],
        "ratio": round(ratio, 3), "same_transcripts": same, "max_batch_rows": stats["max_batch_rows"],
        "cache_bytes_after": stats["cache_bytes"],
    }
    print(f"{args.requests} requests x {args.workers} workers, {args.budget} forward passes each, "
          f"{report['torch_threads']} torch thread(s), {args.rounds} round(s)")
    print(f"sequential {statistics.median(sequential):.2f} s, concurrent {statistics.median(concurrent):.2f} s "
          f"(medians); concurrent/sequential per round {report['ratios']}, median {ratio:.3f} (target <= 0.6); "
          f"transcripts identical: {same}")
    print(json.dumps(report))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
