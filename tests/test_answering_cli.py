"""Answer while thinking at the front ends: ``solve --async`` (JSON, transcript, live view, refusals)
and the live view's rendering of a scripted-policy run (the writer streams while the thinker thinks)."""

import io
import json
import time

import pytest
from rich.console import Console

from hogwild import Engine, FirstAnswerTokenEvent, ModeEvent, ProbeEvent, TokenEvent
from hogwild.cli import drive, main
from hogwild.live import AnsweringView
from hogwild.transcript import to_markdown

PROBLEM = "Tom has 3 apples and buys 4 more. How many apples does he have?"
TINY = ["--random-config", "tiny-qwen2"]
METRICS = {"text", "first_answer_passes", "first_answer_s", "answer_tokens", "answer_tokens_per_s", "pauses",
           "paused_passes", "longest_pause", "paused_share", "probe_passes", "probe_s"}


def shown(view: AnsweringView) -> str:
    console = Console(file=io.StringIO(), width=140, record=True, color_system=None)
    console.print(view.render())
    return console.export_text()


@pytest.fixture(scope="module")
def streamed(model):
    """The events of a greedy run whose probes always say yes (the writer streams while Alice thinks)."""
    engine = Engine(model)
    events = list(engine.stream_answer(PROBLEM, budget=26, seed=0, probe_policy=lambda i, p_yes, p_no: True))
    assert not engine.runner.cache.blocks
    return events


def test_live_view_fills_the_answer_while_the_thoughts_move(streamed):
    view = AnsweringView(thinkers=1, budget=26)
    assert "not started" in shown(view) and "first answer token: not yet" in shown(view)
    both_frames = []  # (thoughts, answer) at each pass the writer wrote in "both" mode
    for event in streamed:
        view.update(event)
        if isinstance(event, TokenEvent) and event.role == "writer" and view.mode == "both":
            both_frames.append((view.thoughts[0], view.written))
            if len(both_frames) == 2:
                text = shown(view)
                assert "Alice (thinking)" in text and "answer, as written (writing)" in text
                assert "mode: both (writing while thinking)" in text
                assert "P(yes)" in text and "-> yes" in text
                first = next(e for e in streamed if isinstance(e, FirstAnswerTokenEvent))
                assert f"first answer token: pass {first.forward_passes}" in text
                for line in view.written.strip().splitlines()[-3:]:  # the pane shows the answer's last lines
                    assert line.strip()[:40] in text
    assert len(both_frames) >= 2
    (thoughts0, answer0), (thoughts1, answer1) = both_frames[:2]
    assert thoughts1.startswith(thoughts0) and len(thoughts1) > len(thoughts0)  # the thoughts still move
    assert answer1.startswith(answer0) and len(answer1) > len(answer0)  # while the answer fills
    result = streamed[-1].result
    text = shown(view)
    assert f"answer (by {result.answered_by})" in text and "answer, as written (done)" in text
    assert view.written == result.answering["text"]


def test_transcript_has_thoughts_answer_metrics_and_timeline(streamed):
    result = streamed[-1].result
    text = to_markdown(PROBLEM, result, streamed)
    for heading in ("## Problem", "## Thoughts", "### Alice", "## Answer as written", "## Metrics", "## Timeline",
                    "## Answer"):
        assert heading in text
    thoughts = text[text.index("### Alice"):text.index("## Answer as written")]
    assert result.workers[0].text.strip() in thoughts
    written = text[text.index("## Answer as written"):text.index("## Metrics")]
    assert result.answering["text"].strip() in written
    first = result.answering["first_answer_passes"]
    assert f"| forward passes to the first answer token | {first} |" in text
    probes = [e for e in streamed if isinstance(e, ProbeEvent)]
    modes = [e for e in streamed if isinstance(e, ModeEvent)]
    timeline = text[text.index("## Timeline"):]
    assert timeline.count("probe (") == len(probes) and timeline.count(": mode ") == len(modes)
    assert f"- pass {first}: first answer token" in timeline


def test_solve_async_json_and_transcript(capsys, tmp_path):
    """The model decides the probes: the structure holds whoever answers (at this budget, the finisher)."""
    transcript = tmp_path / "async.md"
    code = main(["solve", PROBLEM, "--async", "--budget", "4", "--json", "--transcript", str(transcript)])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["layout"] == "answering" and data["history"] == []
    assert [w["name"] for w in data["workers"]] == ["Alice", "Writer"]
    assert 1 <= data["forward_passes"] <= 4 and data["answered_by"] in ("Writer", "finisher")
    assert set(data["answering"]) == METRICS and data["answering"]["text"] == data["workers"][1]["text"]
    assert set(data["timings"]) == {"prefill", "decode", "probe", "finisher"}
    text = transcript.read_text()
    assert "## Thoughts" in text and "### Alice" in text and "## Answer as written" in text
    assert "## Metrics" in text and "- pass 0: mode think" in text
    assert data["workers"][0]["text"].strip() in text


def test_solve_async_live_view_and_no_thinking(capsys, tmp_path):
    assert main(["solve", PROBLEM, "--async", "--thinkers", "2", "--budget", "3", *TINY]) == 0
    out = capsys.readouterr().out
    assert "Alice (thinking)" in out and "Bob (thinking)" in out and "answer, as written" in out
    assert "Answer:" in out and "3 passes" in out
    transcript = tmp_path / "nothink.md"
    assert main(["solve", PROBLEM, "--async", "--thinkers", "0", "--budget", "3", *TINY, "--json",
                 "--transcript", str(transcript)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [w["name"] for w in data["workers"]] == ["Writer"]
    assert data["answering"]["probe_passes"] == 0
    assert "no thinking: the writer answered at once" in transcript.read_text()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--async", "--layout", "combined"], "--layout does not apply to --async"),
        (["--async", "--workers", "3"], "--workers does not apply to --async"),
        (["--async", "--collab-stats"], "--collab-stats does not apply to --async"),
        (["--async", "--collab-every", "8"], "--collab-every does not apply to --async"),
        (["--thinkers", "2"], "--thinkers needs --async"),
        (["--async", "--thinkers", "9"], "thinkers must be between 0 and 8"),
        (["--async", "--thinkers", "-1"], "thinkers must be between 0 and 8"),
        (["--async", "--budget", "0"], "budget"),
    ],
)
def test_async_refusals(capsys, argv, message):
    start = time.perf_counter()
    assert main(["solve", PROBLEM, *argv, "--model", "no/such-model"]) == 2  # refused before any model loads
    assert time.perf_counter() - start < 5
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err



def test_ctrl_c_hands_back_the_partial_run():
    """Ctrl-C while the live view draws: the engine stops, the partial run comes back, blocks are freed."""
    from hogwild import PassEvent
    from hogwild.models import random_model

    class Interrupted(AnsweringView):
        def update(self, event):
            super().update(event)
            if isinstance(event, PassEvent) and event.forward_passes == 3:
                raise KeyboardInterrupt

    engine = Engine(random_model("tiny-qwen2"))
    stream = engine.stream_answer(PROBLEM, budget=50, seed=0)
    result, kept = drive(stream, Interrupted(thinkers=1, budget=50), keep=(ModeEvent,))
    assert result.interrupted and result.forward_passes == 3 and result.layout == "answering"
    assert kept == [ModeEvent("think", 0)]
    assert not engine.runner.cache.blocks
