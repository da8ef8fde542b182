"""Reading a request: strict types, bounded lists, honest refusals, tokenization off the loop.

Numbers and booleans must be JSON numbers and booleans (no ``"8"``, ``8.0`` or ``true`` for an
integer, no ``"yes"`` for a boolean), floats must be finite, integers fit 64 bits, and the text the
server uses must be valid Unicode (no lone surrogates). Lists stop at their first bad item
(``FailFast``; ``bodies`` has already bounded every list and object of the body). Fields of
OpenAI's API that the server does not implement (tools, logprobs, penalties, ...) are refused
by name (``refuse_unsupported``), never silently ignored.

A chat is read whole (``conversation_of``): the last message is the user's problem, the messages
before it (system, user, assistant) are its context. A problem longer than the context could
hold, counted in characters, is refused before any tokenizing; the tokenizing itself
(``prepare_session``) runs in a worker thread and counts tokens chunk by chunk, so that an
over-long problem never turns into millions of token ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from .. import MAX_THINKERS, ContextOverflowError, Engine, InputError, SamplingParams, Session, SolveConfig

DEFAULT_BUDGET = 512
INT64_MAX = 2**63 - 1
SEED_MAX = 2**64 - 1
MAX_TEMPERATURE = 2.0  # OpenAI's range is [0, 2]
MAX_STOP = 4  # stop sequences, as OpenAI allows
MAX_STOP_CHARS = 256
TOKENIZE_CHUNK_CHARS = 16_384
SYSTEM_ROLES = ("system", "developer")  # "developer": OpenAI's newer name for the system role


def valid_unicode(text: str) -> str:
    """Refuse text that cannot be encoded as UTF-8 (a lone surrogate such as ``\\ud800``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"the text holds a lone surrogate (U+{ord(text[exc.start]):04X} at character {exc.start}), "
            "which is not valid Unicode"
        ) from None
    return text


Text = Annotated[str, AfterValidator(valid_unicode)]
Int = Annotated[int, Field(ge=-INT64_MAX - 1, le=INT64_MAX)]
Temperature = Annotated[float, Field(ge=0, le=MAX_TEMPERATURE, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]
StopText = Annotated[Text, Field(min_length=1, max_length=MAX_STOP_CHARS)]
Stop = StopText | Annotated[list[StopText], Field(max_length=MAX_STOP, fail_fast=True)]
STRICT = ConfigDict(strict=True, extra="ignore")


class UnsupportedError(InputError):
    """A field of OpenAI's API that this server does not implement (HTTP 400, naming it)."""

    code = "unsupported_parameter"

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


class ContentPart(BaseModel):
    """One part of OpenAI's list form of ``content``: text only."""

    model_config = STRICT
    type: Text = "text"
    text: Text | None = None


class Message(BaseModel):
    """A chat message; ``content`` may be a string or OpenAI's list of text parts."""

    model_config = STRICT
    role: Text
    content: Text | Annotated[list[ContentPart], Field(fail_fast=True)] | None = None
    tool_calls: Any = None
    function_call: Any = None

    def text(self, index: int) -> str:
        """The text; a part that is not text (an image, audio) is refused, not dropped."""
        if not isinstance(self.content, list):
            return self.content or ""
        for j, part in enumerate(self.content):
            if part.type != "text":
                raise UnsupportedError(f"messages.{index}.content.{j}.type",
                                       f"{part.type[:64]!r} parts are not supported: this server reads text only")
        return "".join(p.text or "" for p in self.content)


class HogwildOptions(BaseModel):
    """The ``hogwild`` extension object of a request. ``async``: answer while thinking (an
    ``AnsweringSession`` of ``thinkers`` thinkers and a writer) instead of a hogwild solve."""

    model_config = ConfigDict(strict=True, extra="forbid")
    workers: Int = 2
    layout: Text = "combined"
    collab_every: Int | None = None
    top_k: Int = 0
    collab_stats: bool = False  # stream a "who reads whom" event per pass
    async_: bool = Field(False, alias="async")
    thinkers: Annotated[int, Field(ge=0, le=MAX_THINKERS)] | None = None

    def refuse_mixed(self) -> None:
        """Name the first field set that the chosen kind of run does not read (400, never ignored)."""
        unread = ("workers", "layout", "collab_every", "collab_stats") if self.async_ else ("thinkers",)
        for name in unread:
            if name in self.model_fields_set:
                raise UnsupportedError(f"hogwild.{name}", "applies only without hogwild.async" if self.async_
                                       else "applies only with hogwild.async: true (answer while thinking)")


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool | None = False


class SolveRequest(BaseModel):
    """What chat and text completions share; other OpenAI fields are ignored unless they would
    change the answer (see ``refuse_unsupported``)."""

    model_config = STRICT
    model: Text | None = None
    max_tokens: Int | None = None  # the budget in forward passes (one token per worker each)
    temperature: Temperature | None = None  # omitted: 0, greedy (the engine's default)
    top_p: TopP | None = None
    seed: Seed | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: Int | None = None
    stop: Stop | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: Any = None
    hogwild: HogwildOptions = Field(default_factory=HogwildOptions)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def budget(self) -> int | None:
        return self.max_tokens

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def unsupported(self) -> dict[str, bool]:
        """Field name -> whether the request asks for something this server does not do."""
        return {
            "presence_penalty": self.presence_penalty not in (None, 0),
            "frequency_penalty": self.frequency_penalty not in (None, 0),
            "logit_bias": self.logit_bias not in (None, {}),
        }


class ChatRequest(SolveRequest):
    """The standard chat-completions request."""

    messages: Annotated[list[Message], Field(fail_fast=True)]
    max_completion_tokens: Int | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool | None = None
    top_logprobs: Int | None = None
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None

    @property
    def budget(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens

    def unsupported(self) -> dict[str, bool]:
        return {
            **super().unsupported(),
            "logprobs": bool(self.logprobs), "top_logprobs": self.top_logprobs not in (None, 0),
            "response_format": self.response_format not in (None, {"type": "text"}),
            "tools": self.tools not in (None, []), "tool_choice": self.tool_choice not in (None, "none"),
            "functions": self.functions not in (None, []), "function_call": self.function_call not in (None, "none"),
        }


class CompletionRequest(SolveRequest):
    """The legacy text-completions request: ``prompt`` is the problem."""

    prompt: Text
    logprobs: Int | None = None
    echo: bool | None = None
    suffix: Text | None = None
    best_of: Int | None = None

    def unsupported(self) -> dict[str, bool]:
        return {
            **super().unsupported(), "logprobs": self.logprobs is not None, "echo": bool(self.echo),
            "suffix": bool(self.suffix), "best_of": self.best_of not in (None, 1),
        }


def refuse_unsupported(body: SolveRequest) -> None:
    """Name the first field the request sets to something this server does not do (400)."""
    for name, asked in body.unsupported().items():
        if asked:
            raise UnsupportedError(name, "not supported by this server (see docs/server.md for the fields it reads)")


@dataclass(frozen=True)
class Conversation:
    """A chat read whole: ``context`` (earlier messages, ``{"role", "content"}``) and the problem."""

    context: tuple[dict[str, str], ...]
    problem: str

    @property
    def chars(self) -> int:
        return len(self.problem.strip()) + sum(len(m["content"]) for m in self.context)


def conversation_of(messages: list[Message]) -> Conversation:
    """The last message is the problem and must be the user's; the system, user and assistant
    messages before it are its context (a client resends the whole conversation each turn)."""
    if not messages:
        raise InputError("messages must hold at least one message")
    context = []
    for i, m in enumerate(messages):
        if m.tool_calls not in (None, []) or m.function_call is not None:
            raise UnsupportedError(f"messages.{i}.tool_calls", "tool calls are not supported by this server")
        role = "system" if m.role in SYSTEM_ROLES else m.role
        if role not in ("system", "user", "assistant"):
            raise UnsupportedError(f"messages.{i}.role", f"the role {m.role[:64]!r} is not supported "
                                   "(system, developer, user and assistant are)")
        context.append({"role": role, "content": m.text(i)})
    last = context.pop()
    if last["role"] != "user":
        raise InputError(f"messages must end with a user message: its text is the problem (the last one is "
                         f"the {last['role']}'s)")
    return Conversation(tuple(context), last["content"])


def budget_and_sampling(body: SolveRequest) -> tuple[int, SamplingParams]:
    """What every kind of run reads: the budget in forward passes and the sampling (InputError for
    bad values, fields this server does not do, and hogwild fields the kind of run does not read)."""
    refuse_unsupported(body)
    body.hogwild.refuse_mixed()
    if body.n not in (None, 1):
        raise InputError(f"n must be 1, got {body.n}: one request is one collaborative solve")
    budget = DEFAULT_BUDGET if body.budget is None else body.budget
    if budget < 1:
        raise InputError(f"max_tokens (the forward-pass budget) must be at least 1, got {budget}")
    sampling = SamplingParams(  # the Sampler copes with tiny temperatures and top_p values
        temperature=body.temperature or 0.0,
        top_k=body.hogwild.top_k,
        top_p=1.0 if body.top_p is None else body.top_p,
    )
    return budget, sampling


def solve_config(body: SolveRequest) -> SolveConfig:
    """Map a request onto the engine's SolveConfig (raises InputError for bad values)."""
    budget, sampling = budget_and_sampling(body)
    opts = body.hogwild
    return SolveConfig(opts.workers, opts.layout, budget, sampling, body.seed, opts.collab_every,
                       collab_stats=opts.collab_stats)


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


@dataclass(frozen=True)
class ProblemLimits:
    """How long a problem may be, known without tokenizing it.

    A token stands for at most ``max_token_bytes`` bytes of text (the vocabulary's longest piece),
    so a problem of more characters than ``max_positions * max_token_bytes`` cannot fit.
    """

    max_positions: int
    max_token_bytes: int

    @classmethod
    def of(cls, engine: Engine) -> ProblemLimits:
        tokenizer = engine.model.tokenizer
        pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        longest = max((len(p.encode("utf-8", "replace")) for p in pieces), default=1)
        return cls(engine.model.max_positions, max(1, longest))

    @property
    def max_chars(self) -> int:
        return self.max_positions * self.max_token_bytes

    def check_chars(self, conversation: Conversation) -> None:
        """The cheap check, before anything else: the length in characters."""
        length = conversation.chars
        if length > self.max_chars:
            what = "conversation" if conversation.context else "problem"
            raise ContextOverflowError(
                f"the {what} is {length} characters long: the model's context of {self.max_positions} "
                f"tokens (at most {self.max_token_bytes} characters each) cannot hold it"
            )

    def check_tokens(self, tokenizer, conversation: Conversation) -> None:
        """Count the conversation's tokens in chunks, stopping as soon as they are clearly too many
        (twice the context: the exact check follows on the real prompt), so that the work and the
        memory stay bounded whatever the text."""
        count = 0
        for text in [m["content"] for m in conversation.context] + [conversation.problem.strip()]:
            for start in range(0, len(text), TOKENIZE_CHUNK_CHARS):
                chunk = text[start : start + TOKENIZE_CHUNK_CHARS]
                count += len(tokenizer(chunk, add_special_tokens=False, split_special_tokens=True).input_ids)
                if count > 2 * self.max_positions:
                    raise ContextOverflowError(
                        f"the {'conversation' if conversation.context else 'problem'} takes more than {count} "
                        f"tokens; the model's context holds {self.max_positions}"
                    )


def check_pool(session: Session, config: SolveConfig, capacity_tokens: int) -> None:
    """Refuse a session that could never run: its bound exceeds the whole K/V pool. (One that
    fits the pool but not its free slots waits in the queue instead.)"""
    bound = session.token_bound()
    if bound > capacity_tokens:
        raise CacheTooSmallError(
            f"this request may need up to {bound} K/V cache slots ({config.workers} worker(s), max_tokens="
            f"{config.budget}, a {len(session.prompt_ids)}-token prompt), and the server's whole K/V cache "
            f"holds {capacity_tokens}; lower max_tokens or hogwild.workers (or start the server with a "
            f"larger --kv-memory)"
        )


class CacheTooSmallError(InputError):
    """The request cannot fit even the idle K/V pool (HTTP 400, code ``kv_cache_too_small``)."""

    code = "kv_cache_too_small"


def prepare_session(engine: Engine, limits: ProblemLimits, conversation: Conversation,
                    config: SolveConfig) -> Session:
    """Tokenize and check a request's session (not started). Runs in a worker thread: it is the
    costly part of a request, and it must not hold up the event loop."""
    limits.check_tokens(engine.model.tokenizer, conversation)
    session = Session(engine.runner, conversation.problem, config, engine.protocol, engine.banned_token_ids,
                      context=conversation.context)  # validates: InputError -> 400
    check_context(session, config, engine.model.max_positions)
    check_pool(session, config, engine.runner.cache.capacity_tokens)
    return session
