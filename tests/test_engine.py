"""The engine on real models: exact against ordinary decoding, sharing is real, memory is shared."""

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    DynamicCache,
    GenerationConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from hogwild import LoadedModel, Runner, SamplingParams, WorkerStep, generate, load_model, ordinary_attention

PROMPT = "Here is a short story about a robot who learns to paint."


def greedy_reference(model, token_ids: list[int], n: int, implementation: str = "sdpa") -> list[int]:
    """Ordinary greedy decoding with transformers (sdpa, DynamicCache), not stopping at end-of-turn."""
    config = GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0)
    with ordinary_attention(model.model, implementation):
        out = model.model.generate(torch.tensor([token_ids], device=model.device), generation_config=config)
    assert out.shape[1] == len(token_ids) + n, "the reference stopped at end-of-turn: pick another prompt"
    return out[0, len(token_ids):].tolist()


@torch.inference_mode()
def greedy_loop(model, token_ids: list[int], n: int, implementation: str = "sdpa") -> list[int]:
    """Ordinary greedy decoding step by step (DynamicCache, sdpa), going on past end-of-turn."""
    cache = DynamicCache(config=model.model.config)
    out, inputs = [], torch.tensor([token_ids], device=model.device)
    with ordinary_attention(model.model, implementation):
        for _ in range(n):
            logits = model.model(inputs, use_cache=True, **{model.cache_argument: cache}).logits
            token = int(logits[0, -1].argmax())
            out.append(token)
            inputs = torch.tensor([[token]], device=model.device)
    return out


def test_one_worker_equals_greedy_generate(model, runner):
    prompt = model.tokenizer(PROMPT, add_special_tokens=False).input_ids
    result = generate(runner, prompt, [[]], "independent", max_new_tokens=64)
    assert result.workers[0].token_ids == greedy_reference(model, prompt, 64)
    assert result.forward_passes == 64 + 1  # one prefill pass + 64 decode passes


def test_independent_workers_equal_independent_decoding(model, runner):
    tok = model.tokenizer
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Name three uses of a paperclip."}], add_generation_prompt=True,
        tokenize=True, return_dict=True,
    )["input_ids"]
    prefixes = [tok(p, add_special_tokens=False).input_ids for p in ["First,", "A paperclip can", "Sure! Here"]]
    result = generate(runner, prompt, prefixes, "independent", max_new_tokens=48)
    for prefix, worker in zip(prefixes, result.workers, strict=True):
        assert worker.token_ids == greedy_loop(model, prompt + prefix, 48)
    assert runner.cache.nbytes() == 0  # generate frees its blocks


def build_contiguous(runner, prompt, a_tokens, b_tokens):
    cache = runner.cache
    p, a, b = cache.new_block("prompt"), cache.new_block("A"), cache.new_block("B")
    runner.prefill([p], prompt)
    runner.forward([WorkerStep(a_tokens, [p, b, a]), WorkerStep(b_tokens, [p, a, b])])
    return p, a, b


def test_contiguous_sharing_is_real(model, runner):
    tok = model.tokenizer
    prompt = tok(PROMPT, add_special_tokens=False).input_ids
    b_tokens = tok(" Bob thinks the robot", add_special_tokens=False).input_ids
    next_b = tok(" should", add_special_tokens=False).input_ids
    logits = []
    for a_text in [" Alice writes about colours", " Alice counts the apples twice"]:
        p, a, b = build_contiguous(runner, prompt, tok(a_text, add_special_tokens=False).input_ids, b_tokens)
        fast = runner.forward([WorkerStep(next_b, [p, a, b])]).logits[0]
        runner.cache.truncate(b, b.length - len(next_b))
        reference = runner.forward([WorkerStep(next_b, [p, a, b])], reference=True).logits[0]
        assert torch.allclose(fast, reference, rtol=1e-4, atol=1e-4)
        assert float((fast - reference).norm() / reference.norm()) < 1e-5
        logits.append(fast)
        for block in (p, a, b):
            runner.cache.free(block)
    assert (logits[0] - logits[1]).abs().max() > 1e-2  # B reads A's tokens: A's text changes B


def test_shared_prompt_is_stored_once(model, runner):
    cache = runner.cache
    prompt = model.tokenizer(PROMPT * 8, add_special_tokens=False).input_ids
    p = cache.new_block("prompt")
    runner.prefill([p], prompt)
    own = [cache.new_block(f"w{i}") for i in range(4)]
    for _ in range(3):
        runner.forward([WorkerStep([5], [p, o]) for o in own])
    assert cache.nbytes() == (len(prompt) + 4 * 3) * cache.bytes_per_token


def test_a_cache_the_model_ignores_is_an_error(model, monkeypatch):
    """transformers versions differ in the cache keyword; one it swallows must never decode silently."""
    from hogwild import HogwildError

    runner = Runner.for_model(model)
    block = runner.cache.new_block("own")
    monkeypatch.setitem(model.__dict__, "cache_argument", "not_a_cache_keyword")
    with pytest.raises(HogwildError, match="0 of 30 layers"):
        runner.forward([WorkerStep([1, 2, 3], [block])])


def test_sampling_is_reproducible(model, runner):
    prompt = model.tokenizer(PROMPT, add_special_tokens=False).input_ids
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50)
    first = generate(runner, prompt, [[], []], "contiguous", 12, params, seed=7)
    again = generate(runner, prompt, [[], []], "contiguous", 12, params, seed=7)
    assert [w.token_ids for w in first.workers] == [w.token_ids for w in again.workers]


# -- other architectures: tiny random-weight models -------------------------------------------
# They carry their own byte-level tokenizer, so they need neither the embedded model nor a hub and
# run on any device (HOGWILD_TEST_DEVICE=cuda checks exactness on a GPU).
TINY = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False,
)
CONFIGS = {
    "llama-llama3": lambda: LlamaConfig(**TINY, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}),
    "mistral": lambda: MistralConfig(**TINY, sliding_window=None),
    "qwen2-yarn": lambda: Qwen2Config(**TINY, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0, "original_max_position_embeddings": 1024}),
    "qwen3-linear": lambda: Qwen3Config(**TINY, head_dim=32, rope_parameters={
        "rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
}


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A 256-token byte-level tokenizer (one token per byte, no merges)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def tiny_model(name: str, folder, device) -> LoadedModel:
    """A tiny random-weight model of config ``name`` (seeded), saved to ``folder`` and loaded by hogwild."""
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(CONFIGS[name]()).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return load_model(str(folder), device=device)


@pytest.mark.parametrize("attention", ["torch", "triton"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_tiny_architectures_one_worker_equals_greedy(name, attention, device, tmp_path):
    """On the CPU triton runs in Triton's interpreter (slow: fewer tokens); on CUDA with graphs."""
    loaded = tiny_model(name, tmp_path, device)
    prompt = loaded.tokenizer(PROMPT, add_special_tokens=False).input_ids
    n = 24 if attention == "triton" and device.type == "cpu" else 64
    result = generate(Runner.for_model(loaded, attention), prompt, [[]], "independent", max_new_tokens=n)
    assert result.workers[0].token_ids == greedy_reference(loaded, prompt, n)
