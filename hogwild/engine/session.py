"""One solve in progress: its blocks, its workers and the protocol, advanced one pass at a time.

A session does not run the model's decode passes itself: ``inputs()`` gives the rows it wants in
the next pass and ``advance(logits)`` takes that pass's logits, so that a driver can put the
workers of several sessions into one forward pass. Prefill and the finisher are short,
session-local passes that the session runs with the runner directly.
"""

from __future__ import annotations

import collections
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import jinja2
import torch

from ..cache import Block
from ..errors import ContextOverflowError, InputError
from ..protocol import text as rules
from ..protocol.layouts import HISTORY_LAYOUTS, LAYOUTS, SharedBlocks, finisher_view, view
from ..protocol.prompts import ProtocolConfig
from ..sampling import Sampler, SamplingParams
from . import collaboration as collab
from .events import (
    AnswerEvent,
    CollabEvent,
    Event,
    HistoryStep,
    PassEvent,
    Result,
    SnapshotEvent,
    StepEvent,
    StepStartEvent,
    TokenEvent,
    WorkerText,
)
from .runner import Runner, WorkerStep, view_lengths

MAX_WORKERS = 16


@dataclass(frozen=True)
class SolveConfig:
    """One request. ``budget`` counts forward passes (one token per worker each); ``snapshots``
    are budgets at which the finisher's answer is reported without stopping the run."""

    workers: int = 2
    layout: str = "combined"
    budget: int = 512
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    collab_every: int | None = None  # None: the protocol's default; 0: never
    snapshots: tuple[int, ...] = ()
    collab_stats: bool = False  # drivers pass PassOutput.shares to advance(); a CollabEvent per pass

    def check(self, protocol: ProtocolConfig) -> None:
        if not 1 <= self.workers <= min(MAX_WORKERS, len(protocol.names)):
            raise InputError(f"workers must be between 1 and {MAX_WORKERS}, got {self.workers}")
        if self.layout not in LAYOUTS:
            raise InputError(f"unknown layout {self.layout!r}; choose one of {', '.join(LAYOUTS)}")
        if self.budget < 1:
            raise InputError(f"the budget must be at least 1 forward pass, got {self.budget}")
        if any(b < 1 or b > self.budget for b in self.snapshots):
            raise InputError(f"snapshots must lie between 1 and the budget ({self.budget})")
        if self.collab_every is not None and self.collab_every < 0:
            raise InputError(f"collab_every must be >= 0, got {self.collab_every}")


@dataclass
class Worker:
    """A worker's state. ``block`` holds its current step (header included) in the cache."""

    index: int
    name: str
    block: Block
    step: int = 1
    pending: list[int] = field(default_factory=list)  # fed in the next pass
    forced: str = ""  # seeded words or check question opening the current step
    generated: list[int] = field(default_factory=list)  # sampled in the current step
    close_after_pass: int = 0  # >0: the first n tokens of the block are a finished step
    shown: int = 0  # characters of the current step's text already sent out in TokenEvents
    since_check: int = 0
    finished_text: str = ""  # all finished steps, headers included
    header: str = ""
    answer: str | None = None
    active: bool = True

    def step_text(self, tokenizer) -> str:
        return self.forced + tokenizer.decode(self.generated)


def chat_ids(tokenizer, messages: Sequence[dict[str, str]]) -> list[int]:
    """The token ids of ``messages`` laid out by the tokenizer's chat template, ready for the reply,
    with each message's text tokenized as text: a control token written inside a message (such as
    ``<|im_end|>``) stays plain text, only the template's own control tokens are real."""
    key = uuid.uuid4().hex  # stands in for each text while the template renders
    stand_ins = [{**m, "content": f"{key}{i}{key}"} for i, m in enumerate(messages)]
    rendered = tokenizer.apply_chat_template(stand_ins, add_generation_prompt=True, tokenize=False)
    ids: list[int] = []
    for j, piece in enumerate(re.split(f"{key}(\\d+){key}", rendered)):
        if j % 2:
            ids += tokenizer(messages[int(piece)]["content"], add_special_tokens=False,
                             split_special_tokens=True).input_ids
        elif piece:
            ids += tokenizer(piece, add_special_tokens=False).input_ids
    return ids


class Session:
    """A problem being solved by several workers over one shared cache."""

    def __init__(
        self,
        runner: Runner,
        problem: str,
        config: SolveConfig,
        protocol: ProtocolConfig,
        banned_token_ids: tuple[int, ...],
        context: Sequence[dict[str, str]] = (),
    ):
        """``context``: earlier chat messages (``{"role", "content"}``: a client's system
        messages, earlier user and assistant turns), laid out before the protocol's prompt."""
        if not problem or not problem.strip():
            raise InputError("the problem is empty")
        config.check(protocol)
        self.runner = runner
        self.cache = runner.cache
        self.tokenizer = runner.model.tokenizer
        self.protocol = protocol
        self.config = config
        self.layout = config.layout
        self.solo = config.layout == "independent"
        self.collab_every = protocol.collab_every if config.collab_every is None else config.collab_every
        self.sampler = Sampler(
            SamplingParams(
                config.sampling.temperature, config.sampling.top_k, config.sampling.top_p,
                tuple(config.sampling.banned_token_ids) + tuple(banned_token_ids),
            ),
            config.seed,
        )
        self.prompt_ids = self._prompt_ids(problem, context)
        room = runner.model.max_positions - 64 - protocol.finisher_tokens
        if len(self.prompt_ids) > room:
            raise ContextOverflowError(
                f"the problem takes {len(self.prompt_ids)} tokens with the protocol's prompt; the model's "
                f"context of {runner.model.max_positions} leaves room for at most {room}"
            )
        self.forward_passes = 0
        self.tokens_generated = 0
        self.history: list[HistoryStep] = []
        self.answer: str | None = None
        self.answered_by = ""
        self.done = False
        self.interrupted = False
        self.timings = {"prefill": 0.0, "decode": 0.0, "finisher": 0.0}
        self.started = time.perf_counter()
        self.shared: SharedBlocks | None = None
        self.workers: list[Worker] = []
        self._blocks: list[Block] = []
        self._opened: list[Event] = []  # steps opened since the last events were handed out
        self._snapshots_left = sorted(config.snapshots)  # budgets not snapshotted yet
        self._attention: dict[str, dict] = {}  # worker -> sum of its per-pass shares (collab_stats)
        self._attention_passes: dict[str, int] = {}

    # -- set-up --------------------------------------------------------------------------------
    def _prompt_ids(self, problem: str, context: Sequence[dict[str, str]]) -> list[int]:
        system = self.protocol.system(self.config.workers, self.solo)
        tail = [{"role": "system", "content": system}, {"role": "user", "content": problem.strip()}]
        if getattr(self.tokenizer, "chat_template", None):
            try:
                return chat_ids(self.tokenizer, [*context, *tail])
            except jinja2.TemplateError as exc:  # a template that wants the system message first
                if not context:
                    raise
                merged = {"role": "user", "content": f"{system}\n\n{problem.strip()}"}
                try:
                    return chat_ids(self.tokenizer, [*context, merged])
                except jinja2.TemplateError:
                    raise InputError(f"the model's chat template refuses this conversation: {exc}") from None
        earlier = "".join(f"{m['role']}: {m['content']}\n\n" for m in context)
        text = f"{earlier}{system}\n\nProblem: {problem.strip()}\n\n"
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _new_block(self, name: str, capacity: int | None = None) -> Block:
        block = self.cache.new_block(name, capacity)
        self._blocks.append(block)
        return block

    def token_bound(self) -> int:
        """Pool slots this session is expected to need at most: the prompt, every worker's budget
        twice (its own block and the history it moves into), headers and the finisher. Step
        headers are counted at 64 tokens per worker per 64 passes; a run that opens steps far more
        often can need more."""
        c, p = self.config, self.protocol
        headers = 64 * c.workers * (1 + c.budget // 64)
        return len(self.prompt_ids) + 2 * c.workers * c.budget + headers + 64 + p.finisher_tokens

    def start(self) -> None:
        """Prefill the prompt and the shared headers, and queue each worker's first step.

        Raises CacheFullError before any work when the pool has fewer free slots than
        ``token_bound`` (a server keeps such a session waiting)."""
        self.cache.require_free(self.token_bound(), f"this run ({self.config.workers} workers, a budget of "
                                                    f"{self.config.budget} passes)")
        t0 = time.perf_counter()
        p = self.protocol
        prompt_ids = self.prompt_ids
        if self.solo:  # the prompt's last token opens each worker's own block (nothing else to feed)
            prompt_ids = prompt_ids[:-1]
        prompt = self._new_block("prompt", capacity=len(prompt_ids))  # it never grows
        shared = SharedBlocks(prompt)
        self.runner.prefill([prompt], prompt_ids)
        rows = []
        texts = {"history": p.history_header, "others_header": p.others_header,
                 "marker": p.unfinished_marker, "own_header": p.own_header}
        wanted = {"combined": texts, "interleaved": {k: texts[k] for k in ("history", "marker", "own_header")},
                  "contiguous": {"marker": texts["marker"]}, "independent": {}}[self.layout]
        for name, text in wanted.items():
            block = self._new_block(name)
            setattr(shared, name, block)
            rows.append(WorkerStep(self._ids(text), [prompt, block]))
        if rows:
            self.runner.forward(rows)  # the small shared blocks, all in one pass
        self.shared = shared
        for i in range(self.config.workers):
            name = p.name(i)
            worker = Worker(i, name, self._new_block(name))
            self._open_step(worker)
            if self.solo:
                worker.pending = self.prompt_ids[-1:]
            self.workers.append(worker)
        self.timings["prefill"] += time.perf_counter() - t0

    def _open_step(self, worker: Worker) -> None:
        """Queue the header of the worker's next step (independent workers get no headers)."""
        worker.generated = []
        worker.shown = 0
        if self.solo:
            worker.forced, worker.header, worker.pending = "", "", []
            return
        check = bool(self.collab_every) and worker.since_check >= self.collab_every
        if check:
            worker.since_check = 0
        full = self.protocol.header(worker.index, worker.step, check)
        worker.header = self.protocol.step_header.format(name=worker.name, step=worker.step)
        worker.forced = full[len(worker.header):]
        worker.shown = len(worker.forced)  # the forced words go out in the StepStartEvent
        worker.pending = self._ids(full)
        self._opened.append(StepStartEvent(worker.name, worker.index, worker.step, full))

    # -- one pass ------------------------------------------------------------------------------
    def inputs(self) -> list[WorkerStep]:
        """The rows this session wants in the next forward pass (one per active worker)."""
        return [
            WorkerStep(w.pending, view(self.layout, self.shared, [x.block for x in self.workers], w.index))
            for w in self.workers
            if w.active
        ]

    def room_left(self) -> int:
        """Positions left in the longest view before the context is full."""
        return self.runner.model.max_positions - max(view_lengths(self.inputs()), default=0)

    def advance(self, logits: torch.Tensor, elapsed_s: float = 0.0,
                shares: list[torch.Tensor] | None = None) -> list[Event]:
        """Take the logits [active workers, vocab] of the pass just run on ``inputs()`` and, with
        ``collab_stats``, that pass's ``PassOutput.shares`` of these rows ([layers, view entries] each)."""
        self.forward_passes += 1
        self.timings["decode"] += elapsed_s
        events: list[Event] = self.take_opened()
        active = [w for w in self.workers if w.active]
        collab_event = self._collab_event(active, shares) if shares is not None else None
        for w in active:  # steps whose last token was fed in this pass move into the history
            if w.close_after_pass:
                if self.layout in HISTORY_LAYOUTS:
                    self.runner.move_prefix(self.shared.history, w.block, w.close_after_pass)
                w.close_after_pass = 0
        tokens = self.sampler(logits)
        for w, token in zip(active, tokens, strict=True):
            w.generated.append(token)
            w.since_check += 1
            self.tokens_generated += 1
            text = w.step_text(self.tokenizer)
            new = "" if text.endswith("\ufffd") else text[w.shown :]  # wait for split characters
            w.shown += len(new)
            events.append(TokenEvent(w.name, w.index, token, new))
            w.pending = [token]
            answer = rules.final_answer(text)
            if answer is not None:
                w.answer, w.active = answer, False
                events.append(self._finish_step(w, text))
                if not self.solo and self.answer is None:
                    self.answer, self.answered_by = answer, w.name
                    events.append(AnswerEvent(answer, w.name, self.forward_passes))
                    self.done = True
            elif rules.is_step_end(text):
                events.append(self._finish_step(w, text))
                w.close_after_pass = w.block.length + 1  # the step's tokens, its last one fed next pass
                w.step += 1
                self._open_step(w)
                w.pending = [token] + w.pending
        events += self.take_opened()
        if self.solo and not any(w.active for w in self.workers):
            self._vote()
            events.append(AnswerEvent(self.answer, self.answered_by, self.forward_passes))
            self.done = True
        if collab_event is not None:
            events.append(collab_event)
        events.append(PassEvent(self.forward_passes, self.tokens_generated, self.elapsed()))
        if not self.done and (self.forward_passes >= self.config.budget or self.room_left() < 1):
            events += self.finish()
        return events

    def _collab_event(self, active: list[Worker], shares: list[torch.Tensor]) -> CollabEvent:
        """Map each row's entry shares to block kinds (before the pass's steps move), add them up."""
        labels = collab.block_labels(self.shared, {w.name: w.block for w in self.workers})
        own = [w.block for w in self.workers]
        per_layer, means = {}, {}
        for w, entries in zip(active, shares, strict=True):
            others = [x.name for x in self.workers if x is not w]
            blocks = view(self.layout, self.shared, own, w.index)
            per_layer[w.name] = collab.view_shares(entries, blocks, labels, w.name, others)
            means[w.name] = collab.layer_mean(per_layer[w.name])
            total = self._attention.setdefault(w.name, collab.empty_shares(others))
            collab.add_shares(total, means[w.name])
            self._attention_passes[w.name] = self._attention_passes.get(w.name, 0) + 1
        return CollabEvent(self.forward_passes, means, per_layer)

    def collaboration(self) -> dict:
        """``duplication`` per worker (always) and, with ``collab_stats``, ``attention``: per worker its
        shares averaged over the passes it took part in."""
        forced = [self.protocol.header(i, 1, False)[len(self.protocol.step_header.format(
            name=w.name, step=1)):] for i, w in enumerate(self.workers)]
        out = {"duplication": collab.duplication(
            self.history, [w.name for w in self.workers], self.protocol.collab_question, forced)}
        if self.config.collab_stats:
            out["attention"] = {name: collab.scaled(total, 1 / self._attention_passes[name])
                                for name, total in self._attention.items()}
        return out

    def take_opened(self) -> list[Event]:
        """StepStartEvents of the steps opened since the last call."""
        opened, self._opened = self._opened, []
        return opened

    def _finish_step(self, w: Worker, text: str) -> StepEvent:
        step = HistoryStep(w.name, w.step, text)
        self.history.append(step)
        w.finished_text += w.header + text
        return StepEvent(w.name, w.index, w.step, text)

    # -- the end -------------------------------------------------------------------------------
    def _vote(self) -> None:
        answers = [w.answer for w in self.workers if w.answer is not None]
        if answers:
            counts = collections.Counter(answers)
            self.answer = max(answers, key=lambda a: (counts[a], -answers.index(a)))
        self.answered_by = "vote" if len(self.workers) > 1 else (self.workers[0].name if answers else "finisher")

    def finisher_answer(self) -> str | None:
        """Ask the finisher for an answer from the current state, leaving the state as it was."""
        t0 = time.perf_counter()
        own = [w.block for w in self.workers]
        if self.solo:
            answers = []
            for w in self.workers:
                answers.append(w.answer if w.answer is not None else self._finish([self.shared.prompt, w.block]))
            counts = collections.Counter(a for a in answers if a)
            result = max(counts, key=lambda a: (counts[a], -answers.index(a))) if counts else None
        else:
            result = self._finish(finisher_view(self.layout, self.shared, own))
        self.timings["finisher"] += time.perf_counter() - t0
        return result

    def _finish(self, state: list[Block]) -> str | None:
        block = self.cache.new_block("finisher")
        try:
            steps = [WorkerStep(self._ids(self.protocol.finisher), [*state, block])]
            decoded: list[int] = []
            for _ in range(self.protocol.finisher_tokens):
                logits = self.runner.forward(steps).logits
                token = self.sampler.greedy(logits)[0]
                decoded.append(token)
                text = self.tokenizer.decode(decoded)
                if rules.close_finisher(text) != text.strip():
                    break
                steps = [WorkerStep([token], [*state, block])]
            answer = rules.close_finisher(self.tokenizer.decode(decoded))
            return answer if rules.is_answer(answer) else None
        finally:
            self.cache.free(block)

    def finish(self) -> list[Event]:
        """End the run now; without an answer yet, the finisher gives one."""
        self.done = True
        if self.answer is None:
            self.answer = self.finisher_answer()
            self.answered_by = "vote" if self.solo and len(self.workers) > 1 else "finisher"
        return [AnswerEvent(self.answer, self.answered_by, self.forward_passes)]

    def due_snapshots(self) -> list[SnapshotEvent]:
        """Snapshots of ``config.snapshots`` whose budget the run has reached (every one left, once
        it is done): drivers call this after each ``advance``."""
        due = []
        while self._snapshots_left and (self.forward_passes >= self._snapshots_left[0] or self.done):
            due.append(self.snapshot(self._snapshots_left.pop(0)))
        return due

    def snapshot(self, budget: int) -> SnapshotEvent:
        answer, by = self.answer, self.answered_by
        if answer is None:
            answer, by = self.finisher_answer(), "finisher"
        return SnapshotEvent(budget, answer, by, self.forward_passes, self.tokens_generated, self.elapsed(),
                             self.collaboration())

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def result(self) -> Result:
        workers = []
        for w in self.workers:
            current = w.header + w.step_text(self.tokenizer) if (w.generated or w.forced) and w.active else ""
            workers.append(WorkerText(w.name, w.finished_text + current))
        return Result(
            answer=self.answer, answered_by=self.answered_by, workers=workers, history=list(self.history),
            forward_passes=self.forward_passes, tokens_generated=self.tokens_generated,
            elapsed_s=self.elapsed(), model=self.runner.model.name, layout=self.layout,
            timings=dict(self.timings), interrupted=self.interrupted, collaboration=self.collaboration(),
        )

    def close(self) -> None:
        """Free every block of the session (the cache keeps nothing of it)."""
        for block in self._blocks:
            self.cache.free(block)
        self._blocks = []
