"""What the server sends back: errors in OpenAI's shape, completions and server-sent event streams."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field

import anyio
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from .. import (
    AnswerEvent,
    CollabEvent,
    Engine,
    Event,
    Result,
    SolveConfig,
    StepEvent,
    StepStartEvent,
    TokenEvent,
    collaboration,
)
from .scheduler import Failed, Finished, Job, Scheduler, Update

log = logging.getLogger(__name__)

RETRY_AFTER_S = 2  # what a 503 tells clients to wait before they try again
MAX_MESSAGE_CHARS = 2000


@dataclass
class ServerState:
    engine: Engine
    scheduler: Scheduler
    model_name: str
    created: int = field(default_factory=lambda: int(time.time()))


# -- errors -------------------------------------------------------------------------------------
def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict:
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 3] + "..."
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def dumps(body: dict) -> str:
    """JSON as ASCII: any text, even a lone surrogate echoed from a request, encodes safely."""
    return json.dumps(body, ensure_ascii=True, allow_nan=False)


def error_response(status: int, message: str, kind: str | None = None, code: str | None = None,
                   param: str | None = None, headers: dict[str, str] | None = None) -> Response:
    """An error in OpenAI's shape; a 503 says when to retry."""
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    headers = dict(headers or {})
    if status == 503:
        headers.setdefault("Retry-After", str(RETRY_AFTER_S))
    return Response(dumps(error_body(message, kind, code, param)), status, headers, "application/json")


def json_response(body: dict, status: int = 200) -> Response:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return Response(dumps(body), status, headers, media_type="application/json")


# -- completions --------------------------------------------------------------------------------
EVENT_TYPES = {TokenEvent: "token", StepStartEvent: "step_start", StepEvent: "step", AnswerEvent: "answer"}


def event_json(event: Event, names: list[str]) -> dict:
    """A streamed event; a ``CollabEvent`` as ``collaboration.server_payload`` (with the "who reads
    whom" matrix over ``names``, the workers in order)."""
    if isinstance(event, CollabEvent):
        return collaboration.server_payload(event, names)
    return {"type": EVENT_TYPES.get(type(event), type(event).__name__), **asdict(event)}


def finish_reason(result: Result, budget: int) -> str:
    """OpenAI's finish reason: "stop" when a worker wrote the answer, "length" when the budget ran out."""
    if result.answered_by == "finisher" or (result.answered_by == "vote" and result.forward_passes >= budget):
        return "length"
    return "stop"


def transcript(result: Result) -> dict:
    """The ``hogwild`` extension of a response: the answer and who gave it, every worker's text,
    the shared history of finished steps and the collaboration measures (``duplication``; with
    ``collab_stats`` also ``attention``, each worker's shares averaged over its passes)."""
    return {
        "answer": result.answer, "answered_by": result.answered_by, "layout": result.layout,
        "forward_passes": result.forward_passes, "tokens_generated": result.tokens_generated,
        "elapsed_s": round(result.elapsed_s, 4), "timings": {k: round(v, 4) for k, v in result.timings.items()},
        "interrupted": result.interrupted,
        "workers": [{"name": w.name, "text": w.text} for w in result.workers],
        "history": [{"worker": h.worker, "step": h.step, "text": h.text} for h in result.history],
        "collaboration": result.collaboration,
    }


def usage(prompt_tokens: int, result: Result | None) -> dict:
    """``completion_tokens`` counts the tokens of all workers (about workers x passes), so it may
    exceed ``max_tokens``, which counts forward passes."""
    completion = result.tokens_generated if result else 0
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """``text`` up to the first of the ``stops`` it holds, and whether one was found."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(found)], True) if found else (text, False)


@dataclass
class Reply:
    """What the response of one job needs besides the job: ``chat`` for chat completions (else
    OpenAI's text completions), and the ``stops`` that cut the answer."""

    state: ServerState
    config: SolveConfig
    prompt_tokens: int
    include_usage: bool = False
    chat: bool = True
    stops: tuple[str, ...] = ()
    created: int = field(default_factory=lambda: int(time.time()))

    def answer(self, result: Result) -> tuple[str, str]:
        """The answer's text (cut at the first stop sequence) and the finish reason."""
        text, stopped = cut_at_stop(result.answer or "", self.stops)
        return text, "stop" if stopped else finish_reason(result, self.config.budget)

    def completion(self, job: Job, result: Result) -> dict:
        text, finish = self.answer(result)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        return {
            "id": job.id, "object": "chat.completion" if self.chat else "text_completion", "created": self.created,
            "model": self.state.model_name, "system_fingerprint": None,
            "choices": [{**choice, "logprobs": None, "finish_reason": finish}],
            "usage": usage(self.prompt_tokens, result),
            "hogwild": transcript(result),
        }

    def chunk(self, job: Job, delta: dict | None, hogwild: dict | None = None, finish: str | None = None,
              result: Result | None = None) -> str:
        """One server-sent event with a ``chat.completion.chunk`` (a ``text_completion`` with the
        delta's content as ``text``, and its ``reasoning_content`` beside it); ``delta=None`` is the
        usage chunk."""
        body = {"id": job.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.state.model_name, "system_fingerprint": None}
        if delta is None:
            body.update(choices=[], usage=usage(self.prompt_tokens, result))
        else:
            part = {"delta": delta} if self.chat else {"text": delta.get("content", "")}
            if not self.chat and "reasoning_content" in delta:
                part["reasoning_content"] = delta["reasoning_content"]
            body["choices"] = [{"index": 0, **part, "logprobs": None, "finish_reason": finish}]
        if hogwild is not None:
            body["hogwild"] = hogwild
        return f"data: {dumps(body)}\n\n"

    def opening(self, job: Job) -> str:
        """The first chunk: the role, and the run's shape in ``hogwild``."""
        config = self.config
        return self.chunk(job, {"role": "assistant", "content": ""} if self.chat else {}, {
            "workers": self.names(), "layout": config.layout, "budget": config.budget,
            "prompt_tokens": self.prompt_tokens,
        })

    def names(self) -> list[str]:
        return [self.state.engine.protocol.name(i) for i in range(self.config.workers)]

    def update(self, job: Job, item: Update) -> list[str]:
        """The chunks of one update: one with the pass's events in ``hogwild.events``."""
        if not item.events:
            return []
        return [self.chunk(job, {}, {
            "forward_passes": item.forward_passes, "tokens_generated": item.tokens_generated,
            "events": [event_json(e, self.names()) for e in item.events],
        })]

    def ending(self, job: Job, result: Result) -> list[str]:
        """The answer, the chunk with the finish reason and the transcript, the usage if asked for."""
        text, finish = self.answer(result)
        chunks = [self.chunk(job, {"content": text}), self.chunk(job, {}, {"result": transcript(result)}, finish)]
        if self.include_usage:
            chunks.append(self.chunk(job, None, result=result))
        return chunks


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that always closes its generator, so that its ``finally`` (which
    cancels the session) runs at once when the client goes away mid-send."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


async def complete(job: Job, queue: asyncio.Queue, reply: Reply, request: Request) -> Response:
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
                return error_response(item.status, item.message, code=item.code)
            if isinstance(item, Finished):
                done = True
                return json_response(reply.completion(job, item.result))
    finally:
        if not done:
            reply.state.scheduler.cancel(job)


async def stream_chunks(job: Job, queue: asyncio.Queue, reply: Reply) -> AsyncIterator[str]:
    """Server-sent events: the reply's opening chunk, its chunks for each update, its closing
    chunks (or an error chunk), then ``[DONE]``. A client that goes away cancels the job."""
    done = False
    try:
        yield reply.opening(job)
        while True:
            item = await queue.get()
            if isinstance(item, Update):
                for chunk in reply.update(job, item):
                    yield chunk
                continue
            done = True
            if isinstance(item, Failed):
                kind = "invalid_request_error" if item.status < 500 else "server_error"
                yield f"data: {dumps(error_body(item.message, kind, item.code))}\n\n"
            else:
                for chunk in reply.ending(job, item.result):
                    yield chunk
            yield "data: [DONE]\n\n"
            return
    finally:
        if not done:
            log.info("client of %s went away mid-stream: cancelled", job.id)
            reply.state.scheduler.cancel(job)
