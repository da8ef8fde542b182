"""Concurrent attention as two fused Triton launches per layer, driven by device metadata.

The pass (rows, their views, their new tokens) is described once on the host by
``build_meta`` and copied into fixed-capacity int32 device tensors (``DeviceMeta``), so the two
launches can be captured in a CUDA graph: their grids come from capacities, unused work items
exit early, and nothing reads a count on the host.

Vocabulary. A *pair* is (row, view entry): the row's queries are rotated by
``delta = offset(own block) - offset(entry)`` and read the entry's block; token t of the row
(0 <= t < n_new) sees key l of the block iff ``l < visible`` and ``l <= qstart + t`` with
``qstart = row.start + delta``. Pairs are numbered block by block, so the readers of a block are
consecutive. A *work item* is (one block, one key chunk [k0, k1) of it, a run of consecutive
pairs reading that block, a run of query tokens [t0, t0 + nt)); it scores every query of the run
against the chunk, loading each key once for all its readers (a shared prompt is read once for
all workers). A *pc* (pair-chunk) is the partial result (max, sum, unnormalised output) of one
pair over one chunk; the pcs of a row are one contiguous range, merged by log-sum-exp.

Launch 1, ``_partial_kernel``, grid (item capacity, kv_heads), 4 warps: tile rows are
(pair, group member, token) of the item, BLOCK_M = ``block_m`` >= 16 of them (padding masked).
Each row's query is rotated by its pair's cos/sin in fp32, split in halves so that the scores are
``q1' k1^T + q2' k2^T``; the chunk is walked in BLOCK_N-key tiles gathered through the page table
(64 keys, 2 pipeline stages, or smaller where the device's shared memory needs it: ``tiles.py``);
online softmax in exp2 with the scale folded in; m, l, acc go to the pc workspace.
Launch 2, ``_merge_kernel``, grid (rows, q_heads, cdiv(T, BLOCK_T)): merges a row's pcs in
(PC_BLOCK pcs x BLOCK_T tokens) = 16 tiles (16 x 1 for decode, 1 x 16 for prefill), skipping
(pc, token) pairs whose token does not reach the chunk, and writes out[b, t, hq, :]; padding
tokens and rows get zeros. Dots run in the K/V dtype with fp32
accumulation (fp32 inputs: IEEE, not TF32); on CPU tensors (the interpreter) every tile is
converted to fp32 first.

Windows, sinks, soft-caps, per-layer and partial RoPE run behind ``tl.constexpr`` flags (with
every flag off the kernels are the plain ones), and with ``collab_stats`` the merge also writes
each pair's share of its row's attention mass (docs/design.md). ``triton_backend.TritonBackend``
is the backend object that plans passes into this module's metadata and calls ``triton_attention``.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from operator import itemgetter

import numpy as np
import torch
import triton
import triton.language as tl

from ..rope import RotationRows
from .attention import Row
from .tiles import DeviceLimits, attention_tiles, device_limits, triton_refusal

#: Columns of the int32 tables (the kernels index them by these positions).
ITEM_FIELDS = ("pair0", "pairs", "t0", "tokens", "k0", "k1", "chunk", "page_base")
PAIR_FIELDS = ("row", "limit", "qstart", "n_new", "pc0", "chunks")
ROW_FIELDS = ("pc_start", "pc_end", "n_new")

_LOG2E = 1.4426950408889634


@dataclass
class HostMeta:
    """One pass's metadata on the host (numpy), as ``build_meta`` lays it out.

    items: int32 [n_items, 8] (``ITEM_FIELDS``), largest chunks first; pairs: int32 [n_pairs, 6]
    (``PAIR_FIELDS``: row index, visible keys, qstart, the row's n_new, first pc, pcs of the
    pair); rows: int32 [n_rows, 3] (``ROW_FIELDS``: the row's pcs are pc_start..pc_end-1);
    pc_tlo: int32 [n_pcs], the first token of its pair that sees the pc's chunk (earlier tokens
    are not written there); pages: int32 [n_pages], the pages of every block read, each block
    once; trig: float32 [n_pairs, 2, head_dim/2], cos and sin of ``delta * inv_freq`` (float64
    angles). With R = ``rotary`` < head_dim (partial rotary) trig is [n_pairs, 2, R/2]; with several
    RoPE tables (one per distinct layer table) it is [tables, n_pairs, 2, R/2]: layer l reads
    ``trig[layer_rope[l]]``. T: padded new tokens per row; the other fields are the settings the pass
    was built for.
    """

    T: int
    groups: int
    head_dim: int
    page_size: int
    chunk: int
    block_m: int
    items: np.ndarray
    pairs: np.ndarray
    rows: np.ndarray
    pc_tlo: np.ndarray
    pages: np.ndarray
    trig: np.ndarray
    rotary: int = 0  # rotary dims R (0: head_dim)
    tables: int = 1  # RoPE tables: trig is [tables, n_pairs, 2, R/2]

    def __post_init__(self):
        self.rotary = self.rotary or self.head_dim


def build_meta(
    rows: list[Row],
    T: int,
    groups: int,
    page_size: int,
    inv_freq,
    chunk: int = 256,
    block_m: int = 64,
    head_dim: int | None = None,
) -> HostMeta:
    """Lay out a pass for the kernels (host work, plain Python and numpy).

    rows: the pass's rows (``Row``, blocks with ``pages``); T: padded new tokens per row; groups:
    query heads per K/V head; page_size: tokens per pool page; inv_freq: [head_dim/2] rotary
    inverse frequencies (host tensor or array), or [tables, R/2] / a list of tables (per-layer RoPE:
    one rotation table each), or a ``RotationRows`` over them (rotations kept from pass to pass, as
    ``SharedCache.rotation_rows``); chunk: keys per work item at most; block_m: query rows per work item
    (a power of two >= 16 and >= groups); head_dim: D when it exceeds the rotary width R = 2 *
    len(inv_freq) (partial rotary: the last D - R dims pass through).
    """
    if block_m < 16 or block_m & (block_m - 1) or groups > block_m:
        raise ValueError(f"block_m must be a power of two >= max(16, groups), got {block_m} for {groups} groups")
    rotations = inv_freq if isinstance(inv_freq, RotationRows) else RotationRows(inv_freq)
    rotary = 2 * rotations.tables.shape[-1]
    head_dim = head_dim or rotary
    if rotary > head_dim or rotary % 2:
        raise ValueError(f"rotary width {rotary} must be even and at most head_dim {head_dim}")
    max_tokens = block_m // groups

    readers: dict = {}  # block -> [(n_new, reach, row index, visible, qstart, delta)]
    for r, row in enumerate(rows):
        own, start, n_new = row.own_offset, row.start, row.n_new
        for e in row.entries:
            delta = own - e.offset
            reach = min(e.visible, start + delta + n_new)  # keys 0..reach-1 are seen by some token
            if reach > 0:
                readers.setdefault(e.block, []).append((n_new, reach, r, e.visible, start + delta, delta))

    pairs, items, pages = [], [], []  # pairs: the readers' tuples above, in the pass's pair order
    for block, infos in readers.items():
        infos.sort(key=itemgetter(0), reverse=True)  # rows with many new tokens first: alike ones share runs
        base = len(pages)
        pages += block.pages[: -(-max(x[1] for x in infos) // page_size)]
        i = 0
        while i < len(infos):
            nt = min(infos[i][0], max_tokens)
            run = infos[i : i + block_m // (groups * nt)]
            p0, i = len(pairs), i + len(run)
            pairs += run
            if run[0][0] <= nt:  # one token tile (decode): it reaches as far as the run
                tiles = [(0, max(x[1] for x in run))]
            else:
                tiles = [(t0, max(min(vis, qs + min(t0 + nt, n)) for n, _, _, vis, qs, _ in run if n > t0))
                         for t0 in range(0, run[0][0], nt)]
            for t0, reach in tiles:
                items += [(p0, len(run), t0, nt, k0, min(k0 + chunk, reach), c, base)
                          for c, k0 in enumerate(range(0, reach, chunk))]
    items.sort(key=lambda it: it[4] - it[5])  # longest first: the tail of the grid is short work

    # pcs numbered row by row (a row's pcs are one range), pair by pair, chunk by chunk.
    table = np.fromiter(chain.from_iterable(pairs), np.int64, 6 * len(pairs)).reshape(-1, 6)
    n_new, row_of, visible, qstart, delta = table[:, 0], table[:, 2], table[:, 3], table[:, 4], table[:, 5]
    n_chunks = -(-table[:, 1] // chunk)
    order = np.argsort(row_of, kind="stable")
    ends = np.cumsum(n_chunks[order])
    pc0 = np.empty_like(n_chunks)
    pc0[order] = ends - n_chunks[order]
    chunk_index = np.arange(ends[-1] if len(ends) else 0) - np.repeat(pc0[order], n_chunks[order])
    pc_tlo = np.maximum(0, chunk_index * chunk - np.repeat(qstart[order], n_chunks[order]))
    row_pcs = np.bincount(row_of, weights=n_chunks, minlength=len(rows)).astype(np.int64)
    row_end = np.cumsum(row_pcs)
    return HostMeta(
        T=T,
        groups=groups,
        head_dim=head_dim,
        page_size=page_size,
        chunk=chunk,
        block_m=block_m,
        items=np.fromiter(chain.from_iterable(items), np.int32, 8 * len(items)).reshape(-1, len(ITEM_FIELDS)),
        pairs=np.stack([row_of, visible, qstart, n_new, pc0, n_chunks], 1).astype(np.int32),
        rows=np.stack([row_end - row_pcs, row_end, [row.n_new for row in rows]], 1).astype(np.int32),
        pc_tlo=pc_tlo.astype(np.int32),
        pages=np.array(pages, dtype=np.int32),
        trig=rotations(delta) if len(rotations.tables) > 1 else rotations(delta)[0],
        rotary=rotary,
        tables=len(rotations.tables),
    )


class DeviceMeta:
    """A pass's metadata in fixed-capacity device tensors, and the partial-result workspaces.

    Made once with ``allocate`` (capacities: rows, work items, pairs, pcs, pages, T) and refilled
    in place by ``fill`` before every pass, so captured launches stay valid. All int32 tables live
    in one buffer: count int32 [1] (work items of the pass; programs past it exit), items
    [items, 8], pairs [pairs, 6], rows [rows, 3] (rows past the pass's have no pcs and get zeros),
    pc_tlo [pcs], pages [pages], and trig float32 [tables, pairs, 2, R/2] (same bytes; R: rotary
    dims, head_dim unless partial; tables: distinct RoPE tables, 1 unless per-layer).
    Workspaces: m, l float32 [pcs, q_heads, T] (running max in log2 units, sum of exp2), acc
    float32 [pcs, q_heads, T, head_dim] (unnormalised output).
    """

    def __init__(self, caps: dict[str, int], q_heads: int, groups: int, head_dim: int, page_size: int,
                 chunk: int, block_m: int, device, rotary: int | None = None, tables: int = 1):
        self.caps = caps
        self.q_heads, self.groups, self.head_dim = q_heads, groups, head_dim
        self.page_size, self.chunk, self.block_m = page_size, chunk, block_m
        self.rotary, self.tables = rotary or head_dim, tables
        half = self.rotary // 2
        sizes = {
            "count": 1,
            "items": caps["items"] * len(ITEM_FIELDS),
            "pairs": caps["pairs"] * len(PAIR_FIELDS),
            "rows": caps["rows"] * len(ROW_FIELDS),
            "pc_tlo": caps["pcs"],
            "pages": caps["pages"],
            "trig": tables * caps["pairs"] * 2 * half,
        }
        offsets, total = {}, 0
        for name, size in sizes.items():
            offsets[name] = total
            total += -(-size // 4) * 4  # 16-byte aligned sections
        self.buffer = torch.zeros(total, dtype=torch.int32, device=device)
        view = {name: self.buffer[offsets[name] : offsets[name] + size] for name, size in sizes.items()}
        self.count = view["count"]
        self.items = view["items"].view(-1, len(ITEM_FIELDS))
        self.pairs = view["pairs"].view(-1, len(PAIR_FIELDS))
        self.rows = view["rows"].view(-1, len(ROW_FIELDS))
        self.pc_tlo, self.pages = view["pc_tlo"], view["pages"]
        self.trig = view["trig"].view(torch.float32).view(tables, -1, 2, half)
        shape = (caps["pcs"], q_heads, caps["T"])
        self.m = torch.empty(shape, dtype=torch.float32, device=device)
        self.l = torch.empty(shape, dtype=torch.float32, device=device)
        self.acc = torch.empty((*shape, head_dim), dtype=torch.float32, device=device)
        self.filled = (0, 0)

    @classmethod
    def allocate(cls, rows: int, items: int, pairs: int, pcs: int, pages: int, T: int, q_heads: int,
                 groups: int, head_dim: int, page_size: int, device, chunk: int = 256, block_m: int = 64,
                 rotary: int | None = None, tables: int = 1) -> DeviceMeta:
        """Buffers for any pass within these capacities (once, before capturing graphs). rotary: the
        rotary dims (default head_dim); tables: distinct RoPE tables (per-layer RoPE: more than 1)."""
        caps = {"rows": rows, "items": items, "pairs": pairs, "pcs": pcs, "pages": pages, "T": T}
        return cls(caps, q_heads, groups, head_dim, page_size, chunk, block_m, device, rotary, tables)

    @classmethod
    def from_host(cls, host: HostMeta, q_heads: int, device) -> DeviceMeta:
        """Exactly sized buffers for one pass, filled (the eager path)."""
        meta = cls.allocate(
            max(1, len(host.rows)), max(1, len(host.items)), max(1, len(host.pairs)), max(1, len(host.pc_tlo)),
            max(1, len(host.pages)), host.T, q_heads, host.groups, host.head_dim, host.page_size, device,
            host.chunk, host.block_m, host.rotary, host.tables,
        )
        meta.fill(host)
        return meta

    def fill(self, host: HostMeta) -> None:
        """Copy a pass's metadata in place (non-blocking host-to-device copies; no host sync).

        Raises ValueError when the pass does not fit the capacities or settings (re-plan, or
        allocate a bigger bucket).
        """
        settings = (host.groups, host.head_dim, host.page_size, host.chunk, host.block_m, host.rotary, host.tables)
        mine = (self.groups, self.head_dim, self.page_size, self.chunk, self.block_m, self.rotary, self.tables)
        if settings != mine:
            raise ValueError(f"pass built for (groups, head_dim, page_size, chunk, block_m, rotary, tables) = "
                             f"{settings}, buffers for {mine}")
        used = {"rows": len(host.rows), "items": len(host.items), "pairs": len(host.pairs),
                "pcs": len(host.pc_tlo), "pages": len(host.pages), "T": host.T}
        over = [f"{k} {n} > {self.caps[k]}" for k, n in used.items() if n > self.caps[k]]
        if over:
            raise ValueError("pass exceeds the metadata capacities: " + ", ".join(over))
        self.filled = (len(host.rows), host.T)  # the pass's rows and tokens, for the launcher's checks
        rows = np.zeros((self.caps["rows"], len(ROW_FIELDS)), dtype=np.int32)
        rows[: len(host.rows)] = host.rows
        copies = [
            (self.count, np.array([len(host.items)], dtype=np.int32)),
            (self.items, host.items),
            (self.pairs, host.pairs),
            (self.rows, rows),
            (self.pc_tlo, host.pc_tlo),
            (self.pages, host.pages),
        ]
        for dst, src in copies:
            if len(src):
                dst[: len(src)].copy_(torch.from_numpy(src), non_blocking=True)
        trig = host.trig if host.tables > 1 else host.trig[None]
        for k in range(host.tables if len(host.pairs) else 0):  # one contiguous copy per table
            self.trig[k, : len(host.pairs)].copy_(torch.from_numpy(trig[k]), non_blocking=True)


@triton.jit
def _partial_kernel(
    q_ptr, k_ptr, v_ptr, count_ptr, items_ptr, pairs_ptr, pages_ptr, trig_ptr, m_ptr, l_ptr, acc_ptr,
    stride_qb, stride_qh, stride_qt, stride_qd, stride_kh, stride_ks, stride_vh, stride_vs,
    ws_pc, ws_h, qk_scale, window, cap_in, cap_out,
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr, D_P: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, PARTIAL: tl.constexpr, REST_P: tl.constexpr,
):
    """One work item x one K/V head: partial softmax of its queries over its key chunk.

    HALF: half the rotary dims (HEAD_DIM // 2 unless PARTIAL). Feature flags (all off: the kernel
    verified on the H200): WINDOW, keys below ``qstart + t - window + 1`` are masked too and the
    chunk walk starts at the item's smallest such bound; SOFTCAP, scores (log2 units) become
    ``cap_out * tanh(cap_in * s)`` with cap_in = scale / cap, cap_out = cap * log2(e); PARTIAL, dims
    2 * HALF..HEAD_DIM-1 (REST_P of them padded) pass through unrotated as a third dot.
    """
    item = tl.program_id(0)
    h = tl.program_id(1)
    if item >= tl.load(count_ptr):
        return
    it = items_ptr + item * 8
    pair0 = tl.load(it)
    n_pairs = tl.load(it + 1)
    t0 = tl.load(it + 2)
    nt = tl.load(it + 3)
    k0 = tl.load(it + 4)
    k1 = tl.load(it + 5)
    chunk = tl.load(it + 6)
    page_base = tl.load(it + 7)

    # Tile row r = (pair, group member, token) of the item.
    r = tl.arange(0, BLOCK_M)
    p_local = r // (GROUPS * nt)
    g = (r // nt) % GROUPS
    t = t0 + r % nt
    in_item = p_local < n_pairs
    pair = pair0 + p_local
    pm = pairs_ptr + pair * 6
    row = tl.load(pm, mask=in_item, other=0)
    limit = tl.load(pm + 1, mask=in_item, other=0)
    qstart = tl.load(pm + 2, mask=in_item, other=0)
    n_new = tl.load(pm + 3, mask=in_item, other=0)
    pc0 = tl.load(pm + 4, mask=in_item, other=0)
    n_chunks = tl.load(pm + 5, mask=in_item, other=0)
    valid = in_item & (t < n_new)
    hi = tl.where(valid, tl.minimum(limit - 1, qstart + t), -1)  # last key each row sees
    hq = h * GROUPS + g

    # Rotate the queries by their pair's delta in fp32: (q1, q2) -> (q1 c - q2 s, q2 c + q1 s).
    offs_h = tl.arange(0, HALF_P)
    hmask = offs_h < HALF
    qmask = valid[:, None] & hmask[None, :]
    q_row = row.to(tl.int64) * stride_qb + hq.to(tl.int64) * stride_qh + t.to(tl.int64) * stride_qt
    q_ptrs = q_ptr + q_row[:, None] + offs_h[None, :] * stride_qd
    q1 = tl.load(q_ptrs, mask=qmask, other=0.0).to(tl.float32)
    q2 = tl.load(q_ptrs + HALF * stride_qd, mask=qmask, other=0.0).to(tl.float32)
    trig = trig_ptr + pair.to(tl.int64)[:, None] * (2 * HALF) + offs_h[None, :]
    cos = tl.load(trig, mask=qmask, other=0.0)
    sin = tl.load(trig + HALF, mask=qmask, other=0.0)
    q1r = (q1 * cos - q2 * sin).to(DOT_DTYPE)
    q2r = (q2 * cos + q1 * sin).to(DOT_DTYPE)
    if PARTIAL:  # the dims past the rotary ones, unrotated
        offs_r = tl.arange(0, REST_P)
        rmask = offs_r < HEAD_DIM - 2 * HALF
        q3 = tl.load(q_ptr + q_row[:, None] + (2 * HALF + offs_r[None, :]) * stride_qd,
                     mask=valid[:, None] & rmask[None, :], other=0.0).to(DOT_DTYPE)
    if WINDOW:  # first key each row sees; the walk starts at the item's smallest
        lo = qstart + t - window + 1
        n_start = tl.maximum(k0, tl.min(tl.where(valid, lo, k1), 0))
    else:
        n_start = k0

    offs_d = tl.arange(0, D_P)
    dmask = offs_d < HEAD_DIM
    k_head = k_ptr + h.to(tl.int64) * stride_kh
    v_head = v_ptr + h.to(tl.int64) * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_P], tl.float32)
    for n0 in range(n_start, k1, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_chunk = offs_n < k1
        page = tl.load(pages_ptr + page_base + offs_n // PAGE, mask=in_chunk, other=0)
        slot = page.to(tl.int64) * PAGE + offs_n % PAGE
        kmask = hmask[:, None] & in_chunk[None, :]
        k_ptrs = k_head + slot[None, :] * stride_ks + offs_h[:, None]  # [HALF_P, BLOCK_N]
        kt1 = tl.load(k_ptrs, mask=kmask, other=0.0).to(DOT_DTYPE)
        kt2 = tl.load(k_ptrs + HALF, mask=kmask, other=0.0).to(DOT_DTYPE)
        s = tl.dot(q1r, kt1, input_precision=PRECISION)
        s = tl.dot(q2r, kt2, s, input_precision=PRECISION)
        if PARTIAL:
            kt3 = tl.load(k_head + slot[None, :] * stride_ks + 2 * HALF + offs_r[:, None],
                          mask=rmask[:, None] & in_chunk[None, :], other=0.0).to(DOT_DTYPE)
            s = tl.dot(q3, kt3, s, input_precision=PRECISION)
        seen = (offs_n[None, :] <= hi[:, None]) & in_chunk[None, :]
        if WINDOW:
            seen = seen & (offs_n[None, :] >= lo[:, None])
        if SOFTCAP:  # tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|): no overflow, no cancellation near 0
            x = s * cap_in
            e = tl.exp2(-2.8853900817779268 * tl.abs(x))
            th = (1.0 - e) / (1.0 + e)
            s = tl.where(seen, tl.where(x < 0, -th, th) * cap_out, float("-inf"))
        else:
            s = tl.where(seen, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing stay at 0
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        v_ptrs = v_head + slot[:, None] * stride_vs + offs_d[None, :]
        v = tl.load(v_ptrs, mask=in_chunk[:, None] & dmask[None, :], other=0.0).to(DOT_DTYPE)
        acc = tl.dot(p.to(DOT_DTYPE), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    keep = valid & (chunk < n_chunks)  # a pair of a run need not reach every chunk of the run
    ws = (pc0 + chunk).to(tl.int64) * ws_pc + hq.to(tl.int64) * ws_h + t
    tl.store(m_ptr + ws, m_i, mask=keep)
    tl.store(l_ptr + ws, l_i, mask=keep)
    tl.store(acc_ptr + ws[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=keep[:, None] & dmask[None, :])


@triton.jit
def _merge_kernel(
    m_ptr, l_ptr, acc_ptr, rows_ptr, pc_tlo_ptr, out_ptr, pc_pair_ptr, stats_ptr, sinks_ptr, T,
    stride_ob, stride_ot, stride_oh, ws_pc, ws_h, q_heads,
    HEAD_DIM: tl.constexpr, D_P: tl.constexpr, PC_BLOCK: tl.constexpr, BLOCK_T: tl.constexpr,
    COLLAB: tl.constexpr, SINKS: tl.constexpr,
):
    """One row x query head x BLOCK_T tokens: log-sum-exp merge of the row's pcs, PC_BLOCK at a time.

    COLLAB: also add each pc's share of the merged mass, ``l * 2**(m - M) / L``, divided by the
    heads and the row's tokens, to its pair's entry of ``stats`` (float32 [pairs]; ``pc_pair``:
    int32 [pcs], each pc's pair): one atomic add per (pc, program). SINKS: the head's sink logit
    (``sinks``: [q_heads], natural-log units) starts the merge as one more term, m = sink * log2(e)
    and l = 1 with no value: it only adds to the denominator (the shares then sum to < 1)."""
    b = tl.program_id(0)
    hq = tl.program_id(1)
    offs_t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, D_P)
    dmask = offs_d < HEAD_DIM
    start = tl.load(rows_ptr + b * 3).to(tl.int64)  # int64: pc * ws_pc may pass 2**31
    end = tl.load(rows_ptr + b * 3 + 1).to(tl.int64)
    real = offs_t < tl.load(rows_ptr + b * 3 + 2)  # padding tokens (and rows) read nothing: zeros
    if SINKS:
        m_run = tl.zeros([BLOCK_T], tl.float32) + tl.load(sinks_ptr + hq).to(tl.float32) * 1.4426950408889634
        l_run = tl.full([BLOCK_T], 1.0, tl.float32)
    else:
        m_run = tl.full([BLOCK_T], float("-inf"), tl.float32)
        l_run = tl.zeros([BLOCK_T], tl.float32)
    acc = tl.zeros([BLOCK_T, D_P], tl.float32)
    for p0 in range(start, end, PC_BLOCK):
        pc = p0 + tl.arange(0, PC_BLOCK)
        tlo = tl.load(pc_tlo_ptr + pc, mask=pc < end, other=2**30)  # tokens before tlo did not reach the chunk
        use = (offs_t[None, :] >= tlo[:, None]) & real[None, :]  # [PC_BLOCK, BLOCK_T]
        ws = pc[:, None] * ws_pc + hq * ws_h + offs_t[None, :]
        m_pc = tl.load(m_ptr + ws, mask=use, other=float("-inf"))
        l_pc = tl.load(l_ptr + ws, mask=use, other=0.0)
        acc_pc = tl.load(acc_ptr + ws[:, :, None] * HEAD_DIM + offs_d[None, None, :],
                         mask=use[:, :, None] & dmask[None, None, :], other=0.0)
        m_new = tl.maximum(m_run, tl.max(m_pc, 0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_run - m_ref)
        beta = tl.exp2(m_pc - m_ref[None, :])
        l_run = l_run * alpha + tl.sum(l_pc * beta, 0)
        acc = acc * alpha[:, None] + tl.sum(acc_pc * beta[:, :, None], 0)
        m_run = m_new
    out = acc / tl.where(l_run > 0, l_run, 1.0)[:, None]  # nothing seen: zeros
    if COLLAB:
        m_ref = tl.where(m_run == float("-inf"), 0.0, m_run)
        scale = 1.0 / (tl.where(l_run > 0, l_run, 1.0) * q_heads * tl.load(rows_ptr + b * 3 + 2))
        for p0 in range(start, end, PC_BLOCK):
            pc = p0 + tl.arange(0, PC_BLOCK)
            tlo = tl.load(pc_tlo_ptr + pc, mask=pc < end, other=2**30)
            use = (offs_t[None, :] >= tlo[:, None]) & real[None, :]
            ws = pc[:, None] * ws_pc + hq * ws_h + offs_t[None, :]
            m_pc = tl.load(m_ptr + ws, mask=use, other=float("-inf"))
            l_pc = tl.load(l_ptr + ws, mask=use, other=0.0)
            share = tl.sum(tl.where(use, l_pc * tl.exp2(m_pc - m_ref[None, :]) * scale[None, :], 0.0), 1)
            pair = tl.load(pc_pair_ptr + pc, mask=pc < end, other=0)
            tl.atomic_add(stats_ptr + pair, share, mask=pc < end)
    o_ptrs = out_ptr + b.to(tl.int64) * stride_ob + offs_t[:, None] * stride_ot + hq * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=(offs_t[:, None] < T) & dmask[None, :])


_DOT_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def triton_attention(
    query: torch.Tensor, layer_keys: torch.Tensor, layer_values: torch.Tensor, meta: DeviceMeta, scaling: float,
    shares: tuple[torch.Tensor, torch.Tensor] | None = None, window: int | None = None,
    sinks: torch.Tensor | None = None, softcap: float | None = None, table: int = 0,
    limits: DeviceLimits | None = None,
) -> torch.Tensor:
    """Concurrent attention of a pass's rows over their views (two launches, capture-safe).

    query: [B, Hq, T, D] new queries rotated at their local positions (B <= row capacity, T <=
    the T capacity); layer_keys, layer_values: [kv_heads, slots, D] one layer of the pool (last
    dim contiguous); scaling: softmax scale; shares: (pc_pair int32 [pcs], this layer's float32
    [pairs] row of ``AttentionStats.stats``) to also add each pair's share of its row's attention
    (collab_stats), or None. The layer's extras (``layer_options``; None: not used, and the kernels
    are the plain ones): window, a sliding window W (a query at view position p sees keys in
    (p - W, p]); sinks, [Hq] sink logits; softcap, scores become ``softcap * tanh(score / softcap)``;
    table, the layer's RoPE table (``cache.layer_rope[layer]``). Partial rotary comes from the
    metadata (``meta.rotary`` < D). limits: the device the tiles are sized for (``tiles.attention_tiles``;
    None: the query's device, read once; on the CPU no limit). Returns out [B, T, Hq, D] in query's
    dtype, zeros at padding. On CPU tensors (Triton's interpreter) tiles are computed in fp32.
    """
    B, Hq, T, D = query.shape
    Hkv = layer_keys.shape[0]
    if (Hq, Hq // Hkv, D) != (meta.q_heads, meta.groups, meta.head_dim) or Hq % Hkv:
        raise ValueError(f"query {tuple(query.shape)} and {Hkv} K/V heads do not match the metadata's "
                         f"{meta.q_heads} heads, {meta.groups} groups, head_dim {meta.head_dim}")
    if not meta.filled[0] <= B <= meta.caps["rows"] or not meta.filled[1] <= T <= meta.caps["T"]:
        raise ValueError(f"query {tuple(query.shape)} must hold the pass's (rows, T) = {meta.filled} "
                         f"within the capacities {meta.caps}")
    if layer_keys.stride(-1) != 1 or layer_values.stride(-1) != 1:
        raise ValueError("the K/V pool's last dimension must be contiguous")
    if not 0 <= table < meta.tables:
        raise ValueError(f"RoPE table {table} of a pass built with {meta.tables}")
    if window is not None and window < 1:
        raise ValueError(f"sliding window must be >= 1, got {window}")
    if sinks is not None and (sinks.numel() != Hq or sinks.device != query.device):
        raise ValueError(f"sinks must be [{Hq}] on {query.device}, got {tuple(sinks.shape)} on {sinks.device}")
    dot_dtype = tl.float32 if query.device.type == "cpu" else _DOT_DTYPES[layer_keys.dtype]
    precision = "ieee" if dot_dtype == tl.float32 else "tf32"
    D_P = triton.next_power_of_2(D)
    half, rest = meta.rotary // 2, D - meta.rotary
    cap_in, cap_out = (scaling / softcap, softcap * _LOG2E) if softcap else (1.0, 1.0)
    ws_pc, ws_h = meta.m.stride(0), meta.m.stride(1)
    limits = device_limits(query.device) if limits is None else limits
    tiles = attention_tiles(limits, layer_keys.dtype, D, meta.groups, meta.rotary, meta.chunk, meta.block_m)
    if tiles is None:
        raise ValueError(triton_refusal(limits, layer_keys.dtype, D, meta.groups, meta.rotary))
    _partial_kernel[(meta.caps["items"], Hkv)](
        query, layer_keys, layer_values, meta.count, meta.items, meta.pairs, meta.pages, meta.trig[table],
        meta.m, meta.l, meta.acc,
        *query.stride(), layer_keys.stride(0), layer_keys.stride(1), layer_values.stride(0), layer_values.stride(1),
        ws_pc, ws_h, scaling * _LOG2E, window or 0, cap_in, cap_out,
        GROUPS=meta.groups, HEAD_DIM=D, HALF=half, HALF_P=max(16, triton.next_power_of_2(half)), D_P=D_P,
        PAGE=meta.page_size,
        BLOCK_M=meta.block_m, BLOCK_N=tiles.block_n,
        DOT_DTYPE=dot_dtype, PRECISION=precision, WINDOW=window is not None, SOFTCAP=bool(softcap),
        PARTIAL=rest > 0, REST_P=max(16, triton.next_power_of_2(max(rest, 1))),
        num_warps=4, num_stages=tiles.stages,  # 4 warps: fastest on an H200 (vs 8 warps, 3 stages)
    )
    out = torch.empty(B, T, Hq, D, dtype=query.dtype, device=query.device)
    pc_pair, layer_stats = shares if shares is not None else (meta.rows, meta.rows)  # not read without COLLAB
    block_t = min(16, triton.next_power_of_2(T))  # a merge tile holds 16 (pc, token) pairs
    _merge_kernel[(B, Hq, triton.cdiv(T, block_t))](
        meta.m, meta.l, meta.acc, meta.rows, meta.pc_tlo, out, pc_pair, layer_stats,
        meta.rows if sinks is None else sinks.contiguous(), T,  # sinks: not read without SINKS
        out.stride(0), out.stride(1), out.stride(2), ws_pc, ws_h, Hq,
        HEAD_DIM=D, D_P=D_P, PC_BLOCK=16 // block_t, BLOCK_T=block_t, COLLAB=shares is not None,
        SINKS=sinks is not None, num_warps=4,
    )
    return out
