"""The evaluation harness: answer checking, voting, resume, summary, plot, and a tiny real run."""

import io
import json
from pathlib import Path

import pytest

from hogwild import DoneEvent, Engine
from hogwild import evaluate as ev
from hogwild.cli import main
from hogwild.errors import InputError

TINY = Path(__file__).parent / "data" / "tiny.jsonl"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- answers ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "answer, reference, correct",
    [
        (r"\frac{1}{2}", "0.5", True),
        ("0.5", r"\frac{1}{2}", True),
        ("1,000", "1000", True),
        ("1,000,000", "1000000", True),
        (r"\$1,000", "1000", True),
        ("18 dollars", "18", True),
        (r"18 \text{ dollars}", "18", True),
        ("18.", "18", True),
        ("x = 18", "18", True),
        (r"50\%", "50", True),
        (r"(3, \frac{\pi}{2})", r"\left( 3, \frac{\pi}{2} \right)", True),
        (r"\text{(C)}", r"\text{(C)}", True),
        ("17", "18", False),
        ("1,2", "12", False),
        ("18 dollars and 50 cents", "18", False),
        (r"\frac{1}{3}", "0.5", False),
        (None, "18", False),
        ("", "18", False),
        ("   ", "18", False),
    ],
)
def test_check_answer(answer, reference, correct):
    assert ev.check_answer(answer, reference)[0] is correct


def test_extracted_answer_is_recorded():
    assert ev.check_answer("1,000", "1000") == (True, "1000")
    assert ev.check_answer(r"\frac{1}{2}", "0.5") == (True, r"\frac{1}{2}")
    assert ev.check_answer(None, "5") == (False, None)


def test_majority_vote_groups_equivalent_answers():
    assert ev.majority_vote(["20", "18", r"\$18"]) == "18"
    assert ev.majority_vote(["1,000", "999", "1000"]) == "1,000"
    assert ev.majority_vote(["0.5", "7", r"\frac{1}{2}", "7", "7"]) == "7"
    assert ev.majority_vote(["3", "4"]) == "3"  # a tie goes to the answer seen first
    assert ev.majority_vote([None, "4", None]) == "4"  # missing answers do not vote
    assert ev.majority_vote([None, ""]) is None
    assert ev.majority_vote([]) is None


# -- datasets -----------------------------------------------------------------------------------
def test_load_problems_and_limit():
    problems = ev.load_problems(TINY)
    assert [p.id for p in problems] == ["tiny-1", "tiny-2", "tiny-3"]
    assert problems[0].answer == "7"
    assert len(ev.load_problems(TINY, limit=2)) == 2


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"id": "a", "problem": "p"}\n', "id, problem and answer"),
        ("not json\n", "id, problem and answer"),
        ('{"id": "a", "problem": "p", "answer": "1"}\n{"id": "a", "problem": "q", "answer": "2"}\n', "twice"),
        ("\n", "no problems"),
    ],
)
def test_bad_dataset(tmp_path, text, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        ev.load_problems(path)


def test_named_datasets_resolve(monkeypatch, tmp_path):
    monkeypatch.delenv("HOGWILD_DATA", raising=False)
    if not ev.data_dir().is_dir():
        pytest.skip("no shared/data next to the repository")
    for name in ev.DATASETS:
        problems = ev.load_problems(ev.resolve_dataset(name), limit=3)
        assert len(problems) == 3 and all(p.problem and p.answer for p in problems)
    monkeypatch.setenv("HOGWILD_DATA", str(tmp_path))
    with pytest.raises(InputError, match="HOGWILD_DATA"):
        ev.resolve_dataset("gsm8k")
    (tmp_path / "gsm8k_dev.jsonl").write_text(TINY.read_text())
    assert ev.resolve_dataset("gsm8k") == tmp_path / "gsm8k_dev.jsonl"


# -- resume, summary and plot, with a fake run ----------------------------------------------------
def fake_run_problems(calls):
    """Answers the reference for "combined" (and at budget 4), a wrong number otherwise; records
    each (problem, group) it is asked to run."""

    def run_problems(engine, todo, config, on_rows, on_pass=lambda live: None, on_curve=lambda run: None):
        for problem, group in todo:
            calls.append((problem.id, tuple(group)))
            rows = []
            for method in group:
                for budget in sorted(config.budgets):
                    on_pass(1)
                    answer = problem.answer if method == "combined" or budget > 2 else "-1"
                    correct, extracted = ev.check_answer(answer, problem.answer)
                    rows.append(ev.ResultRow(problem.id, method, budget, answer, extracted, problem.answer, correct,
                                             "finisher", budget, budget, 0.1, 0))
            on_rows(rows)

    return run_problems


def config(tmp_path, **kwargs):
    kwargs.setdefault("budgets", (2, 4))
    return ev.EvalConfig(dataset=str(TINY), out=tmp_path / "out", **kwargs)


def test_resume_skips_done_runs(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(ev, "run_problems", fake_run_problems(calls))
    engines = []
    cfg = config(tmp_path)
    ev.evaluate(cfg, lambda: engines.append(1))
    assert sorted(calls) == sorted(
        [(p, ("combined",)) for p in ("tiny-1", "tiny-2", "tiny-3")]
        + [(p, ("single", "independent")) for p in ("tiny-1", "tiny-2", "tiny-3")]
    )
    results = cfg.out / "results.jsonl"
    assert len(results.read_text().splitlines()) == 3 * 3 * 2

    calls.clear()
    ev.evaluate(cfg, lambda: engines.append(1))
    assert calls == [] and engines == [1]  # nothing left to run: the model is not even loaded

    # An interrupted write leaves a partial line; a lost row makes its (problem, method) run again.
    lines = results.read_text().splitlines(keepends=True)
    kept = [line for line in lines if not ('"tiny-2"' in line and '"single"' in line and '"budget": 4' in line)]
    results.write_text("".join(kept) + lines[0][:25])
    summary = ev.evaluate(cfg, lambda: engines.append(1))
    assert calls == [("tiny-2", ("single",))]
    rows = [json.loads(line) for line in results.read_text().splitlines()]  # no partial line left
    assert len(rows) == 3 * 3 * 2 + 1  # the rerun wrote both budgets; the newer row counts
    assert len({(r["id"], r["method"], r["budget"]) for r in rows}) == 3 * 3 * 2
    assert summary.methods["single"][4].n == 3

    # More budgets or methods later: only what is missing runs.
    calls.clear()
    ev.evaluate(config(tmp_path, layouts=("combined", "contiguous")), lambda: None)
    assert sorted(calls) == [(p, ("contiguous",)) for p in ("tiny-1", "tiny-2", "tiny-3")]


def test_resume_refuses_other_settings(tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "run_problems", fake_run_problems([]))
    ev.evaluate(config(tmp_path), lambda: None)
    with pytest.raises(InputError, match="workers: 2 there, 4 now"):
        ev.evaluate(config(tmp_path, workers=4), lambda: None)


def test_summary_plot_and_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ev, "run_problems", fake_run_problems([]))
    code, out, _ = run(capsys, "eval", "--dataset", str(TINY), "--budgets", "4,2", "--out", str(tmp_path),
                       "--json")
    assert code == 0
    summary = json.loads(out)
    assert summary == json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) == {"dataset", "n", "methods"}
    assert summary["dataset"] == "tiny.jsonl" and summary["n"] == 3
    assert list(summary["methods"]) == ["combined", "single", "independent"]
    assert summary["methods"]["combined"]["2"] == {"accuracy": 1.0, "stderr": 0.0, "n": 3}
    assert summary["methods"]["single"]["2"] == {"accuracy": 0.0, "stderr": 0.0, "n": 3}
    assert summary["methods"]["single"]["4"]["accuracy"] == 1.0

    png = (tmp_path / "accuracy.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE)
    from matplotlib.image import imread

    assert imread(tmp_path / "accuracy.png").ndim == 3

    code, out, _ = run(capsys, "eval", "--dataset", str(TINY), "--budgets", "2,4", "--out", str(tmp_path))
    assert code == 0 and "accuracy" in out and "combined (2 workers)" in out and "100.0 ± 0.0 %" in out


def test_stderr():
    rows = [ev.ResultRow(f"p{i}", "single", 8, "1", "1", "1", i < 3, "", 0, 0, 0.0, 0) for i in range(12)]
    problems = [ev.Problem(f"p{i}", "q", "1") for i in range(12)]
    cfg = ev.EvalConfig(dataset="x.jsonl", out=Path("."), layouts=(), baselines=("single",), budgets=(8,))
    cell = ev.summarize(rows, cfg, problems).methods["single"][8]
    assert cell.n == 12 and cell.accuracy == 0.25 and cell.stderr == pytest.approx((0.25 * 0.75 / 12) ** 0.5, abs=1e-4)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--layouts", "independent"], "--baselines independent"),
        (["--layouts", "sideways"], "unknown layout"),
        (["--baselines", "solo"], "unknown baseline"),
        (["--layouts", "", "--baselines", ""], "nothing to evaluate"),
        (["--budgets", "0,4"], "budgets"),
        (["--limit", "0"], "--limit"),
        (["--batch", "0"], "--batch"),
        (["--temperature", "-1"], "temperature"),
        (["--thinkers", "2"], "--thinkers needs --answering"),
        (["--answering", "--thinkers", "0"], "--baselines nothink"),
        (["--answering", "--thinkers", "9"], "between 1 and 8"),
    ],
)
def test_bad_arguments_exit_code_2(tmp_path, capsys, argv, message):
    code, _, err = run(capsys, "eval", "--dataset", str(TINY), "--out", str(tmp_path), *argv)
    assert code == 2 and message in err


def test_unknown_dataset_exit_code_2(tmp_path, capsys):
    code, _, err = run(capsys, "eval", "--dataset", "nope", "--out", str(tmp_path))
    assert code == 2 and "no dataset 'nope'" in err


def test_answering_methods_run_alone():
    assert ev.run.method_groups(["combined", "answering", "single", "nothink", "independent"]) == [
        ["combined"], ["answering"], ["nothink"], ["single", "independent"]
    ]
    assert config(Path("."), answering=True, baselines=("nothink",)).methods == ("combined", "answering", "nothink")


def test_resume_of_a_dir_older_than_thinkers(tmp_path, monkeypatch):
    """run.json written before --thinkers existed: its runs had one thinker's worth of nothing."""
    monkeypatch.setattr(ev, "run_problems", fake_run_problems([]))
    cfg = config(tmp_path)
    ev.evaluate(cfg, lambda: None)
    info = json.loads((cfg.out / "run.json").read_text())
    del info["thinkers"]
    (cfg.out / "run.json").write_text(json.dumps(info))
    ev.evaluate(cfg, lambda: None)
    with pytest.raises(InputError, match="thinkers: 1 there, 2 now"):
        ev.evaluate(config(tmp_path, answering=True, thinkers=2), lambda: None)


def test_first_answer_summary_and_table():
    """A run whose writer wrote nothing counts at its end (the finisher's answer comes last)."""
    problems = [ev.Problem(f"p{i}", "q", "1") for i in range(2)]
    rows = [
        ev.ResultRow("p0", "answering", 8, "1", "1", "1", True, "Writer", 8, 8, 4.0, 0, first_answer_passes=2,
                     first_answer_s=1.0, probe_passes=1),
        ev.ResultRow("p1", "answering", 8, "2", "2", "1", False, "finisher", 8, 8, 6.0, 0, probe_passes=0),
        *(ev.ResultRow(f"p{i}", "single", 8, "1", "1", "1", True, "Alice", 8, 8, 3.0, 0) for i in range(2)),
    ]
    cfg = ev.EvalConfig(dataset="x.jsonl", out=Path("."), layouts=(), answering=True, baselines=("single",),
                        budgets=(8,))
    summary = ev.summarize(rows, cfg, problems)
    cell = summary.methods["answering"][8]
    assert (cell.accuracy, cell.first_answer_passes, cell.first_answer_s, cell.writer_started) == (0.5, 5.0, 3.5, 0.5)
    assert "first_answer_passes" not in summary.to_json()["methods"]["single"]["8"]
    out = io.StringIO()
    ev.report.print_table(summary, cfg, file=out)
    text = out.getvalue()
    assert "answering (1 thinker, a writer)" in text and "first token 5.0 / 3.5 s" in text
    assert text.count("first token") == 1


def test_seeds_are_fixed_and_distinct():
    assert ev.derive_seed(0, "a", "combined") == ev.derive_seed(0, "a", "combined")
    assert len({ev.derive_seed(s, p, m) for s in (0, 1) for p in "ab" for m in ("combined", "solo-0")}) == 8


# -- the real model -----------------------------------------------------------------------------
def test_end_to_end_tiny(tmp_path, model):
    """3 problems, tiny budgets, every kind of method, the embedded model; then a rerun runs nothing."""
    from hogwild.engine.engine import Engine
    from hogwild.protocol.prompts import ProtocolConfig

    engine = Engine(model, ProtocolConfig(finisher_tokens=4))  # short finisher answers keep the test fast
    loads = []

    def load_engine():
        loads.append(1)
        return engine

    cfg = ev.EvalConfig(dataset=str(TINY), out=tmp_path, budgets=(2, 3), workers=2, layouts=("combined",),
                        baselines=("single", "independent"), batch=4, collab_stats=True)
    summary = ev.evaluate(cfg, load_engine).to_json()
    assert summary["n"] == 3
    for budget in ("2", "3"):  # collaboration measures for the hogwild layout only
        cell = summary["methods"]["combined"][budget]
        assert 0 <= cell["duplication"] <= 1 and 0 < cell["others_attention"] < 1
        assert "others_attention" not in summary["methods"]["single"][budget]
    curves = ev.read_curves(tmp_path / "collab.jsonl")
    assert set(curves) == {"combined"} and set(curves["combined"]) == {"tiny-1", "tiny-2", "tiny-3"}
    # same-pass visibility: at pass 1 each worker already reads the others' headers as they are fed
    assert all(len(v) == 3 and all(0 < x < 1 for x in v) for v in curves["combined"].values())
    assert (tmp_path / "collaboration.png").read_bytes().startswith(PNG_SIGNATURE)
    assert {m: sorted(c) for m, c in summary["methods"].items()} == {
        m: ["2", "3"] for m in ("combined", "single", "independent")
    }
    assert all(cell["n"] == 3 for cells in summary["methods"].values() for cell in cells.values())
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 3 * 2
    fields = {"id", "method", "budget", "answer", "extracted", "reference", "correct", "tokens",
              "forward_passes", "elapsed_s"}
    assert all(fields <= set(row) for row in rows)
    by = {(r["id"], r["method"], r["budget"]): r for r in rows}
    for pid in ("tiny-1", "tiny-2", "tiny-3"):
        assert by[(pid, "combined", 3)]["forward_passes"] <= 3
        assert by[(pid, "combined", 3)]["tokens"] <= 6
        assert by[(pid, "single", 3)]["tokens"] <= 3
        independent = by[(pid, "independent", 3)]
        assert len(independent["votes"]) == 2
        assert independent["answer"] == ev.majority_vote(independent["votes"])
        assert independent["votes"][0] == by[(pid, "single", 3)]["answer"]  # single is the first worker
        for row in (by[(pid, m, b)] for m in ("combined", "single", "independent") for b in (2, 3)):
            assert row["correct"] == ev.check_answer(row["answer"], row["reference"])[0]
    assert (tmp_path / "accuracy.png").read_bytes().startswith(PNG_SIGNATURE)
    assert not engine.runner.cache.blocks  # every session's blocks are freed

    before = (tmp_path / "results.jsonl").read_text()
    assert ev.evaluate(cfg, load_engine).to_json() == summary
    assert (tmp_path / "results.jsonl").read_text() == before and loads == [1]


def test_batched_runs_match_the_engine(model):
    """Runs batched in one forward pass give what Engine.stream gives for each alone."""
    from hogwild.engine.engine import Engine
    from hogwild.engine.events import SnapshotEvent
    from hogwild.protocol.prompts import ProtocolConfig

    engine = Engine(model, ProtocolConfig(finisher_tokens=4))
    cfg = ev.EvalConfig(dataset=str(TINY), out=Path("."), budgets=(2, 4), batch=2)
    problem = ev.load_problems(TINY, limit=1)[0]

    def alone(workers, layout, label):
        return [
            (e.budget, e.answer, e.forward_passes, e.tokens_generated)
            for e in engine.stream(problem.problem, workers=workers, layout=layout, budget=4,
                                   sampling=cfg.sampling(), seed=ev.derive_seed(0, problem.id, label),
                                   snapshots=(2, 4))
            if isinstance(e, SnapshotEvent)
        ]

    rows = []
    ev.run_problems(engine, [(problem, ["combined"]), (problem, ["single", "independent"])], cfg, rows.extend)
    got = {(r.method, r.budget): r for r in rows}
    for method, expected in (("combined", alone(2, "combined", "combined")),
                             ("single", alone(1, "independent", "solo-0"))):
        assert [(b, got[(method, b)].answer, got[(method, b)].forward_passes, got[(method, b)].tokens)
                for b in (2, 4)] == expected
    assert got[("independent", 4)].votes[0] == got[("single", 4)].answer
    assert not engine.runner.cache.blocks  # every session's blocks are freed


def test_answering_end_to_end_tiny(tmp_path):
    """answering and nothink on the 3 tiny problems, a session per budget, batched in one loop (the
    model decides the probes); a budget's row is what the engine gives for that session alone. A
    random-weight model of the real shape keeps it fast (the embedded model: tests/test_answering_cli.py)."""
    from hogwild.models import random_model

    engine = Engine(random_model("tiny-qwen2"))
    cfg = ev.EvalConfig(dataset=str(TINY), out=tmp_path, budgets=(2, 3), layouts=(), answering=True,
                        baselines=("nothink",), batch=4)
    summary = ev.evaluate(cfg, lambda: engine).to_json()
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 2 * 2
    by = {(r["id"], r["method"], r["budget"]): r for r in rows}
    for (pid, method, budget), row in by.items():
        assert 1 <= row["forward_passes"] <= budget and row["probe_passes"] is not None
        assert row["seed"] == ev.derive_seed(0, pid, method)  # every budget of a (problem, method): one seed
        assert row["correct"] == ev.check_answer(row["answer"], row["reference"])[0]
        if method == "nothink":  # the writer starts at once
            assert row["first_answer_passes"] == 1 and row["first_answer_s"] > 0
    for budget in ("2", "3"):
        nothink = summary["methods"]["nothink"][budget]
        assert nothink["n"] == 3 and nothink["first_answer_passes"] == 1.0 and nothink["writer_started"] == 1.0
        answering = summary["methods"]["answering"][budget]
        assert answering["n"] == 3 and 1 <= answering["first_answer_passes"] <= int(budget)
        assert 0 <= answering["writer_started"] <= 1
    assert not engine.runner.cache.blocks  # every session's blocks are freed

    problem = ev.load_problems(TINY, limit=1)[0]
    alone = [e.result for e in engine.stream_answer(problem.problem, thinkers=1, budget=2, sampling=cfg.sampling(),
                                                    seed=ev.derive_seed(0, problem.id, "answering"))
             if isinstance(e, DoneEvent)][0]
    row = by[(problem.id, "answering", 2)]
    assert (row["answer"], row["forward_passes"], row["tokens"]) == (alone.answer, alone.forward_passes,
                                                                     alone.tokens_generated)
    before = (tmp_path / "results.jsonl").read_text()
    assert ev.evaluate(cfg, lambda: pytest.fail("nothing is left to run")).to_json() == summary
    assert (tmp_path / "results.jsonl").read_text() == before
