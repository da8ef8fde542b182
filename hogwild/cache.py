"""The shared KV cache: blocks of tokens whose keys sit at block-local positions.

A block is stored once, however many workers read it and at whatever offset. Each block holds
K and V of every layer in one tensor pair of shape [layers, kv_heads, capacity, head_dim];
appends fill the spare capacity and the capacity doubles when it runs out, so a decode step
never copies a whole block.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from .layers.rope import rotate_by


@dataclass(eq=False)
class Block:
    """A run of tokens with their K/V for every layer, stored at positions 0..length-1.

    keys, values: [layers, kv_heads, capacity, head_dim]; only [:, :, :length] is meaningful.
    token_ids: the tokens held, in order (len(token_ids) == length).
    """

    id: int
    name: str
    keys: torch.Tensor
    values: torch.Tensor
    token_ids: list[int] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def __repr__(self) -> str:
        return f"Block({self.name!r}, length={self.length})"


class SharedCache:
    """All blocks of one or more sessions; blocks are created, grown, moved and freed here.

    inv_freq: [head_dim / 2] rotary inverse frequencies of the model (scaling folded in), used
    for the one-time key rotation when one block is appended to another.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        inv_freq: torch.Tensor,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        initial_capacity: int = 64,
    ):
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.inv_freq = inv_freq.to(device)
        self.dtype = dtype
        self.device = torch.device(device)
        self.initial_capacity = initial_capacity
        self.blocks: dict[int, Block] = {}
        self._ids = itertools.count()

    # -- sizes -------------------------------------------------------------------------------
    @property
    def bytes_per_token(self) -> int:
        """K and V bytes of one token over all layers."""
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element

    def nbytes(self) -> int:
        """Bytes of K/V of the tokens held by all live blocks (what the method needs)."""
        return self.bytes_per_token * sum(b.length for b in self.blocks.values())

    def allocated_nbytes(self) -> int:
        """Bytes allocated, spare capacity included."""
        return self.bytes_per_token * sum(b.capacity for b in self.blocks.values())

    # -- block life cycle --------------------------------------------------------------------
    def new_block(self, name: str = "", capacity: int | None = None) -> Block:
        capacity = max(capacity or 0, self.initial_capacity)
        shape = (self.num_layers, self.num_kv_heads, capacity, self.head_dim)
        block_id = next(self._ids)
        block = Block(
            id=block_id,
            name=name or f"block{block_id}",
            keys=torch.empty(shape, dtype=self.dtype, device=self.device),
            values=torch.empty(shape, dtype=self.dtype, device=self.device),
        )
        self.blocks[block_id] = block
        return block

    def free(self, block: Block) -> None:
        """Forget a block; its memory goes back to torch's allocator."""
        self.blocks.pop(block.id, None)
        block.keys = block.values = torch.empty(0)
        block.token_ids = []

    def clear(self, block: Block) -> None:
        """Empty a block, keeping its capacity for reuse."""
        block.token_ids = []

    def truncate(self, block: Block, length: int) -> None:
        """Drop the tokens after the first ``length`` (their K/V become spare capacity)."""
        del block.token_ids[length:]

    @torch.no_grad()
    def reserve(self, block: Block, length: int) -> None:
        """Make room for ``length`` tokens, doubling the capacity (one copy, amortised)."""
        if length <= block.capacity:
            return
        capacity = max(length, 2 * block.capacity)
        shape = (self.num_layers, self.num_kv_heads, capacity, self.head_dim)
        for name in ("keys", "values"):
            old = getattr(block, name)
            new = torch.empty(shape, dtype=self.dtype, device=self.device)
            new[:, :, : block.length] = old[:, :, : block.length]
            setattr(block, name, new)

    # -- writes ------------------------------------------------------------------------------
    def write(self, block: Block, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store K/V [kv_heads, n, head_dim] of one layer at local positions start..start+n-1.

        The caller has reserved the room and commits the tokens with ``commit`` once every layer
        is written.
        """
        n = keys.shape[1]
        block.keys[layer, :, start : start + n] = keys
        block.values[layer, :, start : start + n] = values

    def commit(self, block: Block, token_ids: list[int]) -> None:
        """Record tokens whose K/V were written for every layer by the last forward pass."""
        block.token_ids.extend(token_ids)

    def append_block(self, dst: Block, src: Block) -> None:
        """Append src's tokens to dst: keys rotated once by dst's length (RoPE rotations add)."""
        self.move_prefix(dst, src, src.length)

    @torch.no_grad()
    def move_prefix(self, dst: Block, src: Block, n: int) -> None:
        """Move src's first n tokens to the end of dst; src keeps the rest from position 0.

        Moved keys are rotated by dst's length, kept keys by -n: one rotation each, no recompute.
        Used when a finished step goes into the history while the next step's header, fed in the
        same pass, stays in the worker's block.
        """
        start, rest = dst.length, src.length - n
        self.reserve(dst, start + n)
        dst.keys[:, :, start : start + n] = rotate_by(src.keys[:, :, :n], self.inv_freq, start)
        dst.values[:, :, start : start + n] = src.values[:, :, :n]
        dst.token_ids.extend(src.token_ids[:n])
        if rest:
            src.keys[:, :, :rest] = rotate_by(src.keys[:, :, n : n + rest], self.inv_freq, -n)
            src.values[:, :, :rest] = src.values[:, :, n : n + rest].clone()
        del src.token_ids[:n]
