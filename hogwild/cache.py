"""The shared KV cache: one paged pool per device, blocks of tokens at block-local positions.

K and V of every block of every session live in one pair of tensors of shape
[layers, kv_heads, slots, head_dim]. Slots come in pages of ``page_size`` tokens; a block is a
list of pages and a length, and the key at local position i of a block sits in slot
``pages[i // page_size] * page_size + i % page_size``. A block is stored once, however many
workers read it and at whatever offset.

New tokens are written through a slot mapping (one slot per new token, one ``index_copy_`` per
layer), so a decode step never copies a block. Pages are handed out lowest first and a growing
block takes the page right after its last one when it is free: a block written in one go (a
prompt) is one contiguous run of slots, which the torch attention backend reads in place.
Page 0 is never handed out: padded positions of a pass write there.

The pool's size is fixed when the cache is made (``capacity_tokens``); when it is full, making
or growing a block raises ``CacheFullError`` and leaves everything as it was.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field

import torch

from .errors import CacheFullError
from .rope import RotationRows, rotate_by


@dataclass(eq=False)
class Block:
    """A run of tokens with their K/V for every layer, stored at local positions 0..length-1.

    pages: the pool pages holding the block, in order (capacity = len(pages) * page_size);
    token_ids: the tokens held, in order (len(token_ids) == length).
    """

    id: int
    name: str
    page_size: int
    pages: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def capacity(self) -> int:
        return len(self.pages) * self.page_size

    def slots(self, start: int, end: int) -> list[int]:
        """Pool slots of local positions start..end-1."""
        P = self.page_size
        return [self.pages[i // P] * P + i % P for i in range(start, end)]

    def contiguous(self, n: int) -> int | None:
        """The first slot if local positions 0..n-1 are one run of pool slots, else None."""
        pages = self.pages[: -(-n // self.page_size)] if n else self.pages[:1]
        if pages and pages[-1] - pages[0] == len(pages) - 1:
            return pages[0] * self.page_size
        return None

    def __repr__(self) -> str:
        return f"Block({self.name!r}, length={self.length})"


class SharedCache:
    """All blocks of one or more sessions, in one paged pool; blocks are made, grown, moved and freed here.

    inv_freq: rotary inverse frequencies of the model (scaling folded in), used for the one-time key
    rotation when one block is appended to another: [R/2] for every layer, or [layers, R/2] with a
    table per layer (Gemma 3's local and global RoPE); R < head_dim is partial rotary (the first R
    dims rotate). ``rope_tables`` holds the distinct tables, ``layer_rope[layer]`` indexes them. capacity_tokens: slots
    in the pool (rounded up to whole pages, plus the padding page).
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        inv_freq: torch.Tensor,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        capacity_tokens: int = 1 << 16,
        page_size: int = 32,
        initial_capacity: int = 64,
    ):
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        per_layer = inv_freq.dim() == 2
        tables = [inv_freq[layer] for layer in range(num_layers)] if per_layer else [inv_freq]
        self.host_rope_tables: list[torch.Tensor] = []  # distinct tables, on the host (pass plans are built there)
        self.layer_rope: list[int] = []
        for table in tables:
            table = table.detach().cpu()
            k = next((k for k, t in enumerate(self.host_rope_tables) if torch.equal(t, table)), None)
            if k is None:
                k = len(self.host_rope_tables)
                self.host_rope_tables.append(table)
            self.layer_rope.append(k)
        if not per_layer:
            self.layer_rope *= num_layers
        self.rope_tables = [t.to(device) for t in self.host_rope_tables]
        self.inv_freq = self.rope_tables[0]  # the table of layer 0 (the only one unless per-layer)
        self.host_inv_freq = self.host_rope_tables[0]
        self.rotation_rows = RotationRows(self.host_rope_tables)  # the triton backend's query rotations, kept
        self.dtype = dtype
        self.device = torch.device(device)
        self.page_size = page_size
        self.initial_capacity = initial_capacity
        self.num_pages = 1 + -(-capacity_tokens // page_size)
        shape = (num_layers, num_kv_heads, self.num_pages * page_size, head_dim)
        # Untouched pages of a CPU pool cost no memory (the OS maps them on first write).
        self.keys = torch.empty(shape, dtype=dtype, device=self.device)
        self.values = torch.empty(shape, dtype=dtype, device=self.device)
        self.free_pages: list[int] = list(range(1, self.num_pages))  # sorted; page 0 takes padding
        self.blocks: dict[int, Block] = {}
        self._ids = itertools.count()

    @classmethod
    def for_memory(cls, num_layers, num_kv_heads, head_dim, inv_freq, dtype, device, nbytes: int, **kw):
        """A cache whose pool takes about ``nbytes`` bytes of K/V."""
        element = torch.empty((), dtype=dtype).element_size()
        per_token = 2 * num_layers * num_kv_heads * head_dim * element
        return cls(num_layers, num_kv_heads, head_dim, inv_freq, dtype, device, max(1, nbytes // per_token), **kw)

    def rope(self, layer: int) -> torch.Tensor:
        """The inverse frequencies of ``layer``'s RoPE table, on the pool's device."""
        return self.rope_tables[self.layer_rope[layer]]

    def rotate_keys(self, keys: torch.Tensor, delta: int) -> torch.Tensor:
        """Keys of every layer [layers, kv_heads, n, D], each layer rotated by ``delta`` with its own table."""
        if len(self.rope_tables) == 1:
            return rotate_by(keys, self.inv_freq, delta)
        out = torch.empty_like(keys)
        for k, table in enumerate(self.rope_tables):
            layers = torch.tensor([i for i, t in enumerate(self.layer_rope) if t == k], device=keys.device)
            out[layers] = rotate_by(keys[layers], table, delta)
        return out

    # -- sizes -------------------------------------------------------------------------------
    @property
    def bytes_per_token(self) -> int:
        """K and V bytes of one token over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.keys.element_size()

    @property
    def capacity_tokens(self) -> int:
        """Tokens the pool can hold (the padding page excluded)."""
        return (self.num_pages - 1) * self.page_size

    @property
    def free_tokens(self) -> int:
        return len(self.free_pages) * self.page_size

    def require_free(self, tokens: int, what: str) -> None:
        """CacheFullError, with nothing taken, when fewer than ``tokens`` slots are free; ``what``
        says who may need them (a session checks this before any work)."""
        if tokens > self.free_tokens:
            raise CacheFullError(
                f"the KV cache has {self.free_tokens} free token slots of {self.capacity_tokens}; {what} may need "
                f"up to {tokens}; give the cache more memory (--kv-memory) or lower the budget"
            )

    def nbytes(self) -> int:
        """Bytes of K/V of the tokens held by all live blocks (what the method needs)."""
        return self.bytes_per_token * sum(b.length for b in self.blocks.values())

    def allocated_nbytes(self) -> int:
        """Bytes of the pages held by live blocks, spare slots included."""
        return self.bytes_per_token * sum(b.capacity for b in self.blocks.values())

    def pool_nbytes(self) -> int:
        """Bytes of the whole pool, free pages included."""
        return self.bytes_per_token * self.num_pages * self.page_size

    # -- pages -------------------------------------------------------------------------------
    def _take(self, block: Block, n: int) -> None:
        """Give ``block`` n more pages: the one after its last page when free, else the lowest free."""
        if n > len(self.free_pages):
            raise CacheFullError(
                f"the KV cache is full: {self.capacity_tokens - self.free_tokens} of {self.capacity_tokens} token "
                f"slots are in use and {n * self.page_size} more are needed; give the cache more memory "
                f"(--kv-memory) or run fewer workers or sessions at once"
            )
        for _ in range(n):
            i = 0
            if block.pages:
                i = bisect.bisect_left(self.free_pages, block.pages[-1] + 1)
                if i == len(self.free_pages) or self.free_pages[i] != block.pages[-1] + 1:
                    i = 0
            block.pages.append(self.free_pages.pop(i))

    def _take_run(self, block: Block, n: int) -> None:
        """Give an empty block n pages, one contiguous run if the pool has one (first fit)."""
        free, run = self.free_pages, 0
        for i, page in enumerate(free):
            run = run + 1 if i and page == free[i - 1] + 1 else 1
            if run >= n:
                block.pages = free[i + 1 - n : i + 1]
                del free[i + 1 - n : i + 1]
                return
        self._take(block, n)

    # -- block life cycle --------------------------------------------------------------------
    def new_block(self, name: str = "", capacity: int | None = None) -> Block:
        """A new empty block with room for ``capacity`` tokens (at least ``initial_capacity``)."""
        block_id = next(self._ids)
        block = Block(id=block_id, name=name or f"block{block_id}", page_size=self.page_size)
        self._take_run(block, -(-max(capacity or 0, self.initial_capacity) // self.page_size))
        self.blocks[block_id] = block
        return block

    def free(self, block: Block) -> None:
        """Forget a block; its pages go back to the pool."""
        if self.blocks.pop(block.id, None) is not None:
            for page in block.pages:
                bisect.insort(self.free_pages, page)
        block.pages = []
        block.token_ids = []

    def truncate(self, block: Block, length: int) -> None:
        """Drop the tokens after the first ``length`` (their slots become spare capacity)."""
        del block.token_ids[length:]

    def reserve(self, block: Block, length: int) -> None:
        """Make room for ``length`` tokens (CacheFullError, with nothing taken, when the pool cannot)."""
        missing = -(-length // self.page_size) - len(block.pages)
        if missing > 0:
            self._take(block, missing)

    # -- writes ------------------------------------------------------------------------------
    def slot_tensor(self, block: Block, start: int, end: int) -> torch.Tensor:
        """Slots of local positions start..end-1 as a long tensor on the pool's device."""
        return torch.tensor(block.slots(start, end), dtype=torch.long, device=self.device)

    def write(self, block: Block, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store K/V [kv_heads, n, head_dim] of one layer at local positions start..start+n-1.

        The caller has reserved the room and commits the tokens with ``commit`` once every layer
        is written. (A forward pass writes all rows at once through its slot mapping instead.)
        """
        slots = self.slot_tensor(block, start, start + keys.shape[1])
        self.keys[layer].index_copy_(1, slots, keys.to(self.dtype))
        self.values[layer].index_copy_(1, slots, values.to(self.dtype))

    def read(self, block: Block, layer: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of local positions 0..n-1 of one layer: [kv_heads, n, head_dim] (a view when contiguous)."""
        first = block.contiguous(n)
        if first is not None:
            return self.keys[layer, :, first : first + n], self.values[layer, :, first : first + n]
        slots = self.slot_tensor(block, 0, n)
        return self.keys[layer].index_select(1, slots), self.values[layer].index_select(1, slots)

    def commit(self, block: Block, token_ids: list[int]) -> None:
        """Record tokens whose K/V were written for every layer by the last forward pass."""
        block.token_ids.extend(token_ids)

    def append_block(self, dst: Block, src: Block) -> None:
        """Append src's tokens to dst: keys rotated once by dst's length (RoPE rotations add)."""
        self.move_prefix(dst, src, src.length)

    @torch.no_grad()
    def move_prefix(self, dst: Block, src: Block, n: int) -> None:
        """Move src's first n tokens to the end of dst; src keeps the rest from position 0.

        Moved keys are rotated by dst's length, kept keys by -n: one rotation each (each layer with its
        own RoPE table), no recompute.
        Used when a finished step goes into the history while the next step's header, fed in the
        same pass, stays in the worker's block.
        """
        start, rest = dst.length, src.length - n
        self.reserve(dst, start + n)
        moved, target = self.slot_tensor(src, 0, n), self.slot_tensor(dst, start, start + n)
        self.keys.index_copy_(2, target, self.rotate_keys(self.keys.index_select(2, moved), start))
        self.values.index_copy_(2, target, self.values.index_select(2, moved))
        dst.token_ids.extend(src.token_ids[:n])
        if rest:
            kept, front = self.slot_tensor(src, n, n + rest), self.slot_tensor(src, 0, rest)
            self.keys.index_copy_(2, front, self.rotate_keys(self.keys.index_select(2, kept), -n))
            self.values.index_copy_(2, front, self.values.index_select(2, kept))
        del src.token_ids[:n]
