"""The OpenAI-compatible server: the FastAPI app, its routes and error handlers.

The parts live beside it: ``requests`` (strict request types, cheap checks, tokenizing off the
event loop), ``scheduler`` (the thread that batches sessions), ``responses`` (OpenAI-shaped
bodies and streams), ``answering`` (``hogwild.async``: answer while thinking), ``security``
(Host allow-list, API key, body size limit, the last-resort 500) and ``lifecycle`` (uvicorn with
a bounded, draining shutdown).

A request is checked cheaply first (body size, the counts of its list items and object keys
before it is parsed, types, the conversation's length in characters), then
takes a place in the scheduler (it counts as queued from then on; 503 when none is left), then is
tokenized in a worker thread, and only then queued for a session slot. Nothing that grows with the
request's size runs on the event loop, so ``/health`` and the streams of other requests never wait.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
import uuid
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import Engine, HogwildError
from .answering import AnsweringReply, answering_config, prepare_answering
from .bodies import BoundedJsonRoute
from .lifecycle import running, serve_in_thread
from .requests import (
    ChatRequest,
    CompletionRequest,
    Conversation,
    ProblemLimits,
    SolveRequest,
    conversation_of,
    prepare_session,
    solve_config,
)
from .responses import (
    ClosingStreamingResponse,
    Reply,
    ServerState,
    complete,
    error_response,
    json_response,
    stream_chunks,
)
from .scheduler import Item, Job, Scheduler, ServerBusy
from .security import DEFAULT_MAX_BODY_BYTES, ApiKeyGuard, BodyLimit, CatchAll, HostGuard, allowed_hosts

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
TOKENIZING_THREADS = 2  # requests tokenized at once, off the event loop
MAX_LOC_CHARS = 64

__all__ = ["create_app", "running", "serve_in_thread"]


def describe(errors: list[dict]) -> str:
    """A validation error as one line: where and what, for the first few problems."""
    parts = []
    for e in errors[:5]:
        # Leave out "body" and the tags pydantic gives validated union members ("function-after[...]").
        loc = [str(x)[:MAX_LOC_CHARS] for x in e.get("loc", ()) if x != "body" and not str(x).startswith("function-")]
        parts.append(f"{'.'.join(loc) or 'body'}: {e.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def page_headers(html: str) -> dict[str, str]:
    """Security headers for the page: its own inline script and style only (by their hashes),
    requests to this server only, never framed, no content-type sniffing."""

    def hashes(tag: str) -> str:
        bodies = re.findall(f"<{tag}>(.*?)</{tag}>", html, re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in bodies)

    policy = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
              "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return {"Content-Security-Policy": policy, "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


def create_app(
    engine: Engine,
    max_sessions: int = 8,
    queue_size: int = 32,
    *,
    hosts: frozenset[str] | None = allowed_hosts("127.0.0.1"),
    api_key: str | None = None,
    docs: bool = False,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """The server for ``engine``: its scheduler starts and stops with the app's lifespan.

    ``hosts``: the Host names it answers (None: any; see ``security.allowed_hosts``); ``api_key``:
    required as a Bearer token on ``/v1/...``; ``docs``: serve ``/docs`` and ``/openapi.json``.
    """
    scheduler = Scheduler(engine, max_sessions, queue_size)
    state = ServerState(engine, scheduler, engine.model.name)
    limits = ProblemLimits.of(engine)
    engine.banned_token_ids  # noqa: B018 -- computed once here, not in the first request
    tokenizing: list[anyio.CapacityLimiter] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        tokenizing.append(anyio.CapacityLimiter(TOKENIZING_THREADS))
        scheduler.start()
        log.info("hogwild server: %s, up to %d sessions, %d queued", state.model_name, max_sessions, queue_size)
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(
        title="hogwild", summary="Hogwild! Inference, OpenAI-compatible", lifespan=lifespan,
        docs_url="/docs" if docs else None, redoc_url=None, openapi_url="/openapi.json" if docs else None,
    )
    app.state.hogwild = state
    app.router.route_class = BoundedJsonRoute  # request bodies: bounded before they are parsed
    page = (STATIC / "index.html").read_text(encoding="utf-8")
    headers = page_headers(page)
    # add_middleware puts each one outside the ones before: the last added runs first.
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(ApiKeyGuard, api_key=api_key)
    app.add_middleware(HostGuard, hosts=hosts)
    app.add_middleware(CatchAll)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(400, "the request body is not valid JSON")
        content_type = request.headers.get("content-type", "")
        if request.method == "POST" and "json" not in content_type:
            return error_response(400, f"the request body must be JSON (Content-Type: application/json), "
                                       f"not {content_type[:MAX_LOC_CHARS]!r}")
        return error_response(400, describe(errors))

    @app.exception_handler(HogwildError)
    async def hogwild_error(request: Request, exc: HogwildError):
        if isinstance(exc, ServerBusy):
            return error_response(503, str(exc), code=exc.code)
        return error_response(400, str(exc), code=getattr(exc, "code", None), param=getattr(exc, "param", None))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)  # HEAD wherever GET is served
    async def index():
        return Response(page, media_type="text/html; charset=utf-8", headers=headers)

    @app.get("/health")
    @app.head("/health", include_in_schema=False)
    async def health():
        status = scheduler.status
        body = {"status": status, "model": state.model_name, **asdict(scheduler.stats())}
        return json_response(body, 200 if status == "ok" else 503)

    @app.get("/v1/models")
    @app.head("/v1/models", include_in_schema=False)
    async def models():
        return {"object": "list", "data": [
            {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "hogwild",
             "quantization": engine.model.quantization, "weight_bytes": engine.model.weight_bytes}
        ]}

    async def solve(body: SolveRequest, conversation: Conversation, request: Request, chat: bool) -> Response:
        answering = body.hogwild.async_  # answer while thinking instead of a hogwild solve
        config = answering_config(body, conversation) if answering else solve_config(body)
        limits.check_chars(conversation)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Item] = asyncio.Queue()

        def deliver(item: Item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone (shutdown)
                pass

        with scheduler.reservation() as place:  # ServerBusy -> 503; queued from here on
            session = await anyio.to_thread.run_sync(
                prepare_answering if answering else prepare_session, engine, limits, conversation, config,
                limiter=tokenizing[0],
            )
            job = Job(session, deliver, stream=bool(body.stream),
                      id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}")
            place.submit(job)
        if answering:  # its prompt tokens are known once it starts (the job's prompt_tokens)
            reply = AnsweringReply(state, config, 0, body.include_usage, chat, body.stops)
        else:
            reply = Reply(state, config, len(session.prompt_ids), body.include_usage, chat, body.stops)
        if body.stream:
            return ClosingStreamingResponse(
                stream_chunks(job, queue, reply), media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await complete(job, queue, reply, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        return await solve(body, conversation_of(body.messages), request, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await solve(body, Conversation((), body.prompt), request, chat=False)

    return app
