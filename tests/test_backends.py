"""The attention backends agree: triton (Triton's interpreter on the CPU) against torch on whole
runs, and decode passes over static (CUDA-graph) buffers against ordinary eager passes."""

import json

import torch
from test_engine import tiny_model  # a sibling test module (tests/ is on sys.path)

from hogwild import Engine, Runner, WorkerStep
from hogwild.cli import main
from hogwild.engine.graphs import DecodeGraphs


def run_json(capsys, *argv) -> dict:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_generate_triton_equals_torch(capsys):
    """SmolLM2, 2 workers, contiguous layout, 8 tokens each: the same tokens from both backends."""
    argv = ["generate", "--prompt", "The robot picked up the brush and", "--worker-prefix", " It",
            "--worker-prefix", " Then", "--layout", "contiguous", "--max-new-tokens", "8", "--json"]
    torch_run = run_json(capsys, *argv, "--attention", "torch")
    triton_run = run_json(capsys, *argv, "--attention", "triton")
    assert [w["token_ids"] for w in triton_run["workers"]] == [w["token_ids"] for w in torch_run["workers"]]
    assert all(len(w["token_ids"]) == 8 for w in triton_run["workers"])


def decode_passes(runner: Runner, prompt_ids: list[int], blocks=None) -> tuple[list[torch.Tensor], tuple]:
    """Decode passes whose shapes change: 2, 3, 1 and 4 rows over a prompt of two key chunks.

    Returns the logits of every pass and the blocks (prompt, a, b, c, d) to go on with."""
    cache = runner.cache
    if blocks is None:
        prompt = cache.new_block("prompt", capacity=len(prompt_ids))
        runner.prefill([prompt], prompt_ids)
        blocks = (prompt, *(cache.new_block(name) for name in "abcd"))
    prompt, a, b, c, d = blocks
    shapes = [[(b, a), (a, b)], [(b, a), (a, b), (a, b, c)], [(a, b)], [(b, c, d, a), (a, b), (a, b, c), (d,)]]
    out = []
    for rows in shapes:
        out.append(runner.forward([WorkerStep([7], [prompt, *row]) for row in rows]))
    return out, blocks


def test_static_buffers_equal_eager_passes(tmp_path):
    """The planner writes a pass into preallocated buckets (what CUDA graphs replay); an eager pass
    over those buffers gives the logits of an ordinary eager pass, whatever the pass's shape."""
    model = tiny_model("qwen2-yarn", tmp_path, "cpu")
    prompt_ids = model.tokenizer("A shared prompt. " * 16, add_special_tokens=False).input_ids
    assert 256 < len(prompt_ids) <= 300  # the prompt block spans two key chunks
    eager = Runner.for_model(model, "triton", kv_memory=32 << 20, graphs=False)
    static = Runner.for_model(model, "triton", kv_memory=32 << 20, graphs=True)
    assert isinstance(static.graphs, DecodeGraphs) and not static.graphs.capture
    expected, _ = decode_passes(eager, prompt_ids)
    got, blocks = decode_passes(static, prompt_ids)
    for want, have in zip(expected, got, strict=True):
        assert have.shape == want.shape
        assert float((have - want).abs().max()) < 1e-5 * float(want.abs().max())
    assert sorted(static.graphs.buckets) == [(1, 64), (2, 64), (4, 64)]  # rows rounded up to a bucket
    bucket = static.graphs.buckets[(4, 64)]
    buffers = bucket.static.meta.buffer.data_ptr(), bucket.static.slot_mapping.data_ptr()
    decode_passes(static, prompt_ids, blocks)  # refilled in place: the same memory, as a captured graph needs
    assert (bucket.static.meta.buffer.data_ptr(), bucket.static.slot_mapping.data_ptr()) == buffers


def test_solve_same_transcript_on_both_backends():
    """SmolLM2, 2 workers, greedy: steps end and move into the history, then the finisher answers."""
    results = {}
    for attention in ("torch", "triton"):
        engine = Engine.from_pretrained(attention=attention)
        results[attention] = engine.solve("What is 12 * 7?", workers=2, budget=10, seed=0)
    torch_result, triton_result = results["torch"], results["triton"]
    assert len(torch_result.history) == 2  # both first steps moved into the history
    assert [h.text for h in triton_result.history] == [h.text for h in torch_result.history]
    assert [w.text for w in triton_result.workers] == [w.text for w in torch_result.workers]
    assert triton_result.answer == torch_result.answer
