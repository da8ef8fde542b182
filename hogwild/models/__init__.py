"""Models: what hogwild runs and how it gets one.

- ``support``: the support policy (families, RoPE types, layer kinds) and its refusals;
- ``loading``: ids, folders and GGUF files (converted once), dense, quantized or sharded;
- ``quantize``, ``gguf_config``: quantized weights; a GGUF header read in milliseconds;
- ``random``: random-weight models and their tokenizer;
- ``adapter``: ``LoadedModel``, the one adapter between transformers and the engine;
- ``attention``: the attention function registered with transformers (imported here, so that
  loading any model registers it).
"""

from .adapter import LoadedModel
from .attention import ordinary_attention
from .loading import cache_dir, load_model, resolve
from .random import RANDOM_CONFIGS, random_model, random_tokenizer

__all__ = [
    "RANDOM_CONFIGS",
    "LoadedModel",
    "cache_dir",
    "load_model",
    "ordinary_attention",
    "random_model",
    "random_tokenizer",
    "resolve",
]
