"""The OpenAI-compatible server: a FastAPI app and the scheduler thread that batches sessions.

One scheduler thread owns the engine. Request handlers validate a request, build its (not yet
started) ``Session`` and hand it to the scheduler as a ``Job``; the scheduler admits up to
``max_sessions`` live sessions, prefills new ones, and then runs ONE forward pass for the
workers of every live session at a time, handing each session its rows of the logits. Events go
back to the handler through an ``asyncio.Queue`` fed with ``loop.call_soon_threadsafe``. A
finished, failed or cancelled session is closed at once, which frees its cache blocks.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.engine import Engine
from ..engine.events import AnswerEvent, Event, PassEvent, Result, StepEvent, StepStartEvent, TokenEvent
from ..engine.session import Session, SolveConfig
from ..errors import ContextOverflowError, HogwildError, InputError
from ..sampling import SamplingParams

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
DEFAULT_BUDGET = 512


# -- requests ---------------------------------------------------------------------------------
class Message(BaseModel):
    """A chat message; ``content`` may be a string or OpenAI's list of text parts."""

    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type", "text") == "text")
        return self.content or ""


class HogwildOptions(BaseModel):
    """The ``hogwild`` extension object of a request."""

    model_config = ConfigDict(extra="forbid")
    workers: int = 2
    layout: str = "combined"
    collab_every: int | None = None
    top_k: int = 0


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The standard chat-completions request; other OpenAI fields are accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[Message]
    max_tokens: int | None = None  # the budget in forward passes (one token per worker each)
    max_completion_tokens: int | None = None  # OpenAI's newer name for the same limit
    temperature: float | None = None  # omitted: 0, greedy (the engine's default)
    top_p: float | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    hogwild: HogwildOptions = Field(default_factory=HogwildOptions)


def problem_of(messages: list[Message]) -> str:
    """The problem: the last user message's text (system and assistant messages are ignored)."""
    if not messages:
        raise InputError("messages must hold at least one message")
    users = [m for m in messages if m.role == "user"]
    if not users:
        raise InputError("messages must hold a user message: its text is the problem")
    return users[-1].text()


def solve_config(body: ChatRequest) -> SolveConfig:
    """Map a request onto the engine's SolveConfig (raises InputError for bad values)."""
    if body.n not in (None, 1):
        raise InputError(f"n must be 1, got {body.n}: one request is one collaborative solve")
    budget = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
    budget = DEFAULT_BUDGET if budget is None else budget
    if budget < 1:
        raise InputError(f"max_tokens (the forward-pass budget) must be at least 1, got {budget}")
    sampling = SamplingParams(
        temperature=0.0 if body.temperature is None else body.temperature,
        top_k=body.hogwild.top_k,
        top_p=1.0 if body.top_p is None else body.top_p,
    )
    opts = body.hogwild
    return SolveConfig(opts.workers, opts.layout, budget, sampling, body.seed, opts.collab_every)


def check_context(session: Session, config: SolveConfig, max_positions: int) -> None:
    """Refuse a budget that cannot fit: every pass writes one token per worker, and in every
    layout but ``independent`` each worker's view holds all of them."""
    seen = 1 if config.layout == "independent" else config.workers
    needed = len(session.prompt_ids) + seen * config.budget
    if needed > max_positions:
        raise ContextOverflowError(
            f"max_tokens={config.budget} is beyond the context: {config.budget} forward passes of "
            f"{config.workers} worker(s) with the {len(session.prompt_ids)}-token prompt need {needed} "
            f"positions, and the model's context holds {max_positions}"
        )


# -- what the scheduler hands back --------------------------------------------------------------
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
    message: str


class ServerBusy(HogwildError):
    """Every session slot and queue place is taken (HTTP 503)."""


@dataclass(eq=False)
class Job:
    """One request inside the scheduler. ``deliver`` must be thread-safe."""

    session: Session
    deliver: Callable[[Update | Finished | Failed], None]
    stream: bool = False
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: bool = False


@dataclass(frozen=True)
class Stats:
    """What the scheduler last published (read by /health and the tests)."""

    live_sessions: int = 0
    queued: int = 0
    cache_bytes: int = 0
    batched_passes: int = 0
    max_batch_rows: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0


# -- the scheduler ------------------------------------------------------------------------------
class Scheduler:
    """The one thread that runs the model: admits sessions, batches their passes, frees them."""

    def __init__(self, engine: Engine, max_sessions: int = 8, queue_size: int = 32):
        if max_sessions < 1 or queue_size < 0:
            raise InputError("max_sessions must be >= 1 and queue_size >= 0")
        self.engine = engine
        self.max_sessions = max_sessions
        self.queue_size = queue_size
        self._cond = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._live: list[Job] = []
        self._stop = False
        self._thread: threading.Thread | None = None
        self._counts = collections.Counter()
        self._stats = Stats()

    # -- called from request handlers (any thread) --
    def submit(self, job: Job) -> None:
        """Queue a job; raises ServerBusy when every slot and queue place is taken."""
        with self._cond:
            if self._stop:
                raise ServerBusy("the server is shutting down")
            if len(self._live) + len(self._waiting) >= self.max_sessions + self.queue_size:
                raise ServerBusy(
                    f"the server is busy: {self.max_sessions} sessions run and {self.queue_size} wait; retry later"
                )
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
            return self._stats

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="hogwild-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the scheduler thread --
    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stop and not self._live and not self._waiting:
                        self._publish()
                        self._cond.wait()
                    if self._stop:
                        break
                    new = []
                    while self._waiting and len(self._live) < self.max_sessions:
                        job = self._waiting.popleft()
                        if job.cancelled.is_set():
                            self._counts["cancelled"] += 1
                            continue
                        self._live.append(job)
                        new.append(job)
                for job in new:
                    self._start(job)
                self._drop_cancelled()
                self._step()
                with self._cond:
                    self._publish()
        except Exception:  # a bug here must not leave clients waiting forever
            log.exception("the scheduler crashed")
            raise
        finally:
            with self._cond:
                self._stop = True  # no more submissions: nobody would serve them
                jobs = self._live + list(self._waiting)
                self._live, self._waiting = [], collections.deque()
            for job in jobs:
                job.session.close()
                job.deliver(Failed("the server stopped"))
            with self._cond:
                self._publish()

    def _publish(self) -> None:
        """Refresh the stats (caller holds the lock; only this thread touches the cache)."""
        self._stats = Stats(
            live_sessions=len(self._live), queued=len(self._waiting),
            cache_bytes=self.engine.runner.cache.nbytes(), batched_passes=self._counts["passes"],
            max_batch_rows=self._counts["max_rows"], finished=self._counts["finished"],
            cancelled=self._counts["cancelled"], failed=self._counts["failed"],
        )

    def _remove(self, job: Job, outcome: str, item: Finished | Failed | None) -> None:
        job.session.close()
        with self._cond:
            if job in self._live:
                self._live.remove(job)
            self._counts[outcome] += 1
            self._publish()
        if item is not None:
            job.deliver(item)
        log.info("session %s %s", job.id, outcome)

    def _start(self, job: Job) -> None:
        if job.cancelled.is_set():
            return self._remove(job, "cancelled", None)
        session = job.session
        try:
            session.start()
        except Exception as exc:
            log.exception("session %s failed to start", job.id)
            return self._remove(job, "failed", Failed(f"{type(exc).__name__}: {exc}"))
        job.started = True
        opened = session.take_opened()  # the workers' first steps
        if job.stream:
            job.deliver(Update(opened, session.forward_passes, session.tokens_generated))

    def _drop_cancelled(self) -> None:
        with self._cond:
            gone = [job for job in self._live if job.cancelled.is_set()]
        for job in gone:
            job.session.interrupted = True
            self._remove(job, "cancelled", None)

    def _step(self) -> None:
        with self._cond:
            jobs = [job for job in self._live if job.started and not job.session.done]
        batch: list[tuple[Job, int]] = []
        rows = []
        for job in jobs:
            mine = job.session.inputs()
            batch.append((job, len(mine)))
            rows.extend(mine)
        if not rows:
            return
        t0 = time.perf_counter()
        try:
            logits = self.engine.runner.forward(rows)
        except Exception:
            if len(batch) == 1:
                return self._fail_pass(batch[0][0])
            # Isolate the session at fault: nothing was committed, so each one may retry alone.
            log.exception("a batched pass of %d sessions failed; running them one by one", len(batch))
            for job, _ in batch:
                t0 = time.perf_counter()
                try:
                    part = self.engine.runner.forward(job.session.inputs())
                except Exception:
                    self._fail_pass(job)
                    continue
                self._advance(job, part, time.perf_counter() - t0)
            return
        elapsed = time.perf_counter() - t0
        self._counts["passes"] += 1
        self._counts["max_rows"] = max(self._counts["max_rows"], len(rows))
        offset = 0
        for job, n in batch:
            self._advance(job, logits[offset : offset + n], elapsed)
            offset += n

    def _fail_pass(self, job: Job) -> None:
        log.exception("session %s: its pass failed", job.id)
        self._remove(job, "failed", Failed("a forward pass failed; see the server's log"))

    def _advance(self, job: Job, logits, elapsed: float) -> None:
        """Hand a session its logits, deliver its events, close it when done."""
        session = job.session
        try:
            events = session.advance(logits, elapsed)
        except Exception as exc:
            log.exception("session %s failed", job.id)
            return self._remove(job, "failed", Failed(f"{type(exc).__name__}: {exc}"))
        if job.stream:
            shown = [e for e in events if not isinstance(e, PassEvent)]
            job.deliver(Update(shown, session.forward_passes, session.tokens_generated))
        if session.done:
            self._remove(job, "finished", Finished(session.result()))


# -- responses ----------------------------------------------------------------------------------
def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def error_response(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
    return JSONResponse(error_body(message, kind, code), status_code=status)


EVENT_TYPES = {TokenEvent: "token", StepStartEvent: "step_start", StepEvent: "step", AnswerEvent: "answer"}


def event_json(event: Event) -> dict:
    return {"type": EVENT_TYPES.get(type(event), type(event).__name__), **asdict(event)}


def finish_reason(result: Result, budget: int) -> str:
    """OpenAI's finish reason: "stop" when a worker wrote the answer, "length" when the budget ran out."""
    if result.answered_by == "finisher" or (result.answered_by == "vote" and result.forward_passes >= budget):
        return "length"
    return "stop"


def transcript(result: Result) -> dict:
    """The ``hogwild`` extension of a response: the answer and who gave it, every worker's text
    and the shared history of finished steps."""
    return {
        "answer": result.answer, "answered_by": result.answered_by, "layout": result.layout,
        "forward_passes": result.forward_passes, "tokens_generated": result.tokens_generated,
        "elapsed_s": round(result.elapsed_s, 4), "timings": {k: round(v, 4) for k, v in result.timings.items()},
        "interrupted": result.interrupted,
        "workers": [{"name": w.name, "text": w.text} for w in result.workers],
        "history": [{"worker": h.worker, "step": h.step, "text": h.text} for h in result.history],
    }


def usage(prompt_tokens: int, result: Result | None) -> dict:
    completion = result.tokens_generated if result else 0
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that always closes its generator, so that its ``finally`` (which
    cancels the session) runs at once when the client goes away mid-send."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


@dataclass
class ServerState:
    engine: Engine
    scheduler: Scheduler
    model_name: str
    created: int = field(default_factory=lambda: int(time.time()))


# -- the app ------------------------------------------------------------------------------------
def create_app(engine: Engine, max_sessions: int = 8, queue_size: int = 32) -> FastAPI:
    """The server for ``engine``: its scheduler starts and stops with the app's lifespan."""
    scheduler = Scheduler(engine, max_sessions, queue_size)
    state = ServerState(engine, scheduler, engine.model.name)
    engine.banned_token_ids  # noqa: B018 -- computed once here, not in the first request

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        log.info("hogwild server: %s, up to %d sessions, %d queued", state.model_name, max_sessions, queue_size)
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="hogwild", summary="Hogwild! Inference, OpenAI-compatible", lifespan=lifespan)
    app.state.hogwild = state

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(400, "the request body is not valid JSON")
        parts = []
        for e in errors[:5]:
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
            parts.append(f"{where}: {e.get('msg', 'invalid')}")
        return error_response(400, "invalid request: " + "; ".join(parts))

    @app.exception_handler(HogwildError)
    async def hogwild_error(request: Request, exc: HogwildError):
        if isinstance(exc, ServerBusy):
            return error_response(503, str(exc), "server_error", "server_busy")
        return error_response(400, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health")
    async def health():
        body = {"status": "ok" if scheduler.alive else "stopped", "model": state.model_name,
                **asdict(scheduler.stats())}
        return JSONResponse(body, status_code=200 if scheduler.alive else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "hogwild"}
        ]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        config = solve_config(body)
        session = engine.session(problem_of(body.messages), config)  # validates: InputError -> 400
        check_context(session, config, engine.model.max_positions)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Update | Finished | Failed] = asyncio.Queue()

        def deliver(item: Update | Finished | Failed) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone (shutdown)
                pass

        job = Job(session, deliver, stream=body.stream)
        scheduler.submit(job)  # ServerBusy -> 503
        prompt_tokens = len(session.prompt_ids)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            chunks = stream_chunks(job, queue, scheduler, state, config, prompt_tokens, include_usage)
            return ClosingStreamingResponse(
                chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            )
        return await complete(job, queue, scheduler, state, config, prompt_tokens, request)

    return app


async def complete(job: Job, queue: asyncio.Queue, scheduler: Scheduler, state: ServerState, config: SolveConfig,
                   prompt_tokens: int, request: Request) -> Response:
    """Wait for a non-streaming job; a client that goes away cancels it."""
    done = False
    try:
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), timeout=0.25)
            except TimeoutError:
                if await request.is_disconnected():
                    log.info("client of %s went away: cancelled", job.id)
                    return Response(status_code=499)
                continue
            if isinstance(item, Failed):
                done = True
                return error_response(500, item.message, "server_error")
            if isinstance(item, Finished):
                done = True
                result = item.result
                return JSONResponse({
                    "id": job.id, "object": "chat.completion", "created": int(time.time()),
                    "model": state.model_name, "system_fingerprint": None,
                    "choices": [{
                        "index": 0, "message": {"role": "assistant", "content": result.answer or ""},
                        "logprobs": None, "finish_reason": finish_reason(result, config.budget),
                    }],
                    "usage": usage(prompt_tokens, result),
                    "hogwild": transcript(result),
                })
    finally:
        if not done:
            scheduler.cancel(job)


async def stream_chunks(job: Job, queue: asyncio.Queue, scheduler: Scheduler, state: ServerState,
                        config: SolveConfig, prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: OpenAI chunks whose ``hogwild`` field carries the workers' events."""
    created = int(time.time())

    def chunk(delta: dict, hogwild: dict | None = None, finish: str | None = None, **extra) -> str:
        body = {
            "id": job.id, "object": "chat.completion.chunk", "created": created, "model": state.model_name,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra,
        }
        if hogwild is not None:
            body["hogwild"] = hogwild
        return f"data: {json.dumps(body)}\n\n"

    done = False
    try:
        names = [state.engine.protocol.name(i) for i in range(config.workers)]
        yield chunk({"role": "assistant", "content": ""}, {
            "workers": names, "layout": config.layout, "budget": config.budget, "prompt_tokens": prompt_tokens,
        })
        while True:
            item = await queue.get()
            if isinstance(item, Update):
                if item.events:
                    yield chunk({}, {
                        "forward_passes": item.forward_passes, "tokens_generated": item.tokens_generated,
                        "events": [event_json(e) for e in item.events],
                    })
                continue
            done = True
            if isinstance(item, Failed):
                yield f"data: {json.dumps(error_body(item.message, 'server_error'))}\n\n"
                yield "data: [DONE]\n\n"
                return
            result = item.result
            yield chunk({"content": result.answer or ""})
            yield chunk({}, {"result": transcript(result)}, finish_reason(result, config.budget))
            if include_usage:
                body = {
                    "id": job.id, "object": "chat.completion.chunk", "created": created,
                    "model": state.model_name, "choices": [], "usage": usage(prompt_tokens, result),
                }
                yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
            return
    finally:
        if not done:
            log.info("client of %s went away mid-stream: cancelled", job.id)
            scheduler.cancel(job)


# -- running it ---------------------------------------------------------------------------------
@contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run ``app`` with uvicorn in a background thread; yields its base URL (tests, benchmarks)."""
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
