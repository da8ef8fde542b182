"""hogwild: several workers of one LLM decode in parallel over one shared, concurrently updated KV cache."""

from .cache import Block, SharedCache
from .engine.generate import GenerateResult, generate
from .engine.runner import Runner, WorkerStep
from .errors import ContextOverflowError, HogwildError, InputError, ModelLoadError, UnsupportedModelError
from .model import LoadedModel, load_model, ordinary_attention
from .sampling import Sampler, SamplingParams

__all__ = [
    "Block",
    "ContextOverflowError",
    "GenerateResult",
    "HogwildError",
    "InputError",
    "LoadedModel",
    "ModelLoadError",
    "Runner",
    "Sampler",
    "SamplingParams",
    "SharedCache",
    "UnsupportedModelError",
    "WorkerStep",
    "generate",
    "load_model",
    "ordinary_attention",
]
