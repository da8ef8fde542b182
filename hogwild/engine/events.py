"""What a solve produces: typed events while it runs, and a Result at the end."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class HistoryStep:
    """A finished step: ``text`` is the step as written (seeded words included, header not)."""

    worker: str
    step: int
    text: str


@dataclass(frozen=True)
class WorkerText:
    """Everything one worker wrote, step headers included, as the others saw it."""

    name: str
    text: str


@dataclass
class Result:
    """The outcome of one solve. ``answer`` is None only if even the finisher gave nothing."""

    answer: str | None
    answered_by: str  # a worker's name, "finisher", or "vote" (independent workers)
    workers: list[WorkerText]
    history: list[HistoryStep]
    forward_passes: int
    tokens_generated: int
    elapsed_s: float
    model: str
    layout: str
    timings: dict[str, float] = field(default_factory=dict)  # seconds: prefill, decode, finisher
    interrupted: bool = False
    # "duplication": per worker (always); "attention": per worker, run-average shares (collab_stats)
    collaboration: dict = field(default_factory=dict)
    # answer while thinking (``AnsweringSession``): "text" (the writer's answer) and its metrics
    answering: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TokenEvent:
    """A worker generated a token; ``text`` is the new text it adds (may be empty mid-character).
    role: "worker" (a hogwild solve), or "thinker" / "writer" (answer while thinking)."""

    worker: str
    worker_index: int
    token_id: int
    text: str
    role: str = "worker"


@dataclass(frozen=True)
class ModeEvent:
    """Answer while thinking changed mode: "think" (thinkers only, the writer paused or not started),
    "both" (the writer writes while the thinkers think) or "write" (thinking is over)."""

    mode: str
    forward_passes: int


@dataclass(frozen=True)
class ProbeEvent:
    """A probe asked a thinker whether its thoughts are far enough ahead of the answer: ``ready``
    lets the writer write one more paragraph. reason: "interval" or "paragraph"."""

    p_yes: float
    p_no: float
    ready: bool
    reason: str
    forward_passes: int


@dataclass(frozen=True)
class FirstAnswerTokenEvent:
    """The writer's first token: after this many forward passes (probes not counted) and seconds."""

    forward_passes: int
    elapsed_s: float


@dataclass(frozen=True)
class StepStartEvent:
    """A worker opens a step; ``text`` is what the protocol writes for it (header, seeded words)."""

    worker: str
    worker_index: int
    step: int
    text: str


@dataclass(frozen=True)
class StepEvent:
    """A worker finished a step; it goes into the shared history."""

    worker: str
    worker_index: int
    step: int
    text: str


@dataclass(frozen=True)
class PassEvent:
    """A forward pass ended (for progress bars)."""

    forward_passes: int
    tokens_generated: int
    elapsed_s: float


@dataclass(frozen=True)
class CollabEvent:
    """Where each active worker's attention went in one pass (``collab_stats``).

    shares: worker -> ``{"prompt", "history", "protocol", "own": x, "others": {name: x}}``, means over
    layers, heads and the pass's tokens (they sum to 1); per_layer: the same dicts with a list of
    one value per layer instead of each x.
    """

    forward_passes: int
    shares: dict[str, dict]
    per_layer: dict[str, dict]


@dataclass(frozen=True)
class AnswerEvent:
    r"""A final answer: written by a worker in \boxed{}, or produced by the finisher or a vote."""

    answer: str | None
    answered_by: str
    forward_passes: int


@dataclass(frozen=True)
class SnapshotEvent:
    """The answer the finisher gives at a budget of forward passes (for evaluations)."""

    budget: int
    answer: str | None
    answered_by: str
    forward_passes: int
    tokens_generated: int
    elapsed_s: float
    collaboration: dict = field(default_factory=dict)  # as Result.collaboration, up to this budget


@dataclass(frozen=True)
class DoneEvent:
    result: Result


Event = (TokenEvent | StepStartEvent | StepEvent | PassEvent | CollabEvent | AnswerEvent | SnapshotEvent | DoneEvent
         | ModeEvent | ProbeEvent | FirstAnswerTokenEvent)
