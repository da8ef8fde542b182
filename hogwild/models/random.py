"""Random-weight models (no download): real shapes for GPU measurements, tiny ones for tests.

``random_model`` builds a hand-built Qwen2 config (``RANDOM_CONFIGS``) with random weights and
``random_tokenizer``: its text is noise, its speed and memory are the real shape's.
"""

from __future__ import annotations

import itertools

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

from ..errors import InputError
from ..layers.tiles import device_limits, model_dtype
from .adapter import LoadedModel, adapt
from .attention import ATTENTION_NAME
from .support import check_supported

#: Hand-built Qwen2 configurations, by preset name (``--random-config``).
RANDOM_CONFIGS: dict[str, dict] = {
    "qwen2.5-7b": dict(
        hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        intermediate_size=18944, vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
    ),
    # Same family, a few MB: lets the tests cover the random-config path.
    "tiny-qwen2": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=1024, max_position_embeddings=4096, rope_theta=1e6,
    ),
    # Qwen2.5-7B's attention shape (7 query heads per K/V head, head_dim 128) in ~6 MB.
    "tiny-qwen2-gqa7": dict(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=14, num_key_value_heads=2, head_dim=128,
        intermediate_size=256, vocab_size=1024, max_position_embeddings=4096, rope_theta=1e6,
    ),
}

RANDOM_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
RANDOM_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def random_tokenizer(vocab_size: int):
    """A byte-level tokenizer with exactly ``vocab_size`` ids and a ChatML chat template.

    Ids 0-255 are the bytes, then ``RANDOM_SPECIAL_TOKENS`` (end of text, the chat markers); the
    rest are fixed strings of 2+ letters, digits and spaces that encoding never produces but
    decoding prints, so that every id a random model samples decodes to readable noise.
    """
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate([*alphabet, *RANDOM_SPECIAL_TOKENS])}
    if vocab_size < len(vocab):
        raise ValueError(f"a random tokenizer needs a vocabulary of at least {len(vocab)} ids, not {vocab_size}")
    letters = [byte_level.pre_tokenize_str(c)[0][0] for c in "etaoinshrdlucmfwypvbgkqjxz 0123456789,.\n"]
    fillers = ("".join(t) for n in itertools.count(2) for t in itertools.product(letters, repeat=n))
    vocab.update({t: i for i, t in zip(range(len(vocab), vocab_size), fillers)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    end, start, stop = RANDOM_SPECIAL_TOKENS
    out = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=stop, pad_token=end, additional_special_tokens=[start, stop]
    )
    out.chat_template = RANDOM_CHAT_TEMPLATE
    return out


def random_model(preset: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 seed: int = 0) -> LoadedModel:
    """A random-weight model from a hand-built config (``RANDOM_CONFIGS``), built on ``device``,
    with ``random_tokenizer``. dtype: as ``load_model``'s."""
    dtype = model_dtype(dtype, device_limits(device))
    if preset not in RANDOM_CONFIGS:
        raise InputError(f"unknown --random-config {preset!r}; choose one of {', '.join(RANDOM_CONFIGS)}")
    config = Qwen2Config(**RANDOM_CONFIGS[preset])
    check_supported(config)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=ATTENTION_NAME)
    model.eval()
    return adapt(model, random_tokenizer(config.vocab_size), f"random {preset}", config)
