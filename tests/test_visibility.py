"""Same-pass visibility, the authors' rule: a worker sees the tokens the others are fed in the very
pass they are fed (every row's new K/V are stored at each layer before any row attends)."""

import pytest
import torch
from test_engine import byte_tokenizer
from transformers import AutoModelForCausalLM, LlamaConfig

from hogwild import Runner, WorkerStep, load_model, ordinary_attention
from hogwild.cache import SharedCache
from hogwild.engine.runner import plan_pass

#: Every backend, the spec included (triton runs in Triton's interpreter on the CPU).
BACKENDS = ["torch", "triton", "reference"]


@torch.no_grad()
def ordinary_logits(model, token_ids: list[int]) -> torch.Tensor:
    """Next-token logits [vocab] after ``token_ids`` from a plain transformers forward (sdpa)."""
    with ordinary_attention(model.model, "sdpa"):
        return model.model(torch.tensor([token_ids], device=model.device)).logits[0, -1].float()


def run_pass(runner: Runner, steps: list[WorkerStep], attention: str) -> torch.Tensor:
    return runner.forward(steps, reference=attention == "reference").logits.float()


def test_the_plan_counts_the_tokens_fed_in_the_pass():
    """Visible lengths and offsets: others' blocks with this pass's tokens, later blocks shifted by them."""
    cache = SharedCache(1, 1, 8, torch.ones(4), capacity_tokens=256, page_size=4)
    prompt, a, b, sep = (cache.new_block(n) for n in ("prompt", "alice", "bob", "sep"))
    for block, n in ((prompt, 5), (a, 2), (b, 3), (sep, 1)):
        cache.reserve(block, n)
        cache.commit(block, [0] * n)
    plan = plan_pass([WorkerStep([1], [prompt, b, sep, a]), WorkerStep([1, 2, 3], [prompt, a, sep, b])],
                     cache, 1.0, torch.float32, 100)
    alice, bob = plan.rows
    assert [(e.offset, e.visible) for e in alice.entries] == [(0, 5), (5, 6), (11, 1), (12, 3)]
    assert [(e.offset, e.visible) for e in bob.entries] == [(0, 5), (5, 3), (8, 1), (9, 6)]
    assert (alice.start, alice.n_new, bob.start, bob.n_new) == (2, 1, 3, 3)


def tiny_llama(folder, layers: int):
    """A random-weight Llama with a byte tokenizer. With one layer a token's K/V depend on nothing
    but the token and its local position, so any view of blocks equals an ordinary forward of the
    view's tokens."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return load_model(str(folder))


def chain_first_pass(loaded, attention: str) -> None:
    """One pass writes a prompt and three workers' prefixes (many tokens each) into views that chain:
    prompt [P], Bob [P, B], Alice [P, B, A], Carol [P, B, A, C]. Every block's K/V are then computed
    in the context its readers see it in, so each row's logits equal an ordinary forward of its
    laid-out view, at every depth: which holds only if every row sees the others' tokens of the same pass."""
    tok = loaded.tokenizer
    ids = [tok(t, add_special_tokens=False).input_ids
           for t in ("Solve 12 * 7 together.", " Bob: I will multiply", " Alice: and I check", " Carol: 84?")]
    runner = Runner.for_model(loaded, "torch" if attention == "reference" else attention, kv_memory=32 << 20)
    blocks = [runner.cache.new_block(n) for n in ("prompt", "bob", "alice", "carol")]
    logits = run_pass(runner, [WorkerStep(ids[i], blocks[: i + 1]) for i in range(4)], attention)
    for i in range(4):
        want = ordinary_logits(loaded, sum(ids[: i + 1], []))
        assert float((logits[i] - want).abs().max()) < 2e-3 * float(want.abs().max()), i
        assert int(logits[i].argmax()) == int(want.argmax())


@pytest.mark.parametrize("attention", ["torch", "reference"])
def test_first_pass_of_a_chain_equals_an_ordinary_forward(model, attention):
    """On the real 30-layer SmolLM2."""
    chain_first_pass(model, attention)


@pytest.mark.parametrize("attention", BACKENDS)
def test_first_pass_of_a_chain_on_a_deep_tiny_model(attention, tmp_path):
    """Every backend (triton in the interpreter) on a random four-layer Llama."""
    chain_first_pass(tiny_llama(tmp_path, layers=4), attention)


@pytest.mark.parametrize("attention", BACKENDS)
@pytest.mark.parametrize("workers", [2, 3])
def test_official_contiguous_layout_first_pass_is_exact(workers, attention, tmp_path):
    """The authors' contiguous structure: blocks prompt, split, one per worker; worker i sees
    [prompt, the other workers' blocks, split, own block]. In the first pass every worker feeds its
    whole prefix, and each sees all of the others' prefixes: exact against an ordinary forward."""
    loaded = tiny_llama(tmp_path, layers=1)
    tok = loaded.tokenizer
    runner = Runner.for_model(loaded, "torch" if attention == "reference" else attention, kv_memory=16 << 20)
    cache = runner.cache
    prompt, split = cache.new_block("prompt"), cache.new_block("split")
    prompt_ids = tok("Problem: 3 + 4 = ?\n", add_special_tokens=False).input_ids
    split_ids = tok(" <the assistant will continue here>\n\n", add_special_tokens=False).input_ids
    run_pass(runner, [WorkerStep(prompt_ids, [prompt]), WorkerStep(split_ids, [split])], attention)
    texts = ["Alice: I add them", "Bob: seven", "Carol: let me check that"][:workers]
    own = [cache.new_block(t.split(":")[0]) for t in texts]
    fed = [tok(t, add_special_tokens=False).input_ids for t in texts]
    views = [[prompt, *[b for b in own if b is not own[w]], split, own[w]] for w in range(workers)]
    logits = run_pass(runner, [WorkerStep(fed[w], views[w]) for w in range(workers)], attention)
    tokens = {prompt.id: prompt_ids, split.id: split_ids} | {b.id: f for b, f in zip(own, fed, strict=True)}
    for w in range(workers):
        want = ordinary_logits(loaded, sum((tokens[b.id] for b in views[w]), []))
        assert float((logits[w] - want).abs().max()) < 1e-4 * float(want.abs().max()), w


def test_bobs_tokens_change_alices_logits_in_the_same_pass(model):
    """An ablation: Alice feeds the same token while Bob feeds different text; her logits of that pass differ."""
    tok = model.tokenizer
    prompt_ids = tok("Two workers share one cache.", add_special_tokens=False).input_ids
    outs = []
    for bob_text in (" Bob: the answer is 5", " Bob: I think it is 9"):
        runner = Runner.for_model(model, "torch", kv_memory=32 << 20)
        prompt, alice, bob = (runner.cache.new_block(n) for n in ("prompt", "alice", "bob"))
        runner.forward([WorkerStep(prompt_ids, [prompt])])
        steps = [WorkerStep(tok(" Alice:", add_special_tokens=False).input_ids, [prompt, bob, alice]),
                 WorkerStep(tok(bob_text, add_special_tokens=False).input_ids, [prompt, alice, bob])]
        outs.append(runner.forward(steps).logits[0])
    assert float((outs[0] - outs[1]).abs().max()) > 0.1
