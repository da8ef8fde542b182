"""Concurrent attention, backend-neutral: the rows of a pass, its plan, and the backend interface.

One forward pass carries B rows (workers), each with up to T new tokens (right-padded). A row's
view is an ordered list of ``ViewEntry`` (a block at an offset); its own block is the last entry.
Keys are stored at block-local positions, and the model has already rotated the new queries and
keys at their local positions in the writer's block. For entry e the query is rotated further
by ``delta = offset(own) - offset(e)``, so that its position relative to e's keys is the one it
has in the view.

Per layer, transformers hands the attention function what the layer needs beyond plain causal
attention, and every backend reads it from there (``layer_options``): ``sliding_window`` W (a
query at view position p sees only keys at view positions in (p - W, p], across every block of
its view), ``s_aux`` (gpt-oss attention sinks: a learned per-head logit that joins the softmax
denominator once per row) and ``softcap`` (Gemma 2: scores become ``softcap * tanh(score /
softcap)`` before the mask). The RoPE table is the layer's own (``SharedCache.rope``).

``PassPlan`` holds what every backend shares (rows, the slot mapping of the new tokens, the
attention statistics) and the backend's own metadata (``meta``), which ``AttentionBackend.prepare``
computes once per pass, for every layer. The backends: ``torch_attention`` (plain PyTorch),
``triton_backend`` (two fused Triton launches per layer, capturable) and ``reference_attention``
(the spec: materialised views); ``backends`` is the registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..cache import Block, SharedCache


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


@dataclass
class StaticBuffers:
    """Device buffers that a captured (CUDA graph) pass reads, refilled in place before each replay.

    slot_mapping: [rows * T] long; meta: the backend's metadata buffers of the same rows; for passes
    with attention statistics (collab_stats), stats: float32 [layers, pair capacity] (zeroed before
    each pass) and pc_pair: int32 [pc capacity] (see ``AttentionStats``).
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


#: What a model may need beyond plain causal attention with one RoPE table (``LoadedModel.features``
#: names them this way); each backend declares which it runs (``AttentionBackend.features``).
WINDOWS, SINKS, SOFTCAP = "sliding windows", "attention sinks", "attention logit soft-capping"
PER_LAYER_ROPE, PARTIAL_ROTARY = "per-layer RoPE tables", "partial rotary"
FEATURES = (WINDOWS, SINKS, SOFTCAP, PER_LAYER_ROPE, PARTIAL_ROTARY)

#: The pool slot that padded positions of a pass write to (page 0 is never given to a block).
PAD_SLOT = 0


class AttentionBackend:
    """The interface every attention backend implements (one module each, registered in ``backends``).

    name: what ``--attention`` calls it; features: which of ``FEATURES`` it runs; capture: whether decode passes
    can be captured in CUDA graphs (then ``static_buffers`` and ``work_items`` are implemented);
    fused_decoder: whether the lean decoder runs with it.
    """

    name: ClassVar[str] = ""
    features: ClassVar[frozenset[str]] = frozenset()
    capture: ClassVar[bool] = False
    fused_decoder: ClassVar[bool] = False

    def unavailable(self, device: torch.device) -> str | None:
        """Why this backend cannot run on ``device`` (None: it can)."""
        return None

    def prepare(self, plan: PassPlan, groups: int, static: StaticBuffers | None, collab_stats: bool) -> object:
        """The pass's metadata for every layer (``plan.meta``); with collab_stats, also set ``plan.stats``."""
        raise NotImplementedError

    def forward(self, plan: PassPlan, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                scaling: float, window: int | None = None, sinks: torch.Tensor | None = None,
                softcap: float | None = None) -> torch.Tensor:
        """One layer's attention of the pass's rows over their views: query [B, Hq, T, D] rotated at
        local positions, key/value [B, Hkv, T, D] the new tokens (already stored in the pool) ->
        out [B, T, Hq, D] in query's dtype."""
        raise NotImplementedError

    def static_buffers(self, cache: SharedCache, rows: int, items: int, groups: int, max_positions: int,
                       max_entries: int, num_layers: int, collab_stats: bool) -> StaticBuffers:
        """Buffers for captured decode passes of up to ``rows`` rows (one token each), ``items`` work
        items and ``max_entries`` view entries per row."""
        raise NotImplementedError(f"the {self.name} backend does not capture passes")

    def work_items(self, views: list[list[Block]], groups: int) -> int:
        """At least the work items of a decode pass over these views (the graph bucket's size)."""
        raise NotImplementedError(f"the {self.name} backend does not capture passes")


class PassPlan:
    """Per-pass attention metadata shared by every layer (passed explicitly as ``hogwild_plan``).

    rows: the B rows of the batch; T: padded new tokens per row; cache: the shared cache the
    blocks live in; scaling: softmax scale; dtype: of queries; backend: the ``AttentionBackend``;
    slot_mapping: [B * T] long, the pool slot of every new token (row-major; padding writes to
    ``PAD_SLOT``); meta: the backend's metadata. collab_stats: every layer also stores each (row,
    entry) pair's share of the row's attention mass in ``stats`` (``AttentionStats``), from the
    merge's statistics; off, ``stats`` is None and nothing is added.
    """

    def __init__(
        self,
        rows: list[Row],
        cache: SharedCache,
        scaling: float,
        dtype: torch.dtype,
        backend: AttentionBackend,
        groups: int = 1,
        static: StaticBuffers | None = None,
        collab_stats: bool = False,
    ):
        self.rows = rows
        self.cache = cache
        self.backend = backend
        self.stats: AttentionStats | None = None  # collab_stats: attention shares per (row, entry)
        self.T = max(r.n_new for r in rows)
        self.scaling = scaling
        self.dtype = dtype
        slots = []
        for row in rows:
            slots += row.write.slots(row.start, row.start + row.n_new) + [PAD_SLOT] * (self.T - row.n_new)
        if static is None:
            self.slot_mapping = torch.tensor(slots, dtype=torch.long).to(cache.device, non_blocking=True)
        else:  # a captured pass: refill its buffer in place, padding rows write to the padding slot
            slots += [PAD_SLOT] * (static.slot_mapping.numel() - len(slots))
            static.slot_mapping.copy_(torch.tensor(slots, dtype=torch.long), non_blocking=True)
            self.slot_mapping = static.slot_mapping
        self.meta = backend.prepare(self, groups, static, collab_stats)

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
               **kwargs) -> torch.Tensor:
        """One layer's attention by the plan's backend; ``kwargs``: transformers' (``layer_options``)."""
        window, sinks, softcap = layer_options(kwargs)
        return self.backend.forward(self, layer, query, key, value, scaling, window, sinks, softcap)
