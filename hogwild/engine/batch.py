"""The one batching loop of every front end (``Engine.stream``, the server's scheduler, eval).

Sessions join (``add``: started, their opening events returned) and leave (``remove``: their blocks
freed); each ``step`` runs one forward pass over the rows of every live session and hands each
session its rows of the logits and of the attention shares. A pass whose rows come from several
sessions and fails is retried session by session (nothing is committed by a failed pass), so one
session at fault fails alone.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from .events import Event
from .runner import Runner
from .session import Session

log = logging.getLogger(__name__)


@dataclass
class SessionStep:
    """What one session got from a step: its events (snapshots that came due included), or the
    exception that ended it, raised in its ``stage`` ("pass" or "advance"; the session is not removed)."""

    events: list[Event] = field(default_factory=list)
    error: Exception | None = None
    stage: str = ""


@dataclass
class LoopStep:
    """One step of the loop: how many rows its pass had, and what each session got."""

    rows: int = 0
    sessions: dict[Session, SessionStep] = field(default_factory=dict)


class BatchLoop:
    """Sessions over one runner, advanced together one forward pass per ``step``."""

    def __init__(self, runner: Runner):
        self.runner = runner
        self.sessions: list[Session] = []

    def add(self, session: Session) -> list[Event]:
        """Start ``session`` (its prompt is prefilled now) and batch it from the next step on.
        Errors of the start (a full pool, say) propagate, with the session not added."""
        session.start()
        self.sessions.append(session)
        return session.take_opened()

    def remove(self, session: Session) -> None:
        """Stop batching ``session`` and free its blocks (done or not)."""
        if session in self.sessions:
            self.sessions.remove(session)
        session.close()

    def step(self) -> LoopStep:
        """One pass over every live session's rows (no pass when none has rows).

        Raises what the pass raised when it held one session's rows only, or when a
        tensor-parallel rank is gone (every session is lost then)."""
        live = [s for s in self.sessions if not s.done]
        inputs = [s.inputs() for s in live]
        rows = [row for mine in inputs for row in mine]
        if not rows:
            return LoopStep()
        try:
            t0 = time.perf_counter()
            out = self.runner.forward(rows, collab_stats=any(s.config.collab_stats for s in live))
            self.runner.synchronize()  # a GPU pass runs on after forward returns: time all of it
            elapsed = time.perf_counter() - t0
        except Exception:
            if len(live) == 1 or not self.runner.ranks_alive():
                raise
            log.exception("a batched pass of %d sessions failed; running them one by one", len(live))
            return LoopStep(len(rows), {s: self._alone(s) for s in live})
        steps, start = {}, 0
        for session, mine in zip(live, inputs, strict=True):
            end = start + len(mine)
            shares = out.shares[start:end] if out.shares is not None and session.config.collab_stats else None
            steps[session] = self._advance(session, out.logits[start:end], elapsed, shares)
            start = end
        return LoopStep(len(rows), steps)

    def _alone(self, session: Session) -> SessionStep:
        try:
            t0 = time.perf_counter()
            out = self.runner.forward(session.inputs(), collab_stats=session.config.collab_stats)
            self.runner.synchronize()
        except Exception as exc:
            return SessionStep(error=exc, stage="pass")
        return self._advance(session, out.logits, time.perf_counter() - t0, out.shares)

    @staticmethod
    def _advance(session: Session, logits, elapsed: float, shares) -> SessionStep:
        try:
            return SessionStep(session.advance(logits, elapsed, shares) + session.due_snapshots())
        except Exception as exc:
            return SessionStep(error=exc, stage="advance")
