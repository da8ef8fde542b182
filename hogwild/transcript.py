"""A readable Markdown transcript of a collaboration, built from a Result."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from . import Result


def to_markdown(problem: str, result: Result) -> str:
    lines = [
        "# Hogwild! transcript",
        "",
        f"- model: {result.model}",
        f"- layout: {result.layout}, workers: {', '.join(w.name for w in result.workers)}",
        f"- forward passes: {result.forward_passes}, tokens generated: {result.tokens_generated}, "
        f"time: {result.elapsed_s:.1f} s" + (" (interrupted)" if result.interrupted else ""),
        "",
        "## Problem",
        "",
        problem.strip(),
        "",
        "## Finished steps, in the order they were finished",
        "",
    ]
    for step in result.history:
        lines += [f"**{step.worker} [{step.step}]:** {step.text.strip()}", ""]
    if not result.history:
        lines += ["(none)", ""]
    lines += ["## Each worker's full text", ""]
    for worker in result.workers:
        lines += [f"### {worker.name}", "", worker.text.strip() or "(nothing)", ""]
    lines += collaboration_section(result.collaboration)
    answer = result.answer if result.answer is not None else "(none)"
    lines += ["## Answer", "", f"{answer} (by {result.answered_by or 'nobody'})", ""]
    return "\n".join(lines)


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
