"""hogwild: several workers of one LLM decode in parallel over one shared, concurrently updated KV cache.

The public API: ``Engine`` (load a model once; ``solve`` / ``stream`` problems), ``SamplingParams``,
the events a stream yields, and the lower-level ``Runner``, ``SharedCache`` and ``generate``.
"""

import logging
import os

import torch

if not torch.cuda.is_available():  # no device for Triton kernels: run them in Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")  # (read when triton is first imported, so set it first)

# torchao (for --quantize), which transformers imports whenever it is installed, logs its missing CUDA
# kernels and torch's deprecations at import: noise on every run, whatever was asked for.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)

from .cache import Block, SharedCache
from .engine import collaboration
from .engine.answering import MAX_THINKERS, AnsweringConfig, AnsweringSession
from .engine.batch import BatchLoop, LoopStep, SessionStep
from .engine.engine import Engine
from .engine.events import (
    AnswerEvent,
    CollabEvent,
    DoneEvent,
    Event,
    FirstAnswerTokenEvent,
    HistoryStep,
    ModeEvent,
    PassEvent,
    ProbeEvent,
    Result,
    SnapshotEvent,
    StepEvent,
    StepStartEvent,
    TokenEvent,
    WorkerText,
)
from .engine.generate import GenerateResult, generate
from .engine.runner import PassOutput, Runner, WorkerStep
from .engine.session import Session, SolveConfig
from .errors import (
    CacheFullError,
    ContextOverflowError,
    HogwildError,
    InputError,
    ModelLoadError,
    UnsupportedModelError,
)
from .models import RANDOM_CONFIGS, LoadedModel, load_model, ordinary_attention
from .sampling import Sampler, SamplingParams

__all__ = [
    "MAX_THINKERS",
    "RANDOM_CONFIGS",
    "AnswerEvent",
    "AnsweringConfig",
    "AnsweringSession",
    "BatchLoop",
    "CollabEvent",
    "Block",
    "CacheFullError",
    "ContextOverflowError",
    "DoneEvent",
    "Engine",
    "Event",
    "FirstAnswerTokenEvent",
    "GenerateResult",
    "HistoryStep",
    "HogwildError",
    "InputError",
    "LoadedModel",
    "LoopStep",
    "ModeEvent",
    "ModelLoadError",
    "PassEvent",
    "PassOutput",
    "ProbeEvent",
    "Result",
    "Runner",
    "Sampler",
    "SamplingParams",
    "Session",
    "SessionStep",
    "SharedCache",
    "SnapshotEvent",
    "SolveConfig",
    "StepEvent",
    "StepStartEvent",
    "TokenEvent",
    "UnsupportedModelError",
    "WorkerStep",
    "WorkerText",
    "collaboration",
    "generate",
    "load_model",
    "ordinary_attention",
]
