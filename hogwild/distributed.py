"""Tensor parallelism with transformers' own TP plan: one process per rank under ``torchrun``.

transformers shards each supported model by its TP plan (``DistributedConfig(tp_size=K)``): every
rank holds Hq/K query and Hkv/K K/V heads, its attention function and cache see only those, and
the logits come back whole on every rank (the LM head gathers its output).

Rank 0 leads: it runs the front end (terminal, HTTP, files), the sessions and their block
bookkeeping, and samples. The other ranks *follow*: they hold a pool of the same pages for their
own heads and no bookkeeping at all. Each runner-level call that touches K/V is described to them
on a control channel (a gloo group, also under NCCL) before rank 0 runs it, in one place each
(``Runner.for_model``, ``Runner.hidden_states``, ``Runner.move_prefix`` call ``mirror_*``), and
``follow`` replays it on a ``Runner`` of its own:

- ``("cache", pages, page_size, attention)``: rank 0 made a new runner's pool (the followers make
  theirs, of the same pages; one runner at a time);
- ``("pass", backend, blocks, rows)``: a forward pass; ``blocks`` maps block id to (pages, length)
  as they are before the pass, rows are (new token ids, view as block ids). Pages are reserved on
  rank 0 before it is sent, so the followers write the same slots;
- ``("move", dst, src, n)``: ``Runner.move_prefix`` (key rotations) with both blocks' pages;
- ``("ping",)`` when rank 0 has sent nothing for a while (the followers' wait has a timeout);
- ``("stop",)``: the run is over.

Every rank then runs the same forward pass on its heads, so the ranks never diverge; the tokens
sampled on rank 0 reach the followers as the next pass's new tokens. Collectives time out after
``HOGWILD_TP_TIMEOUT`` seconds (default 60): a dead rank ends the others with a message instead of
a hang. A front end that must end cleanly (the server: it answers its requests, then exits) sets
``TPGroup.on_failure``; it is called once, from whichever thread finds the rank gone, instead of
the process's immediate exit.
"""

from __future__ import annotations

import datetime
import os
import sys
import threading
import time
from collections.abc import Callable

import torch

from .errors import HogwildError, InputError

TIMEOUT_ENV = "HOGWILD_TP_TIMEOUT"
DEFAULT_TIMEOUT_S = 60.0


class TPError(HogwildError):
    """A tensor-parallel rank failed or could not be reached."""


def check_heads(config, tp: int) -> None:
    """Refuse a TP size that does not divide the model's head counts (from the config alone)."""
    if tp < 1:
        raise InputError(f"--tp must be at least 1, got {tp}")
    hq, hkv = config.num_attention_heads, config.num_key_value_heads
    if hq % tp or hkv % tp:
        sizes = [k for k in range(2, hkv + 1) if hq % k == 0 and hkv % k == 0]
        raise InputError(
            f"--tp {tp} does not divide the model's heads ({hq} query heads, {hkv} K/V heads): every rank "
            f"needs whole heads; tensor-parallel sizes that fit: {', '.join(map(str, sizes)) or 'none'}"
        )


def timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise InputError(f"{TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    if not value > 0:
        raise InputError(f"{TIMEOUT_ENV} must be positive, got {raw!r}")
    return value


def tp_device(device: str | torch.device, tp: int) -> torch.device:
    """This rank's device: ``cuda`` becomes ``cuda:LOCAL_RANK`` (one GPU per rank)."""
    device = torch.device(device)
    if device.type != "cuda":
        return device
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", tp))
    available = torch.cuda.device_count()
    if local_ranks > available:
        raise InputError(f"{local_ranks} ranks on this node but only {available} GPUs: one GPU per rank is needed")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


class TPGroup:
    """The process group of one tensor-parallel run and its control channel (see the module doc)."""

    def __init__(self, size: int, device: torch.device, timeout: float):
        import torch.distributed as dist

        self.size = size
        self.device = device
        self.timeout = timeout
        backend = "nccl" if device.type == "cuda" else "gloo"
        delta = datetime.timedelta(seconds=timeout)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=delta)
        self.rank = dist.get_rank()
        self.control = dist.new_group(backend="gloo", timeout=delta)
        self._lock = threading.Lock()
        self._last_sent = time.monotonic()
        self._stopped = False
        self._cache = None  # rank 0: the pool the followers mirror
        self.on_failure: Callable[[str], None] | None = None  # rank 0: instead of exiting when a rank is lost
        self.failed: str | None = None
        if self.rank == 0:
            threading.Thread(target=self._heartbeat, name="hogwild-tp-ping", daemon=True).start()

    @property
    def leader(self) -> bool:
        return self.rank == 0

    # -- the channel ---------------------------------------------------------------------------
    def send(self, op: tuple) -> None:
        import torch.distributed as dist

        with self._lock:
            if self._stopped:
                raise TPError("the tensor-parallel group is stopped")
            try:
                dist.broadcast_object_list([op], src=0, group=self.control)
            except Exception as exc:  # noqa: BLE001 - gloo raises RuntimeError/DistError subclasses
                error = TPError(f"a tensor-parallel rank is gone ({type(exc).__name__}: {exc})")
                if self.on_failure is not None and not self._stopped:
                    self._fail(str(error))
                raise error from exc
            self._last_sent = time.monotonic()

    def receive(self) -> tuple:
        import torch.distributed as dist

        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def _heartbeat(self) -> None:
        """Rank 0: keep idle followers' waits under the timeout; exit the process if a rank is lost."""
        interval = self.timeout / 4
        while True:
            time.sleep(interval / 2)
            if self._stopped:
                return
            if time.monotonic() - self._last_sent < interval or self._lock.locked():
                continue
            try:
                self.send(("ping",))
            except TPError as exc:
                if self._stopped:
                    return
                self._fail(str(exc))
                return

    def _fail(self, message: str) -> None:
        """A rank is lost: hand it to ``on_failure`` (once), or exit the process now."""
        if self.failed is not None:
            return
        self.failed = message
        print(f"hogwild: error: rank 0: {message}; exiting", file=sys.stderr, flush=True)
        if self.on_failure is None:
            os._exit(1)
        self.on_failure(message)

    def stop(self) -> None:
        """Rank 0: tell the followers the run is over, then leave the group."""
        import torch.distributed as dist

        if self.failed is not None:  # a rank is gone: nothing to tell, no group to leave cleanly
            self._stopped = True
            return
        if self.leader and not self._stopped:
            try:
                self.send(("stop",))
            except TPError:
                pass
        self._stopped = True
        if dist.is_initialized():
            dist.destroy_process_group()

    # -- rank 0's runner-level calls, mirrored (``Runner`` makes them; ``follow`` replays them) --------
    def mirror_cache(self, cache, attention: str) -> None:
        """Rank 0: the followers make the same pool (one runner at a time)."""
        self.send(("cache", cache.num_pages, cache.page_size, attention))
        self._cache = cache

    def mirror_move(self, dst, src, n: int) -> None:
        """Rank 0: ``Runner.move_prefix`` (pages of dst already reserved); followers: nothing."""
        if self.leader:
            self.send(("move", _ref(dst), _ref(src), n))

    def mirror_pass(self, plan, input_ids: torch.Tensor) -> None:
        """Rank 0: describe the pass (pages already reserved) before running it; followers: nothing.

        input_ids: [B, T] of the pass (row i's new tokens are its first ``n_new``)."""
        if not self.leader:
            return
        if plan.cache is not self._cache:
            raise TPError("under --tp only the runner made last (Runner.for_model) can run passes")
        blocks, rows = {}, []
        ids = input_ids.tolist()
        for i, row in enumerate(plan.rows):
            for entry in row.entries:
                blocks[entry.block.id] = _ref(entry.block)
            rows.append((ids[i][: row.n_new], [e.block.id for e in row.entries]))
        self.send(("pass", plan.backend.name, blocks, rows))


def _ref(block) -> tuple:
    return block.id, block.name, list(block.pages), block.length


# -- set-up and the followers' loop ------------------------------------------------------------
#: This process's group. Process-wide on purpose, as torch.distributed's own process group is: a
#: torchrun rank joins one group for its life, and the CLI's exit (``shutdown``) must reach it.
_GROUP: TPGroup | None = None


def current() -> TPGroup | None:
    """The tensor-parallel group of this process, if any."""
    return _GROUP


def init_tp(tp: int, device: str | torch.device) -> TPGroup:
    """Join the ``torchrun`` group of ``tp`` ranks (checks: WORLD_SIZE == tp, one GPU per rank)."""
    global _GROUP
    if _GROUP is not None:
        if _GROUP.size != tp:
            raise InputError(f"this process already runs tensor parallel over {_GROUP.size} ranks, not {tp}")
        return _GROUP
    world = os.environ.get("WORLD_SIZE")
    if world is None:
        raise InputError(
            f"--tp {tp} runs one process per rank: start it with torchrun --nproc-per-node {tp} -m hogwild.cli ..."
        )
    if int(world) != tp:
        raise InputError(f"--tp {tp} needs {tp} ranks, but torchrun started {world} (--nproc-per-node x nodes)")
    device = tp_device(device, tp)
    _GROUP = TPGroup(tp, device, timeout_s())
    return _GROUP


def shutdown() -> None:
    """End this process's tensor-parallel group (rank 0 stops the followers first)."""
    global _GROUP
    if _GROUP is not None:
        group, _GROUP = _GROUP, None
        group.stop()
