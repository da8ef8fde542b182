"""More model families on tiny random-weight configs (their own byte tokenizer): one worker equals
transformers' greedy decoding token for token, and workers that share only a prompt equal separate
decoding, with a prompt longer than the sliding window so that the window matters.

The references run transformers' eager attention: it is the one that implements every family's
extras (sinks, soft-capping), and sdpa is not offered for some of them (Gemma 2).
"""

import dataclasses

import pytest
import torch
from test_engine import PROMPT, byte_tokenizer, greedy_loop, greedy_reference
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GptOssConfig,
    MistralConfig,
    Phi3Config,
    Qwen3MoeConfig,
)

from hogwild import InputError, Runner, generate, load_model
from hogwild.models import TRITON_FEATURES

WINDOW = 16
TINY = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=4096, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
ALTERNATING = ["sliding_attention", "full_attention", "sliding_attention"]
CONFIGS = {
    # every layer windowed
    "mistral-window": lambda: MistralConfig(**TINY, num_hidden_layers=2, sliding_window=WINDOW),
    # local (windowed, base 10k) and global (base 1M, linear scaling) layers with their own RoPE tables
    "gemma3_text": lambda: Gemma3TextConfig(
        **TINY, num_hidden_layers=3, head_dim=32, sliding_window=WINDOW, layer_types=ALTERNATING,
        query_pre_attn_scalar=32, rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0}}),
    # attention sinks, windowed layers, YaRN, mixture of experts
    "gpt_oss": lambda: GptOssConfig(
        **TINY, num_hidden_layers=3, head_dim=16, sliding_window=WINDOW, layer_types=ALTERNATING,
        num_local_experts=4, num_experts_per_tok=2, rope_parameters={
            "rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
            "truncate": False, "original_max_position_embeddings": 4096}),
    # partial rotary (Phi-4-mini rotates 3/4 of each head) and a window in every layer
    "phi3-partial": lambda: Phi3Config(
        **TINY, num_hidden_layers=2, sliding_window=WINDOW,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
    # mixture of experts with Qwen3's q/k norms, full attention
    "qwen3_moe": lambda: Qwen3MoeConfig(**TINY, num_hidden_layers=2, head_dim=32, num_experts=4,
                                        num_experts_per_tok=2, moe_intermediate_size=64),
    # attention-logit and final-logit soft-capping, alternating windows
    "gemma2": lambda: Gemma2Config(**TINY, num_hidden_layers=3, head_dim=16, sliding_window=WINDOW,
                                   layer_types=ALTERNATING, query_pre_attn_scalar=16,
                                   attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
}


def tiny_family(name: str, folder, device):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[name]())
    with torch.no_grad():
        for layer in model.model.layers:
            if name == "gpt_oss":  # random sinks large enough to matter (the default init is tiny)
                layer.self_attn.sinks.normal_(0.0, 2.0)
            if name == "gemma2":  # scores large enough for the soft-cap to bend them (init 0.02 gives ~1e-3)
                layer.self_attn.q_proj.weight.mul_(30.0)
                layer.self_attn.k_proj.weight.mul_(30.0)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return load_model(str(folder), device=device)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_family_one_worker_and_independent_workers_equal_transformers(name, device, tmp_path):
    loaded = tiny_family(name, tmp_path, device)
    runner = Runner.for_model(loaded)  # auto: the torch backend for models with windows, sinks or per-layer RoPE
    assert runner.attention == "torch"
    tok = loaded.tokenizer
    prompt = tok(PROMPT, add_special_tokens=False).input_ids
    assert len(prompt) > 3 * WINDOW  # the window matters: most of the prompt falls out of it
    result = generate(runner, prompt, [[]], "independent", max_new_tokens=48)
    assert result.workers[0].token_ids == greedy_reference(loaded, prompt, 48, "eager")

    prefixes = [tok(p, add_special_tokens=False).input_ids for p in [" First,", " The robot", ""]]
    result = generate(runner, prompt, prefixes, "independent", max_new_tokens=40)
    for prefix, worker in zip(prefixes, result.workers, strict=True):
        assert worker.token_ids == greedy_loop(loaded, prompt + prefix, 40, "eager")


@pytest.mark.parametrize("name", ["mistral-window", "gpt_oss", "gemma2", "gemma3_text", "phi3-partial"])
def test_family_one_worker_with_triton_equals_transformers(name, device, tmp_path):
    """The triton backend (Triton's interpreter on the CPU: fewer tokens) runs every family's extras:
    windows, sinks, soft-capping, per-layer and partial RoPE."""
    loaded = tiny_family(name, tmp_path, device)
    runner = Runner.for_model(loaded, "triton")
    assert runner.attention == "triton"
    prompt = loaded.tokenizer(PROMPT, add_special_tokens=False).input_ids
    n = 16 if device.type == "cpu" else 48
    result = generate(runner, prompt, [[]], "independent", max_new_tokens=n)
    assert result.workers[0].token_ids == greedy_reference(loaded, prompt, n, "eager")
    prefixes = [loaded.tokenizer(p, add_special_tokens=False).input_ids for p in [" First,", ""]]
    result = generate(runner, prompt, prefixes, "independent", max_new_tokens=n // 2)  # a shared prompt: merges
    for prefix, worker in zip(prefixes, result.workers, strict=True):
        assert worker.token_ids == greedy_loop(loaded, prompt + prefix, n // 2, "eager")


def test_family_features_and_backend_choice(device, tmp_path):
    """What each family needs is read from its config; triton runs all of it and refuses any other by name."""
    expected = {
        "mistral-window": ("sliding windows",),
        "gemma3_text": ("sliding windows", "per-layer RoPE tables"),
        "gpt_oss": ("sliding windows", "attention sinks"),
        "phi3-partial": ("sliding windows", "partial rotary"),
        "qwen3_moe": (),
        "gemma2": ("sliding windows", "attention logit soft-capping"),
    }
    for name, features in expected.items():
        loaded = tiny_family(name, tmp_path / name, device)
        assert loaded.features == features
        assert set(features) <= set(TRITON_FEATURES)
    unknown = dataclasses.replace(loaded, features=("sliding windows", "some future extra"))
    with pytest.raises(InputError, match="triton backend does not support some future extra yet"):
        Runner.for_model(unknown, "triton")
    assert Runner.for_model(unknown, "auto").attention == "torch"


@pytest.mark.parametrize("name, dropped", [("mistral-window", 0), ("gemma3_text", 0), ("gpt_oss", 1), ("gemma2", 2)])
def test_each_extra_matters(name, dropped, device, tmp_path, monkeypatch):
    """The prompt's next-token logits equal transformers'; without its window (sinks, soft-cap) they do
    not: the tests above would catch a backend that ignored it."""
    import hogwild.layers.attention as attention
    from hogwild import ordinary_attention

    loaded = tiny_family(name, tmp_path, device)
    prompt = loaded.tokenizer(PROMPT, add_special_tokens=False).input_ids
    with ordinary_attention(loaded.model, "eager"), torch.no_grad():
        expected = loaded.model(torch.tensor([prompt], device=device)).logits[0, -1].float()

    def last_logits():
        runner = Runner.for_model(loaded)
        return runner.prefill([runner.cache.new_block("prompt")], prompt)

    assert (last_logits() - expected).abs().max() < 1e-4
    options, seen = attention.layer_options, []

    def without(kwargs):
        kept = list(options(kwargs))
        seen.append(kept[dropped] is not None)
        kept[dropped] = None
        return tuple(kept)

    monkeypatch.setattr(attention, "layer_options", without)
    assert (last_logits() - expected).abs().max() > 1e-3
    assert any(seen)  # transformers did pass the option that was dropped
