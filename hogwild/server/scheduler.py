"""The scheduler thread that batches sessions: admission, one forward pass for all, cancel, drain.

One scheduler thread owns the engine. Request handlers reserve a place (a request counts as
queued from that moment), build their (not yet started) ``Session`` off the event loop and hand it
over as a ``Job``; the scheduler admits up to ``max_sessions`` live sessions, prefills new ones, and
then runs ONE forward pass for the workers of every live session at a time through the engine's
batching loop (``BatchLoop``), which hands each session its rows of the logits. Whatever a job
gets goes back through its ``deliver`` callback. A finished, failed or cancelled session is
closed at once, which frees its cache blocks.

A full K/V pool makes a new session wait, never fails a running one: a session is admitted only
when the pool can hold its ``token_bound`` next to the bounds of the live ones (and has that many
free slots); otherwise it stays first in the queue until running sessions finish. A session whose
bound exceeds the whole pool never gets this far (``requests.prepare_session`` refuses it: 400).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from .. import (
    AnsweringSession,
    BatchLoop,
    CacheFullError,
    Engine,
    Event,
    HogwildError,
    InputError,
    PassEvent,
    Result,
    Session,
    StepStartEvent,
    TokenEvent,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Update:
    """The events of one pass (or of the prefill) of one session."""

    events: list[Event]
    forward_passes: int
    tokens_generated: int


@dataclass(frozen=True)
class Finished:
    result: Result


@dataclass(frozen=True)
class Failed:
    """The job ended without a result: 500 for a failed pass, 503 when the server shuts down, 400
    for a session that cannot fit even the idle K/V pool."""

    message: str
    status: int = 500
    code: str | None = None


Item = Update | Finished | Failed


class ServerBusy(HogwildError):
    """Every session slot and queue place is taken, or the server is shutting down (HTTP 503)."""

    def __init__(self, message: str, code: str = "server_busy"):
        super().__init__(message)
        self.code = code


@dataclass(eq=False)
class Job:
    """One request inside the scheduler: a hogwild ``Session`` or an ``AnsweringSession`` (answer
    while thinking), batched alike. ``deliver`` must be thread-safe; ``prompt_tokens`` is set when
    the session starts (the tokens its prompts prefilled)."""

    session: Session | AnsweringSession
    deliver: Callable[[Item], None]
    stream: bool = False
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: bool = False
    streamed: dict[str, list[str]] = field(default_factory=dict)  # worker -> texts sent so far
    prompt_tokens: int = 0

    def send(self, events: list[Event], final: Result | None = None) -> None:
        """Deliver a streamed update; with the ``final`` result, trim it so that what was streamed
        adds up to the final transcript (see ``final_events``)."""
        if final is not None:
            events = final_events(events, self.streamed, final)
        for e in events:
            if isinstance(e, StepStartEvent | TokenEvent):
                self.streamed.setdefault(e.worker, []).append(e.text)
        self.deliver(Update(events, self.session.forward_passes, self.session.tokens_generated))


def prompt_tokens(session: Session | AnsweringSession) -> int:
    """The tokens a started session prefilled as its prompts (an answering session has two: the
    thinkers' and the writer's)."""
    if isinstance(session, AnsweringSession):
        return session.tp.length + session.wp.length
    return len(session.prompt_ids)


def final_events(events: list[Event], streamed: dict[str, list[str]], result: Result) -> list[Event]:
    """The last pass's events, made to add up to the transcript.

    A step opened in the last pass (its header queued, never fed) is left out of the transcript,
    so its ``step_start`` is dropped; text that a token held back mid-character and the transcript
    shows goes out with that worker's last token.
    """
    events: list[Event | None] = list(events)
    texts = [i for i, e in enumerate(events) if isinstance(e, StepStartEvent | TokenEvent)]
    by_worker = {w.name: [i for i in texts if events[i].worker == w.name] for w in result.workers}
    for worker in result.workers:
        mine = by_worker[worker.name]
        sent = "".join(streamed.get(worker.name, ())) + "".join(events[i].text for i in mine)
        while mine and isinstance(events[mine[-1]], StepStartEvent) and not worker.text.startswith(sent):
            sent = sent[: len(sent) - len(events[mine[-1]].text)]
            events[mine.pop()] = None
        tokens = [i for i in mine if isinstance(events[i], TokenEvent)]
        if worker.text != sent and worker.text.startswith(sent) and tokens:
            last = events[tokens[-1]]
            events[tokens[-1]] = dataclasses.replace(last, text=last.text + worker.text[len(sent) :])
        elif worker.text != sent:
            log.warning("the stream of %s does not add up to its transcript", worker.name)
    return [e for e in events if e is not None]


@dataclass(frozen=True)
class Stats:
    """What /health shows: sessions live and queued now, the K/V bytes and the counters."""

    live_sessions: int = 0
    queued: int = 0
    cache_bytes: int = 0
    batched_passes: int = 0
    max_batch_rows: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    aborted: int = 0


class Reservation:
    """A place taken in the scheduler by an accepted request, before its session exists."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.used = False

    def submit(self, job: Job) -> None:
        """Queue the job in this place (ServerBusy if the server began shutting down meanwhile)."""
        self.scheduler._submit(self, job)


class Scheduler:
    """The one thread that runs the model: admits sessions, batches their passes, frees them."""

    def __init__(self, engine: Engine, max_sessions: int = 8, queue_size: int = 32):
        if max_sessions < 1 or queue_size < 0:
            raise InputError("max_sessions must be >= 1 and queue_size >= 0")
        self.engine = engine
        self.loop = BatchLoop(engine.runner)
        self.max_sessions = max_sessions
        self.queue_size = queue_size
        self._cond = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._live: list[Job] = []
        self._reserved = 0  # accepted requests whose session is being built
        self._draining = False  # no new requests
        self._ending = False  # ``abort`` was called: nothing more runs
        self._abort: str | None = None
        self._failure: str | None = None  # ``fail``: the engine cannot run any more
        self._stop = False
        self._thread: threading.Thread | None = None
        self._counts = collections.Counter()
        self._cache_bytes = 0

    # -- called from request handlers and the server (any thread) --
    @contextmanager
    def reservation(self) -> Iterator[Reservation]:
        """Take a place for a request (ServerBusy when every slot and queue place is taken); it
        is given back on leaving unless a job was submitted in it."""
        with self._cond:
            self._check_open()
            if len(self._live) + len(self._waiting) + self._reserved >= self.max_sessions + self.queue_size:
                raise ServerBusy(
                    f"the server is busy: {self.max_sessions} sessions run and {self.queue_size} wait; retry later"
                )
            self._reserved += 1
        place = Reservation(self)
        try:
            yield place
        finally:
            if not place.used:
                with self._cond:
                    self._reserved -= 1

    def _check_open(self, accepted: bool = False) -> None:
        """Refuse new requests while draining; an accepted one may still queue, until ``abort``."""
        if self._failure is not None:
            raise ServerBusy(f"the server cannot run the model any more: {self._failure}", "engine_failed")
        if self._stop or self._ending or (self._draining and not accepted):
            raise ServerBusy("the server is shutting down", "server_shutting_down")

    def _submit(self, place: Reservation, job: Job) -> None:
        with self._cond:
            self._check_open(accepted=True)
            place.used = True
            self._reserved -= 1
            self._waiting.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Ask the scheduler to drop a job (its session is closed before the next pass)."""
        if not job.cancelled.is_set():
            job.cancelled.set()
            with self._cond:
                self._cond.notify()

    def stats(self) -> Stats:
        with self._cond:
            counts = self._counts
            return Stats(
                live_sessions=len(self._live), queued=len(self._waiting) + self._reserved,
                cache_bytes=self._cache_bytes, batched_passes=counts["passes"], max_batch_rows=counts["max_rows"],
                finished=counts["finished"], cancelled=counts["cancelled"], failed=counts["failed"],
                aborted=counts["aborted"],
            )

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop

    @property
    def status(self) -> str:
        """``ok``, ``draining`` (shutting down: no new requests), ``failed`` (see ``fail``) or ``stopped``."""
        if self._failure is not None:
            return "failed"
        if not self.alive:
            return "stopped"
        return "draining" if self._draining else "ok"

    @property
    def idle(self) -> bool:
        """No request is live, queued or being accepted."""
        with self._cond:
            return not (self._live or self._waiting or self._reserved)

    def drain(self) -> None:
        """Stop accepting requests (503); the running and queued ones go on."""
        with self._cond:
            self._draining = True

    def abort(self, message: str) -> None:
        """End every running and queued request now with a 503 error (their sessions are freed)."""
        with self._cond:
            self._draining = self._ending = True
            if self._live or self._waiting:
                self._abort = message
                self._cond.notify()

    def fail(self, message: str) -> None:
        """The engine cannot run any more (a tensor-parallel rank is gone): refuse new requests
        (503) and end every running and queued one now with a 503 error. Called from any thread,
        also while the scheduler thread is stuck in a pass: the jobs are ended from here, their
        sessions left as they are (the process is about to exit)."""
        with self._cond:
            if self._failure is not None:
                return
            self._failure = message
            self._draining = self._ending = True
            jobs = self._live + list(self._waiting)
            self._live, self._waiting = [], collections.deque()
            self._counts["aborted"] += len(jobs)
            self._cond.notify()
        log.error("hogwild: the engine failed (%s): %d request(s) ended", message, len(jobs))
        for job in jobs:
            job.deliver(Failed(f"the server cannot run the model any more: {message}", 503, "engine_failed"))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="hogwild-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:  # after ``fail`` it may be stuck in a pass that never ends
            self._thread.join(min(timeout, 1.0) if self._failure is not None else timeout)

    # -- the scheduler thread --
    def _loop(self) -> None:
        try:
            while self._iteration():
                pass
        except Exception:  # a bug here must not leave clients waiting forever
            log.exception("the scheduler crashed")
            raise
        finally:
            with self._cond:
                self._stop = True  # no more submissions: nobody would serve them
                jobs = self._live + list(self._waiting)
                self._live, self._waiting = [], collections.deque()
            for job in jobs:
                self.loop.remove(job.session)
                job.deliver(Failed("the server stopped", 503, "server_shutting_down"))
            self._measure()

    def _iteration(self) -> bool:
        """Wait for work, admit, start, drop the cancelled, run one pass; False once stopped. (A
        method of its own, so that nothing of a finished job outlives it in a local variable.)"""
        with self._cond:
            while not self._stop and self._abort is None and not self._live and not self._waiting:
                self._cond.wait()
            if self._stop or self._failure is not None:
                return False
            aborted = self._take_aborted()
            new = [] if aborted else self._admit()
        for job, message in aborted:
            self._remove(job, "aborted", Failed(message, 503, "server_shutting_down"))
        for job in new:
            self._start(job)
        self._drop_cancelled()
        self._step()
        self._measure()
        return True

    def _admit(self) -> list[Job]:
        """Move waiting jobs into the free slots, first come first served, while the K/V pool has
        room for their bounds (caller holds the lock). The first job that does not fit waits, and
        the ones behind it with it, until running sessions free their pages."""
        if any(job.cancelled.is_set() for job in self._waiting):
            kept = collections.deque(job for job in self._waiting if not job.cancelled.is_set())
            self._counts["cancelled"] += len(self._waiting) - len(kept)
            self._waiting = kept
        new = []
        while self._waiting and len(self._live) < self.max_sessions:
            job = self._waiting[0]
            if self._live and job.session.token_bound() > self._room():
                break
            self._live.append(self._waiting.popleft())
            new.append(job)
        return new

    def _room(self) -> int:
        """Pool slots a new session may count on: those no live session's bound claims, and no
        more than are free now (caller holds the lock; only this thread touches the cache)."""
        cache = self.engine.runner.cache
        claimed = sum(job.session.token_bound() for job in self._live)
        return min(cache.capacity_tokens - claimed, cache.free_tokens)

    def _take_aborted(self) -> list[tuple[Job, str]]:
        """Jobs to end because of ``abort`` (caller holds the lock)."""
        if self._abort is None:
            return []
        message, self._abort = self._abort, None
        jobs = self._live + list(self._waiting)
        self._waiting.clear()
        return [(job, message) for job in jobs]

    def _measure(self) -> None:
        """Refresh the K/V bytes for /health (only this thread touches the cache)."""
        nbytes = self.engine.runner.cache.nbytes()
        with self._cond:
            self._cache_bytes = nbytes

    def _remove(self, job: Job, outcome: str, item: Finished | Failed | None) -> None:
        self.loop.remove(job.session)
        with self._cond:
            if job in self._live:
                self._live.remove(job)
            self._counts[outcome] += 1
        self._measure()
        if item is not None:
            job.deliver(item)
        log.info("session %s %s", job.id, outcome)

    def _start(self, job: Job) -> None:
        if job.cancelled.is_set():
            return self._remove(job, "cancelled", None)
        session = job.session
        try:
            opened = self.loop.add(session)
            job.started = True
            job.prompt_tokens = prompt_tokens(session)
            if job.stream:
                job.send(opened)  # the workers' first steps
        except CacheFullError as exc:  # raised before any work: the session is untouched
            with self._cond:
                others = [j for j in self._live if j is not job]
                if others:  # wait for them to free pages, first in line
                    self._live.remove(job)
                    self._waiting.appendleft(job)
                    return None
            log.warning("session %s does not fit the idle K/V pool: %s", job.id, exc)
            return self._remove(job, "failed", Failed(str(exc), 400, "kv_cache_too_small"))
        except InputError as exc:  # the request's own fault, found only at start (a prompt beyond the context)
            log.info("session %s refused at start: %s", job.id, exc)
            return self._remove(job, "failed", Failed(str(exc), 400, getattr(exc, "code", None)))
        except Exception as exc:
            log.exception("session %s failed to start", job.id)
            return self._remove(job, "failed", Failed(f"{type(exc).__name__}: {exc}"))

    def _drop_cancelled(self) -> None:
        with self._cond:
            gone = [job for job in self._live if job.cancelled.is_set()]
        for job in gone:
            job.session.interrupted = True
            self._remove(job, "cancelled", None)

    def _step(self) -> None:
        with self._cond:
            jobs = {job.session: job for job in self._live if job.started and not job.session.done}
        if not jobs:
            return
        try:
            step = self.loop.step()
        except Exception:
            if len(jobs) == 1 and self.engine.runner.ranks_alive():
                return self._fail_pass(next(iter(jobs.values())))
            log.exception("a pass failed with a tensor-parallel rank gone")  # its failure hook ended every request
            return
        with self._cond:
            self._counts["passes"] += 1
            self._counts["max_rows"] = max(self._counts["max_rows"], step.rows)
        for session, got in step.sessions.items():
            job = jobs[session]
            if got.stage == "pass":
                self._fail_pass(job, got.error)
            elif got.error is not None:
                log.error("session %s failed", job.id, exc_info=got.error)
                self._remove(job, "failed", Failed(f"{type(got.error).__name__}: {got.error}"))
            else:
                self._deliver(job, got.events)

    def _fail_pass(self, job: Job, error: Exception | None = None) -> None:
        log.error("session %s: its pass failed", job.id, exc_info=error or True)
        self._remove(job, "failed", Failed("a forward pass failed; see the server's log"))

    def _deliver(self, job: Job, events: list[Event]) -> None:
        """Deliver the events a session got from a step; close it when done."""
        session = job.session
        try:
            result = session.result() if session.done else None
            if job.stream:
                job.send([e for e in events if not isinstance(e, PassEvent)], result)
        except Exception as exc:
            log.exception("session %s failed", job.id)
            return self._remove(job, "failed", Failed(f"{type(exc).__name__}: {exc}"))
        if result is not None:
            self._remove(job, "finished", Finished(result))
