"""``hogwild bench`` and the random models, end to end on tiny sizes: the JSON fields, the files,
skipped cells, the profile; ``--random-config`` for the other commands.

These tests check what the commands produce, never how fast anything is.
"""

import json

import pytest
import torch

from hogwild.bench import measure, methods
from hogwild.cli import main
from hogwild.models import RANDOM_CONFIGS, ordinary_attention, random_model, random_tokenizer

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY = ["--random-config", "tiny-qwen2"]
OK_FIELDS = {"status", "median_ms", "iqr_ms", "tokens_per_s", "kv_bytes", "kv_allocated_bytes", "prefill_s",
             "setup_s", "samples_ms"}


def run_json(capsys, argv, code=0):
    assert main(argv) == code
    return json.loads(capsys.readouterr().out)


def tiny_bytes_per_token(preset="tiny-qwen2"):
    c = RANDOM_CONFIGS[preset]
    head_dim = c.get("head_dim", c["hidden_size"] // c["num_attention_heads"])
    return 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * head_dim * 4  # float32


def test_bench_cpu_methods_json_and_files(tmp_path, capsys):
    out = tmp_path / "bench"
    result = run_json(capsys, ["bench", *TINY, "--workers", "1,2", "--context", "16,40", "--steps", "3",
                               "--warmup", "1", "--json", "--out", str(out)])
    assert result["methods"] == ["hogwild-torch", "transformers", "materialize"]  # the CPU default
    assert result["model"] == "random tiny-qwen2" and result["device"] == "cpu" and result["dtype"] == "float32"
    machine = result["machine"]
    assert {"torch", "transformers", "triton", "git", "platform", "threads"} <= set(machine)
    assert machine["torch"] == torch.__version__
    assert set(result["warmup_s"]) == set(result["methods"])
    assert result["skipped"] == [] and result["compile"] is None and result["profile"] is None
    assert result["complete"] is True and result["wall_s"] > 0
    # one pool for hogwild-torch and materialize: the longest prompt and both methods' worker blocks
    assert result["kv_pool_bytes"]["torch"] >= tiny_bytes_per_token() * (40 + 2 * 2 * 64)
    assert [(c["workers"], c["context"]) for c in result["cells"]] == [(1, 16), (2, 16), (1, 40), (2, 40)]
    bpt = tiny_bytes_per_token()
    for cell in result["cells"]:
        N, L = cell["workers"], cell["context"]
        assert cell["one_copy_kv_bytes"] == bpt * (L + N)
        res = cell["results"]
        assert list(res) == result["methods"]
        for name, r in res.items():
            assert r["status"] == "ok" and OK_FIELDS <= set(r), name
            assert len(r["samples_ms"]) == 3 and r["iqr_ms"][0] <= r["median_ms"] <= r["iqr_ms"][1]
            assert r["tokens_per_s"] == pytest.approx(N * 1e3 / r["median_ms"], rel=1e-3, abs=0.01)
            assert r["kv_allocated_bytes"] >= r["kv_bytes"]
        base = res["transformers"]
        for name in ("hogwild-torch", "materialize"):
            # the same first pass as transformers, and one copy of the prompt for any N
            assert res[name]["max_abs_logit_diff"] < 1e-4
            assert res[name]["kv_bytes"] == cell["one_copy_kv_bytes"]
            assert res[name]["vs_transformers"] == pytest.approx(res[name]["median_ms"] / base["median_ms"], rel=1e-3)
        assert base["kv_bytes"] == N * (L + 1) * bpt  # N rows of the prompt and the first token
        assert res["hogwild-torch"]["prefill_s"] == res["materialize"]["prefill_s"]  # one shared prompt block

    assert json.loads((out / "bench.json").read_text()) == result
    assert (out / "bench.png").read_bytes().startswith(PNG_SIGNATURE)
    assert not (out / "profile.txt").exists()


def test_bench_triton_and_compiled_methods(tmp_path, capsys):
    """hogwild-triton (Triton's interpreter here; the lean decoder, and transformers' modules as
    hogwild-triton-modules) and transformers-compiled (StaticCache and
    torch.compile; the eager backend checks the capture without generating code) on GQA 7: one
    compiled graph serves every N and L."""
    out = tmp_path / "bench"
    argv = ["bench", "--random-config", "tiny-qwen2-gqa7", "--methods",
            "hogwild-triton,hogwild-triton-modules,transformers,transformers-compiled", "--compile-backend", "eager",
            "--workers", "1,2",
            "--context", "12", "--steps", "1", "--warmup", "1", "--out", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "| N | L | method | ms/step [quartiles] | worker tok/s | vs transformers | vs compiled |" in table
    assert "random tiny-qwen2-gqa7" in table and "Not run" not in table
    result = json.loads((out / "bench.json").read_text())
    bpt = tiny_bytes_per_token("tiny-qwen2-gqa7")
    for cell in result["cells"]:
        N, res = cell["workers"], cell["results"]
        assert all(r["status"] == "ok" for r in res.values())
        assert res["hogwild-triton"]["max_abs_logit_diff"] < 1e-4  # the lean decoder
        assert res["hogwild-triton-modules"]["max_abs_logit_diff"] < 1e-4  # transformers' modules
        assert res["transformers-compiled"]["max_abs_logit_diff"] < 1e-4
        assert "vs_transformers_compiled" in res["transformers"] and "vs_transformers" in res["transformers-compiled"]
        compiled = res["transformers-compiled"]
        assert compiled["kv_bytes"] == N * 13 * bpt
        assert compiled["kv_allocated_bytes"] == N * (12 + 1 + 1 + 1) * bpt  # a static cache of L + decoded tokens
    assert result["compile"] == {"backend": "eager", "mode": None, "size_oblivious": True, "shapes": "dynamic",
                                 "graphs": 1, "cudagraph_skips": 0}


def test_bench_collab_stats_side_by_side(tmp_path, capsys):
    """--collab-stats adds hogwild-torch+stats right after hogwild-torch (the same runner and pool,
    statistics on every pass) and its ratio to hogwild-torch in the same cell; the first pass's logits
    equal transformers' either way."""
    out = tmp_path / "bench"
    argv = ["bench", *TINY, "--methods", "hogwild-torch,transformers", "--collab-stats", "--workers", "1,3",
            "--context", "16", "--steps", "2", "--warmup", "1", "--out", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "| vs transformers | vs no stats | K/V MiB |" in table and "| 3 | 16 | hogwild-torch+stats |" in table
    result = json.loads((out / "bench.json").read_text())
    assert result["methods"] == ["hogwild-torch", "hogwild-torch+stats", "transformers"]
    assert set(result["kv_pool_bytes"]) == {"torch"}  # one runner for both
    for cell in result["cells"]:
        res = cell["results"]
        plain, stats = res["hogwild-torch"], res["hogwild-torch+stats"]
        assert plain["status"] == stats["status"] == "ok" and len(stats["samples_ms"]) == 2
        assert stats["vs_no_stats"] == pytest.approx(stats["median_ms"] / plain["median_ms"], rel=1e-3)
        assert "vs_no_stats" not in plain and "vs_no_stats" not in res["transformers"]
        assert stats["max_abs_logit_diff"] < 1e-4 and plain["max_abs_logit_diff"] < 1e-4
        assert stats["kv_bytes"] == plain["kv_bytes"] == cell["one_copy_kv_bytes"]


def test_stats_decoder_reads_shares_that_sum_to_one():
    """A +stats decoder's passes leave per-row shares over [prompt, own] that sum to 1 in every layer;
    the plain decoder's leave none."""
    model = random_model("tiny-qwen2")
    config = measure.BenchConfig(workers=(2,), contexts=(12,), methods=("hogwild-torch", "hogwild-torch+stats"),
                                 steps=1, warmup=0)
    built, broken = measure.build_methods(model, config)
    assert broken == {} and built["hogwild-torch+stats"].prompt is built["hogwild-torch"].prompt
    built["hogwild-torch"].prepare(list(range(3, 15)))
    plain = built["hogwild-torch"].start(2, config.extra_tokens)
    assert plain.step() > 0 and plain.shares is None
    stats = built["hogwild-torch+stats"].start(2, config.extra_tokens)
    stats.step()
    assert len(stats.shares) == 2
    for row in stats.shares:
        assert row.shape == (model.num_layers, 2)  # [layers, view entries]: the prompt and the own block
        torch.testing.assert_close(row.sum(-1), torch.ones(model.num_layers), rtol=0, atol=1e-4)
        assert float(row[:, 0].min()) > 0  # the 12-token prompt gets some of every layer's attention
    assert methods.with_stats_variants(("materialize", "hogwild-triton", "transformers")) == (
        "materialize", "hogwild-triton", "hogwild-triton+stats", "transformers")


def test_compiled_falls_back_to_static_shapes(monkeypatch):
    """Where size-oblivious tracing fails, the compiled call recompiles with static shapes, and
    afresh for a cell of other shapes."""
    from transformers import StaticCache

    model = random_model("tiny-qwen2")

    def fails(*args, **kwargs):
        raise RuntimeError("not here")

    monkeypatch.setattr(torch._dynamo, "mark_static", fails)
    call = methods.CompiledCall(model, backend="eager")
    with torch.no_grad(), ordinary_attention(model.model):
        logits = call(torch.tensor([[5], [6]]), torch.tensor([[0], [0]]),
                      StaticCache(config=model.model.config, max_cache_len=8))
        assert logits.shape == (2, 1, 1024) and call.oblivious is False and call.static is True
        first = call.fn
        call.new_shapes()  # the next cell: one row, a longer cache
        assert call.fn is not first
        longer = StaticCache(config=model.model.config, max_cache_len=12)
        logits = call(torch.tensor([[5]]), torch.tensor([[0]]), longer)
    assert logits.shape == (1, 1, 1024)


def test_bench_full_pool_is_skipped_not_a_crash(tmp_path, capsys):
    out = tmp_path / "bench"
    # tiny-qwen2 holds 512 B of K/V per token: 0.0001 GiB is about 200 tokens, too few for L = 300
    result = run_json(capsys, ["bench", *TINY, "--methods", "hogwild-torch,transformers", "--workers", "2",
                               "--context", "16,300", "--steps", "1", "--warmup", "0", "--kv-memory", "0.0001",
                               "--json", "--out", str(out)])
    short, long = result["cells"]
    assert short["results"]["hogwild-torch"]["status"] == "ok"
    skipped = long["results"]["hogwild-torch"]
    assert skipped["status"] == "skipped" and "--kv-memory" in skipped["reason"]
    assert "median_ms" not in skipped
    assert long["results"]["transformers"]["status"] == "ok"
    (entry,) = result["skipped"]
    assert entry["method"] == "hogwild-torch" and entry["cells"] == [[2, 300]] and entry["status"] == "skipped"
    assert (out / "bench.png").read_bytes().startswith(PNG_SIGNATURE)


def test_bench_out_of_memory_and_errors_are_recorded(tmp_path, capsys, monkeypatch):
    """Too little memory for a cell skips it before any work; an out-of-memory error in the middle
    of a cell skips that method only; an unexpected error is reported and the exit code is 1."""
    real_step = methods.HogwildDecoder.step

    def failing_step(self):  # materialize runs out of memory at its first timed step at L = 20
        if self.reference and self.prompt.length == 20 and self.own[0].length > 0:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self)

    monkeypatch.setattr(methods.HogwildDecoder, "step", failing_step)
    monkeypatch.setattr(measure, "available_bytes", lambda device: 1 << 30)  # just the margin: no K/V fits
    out = tmp_path / "bench"
    result = run_json(capsys, ["bench", *TINY, "--methods", "hogwild-torch,materialize,transformers",
                               "--workers", "1", "--context", "8,20", "--steps", "2", "--warmup", "0",
                               "--json", "--out", str(out)])
    first, second = (c["results"] for c in result["cells"])
    assert first["hogwild-torch"]["status"] == second["hogwild-torch"]["status"] == "ok"
    assert first["transformers"]["status"] == "skipped"
    assert first["transformers"]["reason"].startswith("out of memory: needs")
    assert first["materialize"]["status"] == "ok"
    lost = second["materialize"]
    assert lost["status"] == "skipped" and lost["reason"].startswith("step 0: out of memory")

    def broken_start(self, workers, extra_tokens):
        raise RuntimeError("boom")

    monkeypatch.setattr(methods.TransformersMethod, "start", broken_start)
    monkeypatch.setattr(measure, "available_bytes", lambda device: None)  # unknown: try
    result = run_json(capsys, ["bench", *TINY, "--methods", "transformers,hogwild-torch", "--workers", "1",
                               "--context", "8", "--steps", "1", "--warmup", "0", "--json", "--out", str(out)], code=1)
    (entry,) = result["skipped"]
    assert entry["status"] == "error" and entry["reason"] == "warm-up: RuntimeError: boom"
    assert result["cells"][0]["results"]["hogwild-torch"]["status"] == "ok"
    assert json.loads((out / "bench.json").read_text())["skipped"] == [entry]


def test_bench_cut_short_reports_the_cells_done(tmp_path, capsys, monkeypatch):
    """bench.json is rewritten after every cell; Ctrl-C (or SIGTERM) ends the run with the files
    and the table of the cells done, exit code 130."""
    real_cell = measure.measure_cell
    done = []

    def interrupted_cell(*args, **kwargs):
        if done:
            raise KeyboardInterrupt
        done.append(real_cell(*args, **kwargs))
        return done[-1]

    monkeypatch.setattr(measure, "measure_cell", interrupted_cell)
    out = tmp_path / "bench"
    assert main(["bench", *TINY, "--methods", "hogwild-torch", "--workers", "1,2", "--context", "8", "--steps", "1",
                 "--warmup", "0", "--out", str(out)]) == 130
    captured = capsys.readouterr()
    assert "| 1 | 8 | hogwild-torch |" in captured.out and "| 2 | 8 |" not in captured.out
    assert "interrupted: 1 cells measured" in captured.err
    partial = json.loads((out / "bench.json").read_text())
    assert partial["complete"] is False and partial["interrupted"] is True
    assert [(c["workers"], c["results"]["hogwild-torch"]["status"]) for c in partial["cells"]] == [(1, "ok")]
    assert (out / "bench.png").read_bytes().startswith(PNG_SIGNATURE)


def test_bench_profile_writes_traces_and_table(tmp_path, capsys):
    out = tmp_path / "bench"
    result = run_json(capsys, ["bench", *TINY, "--workers", "1,2", "--context", "8,24", "--steps", "1",
                               "--warmup", "0", "--profile", "--json", "--out", str(out)])
    profile = result["profile"]
    assert profile["workers"] == 2 and profile["context"] == 24 and profile["steps"] == 3
    assert set(profile["methods"]) == {"hogwild-torch", "transformers", "materialize"}
    for name, m in profile["methods"].items():
        trace = json.loads((out / m["trace"]).read_text())
        assert m["trace"] == f"profile-{name}.json" and trace["traceEvents"]
        assert any(str(op).startswith("aten::") for op in m["top_ops_ms_per_step"])
        assert m["wall_ms_per_step"] > 0 and "table" not in m
    assert profile["history_move"]["median_ms"] > 0 and profile["history_move"]["context"] == 24
    text = (out / "profile.txt").read_text()
    for name in profile["methods"]:
        assert f"## {name}:" in text
    assert "Self CPU" in text and "history move" in text


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--context", "5000"], "use --context 4091 or less"),  # 4096 positions, 5 decoded tokens
        (["--workers", "0"], "--workers needs counts >= 1"),
        (["--kv-memory", "0"], "--kv-memory must be a positive"),
    ],
)
def test_bench_rejects_bad_sizes(tmp_path, capsys, extra, message):
    assert main(["bench", *TINY, "--steps", "1", "--out", str(tmp_path), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bench.json").exists()


def test_bench_rejects_unknown_methods(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", *TINY, "--methods", "hogwild-torch,vllm", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "unknown methods ['vllm']" in capsys.readouterr().err


# -- random models ------------------------------------------------------------------------------
def test_random_tokenizer_covers_the_vocabulary():
    tok = random_tokenizer(1024)
    assert len(tok) == 1024
    pieces = tok.batch_decode([[i] for i in range(1024)])
    assert all(isinstance(p, str) for p in pieces) and len(set(pieces[259:])) == 1024 - 259
    ids = tok("Hello, world", add_special_tokens=False).input_ids
    assert max(ids) < 256 and tok.decode(ids) == "Hello, world"
    chat = tok.apply_chat_template([{"role": "user", "content": "2+2?"}], add_generation_prompt=True,
                                   tokenize=True, return_dict=True)["input_ids"]
    assert tok.decode(chat) == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token_id < 1024 and tok.pad_token_id < 1024 and tok.eos_token_id != tok.pad_token_id


def test_random_gqa7_model_shape():
    model = random_model("tiny-qwen2-gqa7")
    assert model.groups == 7 and model.head_dim == 128 and model.num_kv_heads == 2
    assert len(model.tokenizer) == model.model.config.vocab_size
    assert sum(p.numel() * p.element_size() for p in model.model.parameters()) < 8 << 20


def test_solve_random_config_json(capsys):
    result = run_json(capsys, ["solve", "--sample", *TINY, "--budget", "8", "--json"])
    assert result["model"] == "random tiny-qwen2"
    assert result["forward_passes"] == 8 and result["tokens_generated"] == 16
    assert [w["name"] for w in result["workers"]] == ["Alice", "Bob"]


def test_random_config_and_model_are_exclusive(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["solve", "--sample", *TINY, "--model", "HuggingFaceTB/SmolLM2-135M-Instruct", "--json"])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
