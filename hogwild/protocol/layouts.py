"""Layouts: which blocks each worker reads, in which order (its view; its own block last).

For N workers with blocks P (prompt), H (history, opened by its header), O ("others" header),
M (unfinished marker), S ("own" header) and W_i (worker i's current step):

- ``combined``:    P, H, O, W_j, M for every other worker j in index order, S, W_i
- ``interleaved``: P, H, S, W_i                    (others' unfinished steps are not visible)
- ``contiguous``:  P, W_j, M for every other j, W_i (no history: blocks grow for the whole run)
- ``independent``: P, W_i                           (self-consistency: workers never meet)

Others are shown in a fixed, global order (Alice, Bob, Carol, ...) rather than rotated per
worker: every worker then reads the same workspace, only with itself moved to the end, and each
worker's block keeps the same neighbours in every view.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..cache import Block

LAYOUTS = ("combined", "contiguous", "interleaved", "independent")
#: Layouts where finished steps move into the shared history block.
HISTORY_LAYOUTS = ("combined", "interleaved")


@dataclass
class SharedBlocks:
    """The blocks of one session that are not a worker's own (None where a layout has none)."""

    prompt: Block
    history: Block | None = None
    others_header: Block | None = None
    marker: Block | None = None
    own_header: Block | None = None


def view(layout: str, shared: SharedBlocks, own: list[Block], worker: int) -> list[Block]:
    """Worker ``worker``'s view under ``layout``."""
    others = []
    for j, block in enumerate(own):
        if j != worker:
            others += [block, shared.marker]
    if layout == "combined":
        header = [shared.others_header] if others else []
        return [shared.prompt, shared.history, *header, *others, shared.own_header, own[worker]]
    if layout == "interleaved":
        return [shared.prompt, shared.history, shared.own_header, own[worker]]
    if layout == "contiguous":
        return [shared.prompt, *others, own[worker]]
    return [shared.prompt, own[worker]]


def finisher_view(layout: str, shared: SharedBlocks, own: list[Block]) -> list[Block]:
    """The whole shared state as one text (before the finisher's own block)."""
    steps = []
    for block in own:
        steps += [block, shared.marker]
    if layout in HISTORY_LAYOUTS:
        return [shared.prompt, shared.history, *steps]
    return [shared.prompt, *steps]
