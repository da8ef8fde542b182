"""Decode passes replayed as CUDA graphs (backends that capture: triton on CUDA).

A decode pass feeds one token per row. Everything it reads that changes from pass to pass (input
ids, positions, the slot mapping and the attention metadata: work items, pair rotations, page
tables) sits in static device buffers that are refilled in place before ``graph.replay()``; one
graph is captured per bucket of rows (1, 2, 4, 8, ...) and of attention work items, after a
warm-up that also compiles the Triton kernels. The captured region covers the decoder and the
LM head; sampling runs after it on the device, so a pass ends with one small copy to the host
(the sampled tokens). Passes that fit no bucket (prefill, step headers) run the same kernels
eagerly. The graph runner knows no backend internals: the backend provides the static buffers
(``AttentionBackend.static_buffers``) and the work-item bound of a pass (``work_items``).
"""

from __future__ import annotations

import logging
import time

import torch

from ..layers.attention import PassPlan

log = logging.getLogger(__name__)

#: Rows of a captured decode pass; a pass runs in the smallest bucket that holds its rows.
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
#: Entries of one row's view a captured pass allows (layouts use at most 2 x workers + 4).
MAX_ENTRIES = 48


def bucket(n: int, sizes) -> int | None:
    """The smallest size >= n, or None."""
    return next((s for s in sizes if s >= n), None)


class Bucket:
    """One captured decode pass of ``rows`` rows and ``items`` work items, with or without
    attention statistics (``collab_stats``): its static buffers, its graph and its output (logits
    [rows, vocab] float32)."""

    def __init__(self, runner, rows: int, items: int, collab_stats: bool = False):
        model = runner.model
        self.rows, self.items = rows, items
        self.input_ids = torch.zeros(rows, 1, dtype=torch.long, device=model.device)
        self.position_ids = torch.zeros(rows, 1, dtype=torch.long, device=model.device)
        self.static = runner.attention.static_buffers(runner.cache, rows, items, model.groups, model.max_positions,
                                                      MAX_ENTRIES, model.num_layers, collab_stats)
        self.collab_stats = collab_stats
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def fill(self, runner, steps) -> None:
        """Plan the pass into the static buffers (host work plus a few host-to-device copies)."""
        plan = runner.plan(steps, static=self.static, collab_stats=self.collab_stats)
        ids = [s.token_ids[0] for s in steps] + [0] * (self.rows - len(steps))
        positions = [row.start for row in plan.rows] + [0] * (self.rows - len(steps))
        self.input_ids.copy_(torch.tensor(ids)[:, None], non_blocking=True)
        self.position_ids.copy_(torch.tensor(positions)[:, None], non_blocking=True)
        self.plan = plan

    def run(self, runner) -> torch.Tensor:
        """The decode pass over the static buffers (what the graph captures)."""
        hidden = runner.hidden_states(self.input_ids, self.position_ids, self.plan)
        return runner.model.logits(hidden[:, -1])


class DecodeGraphs:
    """CUDA graphs of decode passes for one Runner; ``fits`` says whether a pass can replay one."""

    def __init__(self, runner, capture: bool | None = None):
        """capture: record and replay CUDA graphs (default: on CUDA); without it every pass runs
        eagerly over the same static buffers, which is how the planner is tested on the CPU."""
        self.runner = runner
        self.capture = runner.model.device.type == "cuda" if capture is None else capture
        self.buckets: dict[tuple[int, int], Bucket] = {}
        self.pool = None
        self.capture_s = 0.0

    def fits(self, steps) -> bool:
        if len(steps) > ROW_BUCKETS[-1] or any(len(s.token_ids) != 1 for s in steps):
            return False
        return all(len(s.view) <= MAX_ENTRIES for s in steps)

    def forward(self, steps, collab_stats: bool = False) -> tuple[torch.Tensor, PassPlan]:
        """One decode pass by graph replay: logits [len(steps), vocab] float32, and the pass's plan
        (with collab_stats, its ``stats`` hold the pass's attention shares once the replay is done;
        such passes have graphs of their own)."""
        rows = bucket(len(steps), ROW_BUCKETS)
        items = bucket(self.runner.attention.work_items([s.view for s in steps], self.runner.model.groups),
                       [64 << i for i in range(20)])
        key = (rows, items, collab_stats)
        entry = self.buckets.get(key)
        if entry is None:
            entry = self.buckets[key] = Bucket(self.runner, rows, items, collab_stats)
        entry.fill(self.runner, steps)
        if not self.capture:
            return entry.run(self.runner)[: len(steps)], entry.plan
        if entry.graph is None:
            self._capture(entry)
            if collab_stats:  # the warm-up passes added to the statistics: this pass's start from zero
                entry.static.stats.zero_()
        entry.graph.replay()
        return entry.logits[: len(steps)].clone(), entry.plan

    def _capture(self, entry: Bucket) -> None:
        """Warm up (compiles the kernels, checks every layer writes the cache), then capture."""
        start = time.perf_counter()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                entry.run(self.runner)  # the warm-up passes write the same K/V the replay will
        torch.cuda.current_stream().wait_stream(stream)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            entry.logits = entry.run(self.runner)
        entry.graph = graph
        self.capture_s += time.perf_counter() - start
        log.info("captured a decode graph for %d rows, %d work items (%.2f s)", entry.rows, entry.items,
                 time.perf_counter() - start)
