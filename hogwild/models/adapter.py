"""The one adapter between a transformers causal LM and the engine: ``LoadedModel``.

It holds the facts the cache and attention need (head counts and size, RoPE tables, softmax
scale) and runs the decoder with a pass plan; ``adapt`` builds one from a loaded model.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch

from ..layers.attention import PassPlan
from .quantize import weight_bytes
from .support import attention_features, check_layers


@dataclass
class LoadedModel:
    """A causal LM ready for the engine, with the facts the cache and attention need.

    inv_freq: float32 rotary inverse frequencies (RoPE scaling folded in), on the CPU (pass plans are
    built on the host): [R/2], or [layers, R/2] when layers differ (Gemma 3); R < head_dim is partial
    rotary. features: what the model needs beyond plain causal attention with one table
    (``attention_features``; each attention backend declares which it runs).
    """

    model: torch.nn.Module
    tokenizer: object
    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    inv_freq: torch.Tensor
    max_positions: int
    scaling: float
    tp: object | None = None  # hogwild.distributed.TPGroup under --tp; num_kv_heads is then this rank's
    features: tuple[str, ...] = ()
    quantization: str | None = None  # "int8"/"nf4" (--quantize), a checkpoint's quant_method, or None (dense)

    @functools.cached_property
    def weight_bytes(self) -> int:
        """Bytes of the weights as stored (quantized ones packed; this rank's shards under --tp)."""
        return weight_bytes(self.model)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @functools.cached_property
    def cache_argument(self) -> str:
        """The decoder's keyword for the K/V cache: ``cache`` (recent transformers 5.x, e.g. 5.24) or
        ``past_key_values`` (earlier 5.x, e.g. 5.17). A wrong keyword is swallowed by ``**kwargs``."""
        parameters = inspect.signature(self.model.get_decoder().forward).parameters
        return "cache" if "cache" in parameters else "past_key_values"

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def groups(self) -> int:
        """Query heads per K/V head (grouped-query attention); the same on every tensor-parallel rank."""
        config = self.model.config
        return config.num_attention_heads // config.num_key_value_heads

    def hidden_states(self, input_ids, position_ids, cache, plan: PassPlan) -> torch.Tensor:
        """Run the decoder. input_ids, position_ids: [B, T] -> last hidden states [B, T, hidden]."""
        out = self.model.get_decoder()(
            input_ids=input_ids, position_ids=position_ids, use_cache=True, hogwild_plan=plan,
            **{self.cache_argument: cache},
        )
        return out.last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, hidden] -> next-token logits [B, vocab] in float32 (soft-capped like the model's own
        head where the config says so: Gemma 2)."""
        logits = self.model.get_output_embeddings()(hidden).float()
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits


def rope_tables(model: torch.nn.Module, num_layers: int) -> torch.Tensor:
    """The rotary inverse frequencies as float32 on the CPU: [R/2] when every layer uses the same
    table, else [layers, R/2] (Gemma 3: the local and global tables by layer type)."""
    rotary = model.get_decoder().rotary_emb
    if hasattr(rotary, "inv_freq"):
        return rotary.inv_freq.detach().float().cpu().clone()
    layer_types = model.config.layer_types
    tables = torch.stack(
        [getattr(rotary, f"{layer_types[i]}_inv_freq").detach().float().cpu() for i in range(num_layers)]
    )
    return tables[0].clone() if bool((tables == tables[0]).all()) else tables


def adapt(model: torch.nn.Module, tokenizer, name: str, config, num_kv_heads: int | None = None, tp=None,
          quantization: str | None = None) -> LoadedModel:
    """Wrap a loaded transformers causal LM (``config``: the config it was loaded with) for the engine.

    Refuses layers that differ in softmax scale or head size (``check_layers``). num_kv_heads: this
    rank's K/V heads under tensor parallelism (``tp``: its group), else the config's.
    """
    attention = model.get_decoder().layers[0].self_attn
    inv_freq = rope_tables(model, config.num_hidden_layers)
    check_layers(model)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        num_layers=config.num_hidden_layers,
        num_kv_heads=config.num_key_value_heads if num_kv_heads is None else num_kv_heads,
        head_dim=attention.head_dim,
        inv_freq=inv_freq,
        max_positions=config.max_position_embeddings,
        scaling=attention.scaling,
        tp=tp,
        features=attention_features(config, inv_freq, attention.head_dim),
        quantization=quantization,
    )
