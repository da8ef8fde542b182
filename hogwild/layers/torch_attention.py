"""The torch backend: concurrent attention in plain PyTorch (the default on the CPU).

For each (row, view entry) pair the query is rotated by ``offset(own) - offset(entry)`` with one
batched matmul by precomputed rotation matrices (the softmax scale folded in). Pairs are grouped by
the block they read. A large block (more than ``gather_below`` keys) forms its own group: its K/V
are read once (in place when its slots are one run) and every pair's query is scored against them
in one ``bmm`` (so a shared prompt costs the same for 1 or 16 workers). Small blocks are gathered
into one tensor per layer per set of rows that read them (copying a few small blocks costs less
than a round of kernel launches per block). Each group yields per-pair partial outputs with their
max and sum-exp; pairs are merged per row with log-sum-exp, as flash-decoding does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..cache import Block, SharedCache
from ..rope import rotation
from .attention import FEATURES, AttentionBackend, AttentionStats, PassPlan, StaticBuffers, ViewEntry


@dataclass
class Group:
    """Pairs (row, entry) that read the same keys; their queries are pairs start:end of the pass.

    segments: the blocks read, each with how many of its keys (several small blocks are gathered
    into one tensor per layer, a large block is read in place when its slots are one run); mask:
    additive [pairs, 1, T, key_len] float32 (0 or -inf), or None when every key is visible to
    every pair; slots: the pool slots of the keys when they are gathered, None when read in place.
    """

    segments: list[tuple[Block, int]]
    start: int
    end: int
    mask: torch.Tensor | None
    cache: SharedCache
    slots: torch.Tensor | None = None
    allowed: torch.Tensor | None = None  # bool [pairs, T, key_len] on the host: the mask without a window
    query_pos: torch.Tensor | None = None  # [pairs, T]: each query's position relative to its pair's entry
    key_start: torch.Tensor | None = None  # [pairs]: where the pair's block begins among the group's keys
    window_masks: dict = field(default_factory=dict)

    def mask_for(self, window: int | None) -> torch.Tensor | None:
        """The additive mask of a layer with this sliding window (None: full attention), built once
        per window and pass: keys more than window - 1 positions before the query are hidden too."""
        if window is None:
            return self.mask
        if window not in self.window_masks:
            keys = torch.arange(self.key_len)[None, :] - self.key_start[:, None]  # [pairs, key_len]
            allowed = self.allowed & (keys[:, None, :] > self.query_pos[:, :, None] - window)
            mask = None
            if not bool(allowed.all()):
                mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill_(~allowed, float("-inf"))
                mask = mask[:, None].to(self.cache.device)
            self.window_masks[window] = mask
        return self.window_masks[window]

    @property
    def key_len(self) -> int:
        return sum(n for _, n in self.segments)

    def keys_values(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of this layer: [kv_heads, key_len, head_dim] (a view when read in place)."""
        if self.slots is None:
            block, n = self.segments[0]
            return self.cache.read(block, layer, n)
        return self.cache.keys[layer].index_select(1, self.slots), self.cache.values[layer].index_select(1, self.slots)


def rotation_matrices(inv_freq: torch.Tensor, deltas: list[int], scaling: float, head_dim: int | None = None
                      ) -> torch.Tensor:
    """R [pairs, D, D] with x @ R = scaling * rotate(x, delta): one batched matmul per layer.

    Built on the CPU in float64 (planning is host work); the caller moves R to the device.
    head_dim D > 2 * len(inv_freq) = R: partial rotary, the last D - R dims pass through (identity).
    """
    cos, sin = rotation(inv_freq.cpu(), torch.tensor(deltas), torch.float64)  # [P, R]
    R = cos.shape[-1]
    D = head_dim or R
    half = torch.eye(R, dtype=torch.float64).roll(R // 2, dims=1)  # x @ half = (x2, x1)
    half[R // 2 :] *= -1  # x @ half = (-x2, x1) = rotate_half(x)
    out = torch.eye(D, dtype=torch.float64).repeat(len(deltas), 1, 1)
    out[:, :R, :R] = torch.diag_embed(cos) + half[None] * sin[:, None, :]
    return scaling * out


def by_reader_rows(blocks: list[list[tuple[int, ViewEntry]]]) -> list[list[list[tuple[int, ViewEntry]]]]:
    """Cluster blocks (each given as the pairs that read it) so that no row reads two clusters.

    Rows of unrelated sessions in one pass then never score each other's (masked) keys: the cost
    of a gathered group grows with its rows times its keys, not with the whole pass squared.
    """
    root = {}

    def find(i: int) -> int:
        while root.setdefault(i, i) != i:
            i = root[i]
        return i

    for pairs in blocks:
        for i, _ in pairs:
            root[find(i)] = find(pairs[0][0])
    clusters: dict[int, list] = {}
    for pairs in blocks:
        clusters.setdefault(find(pairs[0][0]), []).append(pairs)
    return list(clusters.values())


@dataclass
class TorchMeta:
    """The torch backend's metadata of a pass: groups (``Group``), pair_row [pairs] long (the row of
    each pair, in group order; ``pair_row_list`` the same on the host), rotations (one [pairs, D, D]
    per RoPE table, in the query dtype, scale folded in) and, with collab_stats, token_weight
    [pairs, T] (1 / n_new for real tokens, 0 for padding)."""

    groups: list[Group]
    pair_row: torch.Tensor
    pair_row_list: list[int]
    rotations: list[torch.Tensor]
    token_weight: torch.Tensor | None = None


class TorchBackend(AttentionBackend):
    """Plain PyTorch; runs every model feature. gather_below: blocks of at most this many keys are
    gathered into one group per set of rows that read them."""

    name = "torch"
    features = frozenset(FEATURES)

    def __init__(self, gather_below: int = 256):
        self.gather_below = gather_below

    def prepare(self, plan: PassPlan, groups: int, static: StaticBuffers | None, collab_stats: bool) -> TorchMeta:
        by_block: dict[int, list[tuple[int, ViewEntry]]] = {}
        for i, row in enumerate(plan.rows):
            for entry in row.entries:
                if entry.visible > 0:
                    by_block.setdefault(entry.block.id, []).append((i, entry))
        small = [pairs for pairs in by_block.values() if max(e.visible for _, e in pairs) <= self.gather_below]
        large = [pairs for pairs in by_block.values() if max(e.visible for _, e in pairs) > self.gather_below]
        clusters = [[pairs] for pairs in large] + by_reader_rows(small)
        cache, device = plan.cache, plan.cache.device
        pair_row: list[int] = []
        deltas: list[int] = []
        group_list = [_group(plan, cluster, pair_row, deltas) for cluster in clusters]
        # One set of rotations per distinct RoPE table; layer l uses rotations[cache.layer_rope[l]].
        rotations = [rotation_matrices(table, deltas, plan.scaling, cache.head_dim).to(plan.dtype).to(device)
                     for table in cache.host_rope_tables]
        meta = TorchMeta(group_list, torch.tensor(pair_row, device=device), pair_row, rotations)
        if collab_stats:
            index = {id(e): j for row in plan.rows for j, e in enumerate(row.entries)}
            pairs = [(i, index[id(e)]) for cluster in clusters for block_pairs in cluster for i, e in block_pairs]
            n_new = torch.tensor([plan.rows[i].n_new for i, _ in pairs], dtype=torch.float32)
            real = torch.arange(plan.T)[None, :] < n_new[:, None]
            meta.token_weight = (real / n_new[:, None]).to(device)
            plan.stats = AttentionStats(torch.zeros(cache.num_layers, len(pairs), device=device), pairs)
        return meta

    def forward(self, plan, layer, query, key, value, scaling, window=None, sinks=None, softcap=None):
        return concurrent_attention(plan, layer, query, key, window, sinks, softcap)


def _group(plan: PassPlan, cluster: list[list[tuple[int, ViewEntry]]], pair_row: list[int],
           deltas: list[int]) -> Group:
    """One group reading the blocks of ``cluster`` (each: the pairs that read one block); appends
    its pairs' rows and rotation deltas."""
    t = torch.arange(plan.T)
    start = len(pair_row)
    segments = [(pairs[0][1].block, max(e.visible for _, e in pairs)) for pairs in cluster]
    total = sum(n for _, n in segments)
    allowed, positions, starts = [], [], []
    key_start = 0
    for pairs, (_, key_len) in zip(cluster, segments, strict=True):
        keys = torch.arange(total) - key_start  # local key index within this block's segment
        for i, entry in pairs:
            row = plan.rows[i]
            delta = row.own_offset - entry.offset
            pair_row.append(i)
            deltas.append(delta)
            # Query t sits at local position start + t (padding repeats the last real token).
            query_pos = row.start + torch.clamp(t, max=row.n_new - 1) + delta
            allowed.append((keys >= 0) & (keys < entry.visible) & (keys[None, :] <= query_pos[:, None]))
            positions.append(query_pos)
            starts.append(key_start)
        key_start += key_len
    allowed = torch.stack(allowed)  # [pairs, T, total]
    device = plan.cache.device
    mask = None
    if not bool(allowed.all()):
        mask = torch.zeros(allowed.shape, dtype=torch.float32)
        mask.masked_fill_(~allowed, float("-inf"))
        mask = mask[:, None].to(device)
    slots = None
    if len(segments) > 1 or segments[0][0].contiguous(segments[0][1]) is None:
        slots = torch.tensor([s for block, n in segments for s in block.slots(0, n)], device=device)
    return Group(segments, start, len(pair_row), mask, plan.cache, slots, allowed,
                 torch.stack(positions), torch.tensor(starts))


def concurrent_attention(plan: PassPlan, layer: int, query: torch.Tensor, key: torch.Tensor,
                         window: int | None = None, sinks: torch.Tensor | None = None,
                         softcap: float | None = None) -> torch.Tensor:
    """Attention of B rows over their views (``TorchMeta`` in ``plan.meta``). query: [B, Hq, T, D];
    key: [B, Hkv, T, D], the new tokens (already written to their blocks by the cache; only its head
    count is read); returns [B, T, Hq, D]."""
    meta: TorchMeta = plan.meta
    B, Hq, T, D = query.shape
    Hkv = key.shape[1]
    G = Hq // Hkv
    P = meta.pair_row.numel()
    # Rotate (and scale) every pair's queries in one batched matmul: [P, Hq*T, D] @ [P, D, D].
    rotation = meta.rotations[plan.cache.layer_rope[layer]]
    q = torch.bmm(query.index_select(0, meta.pair_row).view(P, Hq * T, D), rotation)
    q = q.view(P, Hkv, G, T, D)

    outs, maxes, sums = [], [], []
    for g in meta.groups:
        n = g.end - g.start
        qb = q[g.start : g.end].transpose(0, 1).reshape(Hkv, n * G * T, D)
        keys, values = g.keys_values(layer)  # [Hkv, L, D], read once for all n pairs
        L = keys.shape[1]
        scores = torch.bmm(qb, keys.transpose(1, 2)).float()  # [Hkv, n*G*T, L]
        if softcap:
            scores = torch.tanh(scores / softcap).mul_(softcap)
        mask = g.mask_for(window)
        if mask is not None:
            scores.view(Hkv, n, G, T, L).add_(mask)
        m = scores.amax(-1, keepdim=True)
        if window is not None:  # a window can hide a whole block from a token: no keys, m = -inf
            m.clamp_(min=-1e30)  # exp(-inf - m) = 0 then, and the merge gives the pair no weight
        scores.sub_(m).exp_()
        sums.append(scores.sum(-1).view(Hkv, n, G, T))
        maxes.append(m.view(Hkv, n, G, T))
        outs.append(torch.bmm(scores.to(values.dtype), values).float().view(Hkv, n, G, T, D))

    if sinks is None and len(meta.groups) == 1 and P == B and meta.pair_row_list == list(range(B)):
        out = outs[0] / sums[0][..., None]  # one pair per row, in row order: nothing to merge
        if plan.stats is not None:
            plan.stats.stats[layer].fill_(1.0)  # each row's one pair holds all of its mass
    else:  # merge the pairs of each row with log-sum-exp (flash-decoding style)
        m, s, o = torch.cat(maxes, 1), torch.cat(sums, 1), torch.cat(outs, 1)  # pairs on dim 1
        index = meta.pair_row.view(1, P, 1, 1).expand_as(m)
        row_max = m.new_full((Hkv, B, G, T), float("-inf")).scatter_reduce_(1, index, m, "amax")
        if sinks is not None:  # the sink logit joins each row's softmax denominator once, with no value
            sink = sinks.float().view(Hkv, 1, G, 1)
            row_max = torch.maximum(row_max, sink)
        weight = torch.exp(m - row_max.index_select(1, meta.pair_row))
        total = s.new_zeros((Hkv, B, G, T)).index_add_(1, meta.pair_row, s * weight)
        if sinks is not None:
            total += torch.exp(sink - row_max)
        out = o.new_zeros((Hkv, B, G, T, D)).index_add_(1, meta.pair_row, o * weight[..., None])
        out = out / total[..., None]
        if plan.stats is not None:  # pair p's share of its row's mass: s_p exp(m_p - M_r) / S_r
            share = (s * weight / total.index_select(1, meta.pair_row)).sum((0, 2))  # [P, T]
            plan.stats.stats[layer] = (share * meta.token_weight).sum(1) / Hq
    return out.permute(1, 3, 0, 2, 4).reshape(B, T, Hq, D).to(query.dtype)


