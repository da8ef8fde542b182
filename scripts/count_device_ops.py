"""Device operations per decode pass on the triton backend, with and without the lean decoder.

Each operation is one kernel on a GPU (one node of a replayed CUDA graph), so the count is a
hardware-independent proxy for what a decode step pays beyond reading the weights. Counted: the
aten ops that reach the dispatcher and do work (views and allocations left out) and the Triton
launches (the fused kernels, two per attention call); the work Triton's interpreter does inside a
launch on the CPU is not counted. Runs on the CPU in seconds:

    .venv/bin/python scripts/count_device_ops.py --layers 2,4 --workers 4

Prints one line per (layers, lean) and the per-layer slope, from which a model of any depth follows.
"""

from __future__ import annotations

import argparse
import collections
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import hogwild  # noqa: F401 - sets TRITON_INTERPRET=1 on a machine without CUDA
import hogwild.layers.lean as lean
import hogwild.layers.triton_attention as triton_attention
from hogwild import Runner, WorkerStep
from hogwild.models import RANDOM_CONFIGS, random_model

#: Dispatcher ops that launch no kernel.
NO_KERNEL = {"view", "_unsafe_view", "t", "transpose", "expand", "slice", "select", "alias", "detach", "unsqueeze",
             "as_strided", "empty", "empty_like", "empty_strided", "lift_fresh", "reshape", "split"}


class Counter(TorchDispatchMode):
    """Counts aten ops, and Triton launches announced with ``launch``; not inside a launch."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.inside = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.inside and not func.is_view and name not in NO_KERNEL:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def launch(self, name: str, kernels: int):
        if self.inside:
            yield
            return
        self.ops[f"triton:{name}"] += kernels
        self.inside = True
        try:
            yield
        finally:
            self.inside = False


def counting(counter: Counter, module, name: str, kernels: int = 1) -> None:
    """Wrap ``module.name`` so that each call counts as ``kernels`` launches."""
    function = getattr(module, name)

    def wrapped(*args, **kwargs):
        with counter.launch(name, kernels):
            return function(*args, **kwargs)

    setattr(module, name, wrapped)


def count(counter: Counter, layers: int, workers: int, dtype: torch.dtype, use_lean: bool) -> collections.Counter:
    RANDOM_CONFIGS["count"] = dict(RANDOM_CONFIGS["tiny-qwen2-gqa7"], num_hidden_layers=layers)
    model = random_model("count", dtype=dtype)
    runner = Runner.for_model(model, "triton", kv_memory=16 << 20, lean=use_lean)
    cache = runner.cache
    prompt = cache.new_block("prompt", capacity=40)
    runner.prefill([prompt], list(range(1, 41)))
    steps = [WorkerStep([5], [prompt, cache.new_block(f"w{i}")]) for i in range(workers)]
    runner.forward(steps)  # the first pass of a shape: not counted
    counter.ops = collections.Counter()
    with counter:
        runner.forward(steps)
    return counter.ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", default="2,4", help="comma-separated layer counts (default 2,4)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    dtype = getattr(torch, args.dtype)
    counter = Counter()
    for module, name, kernels in [(lean, "rms_norm", 1), (lean, "rope_store", 1), (lean, "silu_mul", 1),
                                  (lean, "triton_attention", 2), (triton_attention, "triton_attention", 2)]:
        counting(counter, module, name, kernels)
    for use_lean in (False, True):
        totals = []
        for n in layers:
            ops = count(counter, n, args.workers, dtype, use_lean)
            totals.append(sum(ops.values()))
            print(f"lean={use_lean} layers={n}: {totals[-1]} device ops per decode pass: {dict(ops.most_common())}")
        if len(layers) > 1:
            slope = (totals[-1] - totals[0]) / (layers[-1] - layers[0])
            print(f"lean={use_lean}: {slope:g} per layer + {totals[0] - slope * layers[0]:g} per pass")


if __name__ == "__main__":
    main()
