"""Reports: the summary (accuracy ± standard error per method and budget, with the rows' mean
collaboration measures and, for answering methods, the first answer token), its table,
``accuracy.png`` and ``collaboration.png``."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import ANSWERING, BASELINES, HOGWILD_LAYOUTS, EvalConfig
from .data import Problem
from .store import ResultRow, latest, rounded_mean


@dataclass
class SummaryCell:
    """Accuracy of one method at one budget, and the means of the rows' collaboration measures
    (None where no row has them). Answering methods: the mean forward passes and seconds to the first
    answer token, a run whose writer wrote nothing counted at its end (the finisher's answer is the
    first the user sees), and ``writer_started``, the share of runs whose writer wrote."""

    accuracy: float
    stderr: float
    n: int
    duplication: float | None = None
    others_attention: float | None = None
    first_answer_passes: float | None = None
    first_answer_s: float | None = None
    writer_started: float | None = None


@dataclass
class Summary:
    """summary.json: per method, per budget, a ``SummaryCell``."""

    dataset: str
    n: int
    methods: dict[str, dict[int, SummaryCell]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "n": self.n,
            "methods": {
                m: {str(b): {k: v for k, v in asdict(cell).items() if v is not None} for b, cell in cells.items()}
                for m, cells in self.methods.items()
            },
        }


def summarize(rows: Iterable[ResultRow], config: EvalConfig, problems: Sequence[Problem]) -> Summary:
    """Accuracy and its standard error sqrt(p(1-p)/n) per method and budget."""
    by_key = latest(rows)
    summary = Summary(config.label, len(problems))
    for method in config.methods:
        cells = {}
        for budget in sorted(config.budgets):
            found = [by_key[(p.id, method, budget)] for p in problems if (p.id, method, budget) in by_key]
            n = len(found)
            p = sum(r.correct for r in found) / n if n else 0.0
            cells[budget] = SummaryCell(
                round(p, 4), round(math.sqrt(p * (1 - p) / n), 4) if n else 0.0, n,
                rounded_mean([r.duplication for r in found if r.duplication is not None]),
                rounded_mean([r.others_attention for r in found if r.others_attention is not None]),
                **(first_answer(found) if method in ANSWERING else {}),
            )
        summary.methods[method] = cells
    return summary


def first_answer(rows: Sequence[ResultRow]) -> dict[str, float | None]:
    """SummaryCell's first-answer fields over an answering method's rows (a row without a writer
    token counts at its end)."""
    return {
        "first_answer_passes": rounded_mean([
            r.forward_passes if r.first_answer_passes is None else r.first_answer_passes for r in rows
        ]),
        "first_answer_s": rounded_mean([r.elapsed_s if r.first_answer_s is None else r.first_answer_s for r in rows]),
        "writer_started": rounded_mean([float(r.first_answer_passes is not None) for r in rows]),
    }


def method_label(method: str, config: EvalConfig) -> str:
    if method in HOGWILD_LAYOUTS:
        return f"{method} ({config.workers} workers)"
    if method == "independent":
        return f"independent ({config.workers}, vote)"
    if method == "answering":
        return f"answering ({config.thinkers} thinker{'s' if config.thinkers > 1 else ''}, a writer)"
    if method == "nothink":
        return "no thinking (the writer alone)"
    return "single worker"


def plot_accuracy(summary: Summary, config: EvalConfig, path: Path, title: str) -> None:
    """accuracy.png: accuracy (with standard errors) against forward passes, a line per method."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    budgets = sorted(config.budgets)
    for i, (method, cells) in enumerate(summary.methods.items()):
        xs = [b for b in budgets if cells[b].n]
        if not xs:
            continue
        ax.errorbar(
            xs, [100 * cells[b].accuracy for b in xs], yerr=[100 * cells[b].stderr for b in xs],
            marker="osD^v<>"[i % 7], linestyle="--" if method in BASELINES else "-", capsize=3,
            label=method_label(method, config),
        )
    ax.set_xlabel("sequential forward passes (budget)")
    ax.set_ylabel("accuracy, %")
    ax.set_xticks(budgets)
    highest = max((100 * (c.accuracy + c.stderr) for cells in summary.methods.values() for c in cells.values()),
                  default=0.0)
    ax.set_ylim(0, min(105.0, max(10.0, 1.15 * highest)))  # a flat 0 % line still shows a scale
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    if ax.has_data():
        ax.legend()
    fig.savefig(path, dpi=120)


def plot_collaboration(curves: dict[str, dict[str, list[float]]], path: Path, title: str) -> None:
    """collaboration.png: the mean over problems of the attention share on others' current steps
    against forward passes, a line per layout (``curves`` as ``store.read_curves`` gives them)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    for layout, runs in curves.items():
        length = max(len(v) for v in runs.values())
        ys = [[v[k] for v in runs.values() if k < len(v)] for k in range(length)]
        ax.plot(range(1, length + 1), [100 * sum(y) / len(y) for y in ys], label=f"{layout} ({len(runs)} runs)")
    ax.set_xlabel("forward pass")
    ax.set_ylabel("attention on other workers' current steps, %")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    if ax.has_data():
        ax.legend()
    fig.savefig(path, dpi=120)


def print_table(summary: Summary, config: EvalConfig, file=None) -> None:
    """The summary as a rich table: accuracy ± standard error, with n where a cell lacks rows; for
    answering methods a second line, the mean passes and seconds to the first answer token."""
    from rich.console import Console
    from rich.table import Table

    budgets = sorted(config.budgets)
    title = f"{summary.dataset}: accuracy ± standard error ({summary.n} problems)"
    if any(m in ANSWERING for m in summary.methods):
        title += "; answering: first answer token (passes / s)"
    table = Table(title=title)
    table.add_column("method")
    for b in budgets:
        table.add_column(f"{b} passes", justify="right")
    for method, cells in summary.methods.items():
        table.add_row(method_label(method, config), *(cell_text(cells[b], summary.n) for b in budgets))
    Console(file=file or sys.stdout).print(table)


def cell_text(cell: SummaryCell, n: int) -> str:
    text = f"{100 * cell.accuracy:.1f} ± {100 * cell.stderr:.1f} %" + ("" if cell.n == n else f" (n={cell.n})")
    if cell.first_answer_passes is not None:
        text += f"\nfirst token {cell.first_answer_passes:.1f} / {cell.first_answer_s:.1f} s"
    return text
