"""The live terminal view of ``hogwild solve``: history on top, one column per worker, progress."""

from __future__ import annotations

import time

from rich.console import Group
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from . import AnswerEvent, Event, PassEvent, StepEvent, StepStartEvent, TokenEvent

COLOURS = ("cyan", "magenta", "green", "yellow", "blue", "red", "bright_cyan", "bright_magenta")


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
        self.progress = Progress(
            TextColumn("[bold]forward passes"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[rate]}"),
        )
        self.task = self.progress.add_task("passes", total=budget, rate="")

    def update(self, event: Event) -> None:
        if isinstance(event, TokenEvent):
            self.current[event.worker_index] += event.text
        elif isinstance(event, StepStartEvent):
            self.current[event.worker_index] = event.text
        elif isinstance(event, StepEvent):
            self.history.append((event.worker_index, f"[{event.step}] {event.text.strip()}"))
        elif isinstance(event, PassEvent):
            rate = event.tokens_generated / max(event.elapsed_s, 1e-9)
            self.tokens = event.tokens_generated
            self.progress.update(self.task, completed=event.forward_passes, rate=f"{rate:.1f} tokens/s")
        elif isinstance(event, AnswerEvent):
            self.answer, self.answered_by = event.answer, event.answered_by

    def _tail(self, text: str, lines: int) -> str:
        return "\n".join(text.strip().splitlines()[-lines:])

    def render(self) -> Group:
        history = Text()
        for index, line in self.history[-self.history_lines :]:
            history.append(f"{self.names[index]} ", style=f"bold {COLOURS[index % len(COLOURS)]}")
            history.append(line + "\n")
        panels = [
            Panel(
                Text(self._tail(text, self.step_lines)),
                title=f"[bold {COLOURS[i % len(COLOURS)]}]{name}",
                border_style=COLOURS[i % len(COLOURS)],
                height=self.step_lines + 2,
            )
            for i, (name, text) in enumerate(zip(self.names, self.current, strict=True))
        ]
        columns = Table.grid(expand=True)
        for _ in panels:
            columns.add_column(ratio=1)
        columns.add_row(*panels)
        parts = [
            Panel(history or Text("(no finished steps yet)", style="dim"), title="shared history"),
            columns,
            self.progress,
        ]
        if self.answer is not None or self.answered_by:
            parts.append(Panel(Text(str(self.answer)), title=f"answer (by {self.answered_by})", style="bold"))
        return Group(*parts)
