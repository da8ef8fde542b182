"""Concurrent attention: every worker reads its view of shared blocks, with rotated queries.

One forward pass carries B rows (workers), each with up to T new tokens (right-padded). A row's
view is an ordered list of ``ViewEntry`` (a block at an offset); its own block is the last entry.
Keys are stored at block-local positions, and the model has already rotated the new queries and
keys at their local positions in the writer's block. For entry e the query is rotated further
by ``delta = offset(own) - offset(e)``, so that its position relative to e's keys is the one it
has in the view.

Per layer, transformers hands the attention function what the layer needs beyond plain causal
attention, and every backend here reads it from there (``layer_options``): ``sliding_window`` W
(a query at view position p sees only keys at view positions in (p - W, p], across every block of
its view: per (pair, token) a visible key range [lo, hi) instead of a length), ``s_aux`` (gpt-oss
attention sinks: a learned per-head logit that joins the softmax denominator once per row) and
``softcap`` (Gemma 2: scores become ``softcap * tanh(score / softcap)`` before the mask). The
RoPE table is the layer's own (``SharedCache.rope``): Gemma 3's local and global layers differ.

``PassPlan`` precomputes, once per pass, everything that does not depend on the layer: the
(row, entry) pairs grouped by block, their rotations and their masks. Then, per layer:

- ``concurrent_attention`` (the fast path) reads each block's K/V once for all the rows that
  see it (their rotated queries are batched against it), keeps per-pair softmax statistics and
  merges them per row with log-sum-exp, as flash-decoding does;
- ``reference_attention`` (the spec) materialises each row's view with keys re-rotated to view
  positions and runs ordinary masked softmax attention. It copies the whole cache every layer:
  use it for tests and as the "materialize" column of the benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..cache import Block, SharedCache
from .rope import rotate_by, rotation
from .tiles import block_m as triton_block_m


@dataclass
class ViewEntry:
    """One occurrence of a block in a row's view during one pass.

    offset: position of the block's first token in the view; visible: how many of the block's
    tokens the row sees: its length before the pass plus the tokens its writer is fed in this pass
    (same-pass visibility; for the own block they are seen causally).
    """

    block: Block
    offset: int
    visible: int


def layer_options(kwargs: dict) -> tuple[int | None, torch.Tensor | None, float | None]:
    """(sliding window, sinks [q_heads], logit soft-cap) of the layer being run, from the keyword
    arguments transformers passes to the attention function (None: not used by this layer)."""
    return kwargs.get("sliding_window"), kwargs.get("s_aux"), kwargs.get("softcap")


@dataclass
class Row:
    """One worker in one pass: new tokens go to ``entries[-1].block`` from local ``start`` on."""

    entries: list[ViewEntry]
    start: int
    n_new: int

    @property
    def write(self) -> Block:
        return self.entries[-1].block

    @property
    def own_offset(self) -> int:
        return self.entries[-1].offset

    def key_range(self, entry: ViewEntry, t: int, window: int | None = None) -> tuple[int, int]:
        """The local keys [lo, hi) of ``entry`` that new token t (0 <= t < n_new) sees: keys before it
        in the view, and with a window W only those at view positions in (p - W, p]."""
        p = self.start + t + self.own_offset - entry.offset  # the query's position relative to entry
        lo = 0 if window is None else max(0, p - window + 1)
        return lo, max(lo, min(entry.visible, p + 1))


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
class StaticBuffers:
    """Device buffers that a captured (CUDA graph) pass reads, refilled in place before each replay.

    slot_mapping: [rows * T] long; meta: the triton backend's ``DeviceMeta`` of the same rows;
    for passes with attention statistics (collab_stats), stats: float32 [layers, pair capacity]
    (zeroed before each pass) and pc_pair: int32 [pc capacity] (see ``AttentionStats``).
    """

    slot_mapping: torch.Tensor
    meta: object
    stats: torch.Tensor | None = None
    pc_pair: torch.Tensor | None = None


@dataclass
class AttentionStats:
    """Where a pass's attention statistics go (``PassPlan(collab_stats=True)``).

    stats: float32 [layers, pairs] on the device, zeroed per pass: each layer stores, for every
    pair, the share of its row's attention mass that falls on the pair's entry, averaged over the
    query heads and the row's real tokens (the shares of a row sum to 1 in every layer). pairs:
    (row, entry index) of each column, in the backend's pair order. pc_pair: int32 [pcs], the pair
    of each triton pair-chunk (None for the other backends).
    """

    stats: torch.Tensor
    pairs: list[tuple[int, int]]
    pc_pair: torch.Tensor | None = None

    def row_shares(self, rows: list[Row]) -> list[torch.Tensor]:
        """Per row, float32 [layers, entries] on the host (entries it cannot see get 0): the pass's one read."""
        sizes = [len(row.entries) for row in rows]
        first = [sum(sizes[:i]) for i in range(len(rows))]
        column = torch.tensor([first[i] + j for i, j in self.pairs], dtype=torch.long)
        stats = self.stats.cpu()
        shares = torch.zeros(stats.shape[0], sum(sizes)).index_add_(1, column, stats)
        return list(shares.split(sizes, 1))


#: Attention backends: "torch" (the fast path in plain PyTorch), "triton" (one fused kernel per
#: layer, hogwild/layers/triton_attention.py) and "reference" (the spec, materialised views).
BACKENDS = ("torch", "triton", "reference")

#: Keys per work item of the triton backend (an 8k block with 4 K/V heads: 32 x 4 = 128 programs).
TRITON_CHUNK = 256


#: The pool slot that padded positions of a pass write to (page 0 is never given to a block).
PAD_SLOT = 0


class PassPlan:
    """Per-pass attention metadata shared by every layer (passed explicitly as ``hogwild_plan``).

    rows: the B rows of the batch; T: padded new tokens per row; cache: the shared cache the
    blocks live in; scaling: softmax scale; dtype: of queries; backend: one of ``BACKENDS``;
    slot_mapping: [B * T] long, the pool slot of every new token (row-major; padding writes to
    ``PAD_SLOT``). The torch backend's groups: blocks with at most ``gather_below`` keys are
    gathered into one group per set of rows that read them, e.g. per session (copying a few small
    blocks costs less than a round of kernel launches per block). collab_stats: every layer also
    stores each (row, entry) pair's share of the row's attention mass in ``stats``
    (``AttentionStats``), from the merge's statistics; off, ``stats`` is None and nothing is added.
    """

    def __init__(
        self,
        rows: list[Row],
        cache: SharedCache,
        scaling: float,
        dtype: torch.dtype,
        backend: str = "torch",
        groups: int = 1,
        gather_below: int = 256,
        static: StaticBuffers | None = None,
        collab_stats: bool = False,
    ):
        self.rows = rows
        self.cache = cache
        self.stats: AttentionStats | None = None  # collab_stats: attention shares per (row, entry)
        self.backend = backend
        self.reference = backend == "reference"
        self.T = max(r.n_new for r in rows)
        self.scaling = scaling
        device = cache.device
        slots = []
        for row in rows:
            slots += row.write.slots(row.start, row.start + row.n_new) + [PAD_SLOT] * (self.T - row.n_new)
        if static is None:
            self.slot_mapping = torch.tensor(slots, dtype=torch.long).to(device, non_blocking=True)
        else:  # a captured pass: refill its buffer in place, padding rows write to the padding slot
            slots += [PAD_SLOT] * (static.slot_mapping.numel() - len(slots))
            static.slot_mapping.copy_(torch.tensor(slots, dtype=torch.long), non_blocking=True)
            self.slot_mapping = static.slot_mapping
        if backend == "triton":
            from .triton_attention import DeviceMeta, build_meta

            # One rotation table per distinct RoPE table (layer l reads cache.layer_rope[l]); partial
            # rotary: the dims past 2 * len(inv_freq) pass through.
            host = build_meta(rows, self.T, groups, cache.page_size, cache.rotation_rows, TRITON_CHUNK,
                              triton_block_m(groups), cache.head_dim)
            if static is None:
                self.triton = DeviceMeta.from_host(host, groups * cache.num_kv_heads, device)
            else:
                static.meta.fill(host)
                self.triton = static.meta
            if collab_stats:
                self.stats = self._triton_stats(host, static)
            return
        if backend == "reference":
            if collab_stats:
                pairs = [(i, j) for i, row in enumerate(rows) for j, e in enumerate(row.entries) if e.visible > 0]
                self.stats = AttentionStats(torch.zeros(cache.num_layers, len(pairs), device=device), pairs)
            return

        by_block: dict[int, list[tuple[int, ViewEntry]]] = {}
        for i, row in enumerate(rows):
            for entry in row.entries:
                if entry.visible > 0:
                    by_block.setdefault(entry.block.id, []).append((i, entry))
        small = [pairs for pairs in by_block.values() if max(e.visible for _, e in pairs) <= gather_below]
        large = [pairs for pairs in by_block.values() if max(e.visible for _, e in pairs) > gather_below]
        clusters = [[pairs] for pairs in large] + by_reader_rows(small)

        self.pair_row_list: list[int] = []
        deltas: list[int] = []
        self.groups = []
        for cluster in clusters:
            self.groups.append(self._group(cluster, deltas, device))
        self.pair_row = torch.tensor(self.pair_row_list, device=device)
        # One set of rotations per distinct RoPE table; layer l uses rotations[cache.layer_rope[l]].
        self.rotations = [rotation_matrices(table, deltas, scaling, cache.head_dim).to(dtype).to(device)
                          for table in cache.host_rope_tables]
        self.rotation = self.rotations[0]
        if collab_stats:
            self.stats = self._torch_stats(clusters, device)

    def _torch_stats(self, clusters: list[list[list[tuple[int, ViewEntry]]]], device) -> AttentionStats:
        """The torch backend's stats buffer, its pairs, and per pair the weights [P, T] of its tokens
        (1 / n_new of the row for real tokens, 0 for padding)."""
        index = {id(e): j for row in self.rows for j, e in enumerate(row.entries)}
        pairs = [(i, index[id(e)]) for cluster in clusters for block_pairs in cluster for i, e in block_pairs]
        n_new = torch.tensor([self.rows[i].n_new for i, _ in pairs], dtype=torch.float32)
        real = torch.arange(self.T)[None, :] < n_new[:, None]
        self.token_weight = (real / n_new[:, None]).to(device)
        return AttentionStats(torch.zeros(self.cache.num_layers, len(pairs), device=device), pairs)

    def _triton_stats(self, host, static: StaticBuffers | None) -> AttentionStats:
        """The triton backend's stats buffer: pairs in ``build_meta``'s order and each pc's pair (in
        the static buffers of a captured pass, refilled in place). A pair's entry is the one at
        offset ``own - (qstart - start)`` among the row's non-empty entries (their offsets differ)."""
        row, qstart, pc0, chunks = host.pairs[:, 0], host.pairs[:, 2], host.pairs[:, 4], host.pairs[:, 5]
        pairs = []
        for r, q in zip(row.tolist(), qstart.tolist(), strict=True):
            x = self.rows[r]
            offset = x.own_offset - (q - x.start)
            pairs.append((r, next(j for j, e in enumerate(x.entries) if e.offset == offset and e.visible > 0)))
        pc_pair = np.zeros(len(host.pc_tlo), dtype=np.int32)
        for p, (first, n) in enumerate(zip(pc0.tolist(), chunks.tolist(), strict=True)):
            pc_pair[first : first + n] = p
        device = self.cache.device
        if static is None:
            return AttentionStats(torch.zeros(self.cache.num_layers, len(pairs), device=device), pairs,
                                  torch.from_numpy(pc_pair).to(device))
        if static.stats is None or static.pc_pair is None:
            raise ValueError("these static buffers hold no attention statistics (a bucket made without collab_stats)")
        static.stats.zero_()
        static.pc_pair[: len(pc_pair)].copy_(torch.from_numpy(pc_pair), non_blocking=True)
        return AttentionStats(static.stats[:, : len(pairs)], pairs, static.pc_pair)

    def _group(self, cluster: list[list[tuple[int, ViewEntry]]], deltas: list[int], device) -> Group:
        """One group reading the blocks of ``cluster`` (each: the pairs that read one block)."""
        t = torch.arange(self.T)
        start = len(self.pair_row_list)
        segments = [(pairs[0][1].block, max(e.visible for _, e in pairs)) for pairs in cluster]
        total = sum(n for _, n in segments)
        allowed, positions, starts = [], [], []
        key_start = 0
        for pairs, (_, key_len) in zip(cluster, segments, strict=True):
            keys = torch.arange(total) - key_start  # local key index within this block's segment
            for i, entry in pairs:
                row = self.rows[i]
                delta = row.own_offset - entry.offset
                self.pair_row_list.append(i)
                deltas.append(delta)
                # Query t sits at local position start + t (padding repeats the last real token).
                query_pos = row.start + torch.clamp(t, max=row.n_new - 1) + delta
                allowed.append((keys >= 0) & (keys < entry.visible) & (keys[None, :] <= query_pos[:, None]))
                positions.append(query_pos)
                starts.append(key_start)
            key_start += key_len
        allowed = torch.stack(allowed)  # [pairs, T, total]
        mask = None
        if not bool(allowed.all()):
            mask = torch.zeros(allowed.shape, dtype=torch.float32)
            mask.masked_fill_(~allowed, float("-inf"))
            mask = mask[:, None].to(device)
        slots = None
        if len(segments) > 1 or segments[0][0].contiguous(segments[0][1]) is None:
            slots = torch.tensor([s for block, n in segments for s in block.slots(0, n)], device=device)
        return Group(segments, start, len(self.pair_row_list), mask, self.cache, slots, allowed,
                     torch.stack(positions), torch.tensor(starts))


def concurrent_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    hogwild_plan: PassPlan | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention of B rows over their views. query: [B, Hq, T, D]; returns [B, T, Hq, D].

    ``key`` and ``value`` (the new tokens) were already written to the blocks by the cache.
    A sliding window, sinks and a soft-cap come in ``kwargs`` (``layer_options``).
    """
    plan = hogwild_plan
    if plan is None:
        raise RuntimeError("hogwild attention needs a PassPlan (hogwild_plan=...)")
    layer = module.layer_idx
    window, sinks, softcap = layer_options(kwargs)
    B, Hq, T, D = query.shape
    Hkv = key.shape[1]
    G = Hq // Hkv
    P = plan.pair_row.numel()

    # Rotate (and scale) every pair's queries in one batched matmul: [P, Hq*T, D] @ [P, D, D].
    rotation = plan.rotations[plan.cache.layer_rope[layer]]
    q = torch.bmm(query.index_select(0, plan.pair_row).view(P, Hq * T, D), rotation)
    q = q.view(P, Hkv, G, T, D)

    outs, maxes, sums = [], [], []
    for g in plan.groups:
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

    if sinks is None and len(plan.groups) == 1 and P == B and plan.pair_row_list == list(range(B)):
        out = outs[0] / sums[0][..., None]  # one pair per row, in row order: nothing to merge
        if plan.stats is not None:
            plan.stats.stats[layer].fill_(1.0)  # each row's one pair holds all of its mass
    else:  # merge the pairs of each row with log-sum-exp (flash-decoding style)
        m, s, o = torch.cat(maxes, 1), torch.cat(sums, 1), torch.cat(outs, 1)  # pairs on dim 1
        index = plan.pair_row.view(1, P, 1, 1).expand_as(m)
        row_max = m.new_full((Hkv, B, G, T), float("-inf")).scatter_reduce_(1, index, m, "amax")
        if sinks is not None:  # the sink logit joins each row's softmax denominator once, with no value
            sink = sinks.float().view(Hkv, 1, G, 1)
            row_max = torch.maximum(row_max, sink)
        weight = torch.exp(m - row_max.index_select(1, plan.pair_row))
        total = s.new_zeros((Hkv, B, G, T)).index_add_(1, plan.pair_row, s * weight)
        if sinks is not None:
            total += torch.exp(sink - row_max)
        out = o.new_zeros((Hkv, B, G, T, D)).index_add_(1, plan.pair_row, o * weight[..., None])
        out = out / total[..., None]
        if plan.stats is not None:  # pair p's share of its row's mass: s_p exp(m_p - M_r) / S_r
            share = (s * weight / total.index_select(1, plan.pair_row)).sum((0, 2))  # [P, T]
            plan.stats.stats[layer] = (share * plan.token_weight).sum(1) / Hq
    return out.permute(1, 3, 0, 2, 4).reshape(B, T, Hq, D).to(query.dtype), None


def materialize_view(row: Row, layer: int, cache: SharedCache) -> tuple[torch.Tensor, torch.Tensor]:
    """A row's view as one sequence: keys [Hkv, S, D] re-rotated to view positions (with the layer's
    RoPE table), values [Hkv, S, D]."""
    keys, values = [], []
    for entry in row.entries:
        k, v = cache.read(entry.block, layer, entry.visible)
        keys.append(rotate_by(k, cache.rope(layer), entry.offset))
        values.append(v)
    return torch.cat(keys, 1), torch.cat(values, 1)


def reference_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    hogwild_plan: PassPlan | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The spec: per row, materialise the view and run plain causal softmax attention.

    With a sliding window W a query at view position p sees the keys at view positions in (p - W, p];
    sinks add one logit per query head to the softmax (a column with no value); a soft-cap c maps
    every score s to c * tanh(s / c) before masking.
    """
    plan = hogwild_plan
    if plan is None:
        raise RuntimeError("hogwild attention needs a PassPlan (hogwild_plan=...)")
    window, sinks, softcap = layer_options(kwargs)
    B, Hq, T, D = query.shape
    G = Hq // key.shape[1]
    out = torch.zeros(B, T, Hq, D, dtype=query.dtype, device=query.device)
    for i, row in enumerate(plan.rows):
        keys, values = materialize_view(row, module.layer_idx, plan.cache)
        keys = keys.repeat_interleave(G, 0).float()  # [Hq, S, D]
        values = values.repeat_interleave(G, 0).float()
        positions = row.own_offset + row.start + torch.arange(row.n_new, device=query.device)
        q = rotate_by(query[i, :, : row.n_new].float(), plan.cache.rope(module.layer_idx), row.own_offset)
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
                    plan.stats.stats[module.layer_idx, p] = mass[j].sum()
    return out, None
