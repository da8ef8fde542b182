"""One forward pass for any list of workers, each with its new tokens, its view and its block.

The runner knows nothing of sessions or protocols: a pass is a list of ``WorkerStep`` that may
come from different sessions, as long as each block is written by at most one of them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..cache import Block, SharedCache
from ..errors import ContextOverflowError, HogwildError, InputError
from ..layers.attention import AttentionBackend, PassPlan, Row, StaticBuffers, ViewEntry
from ..layers.backends import get_backend, resolve_backend
from ..layers.reference_attention import ReferenceBackend
from ..layers.tiles import device_limits, fast_path
from ..layers.torch_attention import TorchBackend
from ..models import LoadedModel

log = logging.getLogger(__name__)


@dataclass
class PassOutput:
    """What one pass measured. logits: [rows, vocab] after each row's last new token; shares (passes
    with ``collab_stats``): per row, float32 [layers, view entries] on the host, each entry's share
    of the row's attention mass; None otherwise."""

    logits: torch.Tensor
    shares: list[torch.Tensor] | None = None


@dataclass
class WorkerStep:
    """One worker's input to a pass: ``token_ids`` are appended to ``view[-1]`` (its own block)."""

    token_ids: list[int]
    view: list[Block]


def plan_pass(
    steps: list[WorkerStep],
    cache: SharedCache,
    scaling: float,
    dtype: torch.dtype,
    max_positions: int,
    backend: AttentionBackend | None = None,
    groups: int = 1,
    static: StaticBuffers | None = None,
    collab_stats: bool = False,
) -> PassPlan:
    """Lay out a pass: block offsets in each view, the lengths each worker sees, context checks,
    and room in the pool for every worker's new tokens.

    Same-pass visibility (the authors' rule): every row's new K/V are stored at each layer before
    any row attends, so a block written in this pass is seen with its new tokens by every row that
    reads it, and the offsets of the blocks after it shift by them; the own block is causal.
    """
    fed = tokens_fed(steps)
    rows = []
    for step in steps:
        own = step.view[-1]
        entries, offset = [], 0
        for block in step.view:
            visible = block.length + fed.get(block.id, 0)
            entries.append(ViewEntry(block, offset, visible))
            offset += visible
        if offset > max_positions:
            raise ContextOverflowError(
                f"a worker's view would hold {offset} tokens, more than the model's context of {max_positions}"
            )
        rows.append(Row(entries, start=own.length, n_new=len(step.token_ids)))
    for row in rows:  # CacheFullError here leaves only spare pages behind: nothing is written yet
        cache.reserve(row.write, row.start + row.n_new)
    return PassPlan(rows, cache, scaling, dtype, backend or TorchBackend(), groups, static, collab_stats)


def tokens_fed(steps: list[WorkerStep]) -> dict[int, int]:
    """Block id -> how many new tokens the pass appends to it (each block has at most one writer)."""
    fed: dict[int, int] = {}
    for step in steps:
        if not step.token_ids:
            raise InputError("every worker in a pass needs at least one new token")
        own = step.view[-1]
        if own.id in fed:
            raise InputError(f"block {own.name!r} is written by two workers in one pass")
        fed[own.id] = len(step.token_ids)
    return fed


def view_lengths(steps: list[WorkerStep]) -> list[int]:
    """Tokens in each worker's view during the pass (same-pass visibility: every block with the
    tokens fed to it in this pass)."""
    fed = tokens_fed(steps)
    return [sum(block.length + fed.get(block.id, 0) for block in step.view) for step in steps]


class PassCache:
    """The cache object transformers sees during one pass: it stores the new K/V of every row in
    its own block through the plan's slot mapping (padding goes to the padding slot) and hands
    them on unchanged."""

    def __init__(self, plan: PassPlan):
        self.plan = plan
        self.layers_written: set[int] = set()

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are given explicitly; transformers must not infer them

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """key_states, value_states: [B, kv_heads, T, head_dim] of the new tokens."""
        self.layers_written.add(layer_idx)
        cache, slots = self.plan.cache, self.plan.slot_mapping
        B, H, T, D = key_states.shape
        cache.keys[layer_idx].index_copy_(1, slots, key_states.transpose(0, 1).reshape(H, B * T, D))
        cache.values[layer_idx].index_copy_(1, slots, value_states.transpose(0, 1).reshape(H, B * T, D))
        return key_states, value_states


def default_kv_memory(model: LoadedModel) -> int:
    """Bytes of the K/V pool when none are asked for: on CUDA 90% of the memory left free after
    the weights, less 2 GiB for activations and graphs; elsewhere 4 GiB (untouched pages of a CPU
    pool cost nothing)."""
    if model.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(model.device)
        return max(int(0.9 * free) - (2 << 30), 256 << 20)
    return 4 << 30


class Runner:
    """Runs forward passes of a model over a shared cache and returns next-token logits.

    attention: the ``AttentionBackend`` of every pass (default torch); graphs: replay decode passes
    (one new token per row) as CUDA graphs (backends that capture, on CUDA); lean: run the passes
    through ``LeanDecoder`` (fused per-layer kernels; backends with ``fused_decoder``) instead of
    transformers' modules.
    """

    def __init__(self, model: LoadedModel, cache: SharedCache, attention: AttentionBackend | None = None,
                 graphs: bool = False, lean: bool = False):
        self.model = model
        self.cache = cache
        self.attention = attention or TorchBackend()
        self.lean = None
        if lean:
            from ..layers.lean import LeanDecoder

            self.lean = LeanDecoder(model)
        self.forward_passes = 0
        self.graphs = None
        if graphs:
            from .graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self)

    @classmethod
    def for_model(
        cls, model: LoadedModel, attention: str = "auto", kv_memory: int | None = None, graphs: bool | None = None,
        lean: bool | None = None,
    ) -> Runner:
        """A runner with a fresh cache of ``kv_memory`` bytes (default: ``default_kv_memory``).

        lean: the lean decoder for the triton backend (default: where the model allows it,
        ``lean_refusal``); True where it cannot run is an InputError.
        """
        asked, backend = attention, resolve_backend(attention, model.device)
        unsupported = [f for f in model.features if f not in backend.features]
        if unsupported:  # features this backend's kernels do not run: torch runs everything
            if asked != "auto":
                raise InputError(f"the {backend.name} backend does not support {', '.join(unsupported)} yet "
                                 f"({model.name} needs them); use --attention torch")
            backend = TorchBackend()
        if backend.name == "triton":  # the device's limits: tiles that fit, the dtype (before the cache is made)
            backend = get_backend(fast_path(asked, device_limits(model.device), model.dtype, model.head_dim,
                                            model.groups, 2 * model.inv_freq.shape[-1]))
        cache = SharedCache.for_memory(
            model.num_layers, model.num_kv_heads, model.head_dim, model.inv_freq, model.dtype, model.device,
            kv_memory or default_kv_memory(model),
        )
        if graphs is None:
            graphs = backend.capture and model.device.type == "cuda"
        if model.tp is not None:  # tensor parallel: the other ranks mirror this pool; graphs not captured yet
            model.tp.mirror_cache(cache, backend.name)
            graphs = False
        refusal = f"it runs with the triton backend only (a fused-decoder backend), not {backend.name}"
        if backend.fused_decoder:  # (the lean decoder's module needs triton: not imported otherwise)
            from ..layers.lean import lean_refusal

            refusal = lean_refusal(model)
        if lean and refusal:
            raise InputError(f"the lean decoder cannot run {model.name}: {refusal}")
        if lean is None:
            lean = refusal is None
            if backend.fused_decoder and refusal:
                log.info("%s attention inside transformers' modules (no lean decoder: %s)", backend.name, refusal)
        return cls(model, cache, backend, graphs, lean)

    def plan(self, steps: list[WorkerStep], reference: bool = False, static: StaticBuffers | None = None,
             collab_stats: bool = False) -> PassPlan:
        m = self.model
        backend = ReferenceBackend() if reference else self.attention
        return plan_pass(steps, self.cache, m.scaling, m.dtype, m.max_positions, backend, m.groups, static=static,
                         collab_stats=collab_stats)

    @torch.no_grad()  # not inference_mode: cache tensors are updated in place outside passes too
    def forward(self, steps: list[WorkerStep], reference: bool = False, collab_stats: bool = False) -> PassOutput:
        """One pass: the logits after each worker's last new token and, with ``collab_stats``, each
        row's attention shares (decode passes with statistics replay CUDA graphs of their own)."""
        shares = None
        if self.graphs is not None and not reference and self.graphs.fits(steps):
            logits, plan = self.graphs.forward(steps, collab_stats)
        else:
            logits, plan = self._eager(steps, reference, collab_stats)
        if plan.stats is not None:
            shares = plan.stats.row_shares(plan.rows)
        for step in steps:  # only now, with every layer written, do the tokens count as held
            self.cache.commit(step.view[-1], list(step.token_ids))
        self.forward_passes += 1
        return PassOutput(logits, shares)

    def _eager(self, steps: list[WorkerStep], reference: bool, collab_stats: bool = False
               ) -> tuple[torch.Tensor, PassPlan]:
        plan = self.plan(steps, reference, collab_stats=collab_stats)
        B, T = len(steps), plan.T
        device = self.model.device
        input_ids = torch.zeros(B, T, dtype=torch.long)
        position_ids = torch.zeros(B, T, dtype=torch.long)
        for i, (step, row) in enumerate(zip(steps, plan.rows, strict=True)):
            input_ids[i, : row.n_new] = torch.tensor(step.token_ids)
            position_ids[i] = row.start + torch.arange(T)  # local positions in the own block
        hidden = self.hidden_states(input_ids.to(device), position_ids.to(device), plan)
        last = torch.tensor([row.n_new - 1 for row in plan.rows], device=device)
        return self.model.logits(hidden[torch.arange(B, device=device), last]), plan

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor, plan: PassPlan) -> torch.Tensor:
        """The decoder over one planned pass: input_ids, position_ids [B, T] on the device -> last
        hidden states [B, T, hidden] (the lean decoder on the triton backend where it runs)."""
        if self.model.tp is not None:  # rank 0 describes the pass to the other ranks, which run it too
            self.model.tp.mirror_pass(plan, input_ids)
        pass_cache = PassCache(plan)
        if self.lean is not None and plan.backend is self.attention:
            hidden = self.lean.hidden_states(input_ids, position_ids, plan, pass_cache.layers_written)
        else:
            hidden = self.model.hidden_states(input_ids, position_ids, pass_cache, plan)
        self.check_written(pass_cache)
        return hidden

    def move_prefix(self, dst: Block, src: Block, n: int) -> None:
        """``SharedCache.move_prefix`` (src's first n tokens onto the end of dst, keys rotated), done
        on every tensor-parallel rank: rank 0 reserves dst's pages first, so all ranks write the same."""
        if self.model.tp is not None:
            self.cache.reserve(dst, dst.length + n)
            self.model.tp.mirror_move(dst, src, n)
        self.cache.move_prefix(dst, src, n)

    def ranks_alive(self) -> bool:
        """Under tensor parallelism, whether every rank still answers (a ping to the followers; a
        lost rank also calls the group's failure hook, as the server sets it); True without it."""
        if self.model.tp is None:
            return True
        from ..distributed import TPError

        try:
            self.model.tp.send(("ping",))
        except TPError:
            return False
        return True

    def synchronize(self) -> None:
        """Wait for the device to finish the passes queued so far (for timings; no-op on the CPU)."""
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)

    def check_written(self, pass_cache: PassCache) -> None:
        """Never decode from unwritten K/V: every layer must have stored through hogwild's cache."""
        if len(pass_cache.layers_written) != self.model.num_layers:
            raise HogwildError(
                f"the model stored K/V of {len(pass_cache.layers_written)} of {self.model.num_layers} layers "
                f"through hogwild's cache: this transformers version passes the cache differently"
            )

    def prefill(self, view: list[Block], token_ids: list[int], chunk: int = 512) -> torch.Tensor:
        """Append many tokens to ``view[-1]`` in chunks; returns the logits after the last: [vocab]."""
        logits = None
        for i in range(0, len(token_ids), chunk):
            logits = self.forward([WorkerStep(token_ids[i : i + chunk], view)]).logits[0]
        if logits is None:
            raise InputError("nothing to prefill")
        return logits
