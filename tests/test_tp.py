"""Tensor parallelism (``--tp K`` under torchrun, gloo on the CPU) against one process.

Every run here is a subprocess: ``python -m torch.distributed.run --standalone --nproc-per-node K``.
Tiny random Llama and Qwen2 models (heads divisible by 2) run on 2 ranks, the embedded SmolLM2
(9 query, 3 K/V heads) on 3 ranks.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from hogwild.cli import main
from hogwild.models import random_tokenizer

TINY = {
    "llama": LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        vocab_size=320, max_position_embeddings=4096,
    ),
    "qwen2": Qwen2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, intermediate_size=128,
        vocab_size=320, max_position_embeddings=4096, rope_theta=1e6,
    ),
}
RUN_TIMEOUT = 180


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    paths = {}
    for name, config in TINY.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        random_tokenizer(config.vocab_size).save_pretrained(path)
        paths[name] = str(path)
    return paths


def cases(tiny_models):
    """(model arguments, ranks): 2 ranks on the tiny models, 3 on the embedded SmolLM2."""
    return {"llama": (["--model", tiny_models["llama"]], 2), "qwen2": (["--model", tiny_models["qwen2"]], 2),
            "smollm2": ([], 3)}


def env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def torchrun_cmd(ranks: int, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
            "-m", "hogwild.cli", *args, "--tp", str(ranks)]


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT, env=env(**kw))


def hogwild(args: list[str]) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "hogwild.cli", *args])


def both(args: list[str], ranks: int) -> tuple[dict, dict]:
    """The JSON output of one process and of ``ranks`` ranks."""
    one = hogwild(args)
    assert one.returncode == 0, one.stderr
    many = run(torchrun_cmd(ranks, args))
    assert many.returncode == 0, many.stderr[-3000:]
    return json.loads(one.stdout), json.loads(many.stdout)


@pytest.mark.parametrize("case", ["llama", "qwen2", "smollm2"])
def test_generate_equals_one_process(tiny_models, case):
    model_args, ranks = cases(tiny_models)[case]
    args = ["generate", "--prompt", "The cat sat on", "--worker-prefix", "A", "--worker-prefix", "B but",
            "--max-new-tokens", "8", "--json", *model_args]
    one, many = both(args, ranks)
    tokens = [w["token_ids"] for w in one["workers"]]
    assert [len(t) for t in tokens] == [8, 8]
    assert [w["token_ids"] for w in many["workers"]] == tokens
    assert many["forward_passes"] == one["forward_passes"]


@pytest.mark.parametrize("case", ["llama", "qwen2", "smollm2"])
def test_solve_transcript_equals_one_process(tiny_models, case):
    model_args, ranks = cases(tiny_models)[case]
    args = ["solve", "What is 2 + 3?", "--workers", "2", "--temperature", "0", "--budget", "6", "--json",
            *model_args]
    one, many = both(args, ranks)
    for out in (one, many):
        out.pop("elapsed_s"), out.pop("timings")  # wall times differ, everything else must not
    one_weights, rank0_weights = one.pop("weights"), many.pop("weights")  # under --tp: rank 0's shard
    assert 0 < rank0_weights["bytes"] < one_weights["bytes"]
    assert one["forward_passes"] == 6 and all(w["text"] for w in one["workers"])
    assert many == one


def test_bench_under_torchrun(tiny_models, tmp_path, capsys):
    """``hogwild bench --tp 2``: rank 0 measures hogwild-torch (and its +stats variant, on the same
    runner) and writes alone; transformers is skipped with the reason; rank 0's K/V is half of one
    process's (1 of 2 K/V heads). Bounded: the whole run must take under 60 s."""
    out = tmp_path / "tp"
    args = ["bench", "--model", tiny_models["llama"], "--methods", "hogwild-torch,transformers", "--collab-stats",
            "--workers", "1,2", "--context", "16", "--steps", "2", "--warmup", "1", "--json", "--out", str(out)]
    start = time.monotonic()
    many = subprocess.run(torchrun_cmd(2, args), capture_output=True, text=True, timeout=60, env=env(),
                          cwd=tmp_path)
    assert many.returncode == 0, many.stderr[-3000:]
    assert time.monotonic() - start < 60
    result = json.loads(many.stdout)  # one JSON object: only rank 0 writes
    assert json.loads((out / "bench.json").read_text()) == result
    assert result["tp"] == 2 and result["methods"] == ["hogwild-torch", "hogwild-torch+stats", "transformers"]
    (skipped,) = result["skipped"]
    assert skipped["method"] == "transformers" and skipped["status"] == "skipped"
    assert "not under --tp" in skipped["reason"] and skipped["cells"] == [[1, 16], [2, 16]]

    assert main([a for a in args if a != "--collab-stats"][:-1] + [str(tmp_path / "one")]) == 0
    one = json.loads(capsys.readouterr().out)
    assert one["tp"] == 1 and one["skipped"] == []
    for cell, one_cell in zip(result["cells"], one["cells"], strict=True):
        res = cell["results"]
        assert res["hogwild-torch"]["status"] == res["hogwild-torch+stats"]["status"] == "ok"
        assert res["hogwild-torch+stats"]["vs_no_stats"] > 0 and len(res["hogwild-torch"]["samples_ms"]) == 2
        assert 2 * res["hogwild-torch"]["kv_bytes"] == one_cell["results"]["hogwild-torch"]["kv_bytes"]
        assert res["transformers"]["status"] == "skipped"


MOVES = textwrap.dedent("""
    import json, sys, torch
    from hogwild.models import load_model
    from hogwild.distributed import shutdown
    from hogwild.engine.follow import follow
    from hogwild.engine.runner import Runner, WorkerStep
    model = load_model(sys.argv[1], tp=int(sys.argv[2]))
    if model.tp is not None and not model.tp.leader:
        sys.exit(follow(model))
    runner = Runner.for_model(model, kv_memory=64 << 20)
    cache = runner.cache
    prompt, history, own = cache.new_block("prompt"), cache.new_block("history"), cache.new_block("own")
    runner.prefill([prompt], list(range(10, 50)))
    runner.forward([WorkerStep([5, 6, 7], [prompt, history])])
    runner.forward([WorkerStep([60, 61, 62, 63, 64], [prompt, history, own])])
    runner.move_prefix(history, own, 3)  # keys rotated on every rank
    rows = [WorkerStep([70], [prompt, history, own]), WorkerStep([71], [prompt, history])]
    logits = runner.forward(rows).logits
    print(json.dumps(logits.tolist()))
    shutdown()
""")


def test_cache_moves_are_mirrored(tiny_models, tmp_path):
    """move_prefix (the step that goes into the history) rotates keys on every rank alike."""
    script = tmp_path / "moves.py"
    script.write_text(MOVES)
    one = run([sys.executable, str(script), tiny_models["qwen2"], "1"])
    assert one.returncode == 0, one.stderr
    many = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script),
                tiny_models["qwen2"], "2"])
    assert many.returncode == 0, many.stderr[-3000:]
    expected, got = torch.tensor(json.loads(one.stdout)), torch.tensor(json.loads(many.stdout))
    assert expected.shape == (2, 320)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_heads_not_divisible_exit_2_before_loading(capsys):
    """SmolLM2 has 9 query and 3 K/V heads: --tp 2 is refused from the config, naming both."""
    args = ["generate", "--prompt", "hi", "--tp", "2"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "9 query heads, 3 K/V heads" in err and "fit: 3" in err
    launched = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                    "-m", "hogwild.cli", *args])
    assert launched.returncode != 0  # torchrun itself exits 1 when a rank fails
    assert "9 query heads, 3 K/V heads" in launched.stderr and "exitcode  : 2" in launched.stderr
    assert "Loading weights" not in launched.stderr


def test_tp_without_matching_world_size_exit_2(tiny_models, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["generate", "--prompt", "hi", "--model", tiny_models["llama"], "--tp", "2"]) == 2
    assert "torchrun --nproc-per-node 2" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert main(["generate", "--prompt", "hi", "--model", tiny_models["llama"], "--tp", "2"]) == 2
    assert "torchrun started 3" in capsys.readouterr().err
    assert main(["generate", "--prompt", "hi", "--model", tiny_models["llama"], "--tp", "0"]) == 2
    assert "--tp must be at least 1" in capsys.readouterr().err


def children(pid: int) -> dict[int, int]:
    """RANK of each child process of ``pid`` (the ranks torchrun started)."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            for item in environ:
                if item.startswith(b"RANK="):
                    ranks[int(item[5:])] = int(entry.name)
    return ranks


def test_a_killed_rank_ends_the_run_with_an_error(tiny_models):
    # 2 workers x 1900 tokens fit the 4096 positions and take minutes: the rank dies mid-run
    args = ["generate", "--prompt", "hi", "--max-new-tokens", "1900", "--json", "--model", tiny_models["llama"]]
    proc = subprocess.Popen(torchrun_cmd(2, args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env(HOGWILD_TP_TIMEOUT="10"))
    try:
        deadline = time.monotonic() + 60
        while len(ranks := children(proc.pid)) < 2:
            assert time.monotonic() < deadline and proc.poll() is None, "torchrun did not start 2 ranks"
            time.sleep(0.2)
        time.sleep(8)  # loaded and decoding
        assert proc.poll() is None
        os.kill(ranks[1], signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = proc.communicate(timeout=60)
        assert time.monotonic() - killed < 30
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    assert "Signals.SIGKILL" in stderr or "exitcode  : -9" in stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, tp_timeout: int) -> tuple[subprocess.Popen, str]:
    """``serve`` on 2 ranks, once its /health answers 200: the torchrun process and the URL."""
    port = free_port()
    args = ["serve", "--port", str(port), "--model", model]
    proc = subprocess.Popen(torchrun_cmd(2, args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env(HOGWILD_TP_TIMEOUT=str(tp_timeout)))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
            raise AssertionError(f"the server did not come up: {proc.communicate()[1][-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)


def test_server_under_torchrun(tiny_models):
    proc, url = start_server(tiny_models["llama"], tp_timeout=20)
    try:
        time.sleep(6)  # idle for longer than the followers' ping interval (timeout / 4)
        body = {"messages": [{"role": "user", "content": "What is 2 + 3?"}], "max_tokens": 4, "temperature": 0,
                "hogwild": {"workers": 2}}
        good = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
        assert good.status_code == 200, good.text
        assert good.json()["hogwild"]["forward_passes"] <= 4
        bad = httpx.post(url + "/v1/chat/completions", json={**body, "max_tokens": 0}, timeout=30)
        assert bad.status_code == 400 and "at least 1" in bad.json()["error"]["message"]
        os.kill(children(proc.pid)[0], signal.SIGINT)  # Ctrl-C to the server (rank 0); it stops the followers
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]


def test_eval_under_torchrun_equals_one_process(tiny_models, tmp_path):
    """``eval`` on 2 ranks: the same rows (answers, tokens, passes) as one process, greedy."""
    rows = {}
    for name in ("one", "tp"):
        out = tmp_path / name
        args = ["eval", "--dataset", str(Path(__file__).parent / "data" / "tiny.jsonl"), "--budgets", "4,8",
                "--workers", "2", "--layouts", "combined", "--baselines", "single", "--temperature", "0",
                "--out", str(out), "--json", "--model", tiny_models["llama"]]
        done = hogwild(args) if name == "one" else run(torchrun_cmd(2, args))
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads(done.stdout)["n"] == 3
        lines = (out / "results.jsonl").read_text().splitlines()
        rows[name] = sorted(({k: v for k, v in json.loads(line).items() if k != "elapsed_s"} for line in lines),
                            key=lambda r: (r["id"], r["method"], r["budget"]))
    assert len(rows["one"]) == 3 * 2 * 2  # problems x methods x budgets
    assert rows["tp"] == rows["one"]


def test_server_answers_503_when_a_rank_dies(tiny_models):
    """A follower killed mid-stream: the stream ends with an error chunk and [DONE], /health and new
    requests get 503 (with Retry-After) while rank 0 shuts down, and the run exits within seconds."""
    proc, url = start_server(tiny_models["llama"], tp_timeout=10)
    try:
        body = {"messages": [{"role": "user", "content": "Count."}], "max_tokens": 1500, "temperature": 0,
                "stream": True, "hogwild": {"workers": 2}}
        lines, killed = [], None
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                lines += [line] if line else []
                if len(lines) == 10 and killed is None:  # decoding: kill the follower
                    os.kill(children(proc.pid)[1], signal.SIGKILL)
                    killed = time.monotonic()
        assert killed is not None and time.monotonic() - killed < 30
        assert lines[-1] == "data: [DONE]"
        error = json.loads(lines[-2][len("data: "):])["error"]
        assert "tensor-parallel rank is gone" in error["message"] and error["code"] == "engine_failed"
        try:  # rank 0 is shutting down: a refusal in OpenAI's shape, or no server any more
            late = httpx.post(url + "/v1/chat/completions", json={**body, "stream": False}, timeout=10)
            assert late.status_code == 503 and late.headers["retry-after"]
            assert "tensor-parallel rank is gone" in late.json()["error"]["message"]
        except httpx.ConnectError:
            pass
        proc.communicate(timeout=60)
        assert time.monotonic() - killed < 60
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
