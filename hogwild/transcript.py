"""A readable Markdown transcript of a collaboration, built from a Result."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .engine.events import Result


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
    answer = result.answer if result.answer is not None else "(none)"
    lines += ["## Answer", "", f"{answer} (by {result.answered_by or 'nobody'})", ""]
    return "\n".join(lines)


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
