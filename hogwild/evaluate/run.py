"""Running (problem, method group) pairs on the shared batching loop (``hogwild.BatchLoop``).

A ``ProblemRun`` is one pair in flight: a hogwild layout (one session of K workers), the
one-worker baselines (the first session is ``single``, all K vote for ``independent``), or
``answering`` / ``nothink`` (answer-while-thinking sessions, one per budget: they have no snapshots,
since the finisher and the writer's end depend on the budget; runs of one seed share their prefix).
Up to ``EvalConfig.batch`` runs are in flight at once, every row of every run in one forward pass
per step. Each hogwild session is snapshotted at every budget (forward passes); each answering
session gives its one snapshot when it ends. A run gives a ``ResultRow`` per method and budget when
it is done.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from .. import (
    AnsweringConfig,
    AnsweringSession,
    BatchLoop,
    CollabEvent,
    ContextOverflowError,
    Result,
    Session,
    SnapshotEvent,
    SolveConfig,
    collaboration,
)
from .config import ANSWERING, HOGWILD_LAYOUTS, SOLO, EvalConfig
from .data import Problem
from .grading import check_answer, majority_vote
from .store import ResultRow, rounded_mean

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    """What one session gives at one budget (a SnapshotEvent, reduced)."""

    budget: int
    answer: str | None
    answered_by: str
    forward_passes: int
    tokens: int
    elapsed_s: float
    collaboration: dict = field(default_factory=dict)
    answering: dict = field(default_factory=dict)  # Result.answering of an answering session

    @classmethod
    def of(cls, event: SnapshotEvent) -> Snapshot:
        return cls(event.budget, event.answer, event.answered_by, event.forward_passes,
                   event.tokens_generated, event.elapsed_s, event.collaboration)

    @classmethod
    def at_end(cls, budget: int, result: Result) -> Snapshot:
        """An answering session's result at the end of its run with this budget."""
        return cls(budget, result.answer, result.answered_by, result.forward_passes, result.tokens_generated,
                   result.elapsed_s, answering=result.answering)


@dataclass
class ProblemRun:
    """One (problem, method group) run in flight: its sessions and what each gave so far."""

    problem: Problem
    group: list[str]
    seeds: list[int]
    sessions: list[Session | AnsweringSession]
    snapshots: list[list[Snapshot]]  # per session, one per budget reached (answering: one, at its end)
    others: list[float] = field(default_factory=list)  # collab_stats: share on others per pass (session 0)

    @property
    def done(self) -> bool:
        return all(s.done for s in self.sessions)

    def close(self) -> None:
        for session in self.sessions:
            session.close()


def derive_seed(seed: int, problem_id: str, label: str) -> int:
    """A fixed seed per (run seed, problem, method or worker), the same on every machine."""
    digest = hashlib.sha256(f"{seed}/{problem_id}/{label}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def method_groups(methods: Sequence[str]) -> list[list[str]]:
    """How methods run: each hogwild layout and answering method alone, single and independent
    together in one run."""
    solo = [m for m in methods if m in SOLO]
    return [[m] for m in methods if m in HOGWILD_LAYOUTS or m in ANSWERING] + ([solo] if solo else [])


def open_run(engine, problem: Problem, group: Sequence[str], config: EvalConfig) -> ProblemRun:
    """The sessions of one (problem, group) run, not started yet. Raises ContextOverflowError."""
    budgets = tuple(sorted(config.budgets))
    if group[0] in ANSWERING:  # one session per budget, the same seed
        seed = derive_seed(config.seed, problem.id, group[0])
        thinkers = config.thinkers if group[0] == "answering" else 0
        sessions = [engine.answering_session(problem.problem, AnsweringConfig(thinkers, b, config.sampling(), seed))
                    for b in budgets]
        return ProblemRun(problem, list(group), [seed] * len(budgets), sessions, [[] for _ in budgets])
    if group[0] in HOGWILD_LAYOUTS:
        seeds = [derive_seed(config.seed, problem.id, group[0])]
        workers, layout = config.workers, group[0]
    else:
        count = config.workers if "independent" in group else 1
        seeds = [derive_seed(config.seed, problem.id, f"solo-{i}") for i in range(count)]
        workers, layout = 1, "independent"
    sessions = [
        engine.session(problem.problem, SolveConfig(
            workers, layout, budgets[-1], config.sampling(), seed, config.collab_every, budgets,
            config.collab_stats,
        ))
        for seed in seeds
    ]
    return ProblemRun(problem, list(group), seeds, sessions, [[] for _ in seeds])


def result_rows(run: ProblemRun) -> list[ResultRow]:
    """The rows of a finished run: one per method and budget."""
    problem, snapshots = run.problem, run.snapshots
    if run.group[0] in ANSWERING:
        return [_row(problem, run.group[0], s, run.seeds[0]) for snaps in snapshots for s in snaps]
    if run.group[0] in HOGWILD_LAYOUTS:
        return [_row(problem, run.group[0], s, run.seeds[0], measures=True) for s in snapshots[0]]
    rows = []
    if "single" in run.group:
        rows += [_row(problem, "single", s, run.seeds[0]) for s in snapshots[0]]
    if "independent" in run.group:
        for snaps in zip(*snapshots, strict=True):
            votes = [s.answer for s in snaps]
            merged = Snapshot(
                snaps[0].budget, majority_vote(votes), "vote", max(s.forward_passes for s in snaps),
                sum(s.tokens for s in snaps), max(s.elapsed_s for s in snaps),
            )
            rows.append(_row(problem, "independent", merged, run.seeds[0], votes))
    return rows


def _row(problem: Problem, method: str, snap: Snapshot, seed: int, votes: list | None = None,
         measures: bool = False) -> ResultRow:
    """measures: fill ``duplication`` and ``others_attention`` from the snapshot (hogwild layouts)."""
    correct, extracted = check_answer(snap.answer, problem.answer)
    dup = attention = None
    if measures:
        dup = rounded_mean([d["ngram_overlap"] for d in snap.collaboration["duplication"].values()])
        if "attention" in snap.collaboration:
            attention = rounded_mean([collaboration.on_others(a) for a in snap.collaboration["attention"].values()])
    metrics = snap.answering
    return ResultRow(
        problem.id, method, snap.budget, snap.answer, extracted, problem.answer, correct, snap.answered_by,
        snap.tokens, snap.forward_passes, round(snap.elapsed_s, 3), seed, votes, duplication=dup,
        others_attention=attention, first_answer_passes=metrics.get("first_answer_passes"),
        first_answer_s=metrics.get("first_answer_s"), probe_passes=metrics.get("probe_passes"),
    )


def overflow_rows(problem: Problem, group: Sequence[str], config: EvalConfig, error: str) -> list[ResultRow]:
    """A problem that does not fit the model's context counts as unanswered."""
    return [
        ResultRow(problem.id, m, b, None, None, problem.answer, False, "", 0, 0, 0.0, 0, error=error)
        for m in group for b in sorted(config.budgets)
    ]


def run_problems(
    engine,
    todo: Iterable[tuple[Problem, list[str]]],
    config: EvalConfig,
    on_rows: Callable[[list[ResultRow]], None],
    on_pass: Callable[[int], None] = lambda live: None,
    on_curve: Callable[[ProblemRun], None] = lambda run: None,
) -> None:
    """Run (problem, group) pairs, up to ``config.batch`` at a time, every worker of every run in
    flight in one forward pass per step (as ``Engine.stream`` runs one session). ``on_rows`` gets
    each run's rows as soon as it is done; ``on_pass`` the number of runs in flight after a pass;
    ``on_curve`` (with ``collab_stats``) each done hogwild run, whose ``others`` holds its share on
    others per pass."""
    loop = BatchLoop(engine.runner)
    owner: dict[Session | AnsweringSession, tuple[ProblemRun, int]] = {}  # session -> (its run, its index in it)
    queue = iter(todo)
    active: list[ProblemRun] = []
    try:
        with torch.no_grad():  # as Runner.forward: the cache is updated in place between passes
            while True:
                while len(active) < config.batch and (item := next(queue, None)) is not None:
                    problem, group = item
                    try:
                        run = open_run(engine, problem, group, config)
                    except ContextOverflowError as exc:
                        log.warning("%s: %s", problem.id, exc)
                        on_rows(overflow_rows(problem, group, config, str(exc)))
                        continue
                    active.append(run)
                    for i, session in enumerate(run.sessions):
                        owner[session] = run, i
                        loop.add(session)
                if not active:
                    return
                for session, got in loop.step().sessions.items():
                    if got.error is not None:
                        raise got.error
                    run, i = owner[session]
                    if i == 0:
                        run.others += [rounded_mean([collaboration.on_others(s) for s in e.shares.values()])
                                       for e in got.events if isinstance(e, CollabEvent)]
                    run.snapshots[i] += [Snapshot.of(e) for e in got.events if isinstance(e, SnapshotEvent)]
                    if isinstance(session, AnsweringSession) and session.done and not run.snapshots[i]:
                        run.snapshots[i].append(Snapshot.at_end(session.config.budget, session.result()))
                for run in [run for run in active if run.done]:
                    active.remove(run)
                    for session in run.sessions:
                        loop.remove(session)
                        del owner[session]
                    on_rows(result_rows(run))
                    if config.collab_stats and run.group[0] in HOGWILD_LAYOUTS:
                        on_curve(run)
                on_pass(len(active))
    finally:
        for run in active:
            run.close()
