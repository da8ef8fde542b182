"""The live terminal views of ``hogwild solve``: ``LiveView`` (history on top, one column per worker,
progress) and, for ``solve --async``, ``AnsweringView`` (the thoughts, a column per thinker, above the
answer pane that fills at the same time; the mode, the probes and the first answer token)."""

from __future__ import annotations

import time

from rich.console import Group
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from . import (
    AnswerEvent,
    Event,
    FirstAnswerTokenEvent,
    ModeEvent,
    PassEvent,
    ProbeEvent,
    StepEvent,
    StepStartEvent,
    TokenEvent,
)

COLOURS = ("cyan", "magenta", "green", "yellow", "blue", "red", "bright_cyan", "bright_magenta")
#: What each mode of answer while thinking means for the answer pane.
MODES = {
    "think": "the writer waits for the thoughts",
    "both": "writing while thinking",
    "write": "writing (the thinking is over)",
}


class PassProgress:
    """The progress bar: forward passes of the budget, time, tokens per second."""

    def __init__(self, budget: int):
        self.bar = Progress(
            TextColumn("[bold]forward passes"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[rate]}"),
        )
        self.task = self.bar.add_task("passes", total=budget, rate="")

    def update(self, event: PassEvent) -> None:
        rate = event.tokens_generated / max(event.elapsed_s, 1e-9)
        self.bar.update(self.task, completed=event.forward_passes, rate=f"{rate:.1f} tokens/s")


def tail(text: str, lines: int) -> str:
    """The last ``lines`` lines of text, stripped."""
    return "\n".join(text.strip().splitlines()[-lines:])


def columns(panels: list[Panel]) -> Table:
    """Panels side by side, equal widths."""
    grid = Table.grid(expand=True)
    for _ in panels:
        grid.add_column(ratio=1)
    grid.add_row(*panels)
    return grid


def answer_panel(answer: str | None, answered_by: str) -> Panel:
    return Panel(Text(str(answer)), title=f"answer (by {answered_by})", style="bold")


class LiveView:
    """Keeps what the terminal shows, updated event by event; ``render`` draws it."""

    def __init__(self, names: list[str], budget: int, history_lines: int = 12, step_lines: int = 14):
        self.names = names
        self.current = ["" for _ in names]
        self.history: list[tuple[int, str]] = []
        self.answer: str | None = None
        self.answered_by = ""
        self.tokens = 0
        self.history_lines = history_lines
        self.step_lines = step_lines
        self.started = time.perf_counter()
        self.progress = PassProgress(budget)

    def update(self, event: Event) -> None:
        if isinstance(event, TokenEvent):
            self.current[event.worker_index] += event.text
        elif isinstance(event, StepStartEvent):
            self.current[event.worker_index] = event.text
        elif isinstance(event, StepEvent):
            self.history.append((event.worker_index, f"[{event.step}] {event.text.strip()}"))
        elif isinstance(event, PassEvent):
            self.tokens = event.tokens_generated
            self.progress.update(event)
        elif isinstance(event, AnswerEvent):
            self.answer, self.answered_by = event.answer, event.answered_by

    def render(self) -> Group:
        history = Text()
        for index, line in self.history[-self.history_lines :]:
            history.append(f"{self.names[index]} ", style=f"bold {COLOURS[index % len(COLOURS)]}")
            history.append(line + "\n")
        panels = [
            Panel(
                Text(tail(text, self.step_lines)),
                title=f"[bold {COLOURS[i % len(COLOURS)]}]{name}",
                border_style=COLOURS[i % len(COLOURS)],
                height=self.step_lines + 2,
            )
            for i, (name, text) in enumerate(zip(self.names, self.current, strict=True))
        ]
        parts = [
            Panel(history or Text("(no finished steps yet)", style="dim"), title="shared history"),
            columns(panels),
            self.progress.bar,
        ]
        if self.answer is not None or self.answered_by:
            parts.append(answer_panel(self.answer, self.answered_by))
        return Group(*parts)


class AnsweringView:
    """The live view of ``solve --async``, updated event by event; ``render`` draws it: a thoughts
    pane per thinker (none with 0 thinkers), the answer pane below them, a status line (mode, probes,
    first answer token) and the progress bar."""

    def __init__(self, thinkers: int, budget: int, thought_lines: int = 12, answer_lines: int = 10):
        self.names = [f"thinker {i + 1}" for i in range(thinkers)]  # the engine's names, from their first tokens
        self.thoughts = ["" for _ in range(thinkers)]
        self.written = ""
        self.mode = "think" if thinkers else "write"
        self.probes: list[ProbeEvent] = []
        self.first: FirstAnswerTokenEvent | None = None
        self.answer: str | None = None
        self.answered_by = ""
        self.thought_lines, self.answer_lines = thought_lines, answer_lines
        self.progress = PassProgress(budget)

    def update(self, event: Event) -> None:
        if isinstance(event, TokenEvent):
            if event.role == "writer":
                self.written += event.text
            else:
                self.names[event.worker_index] = event.worker
                self.thoughts[event.worker_index] += event.text
        elif isinstance(event, ModeEvent):
            self.mode = event.mode
        elif isinstance(event, ProbeEvent):
            self.probes.append(event)
        elif isinstance(event, FirstAnswerTokenEvent):
            self.first = event
        elif isinstance(event, PassEvent):
            self.progress.update(event)
        elif isinstance(event, AnswerEvent):
            self.answer, self.answered_by = event.answer, event.answered_by

    def status(self) -> Text:
        """Two lines: the mode; the probes so far (the last one's P(yes), P(no)), the first answer token."""
        line = Text()
        line.append("mode: ", style="bold")
        line.append(f"{self.mode} ({MODES[self.mode]})" if self.names else "write (no thinking)")
        line.append("\nprobes: ", style="bold")
        if self.probes:
            last = self.probes[-1]
            yes = sum(p.ready for p in self.probes)
            line.append(f"{len(self.probes)} ({yes} yes); last at pass {last.forward_passes} ({last.reason}): "
                        f"P(yes) {last.p_yes:.3f}, P(no) {last.p_no:.3f} -> {'yes' if last.ready else 'no'}")
        else:
            line.append("none yet")
        line.append("  first answer token: ", style="bold")
        line.append("not yet" if self.first is None else
                    f"pass {self.first.forward_passes}, {self.first.elapsed_s:.1f} s")
        return line

    def writer_state(self) -> str:
        """"not started", "writing", "paused" or "done"."""
        if self.answered_by:
            return "done"
        if self.mode != "think":
            return "writing"
        return "not started" if self.first is None else "paused"

    def render(self) -> Group:
        thoughts = [
            Panel(Text(tail(text, self.thought_lines)), title=f"[bold {COLOURS[i % len(COLOURS)]}]{name} (thinking)",
                  border_style=COLOURS[i % len(COLOURS)], height=self.thought_lines + 2)
            for i, (name, text) in enumerate(zip(self.names, self.thoughts, strict=True))
        ]
        state = self.writer_state()
        answer = Panel(
            Text(tail(self.written, self.answer_lines) or "(nothing written yet)", style="" if self.written else "dim"),
            title=f"[bold]answer, as written ({state})", height=self.answer_lines + 2,
            border_style={"writing": "green", "done": "bold"}.get(state, "yellow"),
        )
        parts = [columns(thoughts)] if thoughts else []
        parts += [answer, self.status(), self.progress.bar]
        if self.answer is not None or self.answered_by:
            parts.append(answer_panel(self.answer, self.answered_by))
        return Group(*parts)
