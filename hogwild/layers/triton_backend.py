"""The triton backend: two fused Triton launches per layer for all rows, capturable in CUDA graphs.

The kernels and their metadata live in ``triton_attention`` (imported on first use, so an install
without triton can still import every backend's description). Per pass, ``prepare`` lays the rows
out on the host (``build_meta``) and copies them into fixed-capacity device buffers
(``DeviceMeta``): fresh ones for an eager pass, the captured pass's own for a replay.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import torch

from ..cache import Block, SharedCache
from .attention import FEATURES, PAD_SLOT, AttentionBackend, AttentionStats, PassPlan, StaticBuffers
from .tiles import block_m

#: Keys per work item (an 8k block with 4 K/V heads: 32 x 4 = 128 programs).
CHUNK = 256


def kernels():
    """The kernel module (``triton_attention``), imported on first use: it needs the triton package."""
    from . import triton_attention

    return triton_attention


class TritonBackend(AttentionBackend):
    """Fused Triton kernels (the default on CUDA; on the CPU they run in Triton's interpreter)."""

    name = "triton"
    features = frozenset(FEATURES)
    capture = True
    fused_decoder = True

    def unavailable(self, device: torch.device) -> str | None:
        if importlib.util.find_spec("triton") is None:
            return "it needs the triton package (pip install triton)"
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "on the CPU it runs in Triton's interpreter: set TRITON_INTERPRET=1"
        return None

    def prepare(self, plan: PassPlan, groups: int, static: StaticBuffers | None, collab_stats: bool):
        k, cache = kernels(), plan.cache
        # One rotation table per distinct RoPE table (layer l reads cache.layer_rope[l]); partial
        # rotary: the dims past 2 * len(inv_freq) pass through.
        host = k.build_meta(plan.rows, plan.T, groups, cache.page_size, cache.rotation_rows, CHUNK, block_m(groups),
                            cache.head_dim)
        if static is None:
            meta = k.DeviceMeta.from_host(host, groups * cache.num_kv_heads, cache.device)
        else:
            static.meta.fill(host)
            meta = static.meta
        if collab_stats:
            plan.stats = self._stats(plan, host, static)
        return meta

    @staticmethod
    def _stats(plan: PassPlan, host, static: StaticBuffers | None) -> AttentionStats:
        """The stats buffer: pairs in ``build_meta``'s order and each pc's pair (in the static buffers
        of a captured pass, refilled in place). A pair's entry is the one at offset ``own - (qstart -
        start)`` among the row's non-empty entries (their offsets differ)."""
        row, qstart, pc0, chunks = host.pairs[:, 0], host.pairs[:, 2], host.pairs[:, 4], host.pairs[:, 5]
        pairs = []
        for r, q in zip(row.tolist(), qstart.tolist(), strict=True):
            x = plan.rows[r]
            offset = x.own_offset - (q - x.start)
            pairs.append((r, next(j for j, e in enumerate(x.entries) if e.offset == offset and e.visible > 0)))
        pc_pair = np.zeros(len(host.pc_tlo), dtype=np.int32)
        for p, (first, n) in enumerate(zip(pc0.tolist(), chunks.tolist(), strict=True)):
            pc_pair[first : first + n] = p
        cache = plan.cache
        if static is None:
            return AttentionStats(torch.zeros(cache.num_layers, len(pairs), device=cache.device), pairs,
                                  torch.from_numpy(pc_pair).to(cache.device))
        if static.stats is None or static.pc_pair is None:
            raise ValueError("these static buffers hold no attention statistics (a bucket made without collab_stats)")
        static.stats.zero_()
        static.pc_pair[: len(pc_pair)].copy_(torch.from_numpy(pc_pair), non_blocking=True)
        return AttentionStats(static.stats[:, : len(pairs)], pairs, static.pc_pair)

    def forward(self, plan, layer, query, key, value, scaling, window=None, sinks=None, softcap=None):
        shares = None if plan.stats is None else (plan.stats.pc_pair, plan.stats.stats[layer])
        cache = plan.cache
        return kernels().triton_attention(query, cache.keys[layer], cache.values[layer], plan.meta, scaling, shares,
                                          window=window, sinks=sinks, softcap=softcap, table=cache.layer_rope[layer])

    def static_buffers(self, cache: SharedCache, rows: int, items: int, groups: int, max_positions: int,
                       max_entries: int, num_layers: int, collab_stats: bool) -> StaticBuffers:
        chunks = -(-max_positions // CHUNK)
        meta = kernels().DeviceMeta.allocate(
            rows=rows, items=items, pairs=rows * max_entries, pcs=rows * (chunks + max_entries),
            pages=cache.num_pages, T=1, q_heads=groups * cache.num_kv_heads, groups=groups,
            head_dim=cache.head_dim, page_size=cache.page_size, device=cache.device, chunk=CHUNK,
            block_m=block_m(groups), rotary=2 * cache.host_inv_freq.shape[-1], tables=len(cache.host_rope_tables),
        )
        static = StaticBuffers(torch.full((rows,), PAD_SLOT, dtype=torch.long, device=cache.device), meta)
        if collab_stats:
            static.stats = torch.zeros(num_layers, meta.caps["pairs"], device=cache.device)
            static.pc_pair = torch.zeros(meta.caps["pcs"], dtype=torch.int32, device=cache.device)
        return static

    def work_items(self, views: list[list[Block]], groups: int) -> int:
        """Per block read, its key chunks (with the pass's token) times the runs of readers that fit one tile."""
        per_tile = block_m(groups) // groups
        readers: dict[int, list] = {}
        for view in views:
            for block in view:
                readers.setdefault(block.id, [block.length + 1, 0])[1] += 1
        return sum(-(-length // CHUNK) * -(-n // per_tile) for length, n in readers.values())
