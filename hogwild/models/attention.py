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

from ..layers.attention import PassPlan

ATTENTION_NAME = "hogwild"


def hogwild_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """The attention function registered with transformers: the pass plan's backend runs it."""
    plan: PassPlan | None = kwargs.get("hogwild_plan")
    if plan is None:
        raise RuntimeError(
            "this model runs hogwild attention, which needs a pass plan; call it through hogwild's Runner, "
            "or wrap ordinary use (e.g. model.generate) in `with ordinary_attention(model): ...`"
        )
    return plan.attend(module.layer_idx, query, key, value, scaling, **kwargs), None


AttentionInterface.register(ATTENTION_NAME, hogwild_attention)


@contextlib.contextmanager
def ordinary_attention(model: torch.nn.Module, implementation: str = "sdpa"):
    """Temporarily switch a hogwild-loaded model to ordinary attention (for model.generate)."""
    model.set_attn_implementation(implementation)
    try:
        yield model
    finally:
        model.set_attn_implementation(ATTENTION_NAME)
