"""A readable Markdown transcript of a run, built from a Result: a collaboration of hogwild workers,
or answer while thinking (the thinkers' thoughts, the writer's answer as written, the metrics and,
given the run's events, the timeline of modes and probes)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from . import Event, FirstAnswerTokenEvent, ModeEvent, ProbeEvent, Result

#: Result.answering's metrics as the transcript names them (units in the names).
METRICS = {
    "first_answer_passes": "forward passes to the first answer token",
    "first_answer_s": "seconds to the first answer token",
    "answer_tokens": "answer tokens",
    "answer_tokens_per_s": "answer tokens per second (after the first)",
    "pauses": "pauses of the writer",
    "paused_passes": "forward passes with the writer paused",
    "longest_pause": "longest pause (forward passes)",
    "paused_share": "share of forward passes with the writer paused",
    "probe_passes": "probe passes",
    "probe_s": "seconds spent in probes",
}


def _head(title: str, problem: str, result: Result, roles: str) -> list[str]:
    return [
        f"# {title}",
        "",
        f"- model: {result.model}",
        f"- {roles}",
        f"- forward passes: {result.forward_passes}, tokens generated: {result.tokens_generated}, "
        f"time: {result.elapsed_s:.1f} s" + (" (interrupted)" if result.interrupted else ""),
        "",
        "## Problem",
        "",
        problem.strip(),
        "",
    ]


def _answer(result: Result) -> list[str]:
    answer = result.answer if result.answer is not None else "(none)"
    return ["## Answer", "", f"{answer} (by {result.answered_by or 'nobody'})", ""]


def to_markdown(problem: str, result: Result, events: Iterable[Event] = ()) -> str:
    """The transcript; ``events`` (the run's, any kinds) add the timeline of an answering run."""
    if result.layout == "answering":
        return answering_markdown(problem, result, events)
    lines = _head("Hogwild! transcript", problem, result,
                  f"layout: {result.layout}, workers: {', '.join(w.name for w in result.workers)}")
    lines += ["## Finished steps, in the order they were finished", ""]
    for step in result.history:
        lines += [f"**{step.worker} [{step.step}]:** {step.text.strip()}", ""]
    if not result.history:
        lines += ["(none)", ""]
    lines += ["## Each worker's full text", ""]
    for worker in result.workers:
        lines += [f"### {worker.name}", "", worker.text.strip() or "(nothing)", ""]
    lines += collaboration_section(result.collaboration)
    return "\n".join(lines + _answer(result))


def answering_markdown(problem: str, result: Result, events: Iterable[Event] = ()) -> str:
    """Answer while thinking: the thoughts, the answer as the writer wrote it, the metrics, the timeline."""
    thinkers = result.workers[:-1]  # the writer comes last
    roles = f"answer while thinking: {len(thinkers)} thinker(s) ({', '.join(w.name for w in thinkers) or 'none'}) "
    lines = _head("Hogwild! transcript: answer while thinking", problem, result, roles + "and a writer")
    lines += ["## Thoughts", ""]
    for worker in thinkers:
        lines += [f"### {worker.name}", "", worker.text.strip() or "(nothing)", ""]
    if not thinkers:
        lines += ["(no thinking: the writer answered at once)", ""]
    lines += ["## Answer as written", "", result.answering.get("text", "").strip() or "(nothing written)", ""]
    lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {label} | {'-' if result.answering.get(key) is None else result.answering[key]} |"
              for key, label in METRICS.items()]
    timeline = [_moment(e) for e in events if isinstance(e, (ModeEvent, ProbeEvent, FirstAnswerTokenEvent))]
    if timeline:
        lines += ["", "## Timeline", "", *timeline]
    return "\n".join([*lines, "", *_answer(result)])


def _moment(event: ModeEvent | ProbeEvent | FirstAnswerTokenEvent) -> str:
    if isinstance(event, ModeEvent):
        return f"- pass {event.forward_passes}: mode {event.mode}"
    if isinstance(event, ProbeEvent):
        return (f"- pass {event.forward_passes}: probe ({event.reason}), P(yes) {event.p_yes:.3f}, "
                f"P(no) {event.p_no:.3f}: {'yes' if event.ready else 'no'}")
    return f"- pass {event.forward_passes}: first answer token ({event.elapsed_s:.1f} s)"


def collaboration_section(collaboration: dict) -> list[str]:
    """Markdown lines: per worker its duplication and, when recorded, its attention shares."""
    if not collaboration:
        return []
    lines = ["## Collaboration", "", "(definitions: docs/collaboration.md)", ""]
    attention = collaboration.get("attention")
    if attention:
        lines += ["Attention shares, run average (each row sums to 100 %):", "",
                  "| worker | prompt | history | protocol | own | " + " | ".join(attention) + " |",
                  "|---" * (5 + len(attention)) + "|"]
        for name, s in attention.items():
            cells = [s["prompt"], s["history"], s["protocol"], s["own"]]
            cells += ["-" if other == name else s["others"][other] for other in attention]
            lines.append(f"| {name} | " + " | ".join(c if c == "-" else f"{100 * c:.1f} %" for c in cells) + " |")
        lines.append("")
    lines += ["| worker | steps | 8-grams seen in others' earlier steps | repeated lines | names others | "
              "checks (yes) | changed course |", "|---|---|---|---|---|---|---|"]
    for name, d in collaboration["duplication"].items():
        mentions = ", ".join(f"{other} {n}" for other, n in d["mentions"].items()) or "-"
        lines.append(f"| {name} | {d['steps']} | {100 * d['ngram_overlap']:.1f} % | {d['repeated_lines']} of "
                     f"{d['lines']} | {mentions} | {d['checks']} ({d['checks_yes']}) | {d['changed_course']} |")
    return [*lines, ""]


def write_atomically(path: str | Path, text: str) -> None:
    """Write text to path via a temporary file and a rename, so it is never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
