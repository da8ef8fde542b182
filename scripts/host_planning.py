"""Host time to plan one decode pass for the triton backend's CUDA graphs (``plan_pass`` into a
bucket's static buffers: rows, slot mapping, ``build_meta``, ``DeviceMeta.fill``), on the CPU.

On a GPU this host work runs before each graph replay, while the GPU waits, so it adds to every
decode step. The pool here has Qwen2.5-7B's attention shape (28 layers, 4 K/V heads, GQA 7,
head_dim 128); N workers each read ``[prompt, own block]`` as in ``hogwild bench``. No K/V is
computed: planning only reads block lengths and pages.

    .venv/bin/python scripts/host_planning.py --context 8192 --workers 1,4,8

Prints the best of 7 rounds of CPU time per plan (CPU time: other processes on the machine
change it less than wall time).
"""

from __future__ import annotations

import argparse
import time

import torch

import hogwild  # noqa: F401 - sets TRITON_INTERPRET=1 on a machine without CUDA
from hogwild.cache import SharedCache
from hogwild.engine.graphs import MAX_ENTRIES, ROW_BUCKETS, bucket
from hogwild.engine.runner import WorkerStep, plan_pass
from hogwild.layers.triton_backend import TritonBackend

LAYERS, KV_HEADS, GROUPS, HEAD_DIM = 28, 4, 7, 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--workers", default="1,4,8")
    args = parser.parse_args()
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, HEAD_DIM, 2).double() / HEAD_DIM))
    cache = SharedCache(LAYERS, KV_HEADS, HEAD_DIM, inv_freq.float(), torch.bfloat16, "cpu",
                        capacity_tokens=args.context + 8 * 1024)
    prompt = cache.new_block("prompt")
    cache.reserve(prompt, args.context)
    cache.commit(prompt, [1] * args.context)
    for n in (int(x) for x in args.workers.split(",")):
        own = [cache.new_block(f"worker{i}") for i in range(n)]
        for block in own:
            cache.reserve(block, 64)
            cache.commit(block, [1] * 40)
        rows = bucket(n, ROW_BUCKETS)
        backend = TritonBackend()
        static = backend.static_buffers(cache, rows, 256, GROUPS, 32768, MAX_ENTRIES, LAYERS, collab_stats=False)
        steps = [WorkerStep([5], [prompt, block]) for block in own]
        best = float("inf")
        for _ in range(7):
            start = time.process_time()
            for _ in range(200):
                plan_pass(steps, cache, 0.1, torch.bfloat16, 40000, backend, GROUPS, static=static)
            best = min(best, (time.process_time() - start) / 200)
        print(f"N={n} L={args.context}: {1e6 * best:.0f} us of CPU time per decode-pass plan")
        for block in own:
            cache.free(block)


if __name__ == "__main__":
    main()
