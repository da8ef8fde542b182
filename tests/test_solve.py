"""End to end: the collaboration protocol on the embedded model."""

import dataclasses
import json

import pytest

from hogwild import SamplingParams
from hogwild.cli import main
from hogwild.engine.engine import Engine
from hogwild.engine.events import DoneEvent, StepEvent, StepStartEvent, TokenEvent
from hogwild.engine.session import SolveConfig
from hogwild.errors import ContextOverflowError, InputError
from hogwild.protocol.layouts import LAYOUTS

PROBLEM = "Tom has 3 boxes with 4 apples in each box. He eats 2 apples. How many apples are left?"
SAMPLING = SamplingParams(temperature=0.8, top_p=0.95)


@pytest.fixture(scope="module")
def engine(model):
    return Engine(model)


def drive(engine, config):
    """Run a session pass by pass, as a batching driver would; return it before it is closed."""
    session = engine.session(PROBLEM, config)
    session.start()
    fed, active_per_pass, events = 0, [], []
    while not session.done:
        rows = session.inputs()
        fed += sum(len(r.token_ids) for r in rows)
        active_per_pass.append(len(rows))
        events += session.advance(engine.runner.forward(rows).logits)
    return session, fed, active_per_pass, events


def test_three_workers_combined(engine):
    config = SolveConfig(workers=3, layout="combined", budget=160, sampling=SAMPLING, seed=1, collab_every=24)
    session, fed, active_per_pass, events = drive(engine, config)
    try:
        result = session.result()
        protocol = engine.protocol
        tok = engine.model.tokenizer
        # History: steps of at least two workers, in completion order (= order of StepEvents).
        steps = [e for e in events if isinstance(e, StepEvent)]
        assert len({s.worker for s in steps}) >= 2
        assert [(h.worker, h.step, h.text) for h in result.history] == [(s.worker, s.step, s.text) for s in steps]
        # Each step's text is exactly what its worker generated (after the seeded words / question).
        generated = {w: "" for w in ("Alice", "Bob", "Carol")}
        forced_texts = {"", " " + protocol.collab_question.rstrip()} | {
            protocol.header(i, 1, False)[len(protocol.step_header.format(name=protocol.name(i), step=1)):]
            for i in range(3)
        }
        for event in events:
            if isinstance(event, TokenEvent):
                generated[event.worker] += event.text
            elif isinstance(event, StepEvent):
                own = generated[event.worker]
                assert event.text.endswith(own) and event.text[: len(event.text) - len(own)] in forced_texts
                generated[event.worker] = ""
        # The history block holds exactly the finished steps, headers included, in that order.
        expected = protocol.history_header + "".join(
            protocol.step_header.format(name=h.worker, step=h.step) + h.text for h in result.history
        )
        assert tok.decode(session.shared.history.token_ids) == expected
        # Tokens generated: one per active worker per pass.
        assert result.tokens_generated == sum(active_per_pass) == 3 * 160
        # The redundancy check opens a step once a worker has written collab_every tokens since the last.
        asked = [e for e in events if isinstance(e, StepStartEvent) and e.step > 1
                 and e.text.endswith(" " + protocol.collab_question.rstrip())]
        assert asked
        # At the budget the finisher answers.
        assert result.forward_passes == 160
        assert result.answered_by == "finisher" and isinstance(result.answer, str) and result.answer
        # Moving steps into the history neither copies nor loses K/V: every token fed is held once.
        shared_headers = sum(
            b.length for b in (session.shared.others_header, session.shared.marker, session.shared.own_header)
        )
        prompt_and_history_header = session.shared.prompt.length + len(tok(protocol.history_header,
                                                                           add_special_tokens=False).input_ids)
        held = prompt_and_history_header + shared_headers + fed
        assert engine.runner.cache.nbytes() == held * engine.runner.cache.bytes_per_token
    finally:
        session.close()
    assert engine.runner.cache.nbytes() == 0


def test_same_seed_same_result(engine):
    kwargs = dict(workers=2, budget=40, sampling=SAMPLING, seed=5, collab_every=16)
    first, second = engine.solve(PROBLEM, **kwargs), engine.solve(PROBLEM, **kwargs)
    strip = lambda r: dataclasses.replace(r, elapsed_s=0.0, timings={})  # noqa: E731
    assert strip(first) == strip(second)
    assert engine.solve(PROBLEM, **{**kwargs, "seed": 6}).workers != first.workers


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("workers", [1, 2, 4])
def test_every_layout_runs(engine, layout, workers):
    events = list(engine.stream(PROBLEM, workers=workers, layout=layout, budget=10, sampling=SAMPLING, seed=0))
    result = events[-1].result
    assert isinstance(events[-1], DoneEvent)
    assert result.forward_passes <= 10 and result.layout == layout
    assert len(result.workers) == workers
    assert set(result.collaboration) == {"duplication"}  # attention shares only with collab_stats
    assert {e.worker_index for e in events if isinstance(e, TokenEvent)} == set(range(workers))
    assert engine.runner.cache.nbytes() == 0  # the session's blocks are freed


def test_snapshots(engine):
    events = list(engine.stream(PROBLEM, workers=2, budget=12, sampling=SAMPLING, seed=0, snapshots=(4, 8, 12)))
    snaps = [e for e in events if e.__class__.__name__ == "SnapshotEvent"]
    assert [s.budget for s in snaps] == [4, 8, 12]
    assert [s.forward_passes for s in snaps] == [4, 8, 12]


def test_bad_input_api(engine):
    with pytest.raises(InputError, match="empty"):
        engine.solve("   ")
    with pytest.raises(InputError, match="between 1 and 16"):
        engine.solve(PROBLEM, workers=0)
    with pytest.raises(InputError, match="between 1 and 16"):
        engine.solve(PROBLEM, workers=17)
    with pytest.raises(InputError, match="budget"):
        engine.solve(PROBLEM, budget=0)
    with pytest.raises(InputError, match="layout"):
        engine.solve(PROBLEM, layout="sideways")
    with pytest.raises(ContextOverflowError, match="context"):
        engine.solve("apple " * 9000)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["   "], "empty"),
        ([PROBLEM, "--workers", "0"], "between 1 and 16"),
        ([PROBLEM, "--workers", "17"], "between 1 and 16"),
        ([PROBLEM, "--budget", "0"], "budget"),
        (["apple " * 9000], "context"),
    ],
)
def test_bad_input_cli(capsys, argv, message):
    assert main(["solve", *argv, "--json"]) == 2
    assert message in capsys.readouterr().err


def test_cli_json_and_transcript(capsys, tmp_path, model):
    transcript = tmp_path / "run.md"
    code = main(["solve", PROBLEM, "--workers", "2", "--budget", "16", "--json", "--transcript", str(transcript),
                 "--collab-stats"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"answer", "workers", "history", "forward_passes", "tokens_generated", "elapsed_s",
                         "timings", "model", "weights", "layout", "collaboration"}
    assert data["weights"] == {"quantization": None, "bytes": model.weight_bytes}
    collaboration = data["collaboration"]
    assert set(collaboration) == {"attention", "duplication"}
    for name, other in (("Alice", "Bob"), ("Bob", "Alice")):
        shares = collaboration["attention"][name]
        assert set(shares) == {"prompt", "history", "protocol", "own", "others"} and set(shares["others"]) == {other}
        assert sum(shares[k] for k in ("prompt", "history", "protocol", "own")) + shares["others"][other] == \
            pytest.approx(1.0, abs=1e-5)
        assert set(collaboration["duplication"][name]["mentions"]) == {other}
    assert set(data["timings"]) == {"prefill", "decode", "finisher"}
    assert [w["name"] for w in data["workers"]] == ["Alice", "Bob"]
    assert data["forward_passes"] == 16 and data["tokens_generated"] == 32
    text = transcript.read_text()
    assert "## Problem" in text and PROBLEM in text and "### Alice" in text
    assert "## Collaboration" in text and "Attention shares" in text
