"""The attention function hogwild registers with transformers (``ATTENTION_NAME``).

Models load with ``attn_implementation=ATTENTION_NAME``; each attention layer then calls
``hogwild_attention``, which runs the backend that the pass plan (a ``hogwild_plan`` keyword of the
decoder's forward) names. ``ordinary_attention`` switches a model back to transformers' own for
``model.generate``.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface

from ..layers.attention import PassPlan, concurrent_attention, reference_attention

ATTENTION_NAME = "hogwild"


def hogwild_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """The attention function registered with transformers; the pass plan picks the method."""
    plan: PassPlan | None = kwargs.get("hogwild_plan")
    if plan is None:
        raise RuntimeError(
            "this model runs hogwild attention, which needs a pass plan; call it through hogwild's Runner, "
            "or wrap ordinary use (e.g. model.generate) in `with ordinary_attention(model): ...`"
        )
    if plan.backend == "triton":
        from ..layers.attention import layer_options
        from ..layers.triton_attention import triton_attention

        window, sinks, softcap = layer_options(kwargs)
        layer = module.layer_idx
        shares = None if plan.stats is None else (plan.stats.pc_pair, plan.stats.stats[layer])
        keys, values = plan.cache.keys[layer], plan.cache.values[layer]
        return triton_attention(query, keys, values, plan.triton, scaling, shares, window=window, sinks=sinks,
                                softcap=softcap, table=plan.cache.layer_rope[layer]), None
    method = reference_attention if plan.reference else concurrent_attention
    return method(module, query, key, value, attention_mask, scaling, dropout, **kwargs)


AttentionInterface.register(ATTENTION_NAME, hogwild_attention)


@contextlib.contextmanager
def ordinary_attention(model: torch.nn.Module, implementation: str = "sdpa"):
    """Temporarily switch a hogwild-loaded model to ordinary attention (for model.generate)."""
    model.set_attn_implementation(implementation)
    try:
        yield model
    finally:
        model.set_attn_implementation(ATTENTION_NAME)
