"""The support policy: which model families hogwild runs exactly, and why others are refused.

Every check here decides from a transformers config alone (before any weight is read), except
``check_layers``, which looks at the loaded attention modules once.
"""

from __future__ import annotations

import torch

from ..errors import UnsupportedModelError
from ..layers.attention import PARTIAL_ROTARY, PER_LAYER_ROPE, SINKS, SOFTCAP, WINDOWS
from ..rope import SUPPORTED_ROPE_TYPES

SUPPORTED_MODEL_TYPES = {
    "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2/2.5", "qwen3": "Qwen3", "qwen3_moe": "Qwen3-MoE",
    "gemma3_text": "Gemma 3 (text)", "gemma2": "Gemma 2", "gpt_oss": "gpt-oss", "phi3": "Phi-3/Phi-4",
}
_MLA = ("uses multi-head latent attention (MLA): its cache holds a compressed latent and a separate decoupled "
        "RoPE key, not per-head rotated keys, which hogwild's shared cache and query rotation do not handle yet")
_MROPE = ("uses M-RoPE (multimodal rotary positions: sections of each head rotate by separate time, height and "
          "width positions), so a block's offset in a view is not one rotation; hogwild handles 1-D RoPE only")
#: Families refused with a specific reason (any other unknown model type gets the generic message).
REFUSED_MODEL_TYPES = {
    "deepseek_v2": _MLA, "deepseek_v3": _MLA, "kimi_k2": _MLA, "kimi_linear": _MLA,
    "qwen2_vl": _MROPE, "qwen2_5_vl": _MROPE, "qwen3_vl": _MROPE, "qwen3_vl_moe": _MROPE, "glm4v": _MROPE,
    "gemma3": ("is the multimodal Gemma 3 wrapper; hogwild runs text-only Gemma 3 checkpoints "
               "(model type 'gemma3_text', e.g. gemma-3-270m / gemma-3-1b)"),
}


def _rope_parameter_sets(config) -> list[dict]:
    """The RoPE settings of a config: one dict, or one per layer type (Gemma 3: local and global)."""
    rope = getattr(config, "rope_parameters", None) or {}
    if rope and all(isinstance(v, dict) for v in rope.values()):
        return list(rope.values())
    return [rope]


def check_supported(config) -> None:
    """Raise UnsupportedModelError unless hogwild can run this config exactly (from the config alone)."""
    supported = ", ".join(SUPPORTED_MODEL_TYPES.values())
    model_type = config.model_type
    if model_type in REFUSED_MODEL_TYPES:
        raise UnsupportedModelError(f"model type {model_type!r} is not supported: it {REFUSED_MODEL_TYPES[model_type]}")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(f"model type {model_type!r} is not supported; hogwild runs {supported} models")
    for rope in _rope_parameter_sets(config):
        if "mrope_section" in rope or rope.get("mrope_interleaved"):
            raise UnsupportedModelError(f"model type {model_type!r} is not supported: it {_MROPE}")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"RoPE type {rope_type!r} is not supported (its angles depend on the sequence length, so "
                f"rotations do not compose); supported RoPE types: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
    other = sorted({t for t in getattr(config, "layer_types", None) or []} - {"full_attention", "sliding_attention"})
    if other:
        raise UnsupportedModelError(
            f"layer types {', '.join(other)} are not supported: hogwild runs full and sliding-window attention layers"
        )
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedModelError(
            "bidirectional attention (use_bidirectional_attention) is not supported: hogwild decodes causally"
        )


def attention_features(config, inv_freq: torch.Tensor, head_dim: int) -> tuple[str, ...]:
    """What beyond plain causal attention with one RoPE table this model needs, named as in
    ``layers.attention.FEATURES`` (each backend declares which it runs). inv_freq: [R/2] or [layers, R/2]."""
    features = []
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is not None and (not layer_types or "sliding_attention" in layer_types):
        features.append(WINDOWS)
    if config.model_type == "gpt_oss":
        features.append(SINKS)
    if getattr(config, "attn_logit_softcapping", None):
        features.append(SOFTCAP)
    if inv_freq.dim() == 2:
        features.append(PER_LAYER_ROPE)
    if 2 * inv_freq.shape[-1] < head_dim:
        features.append(PARTIAL_ROTARY)
    return tuple(features)


def check_layers(model: torch.nn.Module) -> None:
    """Every layer must share layer 0's softmax scale and head size (the pass plan folds one scale into
    its rotations): true of every supported family, checked once at load."""
    first = model.get_decoder().layers[0].self_attn
    for layer in model.get_decoder().layers:
        attention = layer.self_attn
        if attention.scaling != first.scaling or attention.head_dim != first.head_dim:
            raise UnsupportedModelError(
                "layers with different attention scales or head sizes are not supported: the pass plan "
                "folds one softmax scale into its rotations"
            )
