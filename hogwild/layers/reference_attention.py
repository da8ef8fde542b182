"""The reference backend: the spec that every fast path is tested against.

Each row's view is materialised (keys re-rotated from block-local positions to view positions,
``rotate_by``) and attended with plain masked softmax. It copies the whole view every layer: for
tests (``Runner.forward(..., reference=True)``) and the benchmark's "materialize" column.
"""

from __future__ import annotations

import torch

from ..cache import SharedCache
from ..rope import rotate_by
from .attention import FEATURES, AttentionBackend, AttentionStats, PassPlan, Row, StaticBuffers


class ReferenceBackend(AttentionBackend):
    """Materialised views and plain softmax; runs every model feature."""

    name = "reference"
    features = frozenset(FEATURES)

    def prepare(self, plan: PassPlan, groups: int, static: StaticBuffers | None, collab_stats: bool) -> None:
        if collab_stats:
            pairs = [(i, j) for i, row in enumerate(plan.rows) for j, e in enumerate(row.entries) if e.visible > 0]
            plan.stats = AttentionStats(torch.zeros(plan.cache.num_layers, len(pairs), device=plan.cache.device),
                                        pairs)
        return None

    def forward(self, plan, layer, query, key, value, scaling, window=None, sinks=None, softcap=None):
        return reference_attention(plan, layer, query, key, scaling, window, sinks, softcap)


def materialize_view(row: Row, layer: int, cache: SharedCache) -> tuple[torch.Tensor, torch.Tensor]:
    """A row's view as one sequence: keys [Hkv, S, D] re-rotated to view positions (with the layer's
    RoPE table), values [Hkv, S, D]."""
    keys, values = [], []
    for entry in row.entries:
        k, v = cache.read(entry.block, layer, entry.visible)
        keys.append(rotate_by(k, cache.rope(layer), entry.offset))
        values.append(v)
    return torch.cat(keys, 1), torch.cat(values, 1)


def reference_attention(plan: PassPlan, layer: int, query: torch.Tensor, key: torch.Tensor, scaling: float,
                        window: int | None = None, sinks: torch.Tensor | None = None,
                        softcap: float | None = None) -> torch.Tensor:
    """The spec: per row, materialise the view and run plain causal softmax attention. query
    [B, Hq, T, D], key [B, Hkv, T, D] (the new tokens, already stored; only its head count is
    read) -> [B, T, Hq, D].

    With a sliding window W a query at view position p sees the keys at view positions in (p - W, p];
    sinks add one logit per query head to the softmax (a column with no value); a soft-cap c maps
    every score s to c * tanh(s / c) before masking.
    """
    B, Hq, T, D = query.shape
    G = Hq // key.shape[1]
    out = torch.zeros(B, T, Hq, D, dtype=query.dtype, device=query.device)
    for i, row in enumerate(plan.rows):
        keys, values = materialize_view(row, layer, plan.cache)
        keys = keys.repeat_interleave(G, 0).float()  # [Hq, S, D]
        values = values.repeat_interleave(G, 0).float()
        positions = row.own_offset + row.start + torch.arange(row.n_new, device=query.device)
        q = rotate_by(query[i, :, : row.n_new].float(), plan.cache.rope(layer), row.own_offset)
        # A key at view position j is visible if it is before the query; entries hide unseen tokens.
        view_pos = torch.cat(
            [e.offset + torch.arange(e.visible, device=query.device) for e in row.entries]
        )
        allowed = view_pos[None, :] <= positions[:, None]
        if window is not None:
            allowed &= view_pos[None, :] > positions[:, None] - window
        scores = (q @ keys.transpose(1, 2)) * scaling
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        scores = scores.masked_fill(~allowed, float("-inf"))
        if sinks is not None:  # one more column per head: the sink's logit, its value zero
            sink = sinks.float().view(Hq, 1, 1).expand(Hq, row.n_new, 1)
            probs = torch.cat([scores, sink], -1).softmax(-1)[..., :-1]
        else:
            probs = scores.softmax(-1)  # [Hq, n_new, S]
        out[i, : row.n_new] = (probs @ values).transpose(0, 1).to(query.dtype)
        if plan.stats is not None:  # each entry's share: its keys' probabilities, mean over heads and tokens
            mass = probs.mean((0, 1)).split([e.visible for e in row.entries])
            for p, (r, j) in enumerate(plan.stats.pairs):
                if r == i:
                    plan.stats.stats[layer, p] = mass[j].sum()
    return out
