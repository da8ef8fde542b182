"""A lean decoder forward for the Llama-shaped families, over transformers' own weights.

transformers stays the loader and the oracle; this replaces only the per-layer glue of a pass on
the triton backend: one fused RMSNorm (with the residual add) before each sub-layer, the q/k/v
projections, one launch for RoPE on the new queries and keys plus the cache write, the two
attention launches, the output projection, and the gated MLP with one fused SiLU-multiply.
About 13 kernels per layer instead of about 40, which is what a decode step replayed from a CUDA
graph pays for (``docs/performance.md``). No causal mask is built: the pass plan is the mask.

Families: ``llama`` (and SmolLM2, Llama-3, DeepSeek-R1-Distill-Llama), ``mistral``, ``qwen2``
(Qwen2.5, QwQ, DeepSeek-R1-Distill-Qwen), ``qwen3`` (its per-head q/k norms) and ``phi3`` (Phi-4,
Phi-4-reasoning, Phi-4-mini: fused q/k/v and gate/up projections, partial rotary), with SiLU MLPs
and causal attention over one RoPE table (no window, sinks, soft-cap or per-layer RoPE). Other
models run transformers' modules with the same attention kernels.
"""

from __future__ import annotations

import torch

from .attention import PARTIAL_ROTARY
from .fused import rms_norm, rope_store, silu_mul

#: Model types whose decoder layers are Llama-shaped (pre-norm RMSNorm, q/k/v/o projections, gated MLP).
LEAN_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")
#: Attention features (``LoadedModel.features``) the lean decoder runs.
LEAN_FEATURES = (PARTIAL_ROTARY,)


def lean_refusal(model) -> str | None:
    """Why ``model`` (a hogwild ``LoadedModel``) cannot run the lean decoder, or None if it can."""
    config = model.model.config
    if config.model_type not in LEAN_MODEL_TYPES:
        return f"model type {config.model_type!r} is not one of {', '.join(LEAN_MODEL_TYPES)}"
    other = [f for f in model.features if f not in LEAN_FEATURES]
    if other:
        return f"it needs {', '.join(other)}"
    if getattr(config, "hidden_act", None) != "silu":
        return f"its MLP activation is {getattr(config, 'hidden_act', None)!r}, not silu"
    if model.tp is not None:
        return "tensor parallelism runs transformers' sharded modules"
    decoder = model.model.get_decoder()
    for layer in decoder.layers:
        attention, mlp = layer.self_attn, layer.mlp
        projections = ["qkv_proj"] if hasattr(attention, "qkv_proj") else ["q_proj", "k_proj", "v_proj"]
        gated = ["gate_up_proj"] if hasattr(mlp, "gate_up_proj") else ["gate_proj", "up_proj"]
        parts = [(layer, "input_layernorm"), (layer, "post_attention_layernorm"), (mlp, "down_proj"),
                 (attention, "o_proj"), *((attention, x) for x in projections), *((mlp, x) for x in gated)]
        missing = [name for owner, name in parts if not hasattr(owner, name)]
        if missing:
            return f"its decoder layers lack {', '.join(missing)}"
    return None


class LeanDecoder:
    """The decoder of a Llama-shaped model as fused launches (see the module docstring).

    Holds references to the transformers modules (no copy of any weight).
    """

    def __init__(self, model):
        """model: a hogwild ``LoadedModel`` that ``lean_refusal`` accepts."""
        reason = lean_refusal(model)
        if reason is not None:
            raise ValueError(f"the lean decoder cannot run {model.name}: {reason}")
        self.decoder = model.model.get_decoder()
        self.layers = list(self.decoder.layers)
        self.head_dim = model.head_dim
        self.scaling = model.scaling
        config = model.model.config
        # Columns of a fused q/k/v projection (Phi-3): this model's query and K/V widths.
        self.qkv_split = [config.num_attention_heads * self.head_dim] + 2 * [config.num_key_value_heads * self.head_dim]

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor, plan, written: set[int]
                      ) -> torch.Tensor:
        """input_ids, position_ids: [B, T] -> final-normed hidden states [B, T, hidden].

        plan: the pass's ``PassPlan`` (triton backend): its slot mapping places each new token's
        K/V in the pool, its metadata drives attention; ``written`` collects the layers that
        stored K/V (as ``PassCache`` does).
        """
        decoder, D, cache = self.decoder, self.head_dim, plan.cache
        B, T = input_ids.shape
        x = decoder.embed_tokens(input_ids)  # [B, T, hidden]
        cos, sin = decoder.rotary_emb(x, position_ids)  # [B, T, D] each, in x's dtype
        cos, sin = cos.reshape(B * T, -1), sin.reshape(B * T, -1)  # [B*T, R]: R < D with partial rotary
        x = x.reshape(B * T, -1)
        residual = x.clone()  # the residual stream, updated in place by each fused norm
        for i, layer in enumerate(self.layers):
            attention, mlp = layer.self_attn, layer.mlp
            index = attention.layer_idx
            norm = layer.input_layernorm  # after the first layer: the MLP's output joins the residual first
            h = rms_norm(x, norm.weight, norm.variance_epsilon, residual if i else None)
            if hasattr(attention, "qkv_proj"):  # Phi-3: one projection, split into strided views
                q, k, v = attention.qkv_proj(h).split(self.qkv_split, dim=1)
            else:
                q, k, v = attention.q_proj(h), attention.k_proj(h), attention.v_proj(h)
            if hasattr(attention, "q_norm"):  # Qwen3: RMSNorm of each head before RoPE
                q = rms_norm(q.view(-1, D), attention.q_norm.weight, attention.q_norm.variance_epsilon).view(B * T, -1)
                k = rms_norm(k.view(-1, D), attention.k_norm.weight, attention.k_norm.variance_epsilon).view(B * T, -1)
            keys, values = cache.keys[index], cache.values[index]
            q = rope_store(q, k, v, cos, sin, plan.slot_mapping, keys, values)  # [B*T, Hq, D]
            written.add(index)
            heads = lambda t: t.view(B, T, -1, D).transpose(1, 2)  # noqa: E731 - [B*T, H*D] -> [B, H, T, D]
            out = plan.backend.forward(plan, index, heads(q), heads(k), heads(v), self.scaling)  # [B, T, Hq, D]
            x = attention.o_proj(out.view(B * T, -1))
            norm = layer.post_attention_layernorm
            h = rms_norm(x, norm.weight, norm.variance_epsilon, residual)
            if hasattr(mlp, "gate_up_proj"):  # Phi-3: gate and up halves of one projection
                gate, up = mlp.gate_up_proj(h).chunk(2, dim=-1)
            else:
                gate, up = mlp.gate_proj(h), mlp.up_proj(h)
            x = mlp.down_proj(silu_mul(gate, up))
        norm = decoder.norm
        return rms_norm(x, norm.weight, norm.variance_epsilon, residual).view(B, T, -1)
