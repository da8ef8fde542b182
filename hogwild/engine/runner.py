"""One forward pass for any list of workers, each with its new tokens, its view and its block.

The runner knows nothing of sessions or protocols: a pass is a list of ``WorkerStep`` that may
come from different sessions, as long as each block is written by at most one of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache import Block, SharedCache
from ..errors import ContextOverflowError, HogwildError, InputError
from ..layers.attention import PassPlan, Row, ViewEntry
from ..model import LoadedModel


@dataclass
class WorkerStep:
    """One worker's input to a pass: ``token_ids`` are appended to ``view[-1]`` (its own block)."""

    token_ids: list[int]
    view: list[Block]


def plan_pass(
    steps: list[WorkerStep],
    inv_freq: torch.Tensor,
    scaling: float,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    reference: bool = False,
    gather_below: int = 256,
) -> PassPlan:
    """Lay out a pass: block offsets in each view, the lengths each worker sees, context checks.

    Blocks are read as they were before the pass (a worker sees the others' tokens of this pass
    only from the next pass on); the own block also shows the worker's new tokens, causally.
    """
    writers: set[int] = set()
    rows = []
    for step in steps:
        if not step.token_ids:
            raise InputError("every worker in a pass needs at least one new token")
        own = step.view[-1]
        if own.id in writers:
            raise InputError(f"block {own.name!r} is written by two workers in one pass")
        writers.add(own.id)
        entries, offset = [], 0
        for j, block in enumerate(step.view):
            visible = block.length + (len(step.token_ids) if j == len(step.view) - 1 else 0)
            entries.append(ViewEntry(block, offset, visible))
            offset += visible
        if offset > max_positions:
            raise ContextOverflowError(
                f"a worker's view would hold {offset} tokens, more than the model's context of {max_positions}"
            )
        rows.append(Row(entries, start=own.length, n_new=len(step.token_ids)))
    return PassPlan(rows, inv_freq, scaling, dtype, device, reference, gather_below)


class PassCache:
    """The cache object transformers sees during one pass: it stores the new K/V of each row in
    that row's own block (padding is never stored) and hands them on unchanged."""

    def __init__(self, cache: SharedCache, rows: list[Row]):
        self.cache = cache
        self.rows = rows
        self.layers_written: set[int] = set()

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are given explicitly; transformers must not infer them

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """key_states, value_states: [B, kv_heads, T, head_dim] of the new tokens."""
        self.layers_written.add(layer_idx)
        for i, row in enumerate(self.rows):
            self.cache.write(
                row.write, layer_idx, row.start, key_states[i, :, : row.n_new], value_states[i, :, : row.n_new]
            )
        return key_states, value_states


class Runner:
    """Runs forward passes of a model over a shared cache and returns next-token logits."""

    def __init__(self, model: LoadedModel, cache: SharedCache):
        self.model = model
        self.cache = cache
        self.forward_passes = 0

    @classmethod
    def for_model(cls, model: LoadedModel) -> Runner:
        cache = SharedCache(
            model.num_layers, model.num_kv_heads, model.head_dim, model.inv_freq, model.dtype, model.device
        )
        return cls(model, cache)

    def plan(self, steps: list[WorkerStep], reference: bool = False) -> PassPlan:
        m = self.model
        return plan_pass(steps, m.inv_freq, m.scaling, m.dtype, m.device, m.max_positions, reference)

    @torch.no_grad()  # not inference_mode: cache tensors are updated in place outside passes too
    def forward(self, steps: list[WorkerStep], reference: bool = False) -> torch.Tensor:
        """One pass. Returns the logits after each worker's last new token: [len(steps), vocab]."""
        plan = self.plan(steps, reference)
        B, T = len(steps), plan.T
        device = self.model.device
        input_ids = torch.zeros(B, T, dtype=torch.long)
        position_ids = torch.zeros(B, T, dtype=torch.long)
        for i, (step, row) in enumerate(zip(steps, plan.rows, strict=True)):
            input_ids[i, : row.n_new] = torch.tensor(step.token_ids)
            position_ids[i] = row.start + torch.arange(T)  # local positions in the own block
            self.cache.reserve(row.write, row.start + row.n_new)
        pass_cache = PassCache(self.cache, plan.rows)
        hidden = self.model.hidden_states(input_ids.to(device), position_ids.to(device), pass_cache, plan)
        if len(pass_cache.layers_written) != self.model.num_layers:  # never decode from unwritten K/V
            raise HogwildError(
                f"the model stored K/V of {len(pass_cache.layers_written)} of {self.model.num_layers} layers "
                f"through hogwild's cache: this transformers version passes the cache differently"
            )
        last = torch.tensor([row.n_new - 1 for row in plan.rows], device=device)
        logits = self.model.logits(hidden[torch.arange(B, device=device), last])
        for step in steps:  # only now, with every layer written, do the tokens count as held
            self.cache.commit(step.view[-1], list(step.token_ids))
        self.forward_passes += 1
        return logits

    def prefill(self, view: list[Block], token_ids: list[int], chunk: int = 512) -> torch.Tensor:
        """Append many tokens to ``view[-1]`` in chunks; returns the logits after the last: [vocab]."""
        logits = None
        for i in range(0, len(token_ids), chunk):
            logits = self.forward([WorkerStep(token_ids[i : i + chunk], view)])[0]
        if logits is None:
            raise InputError("nothing to prefill")
        return logits
