"""The followers' loop of tensor parallelism: ranks 1..K-1 replay rank 0's runner-level calls.

Rank 0's ``Runner`` describes each call that touches K/V (a new pool, a pass, a move into the
history) to the group (``TPGroup.mirror_*``, in ``hogwild.distributed``); ``follow`` receives them
and makes the same calls on a ``Runner`` of its own, over a pool of the same pages for this rank's
heads. It keeps no bookkeeping of its own: every pass carries the pages it reads.
"""

from __future__ import annotations

import signal
import sys

from ..cache import Block, SharedCache
from ..distributed import TPError
from ..layers.backends import get_backend
from .runner import Runner, WorkerStep


def follow(model) -> int:
    """A follower rank's whole life after loading: mirror rank 0's cache and passes until told to stop."""
    group = model.tp
    runner = None
    # Ctrl-C in a terminal reaches every rank: rank 0 decides how the run ends and says "stop".
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        while True:
            op = group.receive()
            kind = op[0]
            if kind == "ping":
                continue
            if kind == "stop":
                return 0
            if kind == "cache":
                _, pages, page_size, attention = op
                runner = None  # one runner at a time: drop the old pool first
                cache = SharedCache(
                    model.num_layers, model.num_kv_heads, model.head_dim, model.inv_freq, model.dtype,
                    model.device, capacity_tokens=(pages - 1) * page_size, page_size=page_size,
                )
                runner = Runner(model, cache, get_backend(attention))
            elif kind == "move":
                _, dst, src, n = op
                size = runner.cache.page_size
                runner.move_prefix(_block(dst, size), _block(src, size), n)
            elif kind == "pass":
                _, backend, refs, rows = op
                blocks = {i: _block(ref, runner.cache.page_size) for i, ref in refs.items()}
                steps = [WorkerStep(ids, [blocks[i] for i in view]) for ids, view in rows]
                if backend not in ("reference", runner.attention.name):
                    runner.attention = get_backend(backend)
                runner.forward(steps, reference=backend == "reference")
            else:
                raise TPError(f"unknown operation {kind!r} from rank 0")
    except Exception as exc:  # noqa: BLE001 - report any failure of this rank, then end it
        print(f"hogwild: error: rank {group.rank}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1


def _block(ref, page_size: int):
    block_id, name, pages, length = ref
    return Block(id=block_id, name=name, page_size=page_size, pages=list(pages), token_ids=[0] * length)
