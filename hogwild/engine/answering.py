"""Answer while thinking: a writer streams the answer while K thinkers still reason, over one cache.

A session of the same shape as ``Session`` (``start``, ``inputs``, ``advance``, ...), so the one
batching loop runs it beside hogwild solves. Blocks (prompts and splits: ``protocol.answering``):
thinker prompt ``TP``, writer prompt ``WP``, thinker split ``TS``, writer split ``WS``, one output
block per thinker and the writer's ``W``. Thinker i sees ``[TP, W, TS, other thinkers, own]``; the
writer sees ``[WP, thinkers, WS, W]``.

Modes: "think" (thinkers only: the writer has not started or paused itself at a paragraph end),
"both" and "write" (the thinkers ended their thinking; the writer goes on alone to its end of
answer or the budget). While the writer waits, a probe every ``probe_every`` passes and whenever a
thinker ends a paragraph asks the first active thinker, in its own view plus a temporary block,
whether its thoughts are far enough ahead of the draft (P(yes) > P(no), or an injected policy);
the probe's block is freed at once, so the thoughts never contain it. Per-role banned tokens: a
thinker cannot end the turn (only its thinking, with the end marker); the writer cannot write
thinking markers or open a turn, and ends the answer with end of turn.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..cache import Block
from ..errors import ContextOverflowError, InputError
from ..protocol import text as rules
from ..protocol.answering import AnsweringProtocol
from ..protocol.prompts import DEFAULT_NAMES
from ..sampling import Sampler, SamplingParams
from .events import (
    AnswerEvent,
    Event,
    FirstAnswerTokenEvent,
    ModeEvent,
    PassEvent,
    ProbeEvent,
    Result,
    TokenEvent,
    WorkerText,
)
from .runner import Runner, WorkerStep, view_lengths
from .session import chat_ids

#: (probe number from 0, P(yes), P(no)) -> whether the writer may write one more paragraph.
ProbePolicy = Callable[[int, float, float], bool]
#: Thinkers beside the writer at most.
MAX_THINKERS = 8
#: Tokens that end a turn in the chat templates of the families hogwild runs.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|return|>")


@dataclass(frozen=True)
class AnsweringConfig:
    """One answer-while-thinking request. ``budget`` counts forward passes of the thinkers and the
    writer (probes are extra passes: at most one per ``probe_every`` passes plus one per thinker
    paragraph). thinkers 0: no thinking at all, the writer answers at once (the no-thinking
    baseline). collab_stats: not measured for this kind of session (the loop reads the field)."""

    thinkers: int = 1
    budget: int = 512
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    collab_stats: bool = False

    def check(self) -> None:
        if not 0 <= self.thinkers <= MAX_THINKERS:
            raise InputError(f"thinkers must be between 0 and {MAX_THINKERS}, got {self.thinkers}")
        if self.budget < 1:
            raise InputError(f"the budget must be at least 1 forward pass, got {self.budget}")
        if self.collab_stats:
            raise InputError("attention statistics (collab_stats) are not measured while answering")


@dataclass
class Role:
    """A thinker or the writer: its output block, what it feeds next, what it wrote."""

    name: str
    index: int
    role: str
    block: Block
    pending: list[int] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    shown: int = 0  # characters of its text already sent out in TokenEvents
    active: bool = True

    def text(self, tokenizer) -> str:
        return tokenizer.decode(self.generated)


class AnsweringSession:
    """One problem: K thinkers reason while one writer answers."""

    def __init__(self, runner: Runner, problem: str, config: AnsweringConfig,
                 protocol: AnsweringProtocol | None = None, probe_policy: ProbePolicy | None = None):
        if not problem or not problem.strip():
            raise InputError("the problem is empty")
        config.check()
        self.runner, self.cache, self.config = runner, runner.cache, config
        self.protocol = protocol or AnsweringProtocol()
        self.problem = problem.strip()
        self.tokenizer = tok = runner.model.tokenizer
        self.probe_policy = probe_policy
        vocab = tok.get_vocab()
        self.markers = self.protocol.end_of_thinking in vocab  # the template's own reasoning markers
        ends = {vocab[t] for t in END_OF_TURN if t in vocab} | {tok.eos_token_id}
        self.ends = {i for i in ends if i is not None}
        special = set(tok.all_special_ids)
        thinking = {vocab[t] for t in ("<think>", "</think>") if t in vocab}
        size = runner.model.model.get_output_embeddings().out_features
        writer_banned = sorted(i for i in (special - self.ends) | thinking if i < size)
        thinker_banned = sorted(i for i in (special | self.ends) - thinking if i < size)
        s = config.sampling
        self.samplers = {
            "thinker": Sampler(SamplingParams(s.temperature, s.top_k, s.top_p, (*s.banned_token_ids, *thinker_banned)),
                               config.seed),
            "writer": Sampler(SamplingParams(s.temperature, s.top_k, s.top_p, (*s.banned_token_ids, *writer_banned)),
                              None if config.seed is None else config.seed + 1),
        }
        self.yes_no = [self._ids(self.protocol.yes)[0], self._ids(self.protocol.no)[0]]
        self.mode = "think"
        self.forward_passes = self.tokens_generated = self.probe_passes = 0
        self.answer: str | None = None
        self.answered_by = ""
        self.done = self.interrupted = False
        self.started = time.perf_counter()
        self.timings = {"prefill": 0.0, "decode": 0.0, "probe": 0.0, "finisher": 0.0}
        self.first_answer: tuple[int, float] | None = None  # (passes, seconds)
        self.pauses: list[int] = []  # passes each pause of the writer lasted (after it started)
        self.paused_passes = 0  # passes in which the writer waited, after its first token
        self.since_probe = 0
        self.thinkers: list[Role] = []
        self.writer: Role | None = None
        self._blocks: list[Block] = []
        self._events: list[Event] = []
        self._bound: int | None = None
        self.ended: float | None = None  # perf_counter when the run ended
        self._texts = self._layout_texts()
        longest = max(len(self._texts[0]) + len(self._texts[2]), len(self._texts[1]) + len(self._texts[3]))
        room = runner.model.max_positions - 64
        if longest > room:
            raise ContextOverflowError(
                f"the problem takes {longest} tokens with its prompts; the model's context of "
                f"{runner.model.max_positions} leaves room for at most {room}"
            )

    # -- set-up --------------------------------------------------------------------------------
    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _prompt(self, system: str, opener: str) -> list[int]:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": self.problem}]
        if getattr(self.tokenizer, "chat_template", None):
            return chat_ids(self.tokenizer, messages) + self._ids(opener)
        return self._ids(f"{system}\n\nProblem: {self.problem}\n\n{opener}")

    def _block(self, name: str) -> Block:
        block = self.cache.new_block(name)
        self._blocks.append(block)
        return block

    def _layout_texts(self) -> tuple[list[int], list[int], list[int], list[int]]:
        """Token ids of the thinker prompt, the writer prompt, the thinker split and the writer split."""
        p, k = self.protocol, self.config.thinkers
        names = DEFAULT_NAMES[:k]
        end = p.end_of_thinking
        system = (p.thinker_system.format(end=end) if k == 1 else
                  p.thinkers_system.format(end=end, count=k, names=", ".join(names)))
        think_open, think_close = ("<think>\n", "</think>\n\n") if self.markers else (p.think_open, p.think_close)
        thinker_prompt = self._prompt(system, p.draft_intro)
        writer_prompt = self._prompt(p.writer_system, think_open)
        thinker_split = self._ids(p.thinker_split + ("<think>\n" if self.markers else ""))
        writer_split = self._ids(p.writer_split + think_close)
        if not k:  # no thinking: an empty thinking section (reasoning markers), else straight to the answer
            writer_prompt = self._prompt(p.writer_system, "<think>\n" if self.markers else "")
            writer_split = self._ids(think_close if self.markers else p.think_close.lstrip())
        return thinker_prompt, writer_prompt, thinker_split, writer_split

    def token_bound(self) -> int:
        """Pool slots this session needs at most: prompts, splits, every role's budget, a probe and
        the finisher (computed once)."""
        if self._bound is None:
            p = self.protocol
            fixed = sum(len(self._ids(t)) for t in (p.thinker_system, p.writer_system, p.probe, p.finisher))
            roles = (self.config.thinkers + 1) * (self.config.budget + 16)
            self._bound = 2 * len(self._ids(self.problem)) + fixed + roles + 256
        return self._bound

    def start(self) -> None:
        """Prefill the prompts and splits (two passes), open the roles. Raises CacheFullError before
        any work when the pool has fewer free slots than ``token_bound`` (a server keeps the session
        waiting and starts it again later)."""
        self.cache.require_free(self.token_bound(), f"this run ({self.config.thinkers} thinkers and a writer, a "
                                                    f"budget of {self.config.budget} passes)")
        t0 = time.perf_counter()
        p, k = self.protocol, self.config.thinkers
        names = DEFAULT_NAMES[:k]
        thinker_prompt, writer_prompt, thinker_split, writer_split = self._texts
        self.tp, self.wp = self._block("thinker prompt"), self._block("writer prompt")
        if k:
            self.runner.prefill([self.tp], thinker_prompt)
        self.runner.prefill([self.wp], writer_prompt)
        # Each split's last token opens its role's own block, so every role's first pass feeds a token.
        self.ts, self.ws, writer = self._block("thinker split"), self._block("writer split"), self._block("Writer")
        self.writer = Role("Writer", k, "writer", writer, pending=writer_split[-1:])
        for i, name in enumerate(names):
            header = self._ids(p.thinker_header.format(name=name)) if k > 1 else thinker_split[-1:]
            self.thinkers.append(Role(name, i, "thinker", self._block(name), pending=header))
        split = thinker_split if k > 1 else thinker_split[:-1] if k else []  # K > 1: each opens with its header
        rows = [WorkerStep(split, [self.tp, writer, self.ts])] if split else []
        rows += [WorkerStep(writer_split[:-1], [self.wp, self.ws])] if len(writer_split) > 1 else []
        if rows:
            self.runner.forward(rows)
        self.timings["prefill"] += time.perf_counter() - t0
        self.mode = "think" if k else "write"
        self._events.append(ModeEvent(self.mode, 0))

    def take_opened(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    # -- one pass ------------------------------------------------------------------------------
    def _thinker_view(self, t: Role) -> list[Block]:
        return [self.tp, self.writer.block, self.ts, *(x.block for x in self.thinkers if x is not t), t.block]

    def _writer_view(self) -> list[Block]:
        return [self.wp, *(t.block for t in self.thinkers), self.ws, self.writer.block]

    def _active(self) -> list[Role]:
        thinkers = [t for t in self.thinkers if t.active] if self.mode != "write" else []
        return thinkers + ([self.writer] if self.mode in ("both", "write") and self.writer.active else [])

    def inputs(self) -> list[WorkerStep]:
        """The rows this session wants in the next forward pass."""
        return [WorkerStep(r.pending, self._writer_view() if r is self.writer else self._thinker_view(r))
                for r in self._active()]

    def advance(self, logits, elapsed_s: float = 0.0, shares=None) -> list[Event]:
        """Take the logits [active roles, vocab] of the pass just run on ``inputs()``."""
        self.forward_passes += 1
        self.timings["decode"] += elapsed_s
        events = self.take_opened()
        active = self._active()
        paragraph = False
        if self.first_answer is not None and self.mode == "think":
            self.paused_passes += 1
            self.pauses[-1] += 1
        for row, r in enumerate(active):
            token = self.samplers[r.role](logits[row : row + 1])[0]
            self.tokens_generated += 1
            if r is self.writer and token in self.ends:  # the writer ends its answer
                r.active = False
                events += self.finish()
                break
            r.generated.append(token)
            r.pending = [token]
            text = r.text(self.tokenizer)
            new = "" if text.endswith("\ufffd") else text[r.shown :]
            r.shown += len(new)
            events.append(TokenEvent(r.name, r.index, token, new, r.role))
            if r is self.writer:
                if self.first_answer is None:
                    self.first_answer = (self.forward_passes, self.elapsed())
                    events.append(FirstAnswerTokenEvent(self.forward_passes, self.first_answer[1]))
                if self.mode == "both" and rules.is_step_end(text):  # a paragraph: wait for the thoughts
                    self.mode = "think"
                    self.pauses.append(0)
                    events.append(ModeEvent("think", self.forward_passes))
            elif self.protocol.end_of_thinking in text:
                r.active = False
            elif rules.is_step_end(text):
                paragraph = True
        if not self.done:
            events += self._next_mode(paragraph)
        events.append(PassEvent(self.forward_passes, self.tokens_generated, self.elapsed()))
        if not self.done and (self.forward_passes >= self.config.budget or self.room_left() < 1):
            events += self.finish()
        return events

    def room_left(self) -> int:
        """Positions left in the longest view of the next pass before the context is full."""
        return self.runner.model.max_positions - max(view_lengths(self.inputs()), default=0)

    def _next_mode(self, paragraph: bool) -> list[Event]:
        """Thinking over: the writer alone. The writer waiting: probe on a paragraph or the interval."""
        if self.mode != "write" and not any(t.active for t in self.thinkers):
            self.mode = "write"
            return [ModeEvent("write", self.forward_passes)]
        if self.mode != "think":
            return []
        self.since_probe += 1
        reason = "paragraph" if paragraph else "interval" if self.since_probe >= self.protocol.probe_every else None
        if reason is None:
            return []
        self.since_probe = 0
        p_yes, p_no = self._probe()
        policy = self.probe_policy
        ready = policy(self.probe_passes - 1, p_yes, p_no) if policy is not None else p_yes > p_no
        events: list[Event] = [ProbeEvent(p_yes, p_no, ready, reason, self.forward_passes)]
        if ready:
            self.mode = "both"
            events.append(ModeEvent("both", self.forward_passes))
        return events

    def _probe(self) -> tuple[float, float]:  # (only while a thinker is active: "think" mode)
        """P(yes), P(no) after the probe question in the first active thinker's view (block freed)."""
        t0 = time.perf_counter()
        thinker = next(t for t in self.thinkers if t.active)
        block = self.cache.new_block("probe")
        try:
            view = self._thinker_view(thinker)
            logits = self.runner.forward([WorkerStep(self._ids(self.protocol.probe), [*view, block])]).logits
        finally:
            self.cache.free(block)
        self.probe_passes += 1
        self.timings["probe"] += time.perf_counter() - t0
        probs = logits[0].float().softmax(-1)[self.yes_no].tolist()
        return probs[0], probs[1]

    # -- the end -------------------------------------------------------------------------------
    def writer_answer(self) -> str | None:
        r"""The last \boxed{} answer in the writer's text, if any."""
        return rules.final_answer(self.writer.text(self.tokenizer)) if self.writer else None

    def _finisher(self) -> str | None:
        """The writer's view plus the finisher sentence, decoded greedily up to the closing brace."""
        t0 = time.perf_counter()
        block = self.cache.new_block("finisher")
        try:
            view = self._writer_view()
            steps = [WorkerStep([*self.writer.pending, *self._ids(self.protocol.finisher)], [*view, block])]
            decoded: list[int] = []
            for _ in range(self.protocol.finisher_tokens):
                token = self.samplers["writer"].greedy(self.runner.forward(steps).logits)[0]
                decoded.append(token)
                if rules.close_finisher(self.tokenizer.decode(decoded)) != self.tokenizer.decode(decoded).strip():
                    break
                steps = [WorkerStep([token], [*view, block])]
            answer = rules.close_finisher(self.tokenizer.decode(decoded))
            return answer if rules.is_answer(answer) else None
        finally:
            self.cache.free(block)
            self.timings["finisher"] += time.perf_counter() - t0

    def finish(self) -> list[Event]:
        r"""End the run now: the \boxed{} answer the writer wrote, or else the finisher's from its view."""
        self.done = True
        self.answer, self.answered_by = self.writer_answer(), "Writer"
        self.ended = time.perf_counter()
        if self.answer is None:
            self.answer, self.answered_by = self._finisher(), "finisher"
        return [AnswerEvent(self.answer, self.answered_by, self.forward_passes)]

    def due_snapshots(self) -> list:
        return []

    def elapsed(self) -> float:
        """Seconds from the start to now, or to the end once the run has ended."""
        return (self.ended or time.perf_counter()) - self.started

    def metrics(self) -> dict:
        """Time and passes to the first answer token, answer speed, the writer's pauses, probes."""
        passes, seconds = self.first_answer or (None, None)
        written = len(self.writer.generated) if self.writer else 0
        writing_s = self.elapsed() - seconds if seconds is not None else 0.0
        return {
            "first_answer_passes": passes,
            "first_answer_s": None if seconds is None else round(seconds, 3),
            "answer_tokens": written,
            "answer_tokens_per_s": round(written / writing_s, 2) if writing_s > 0 else None,
            "pauses": len(self.pauses),
            "paused_passes": self.paused_passes,
            "longest_pause": max(self.pauses, default=0),
            "paused_share": round(self.paused_passes / self.forward_passes, 3) if self.forward_passes else 0.0,
            "probe_passes": self.probe_passes,
            "probe_s": round(self.timings["probe"], 3),
        }

    def result(self) -> Result:
        workers = [WorkerText(t.name, t.text(self.tokenizer)) for t in self.thinkers]
        writer = self.writer.text(self.tokenizer) if self.writer else ""
        return Result(
            answer=self.answer, answered_by=self.answered_by, workers=[*workers, WorkerText("Writer", writer)],
            history=[], forward_passes=self.forward_passes, tokens_generated=self.tokens_generated,
            elapsed_s=self.elapsed(), model=self.runner.model.name, layout="answering",
            timings=dict(self.timings), interrupted=self.interrupted,
            answering={"text": writer, **self.metrics()},
        )

    def close(self) -> None:
        """Free every block of the session."""
        for block in self._blocks:
            self.cache.free(block)
        self._blocks = []
