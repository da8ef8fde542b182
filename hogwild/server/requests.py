"""Reading a chat-completions request: strict types, cheap checks first, tokenization off the loop.

Numbers and booleans must be JSON numbers and booleans (no ``"8"``, ``8.0`` or ``true`` for an
integer, no ``"yes"`` for a boolean), floats must be finite, integers fit 64 bits, and the text the
server uses must be valid Unicode (no lone surrogates). A problem longer than the context could
hold, counted in characters, is refused before any tokenizing; the tokenizing itself
(``prepare_session``) runs in a worker thread and counts tokens chunk by chunk, so that an
over-long problem never turns into millions of token ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from ..engine.engine import Engine
from ..engine.session import Session, SolveConfig
from ..errors import ContextOverflowError, InputError
from ..sampling import SamplingParams

DEFAULT_BUDGET = 512
INT64_MAX = 2**63 - 1
SEED_MAX = 2**64 - 1
MAX_TEMPERATURE = 2.0  # OpenAI's range is [0, 2]
TOKENIZE_CHUNK_CHARS = 16_384


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
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]
STRICT = ConfigDict(strict=True, extra="allow")


class ContentPart(BaseModel):
    """One part of OpenAI's list form of ``content``; parts other than text are ignored."""

    model_config = STRICT
    type: Text = "text"
    text: Text | None = None


class Message(BaseModel):
    """A chat message; ``content`` may be a string or OpenAI's list of text parts."""

    model_config = STRICT
    role: Text
    content: Text | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""


class HogwildOptions(BaseModel):
    """The ``hogwild`` extension object of a request."""

    model_config = ConfigDict(strict=True, extra="forbid")
    workers: Int = 2
    layout: Text = "combined"
    collab_every: Int | None = None
    top_k: Int = 0
    collab_stats: bool = False  # stream a "who reads whom" event per pass


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool | None = False


class ChatRequest(BaseModel):
    """The standard chat-completions request; other OpenAI fields are accepted and ignored."""

    model_config = STRICT
    model: Text | None = None
    messages: list[Message]
    max_tokens: Int | None = None  # the budget in forward passes (one token per worker each)
    max_completion_tokens: Int | None = None  # OpenAI's newer name for the same limit
    temperature: Temperature | None = None  # omitted: 0, greedy (the engine's default)
    top_p: TopP | None = None
    seed: Seed | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: Int | None = None
    hogwild: HogwildOptions = Field(default_factory=HogwildOptions)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


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
    sampling = SamplingParams(  # the Sampler copes with tiny temperatures and top_p values
        temperature=body.temperature or 0.0,
        top_k=body.hogwild.top_k,
        top_p=1.0 if body.top_p is None else body.top_p,
    )
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

    def check_chars(self, problem: str) -> None:
        """The cheap check, before anything else: the length in characters."""
        length = len(problem.strip())
        if length > self.max_chars:
            raise ContextOverflowError(
                f"the problem is {length} characters long: the model's context of {self.max_positions} "
                f"tokens (at most {self.max_token_bytes} characters each) cannot hold it"
            )

    def check_tokens(self, tokenizer, problem: str) -> None:
        """Count the problem's tokens in chunks, stopping as soon as they are clearly too many
        (twice the context: the exact check follows on the real prompt), so that the work and the
        memory stay bounded whatever the text."""
        text, count = problem.strip(), 0
        for start in range(0, len(text), TOKENIZE_CHUNK_CHARS):
            count += len(tokenizer(text[start : start + TOKENIZE_CHUNK_CHARS], add_special_tokens=False).input_ids)
            if count > 2 * self.max_positions:
                raise ContextOverflowError(
                    f"the problem takes more than {count} tokens; the model's context holds {self.max_positions}"
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


def prepare_session(engine: Engine, limits: ProblemLimits, problem: str, config: SolveConfig) -> Session:
    """Tokenize and check a request's session (not started). Runs in a worker thread: it is the
    costly part of a request, and it must not hold up the event loop."""
    limits.check_tokens(engine.model.tokenizer, problem)
    session = engine.session(problem, config)  # validates: InputError -> 400
    check_context(session, config, engine.model.max_positions)
    check_pool(session, config, engine.runner.cache.capacity_tokens)
    return session
