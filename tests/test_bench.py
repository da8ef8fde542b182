"""``hogwild bench`` end to end with tiny sizes: the JSON fields and the files it writes.

These tests check what the command produces, never how fast anything is.
"""

import json

import pytest

from hogwild.cli import main

ROW_FIELDS = {
    "workers", "context", "hogwild_ms", "baseline_ms", "materialize_ms", "ratio",
    "hogwild_kv_bytes", "baseline_kv_bytes",
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_bench_embedded_model_json_and_files(tmp_path, capsys):
    out = tmp_path / "bench"
    result = run_json(
        capsys, ["bench", "--workers", "1,2", "--context", "16", "--steps", "3", "--warmup", "1",
                 "--json", "--out", str(out)],
    )
    assert {"rows", "device", "dtype", "model"} <= set(result)
    assert result["device"] == "cpu" and result["dtype"] == "float32"
    assert result["model"] == "SmolLM2-135M-Instruct"
    assert [(r["workers"], r["context"]) for r in result["rows"]] == [(1, 16), (2, 16)]
    for row in result["rows"]:
        assert ROW_FIELDS <= set(row)
        for method in ("hogwild", "baseline", "materialize"):
            assert row[f"{method}_ms"] > 0
        assert row["ratio"] == pytest.approx(row["hogwild_ms"] / row["baseline_ms"], rel=1e-3)
        assert row["steps"] == 3
    one, two = result["rows"]
    # One worker holds the same K/V both ways; two workers share the prompt only in hogwild.
    assert one["hogwild_kv_bytes"] == one["baseline_kv_bytes"] == one["one_copy_kv_bytes"]
    assert two["hogwild_kv_bytes"] == two["one_copy_kv_bytes"]
    assert two["baseline_kv_bytes"] == 2 * 17 * (one["baseline_kv_bytes"] // 17)

    assert json.loads((out / "bench.json").read_text())["rows"] == result["rows"]
    assert (out / "bench.png").read_bytes().startswith(PNG_SIGNATURE)


def test_bench_table_random_config_and_profile(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["bench", "--random-config", "tiny-qwen2", "--workers", "2", "--context", "8,32", "--steps", "2",
            "--warmup", "0", "--profile", "--out", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "| N | L | hogwild ms |" in table
    assert "random tiny-qwen2" in table
    result = json.loads((out / "bench.json").read_text())
    assert [r["context"] for r in result["rows"]] == [8, 32]
    profile = result["profile"]
    assert profile["workers"] == 2 and profile["context"] == 32
    assert "attention: query rotation" in profile["parts_ms"]
    assert (out / "profile.txt").is_file()
    assert (out / "bench.png").read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.parametrize(
    "extra",
    [
        ["--context", "9000"],  # more positions than the embedded model has
        ["--workers", "0"],
    ],
)
def test_bench_rejects_bad_sizes(tmp_path, capsys, extra):
    assert main(["bench", "--steps", "1", "--out", str(tmp_path), *extra]) == 2
    assert "hogwild: error:" in capsys.readouterr().err
