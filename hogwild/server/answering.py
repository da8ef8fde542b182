"""Answer while thinking over HTTP (``"hogwild": {"async": true}``): the request's run and its replies.

Such a request runs an ``AnsweringSession`` (``hogwild.thinkers`` thinkers, default 1, reason
while one writer answers, over the same cache) in the scheduler, batched beside hogwild sessions.
The writer's tokens are the answer: ``delta.content`` (text completions: ``text``); the thinkers'
tokens are ``delta.reasoning_content``, the field reasoning-model servers use. A stream sends them
in the order they were generated, a chunk per run of one role's tokens, with the mode changes,
probes and the first answer token in ``hogwild.events`` between them.

The session reads one problem and no conversation: a chat with earlier messages is refused (400)
rather than answered without them. ``stop`` cuts the writer's text, streamed or not: text that
could be the start of a stop sequence is held back until it is known not to be one.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

from .. import (
    AnswerEvent,
    AnsweringConfig,
    AnsweringSession,
    ContextOverflowError,
    Engine,
    Event,
    FirstAnswerTokenEvent,
    ModeEvent,
    ProbeEvent,
    Result,
    TokenEvent,
)
from .requests import (
    CacheTooSmallError,
    Conversation,
    ProblemLimits,
    SolveRequest,
    UnsupportedError,
    budget_and_sampling,
)
from .responses import Reply, cut_at_stop, transcript, usage
from .scheduler import Job, Update

log = logging.getLogger(__name__)

EVENT_TYPES = {ModeEvent: "mode", ProbeEvent: "probe", FirstAnswerTokenEvent: "first_answer_token",
               AnswerEvent: "answer"}


def answering_config(body: SolveRequest, conversation: Conversation) -> AnsweringConfig:
    """Map an async request onto an AnsweringConfig (InputError for bad values; a conversation
    with earlier messages is refused: the session would not read them)."""
    if conversation.context:
        raise UnsupportedError("messages", f"with hogwild.async the request holds one user message (the problem), "
                                           f"got {len(conversation.context) + 1} messages: answer while thinking "
                                           f"reads no conversation context")
    budget, sampling = budget_and_sampling(body)
    thinkers = 1 if body.hogwild.thinkers is None else body.hogwild.thinkers
    return AnsweringConfig(thinkers, budget, sampling, body.seed)


def check_context(engine: Engine, problem: str, config: AnsweringConfig) -> None:
    """Refuse a budget that can never fit: every pass writes one token per thinker and one for the
    writer, and each view holds them all. (The prompts come on top: a run that fills the context
    before its budget ends there, and the finisher answers.)"""
    ids = engine.model.tokenizer(problem.strip(), add_special_tokens=False).input_ids
    needed = len(ids) + (config.thinkers + 1) * config.budget
    if needed > engine.model.max_positions:
        raise ContextOverflowError(
            f"max_tokens={config.budget} is beyond the context: {config.budget} forward passes of "
            f"{config.thinkers} thinker(s) and the writer with the {len(ids)}-token problem need at least "
            f"{needed} positions, and the model's context holds {engine.model.max_positions}"
        )


def prepare_answering(engine: Engine, limits: ProblemLimits, conversation: Conversation,
                      config: AnsweringConfig) -> AnsweringSession:
    """Tokenize and check an async request's session (not started); runs in a worker thread."""
    limits.check_tokens(engine.model.tokenizer, conversation)
    check_context(engine, conversation.problem, config)
    session = engine.answering_session(conversation.problem, config)  # validates: InputError -> 400
    bound, capacity = session.token_bound(), engine.runner.cache.capacity_tokens
    if bound > capacity:
        raise CacheTooSmallError(
            f"this request may need up to {bound} K/V cache slots ({config.thinkers} thinker(s) and a writer, "
            f"max_tokens={config.budget}), and the server's whole K/V cache holds {capacity}; lower max_tokens or "
            f"hogwild.thinkers (or start the server with a larger --kv-memory)"
        )
    return session


def event_json(event: Event) -> dict:
    return {"type": EVENT_TYPES.get(type(event), type(event).__name__), **asdict(event)}


@dataclass
class StopCut:
    """The writer's text as it streams, cut at the first stop sequence: ``feed`` returns what may
    go out now, holding back an end that could still grow into a stop sequence."""

    stops: tuple[str, ...]
    text: str = ""  # everything the writer wrote so far
    sent: str = ""  # what went out
    stopped: bool = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.text += piece
        cut, self.stopped = cut_at_stop(self.text, self.stops)
        if not self.stopped:  # hold back the longest end that begins a stop sequence
            held = max((n for s in self.stops for n in range(1, len(s)) if cut.endswith(s[:n])), default=0)
            cut = cut[: len(cut) - held]
        new, self.sent = cut[len(self.sent) :], cut
        return new


@dataclass
class AnsweringReply(Reply):
    """The replies of an async request: ``content`` is the writer's answer, ``reasoning_content``
    the thinkers' thoughts, ``hogwild`` the transcript with the answering metrics."""

    config: AnsweringConfig
    writer: StopCut = field(init=False)

    def __post_init__(self) -> None:
        self.writer = StopCut(self.stops)

    def answer(self, result: Result) -> tuple[str, str]:
        """The writer's text cut at the first stop sequence, and the finish reason ("length" when
        the budget ran out). When the writer wrote no \\boxed{} answer and the finisher gave one,
        it ends the text as a last paragraph."""
        text, stopped = cut_at_stop(result.answering.get("text", ""), self.stops)
        if stopped:
            return text, "stop"
        if result.answered_by == "finisher" and result.answer is not None:
            gap = "" if not text.strip() or text.endswith("\n\n") else "\n\n"
            text += f"{gap}\\boxed{{{result.answer}}}"
        return text, "length" if result.forward_passes >= self.config.budget else "stop"

    def reasoning(self, result: Result) -> str | None:
        """The thinkers' text (None without thinkers); several are each introduced by their header."""
        thinkers = result.workers[:-1]
        if not thinkers:
            return None
        if len(thinkers) == 1:
            return thinkers[0].text
        header = self.state.engine.answering.thinker_header
        return "\n\n".join(header.format(name=t.name) + t.text for t in thinkers)

    def extra(self, result: Result) -> dict:
        metrics = {k: v for k, v in result.answering.items() if k != "text"}
        return {**transcript(result), "thinkers": self.config.thinkers, "answering": metrics}

    def completion(self, job: Job, result: Result) -> dict:
        self.prompt_tokens = job.prompt_tokens
        text, finish = self.answer(result)
        if self.chat:
            choice = {"message": {"role": "assistant", "content": text, "reasoning_content": self.reasoning(result)}}
        else:
            choice = {"text": text, "reasoning_content": self.reasoning(result)}
        return {
            "id": job.id, "object": "chat.completion" if self.chat else "text_completion", "created": self.created,
            "model": self.state.model_name, "system_fingerprint": None,
            "choices": [{"index": 0, **choice, "logprobs": None, "finish_reason": finish}],
            "usage": usage(self.prompt_tokens, result), "hogwild": self.extra(result),
        }

    # -- streaming -----------------------------------------------------------------------------
    def opening(self, job: Job) -> str:
        return self.chunk(job, {"role": "assistant", "content": ""} if self.chat else {}, {
            "async": True, "thinkers": self.config.thinkers, "budget": self.config.budget,
        })

    def update(self, job: Job, item: Update) -> list[str]:
        """A chunk per run of one role's tokens (``content`` or ``reasoning_content``, with
        ``hogwild.worker``) and per run of other events (``hogwild.events``), in their order."""
        chunks: list[str] = []
        run: list[TokenEvent] = []
        others: list[Event] = []

        def flush() -> None:
            if run:
                piece = "".join(e.text for e in run)
                text = self.writer.feed(piece) if run[0].role == "writer" else piece
                if text:
                    key = "content" if run[0].role == "writer" else "reasoning_content"
                    chunks.append(self.chunk(job, {key: text}, {"worker": run[0].worker,
                                                                "forward_passes": item.forward_passes}))
                run.clear()
            if others:
                chunks.append(self.chunk(job, {}, {
                    "forward_passes": item.forward_passes, "tokens_generated": item.tokens_generated,
                    "events": [event_json(e) for e in others],
                }))
                others.clear()

        for event in item.events:
            if isinstance(event, TokenEvent):
                if others or (run and run[0].worker != event.worker):
                    flush()
                run.append(event)
            else:
                if run:
                    flush()
                others.append(event)
        flush()
        return chunks

    def ending(self, job: Job, result: Result) -> list[str]:
        """What the stream still owes of the answer (held-back text, the finisher's answer), the
        chunk with the finish reason and the transcript, the usage if asked for."""
        self.prompt_tokens = job.prompt_tokens
        text, finish = self.answer(result)
        sent = self.writer.sent
        if not text.startswith(sent):
            log.warning("the streamed answer of %s does not add up to the writer's text", job.id)
        chunks = [self.chunk(job, {"content": text[len(sent) :]})] if len(text) > len(sent) else []
        chunks.append(self.chunk(job, {}, {"result": self.extra(result)}, finish))
        if self.include_usage:
            chunks.append(self.chunk(job, None, result=result))
        return chunks
