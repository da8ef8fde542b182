"""The public entry point: ``Engine`` loads a model once and solves problems with it.

``solve`` returns a Result; ``stream`` yields typed events as they happen (tokens, finished steps,
snapshots, the answer, and last a DoneEvent carrying the Result).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cached_property

import torch

from ..errors import HogwildError
from ..models import LoadedModel, load_model
from ..protocol.answering import AnsweringProtocol
from ..protocol.prompts import ProtocolConfig
from ..sampling import SamplingParams
from .answering import AnsweringConfig, AnsweringSession, ProbePolicy
from .batch import BatchLoop
from .events import DoneEvent, Event, Result
from .runner import Runner
from .session import Session, SolveConfig


class Engine:
    """A loaded model, its shared cache and the collaboration protocol.

    >>> engine = Engine.from_pretrained()            # the embedded SmolLM2-135M-Instruct
    >>> engine.solve("What is 12 * 7?", workers=2).answer
    """

    def __init__(
        self,
        model: LoadedModel,
        protocol: ProtocolConfig | None = None,
        attention: str = "auto",
        kv_memory: int | None = None,
    ):
        """attention: "auto" (triton with CUDA graphs on CUDA, torch elsewhere), "torch" or "triton";
        kv_memory: bytes of the K/V pool (default: ``default_kv_memory``)."""
        self.model = model
        self.protocol = protocol or ProtocolConfig()
        self.answering = AnsweringProtocol()
        #: Decides answer-while-thinking probes when a request names no policy (None: the model's P(yes) > P(no)).
        self.probe_policy: ProbePolicy | None = None
        self.runner = Runner.for_model(model, attention, kv_memory)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | None = None,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        protocol: ProtocolConfig | None = None,
        attention: str = "auto",
        kv_memory: int | None = None,
        quantize: str | None = None,
    ) -> Engine:
        """dtype: default float32, bf16 for quantized weights; quantize: "int8" (torchao weight-only) or
        "nf4" (bitsandbytes) at load (``hogwild.models.quantize``); pre-quantized checkpoints load as they are."""
        model = load_model(name_or_path, device=device, dtype=dtype, quantize=quantize)
        return cls(model, protocol, attention, kv_memory)

    @cached_property
    def banned_token_ids(self) -> tuple[int, ...]:
        """Tokens that would forge the protocol: end of turn, "</think>", "#" headings."""
        tok = self.model.tokenizer
        banned = {i for i in (tok.eos_token_id, tok.pad_token_id) if i is not None}
        vocab = tok.get_vocab()
        for text in self.protocol.banned_strings:
            if text in vocab:
                banned.add(vocab[text])
        pieces = tok.batch_decode([[i] for i in range(len(tok))])
        banned.update(i for i, piece in enumerate(pieces) if piece.lstrip(" \n").startswith("#"))
        vocab_size = self.model.model.get_output_embeddings().out_features  # (never read .weight: may be quantized)
        return tuple(sorted(i for i in banned if i < vocab_size))

    def session(self, problem: str, config: SolveConfig) -> Session:
        """A new session (not started): for drivers that batch several sessions in one pass."""
        return Session(self.runner, problem, config, self.protocol, self.banned_token_ids)

    def stream(
        self,
        problem: str,
        workers: int = 2,
        layout: str = "combined",
        budget: int = 512,
        sampling: SamplingParams | None = None,
        seed: int | None = None,
        collab_every: int | None = None,
        snapshots: tuple[int, ...] = (),
        collab_stats: bool = False,
    ) -> Iterator[Event]:
        """Solve ``problem``, yielding events as they happen; the last one is a DoneEvent.

        collab_stats: a CollabEvent per pass (where each worker's attention went) and the run's
        average in ``Result.collaboration["attention"]`` (decode passes replay CUDA graphs of their own).

        Raises InputError (a HogwildError) at once for bad input. Closing the iterator early
        frees the session's cache blocks; ``gen.throw(KeyboardInterrupt)`` ends the run and returns
        a DoneEvent whose result has ``interrupted=True`` and the partial transcript.
        """
        config = SolveConfig(
            workers, layout, budget, sampling or SamplingParams(), seed, collab_every, tuple(sorted(snapshots)),
            collab_stats,
        )
        session = self.session(problem, config)  # validates before the generator starts
        return self._run(session)

    def answering_session(self, problem: str, config: AnsweringConfig,
                          probe_policy: ProbePolicy | None = None) -> AnsweringSession:
        """A new answer-while-thinking session (not started): for drivers that batch sessions."""
        return AnsweringSession(self.runner, problem, config, self.answering, probe_policy or self.probe_policy)

    def stream_answer(
        self,
        problem: str,
        thinkers: int = 1,
        budget: int = 512,
        sampling: SamplingParams | None = None,
        seed: int | None = None,
        probe_policy: ProbePolicy | None = None,
    ) -> Iterator[Event]:
        """Answer while thinking: ``thinkers`` reason while a writer streams the answer, yielding
        events as they happen (``TokenEvent`` with role "thinker" or "writer", ``ModeEvent``,
        ``ProbeEvent``, ``FirstAnswerTokenEvent``, ``AnswerEvent``); the last is a DoneEvent whose
        ``Result.answering`` holds the writer's text and the metrics. probe_policy: decides the
        probes instead of the model (tests, experiments)."""
        config = AnsweringConfig(thinkers, budget, sampling or SamplingParams(), seed)
        return self._run(self.answering_session(problem, config, probe_policy))

    def _run(self, session: Session | AnsweringSession) -> Iterator[Event]:
        loop = BatchLoop(self.runner)
        try:
            yield from loop.add(session)
            while not session.done:
                step = loop.step().sessions[session]
                if step.error is not None:
                    raise step.error
                yield from step.events
            yield DoneEvent(session.result())
        except KeyboardInterrupt:  # thrown in by the caller (``stream.throw``): hand back what we have
            session.interrupted = True
            yield DoneEvent(session.result())
        finally:
            loop.remove(session)

    def solve(self, problem: str, **kwargs) -> Result:
        """Solve ``problem`` and return the Result (same arguments as ``stream``)."""
        for event in self.stream(problem, **kwargs):
            if isinstance(event, DoneEvent):
                return event.result
        raise HogwildError("the run ended without a result")  # unreachable unless a driver breaks


__all__ = ["Engine", "SolveConfig"]
