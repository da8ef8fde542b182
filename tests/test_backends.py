"""The attention backends agree: triton (Triton's interpreter on the CPU) against torch on whole
runs, and decode passes over static (CUDA-graph) buffers against ordinary eager passes."""

import json

import torch
from test_engine import tiny_model  # a sibling test module (tests/ is on sys.path)

from hogwild import Engine, Result, Runner, SolveConfig, WorkerStep
from hogwild.cli import main
from hogwild.engine.graphs import DecodeGraphs
from hogwild.protocol.prompts import ProtocolConfig


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
        out.append(runner.forward([WorkerStep([7], [prompt, *row]) for row in rows]).logits)
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
    assert sorted(static.graphs.buckets) == [(1, 64, False), (2, 64, False), (4, 64, False)]  # rows rounded up
    bucket = static.graphs.buckets[(4, 64, False)]
    buffers = bucket.static.meta.buffer.data_ptr(), bucket.static.slot_mapping.data_ptr()
    decode_passes(static, prompt_ids, blocks)  # refilled in place: the same memory, as a captured graph needs
    assert (bucket.static.meta.buffer.data_ptr(), bucket.static.slot_mapping.data_ptr()) == buffers


def test_static_buffers_carry_attention_statistics(tmp_path):
    """Decode passes with collab_stats over static buffers (what their own CUDA graphs replay) give
    the shares of eager passes; a bucket used again starts its statistics from zero."""
    model = tiny_model("qwen2-yarn", tmp_path, "cpu")
    prompt_ids = model.tokenizer("A shared prompt. " * 16, add_special_tokens=False).input_ids
    runs = []
    for graphs in (False, True):
        runner = Runner.for_model(model, "triton", kv_memory=32 << 20, graphs=graphs)
        cache = runner.cache
        prompt = cache.new_block("prompt", capacity=len(prompt_ids))
        runner.prefill([prompt], prompt_ids)
        a, b = cache.new_block("a"), cache.new_block("b")
        shares = []
        for views in [[(a,), (b,)], [(b, a), (a, b)], [(a, b)], [(b, a), (a, b)]]:
            out = runner.forward([WorkerStep([7], [prompt, *view]) for view in views], collab_stats=True)
            shares.append(out.shares)
        runs.append((runner, shares))
    (_, eager), (static, replayed) = runs
    assert sorted(static.graphs.buckets) == [(1, 64, True), (2, 64, True)]
    for want_rows, have_rows in zip(eager, replayed, strict=True):
        for want, have in zip(want_rows, have_rows, strict=True):
            torch.testing.assert_close(have.sum(1), torch.ones(model.num_layers), atol=1e-5, rtol=0)
            torch.testing.assert_close(have, want, atol=1e-5, rtol=0)


def scripted_solve(engine: Engine, script: list[int], budget: int) -> tuple[Result, list[torch.Tensor]]:
    """A 2-worker solve whose workers write ``script`` over and over (so steps end and move into
    the history every few passes), whatever the model says; returns the result and the real
    logits of every decode pass. The finisher decodes greedily from the real logits."""
    session = engine.session("What is 2 + 2?", SolveConfig(workers=2, budget=budget))
    written = [0, 0]
    logits_seen = []
    try:
        session.start()
        while not session.done:
            logits = engine.runner.forward(session.inputs()).logits
            logits_seen.append(logits)
            forced = torch.full_like(logits, -1e9)
            for row, worker in enumerate(w for w in session.workers if w.active):
                forced[row, script[written[worker.index] % len(script)]] = 0.0
                written[worker.index] += 1
            session.advance(forced)
        return session.result(), logits_seen
    finally:
        session.close()


def test_solve_same_transcript_on_both_backends(tmp_path):
    """Steps end, move into the history (keys rotated once) and are read from there: every pass's
    logits agree between the backends, and so do the transcripts and the finisher's answer."""
    model = tiny_model("llama-llama3", tmp_path, "cpu")
    protocol = ProtocolConfig(system_prompt="{names} work together.", finisher_tokens=4)
    script = model.tokenizer("Four.\n\n", add_special_tokens=False).input_ids
    runs = {}
    for attention in ("torch", "triton"):
        runs[attention] = scripted_solve(Engine(model, protocol, attention=attention), script, budget=16)
    (want, want_logits), (have, have_logits) = runs["torch"], runs["triton"]
    assert len(want.history) >= 4  # both workers finished steps that moved into the history
    assert [h.text for h in have.history] == [h.text for h in want.history]
    assert [w.text for w in have.workers] == [w.text for w in want.workers]
    assert have.answer == want.answer
    assert len(have_logits) == len(want_logits) == 16
    for a, b in zip(have_logits, want_logits, strict=True):
        assert float((a - b).abs().max()) < 1e-5 * float(b.abs().max())
        assert torch.equal(a.argmax(-1), b.argmax(-1))  # what greedy workers would have written


def test_a_cpu_install_without_triton_runs_torch_and_refuses_triton():
    """triton is a dev dependency: without it (here: its import blocked) hogwild still generates on
    the torch backend, and ``--attention triton`` is a clear error (exit 2)."""
    import subprocess
    import sys

    blocked = "import sys; sys.modules['triton'] = None; from hogwild.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = ["generate", "--prompt", "The robot", "--max-new-tokens", "3", "--json"]
    done = subprocess.run([sys.executable, "-c", blocked, *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(json.loads(done.stdout)["workers"][0]["token_ids"]) == 3
    refused = subprocess.run([sys.executable, "-c", blocked, *argv, "--attention", "triton"], capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode == 2 and "needs the triton package" in refused.stderr
