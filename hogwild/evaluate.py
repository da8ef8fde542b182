"""``hogwild eval``: accuracy against the budget of sequential forward passes, with baselines.

Every (problem, method) is run once up to the largest budget and snapshotted at every budget
(the state after that many forward passes, finished by the finisher when no worker has answered
yet), so one run gives a row per budget. Methods:

- a hogwild layout (``combined``, ``contiguous``, ``interleaved``) with K workers;
- ``single``: one worker with the same forward-pass budget;
- ``independent``: K workers that never see each other; the answer is the majority vote of their
  answers (self-consistency), equal answers grouped by math-verify.

``single`` and ``independent`` come from one batched run of K one-worker sessions (seeds derived
from ``--seed``): ``single`` is the first of them, ``independent`` votes over all K. Answers are
checked with math-verify. DIR gets ``results.jsonl`` (appended one (problem, method) at a time, so
a rerun with the same DIR skips what is done), ``summary.json``, ``accuracy.png`` and ``run.json``
(the settings that must match to resume). Each row of a hogwild layout carries its duplication
(mean over workers of the 8-gram overlap with others' earlier steps) and, with ``--collab-stats``,
its mean attention share on the other workers' current steps; then ``collab.jsonl`` gets each
run's share on others per forward pass, and ``collaboration.png`` plots it (docs/collaboration.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ContextOverflowError, InputError

log = logging.getLogger(__name__)

#: Named datasets: files in ``<repo>/../shared/data`` (or ``$HOGWILD_DATA``).
DATASETS = {
    "gsm8k": "gsm8k_dev.jsonl",
    "math500": "math500.jsonl",
    "aime24": "aime24.jsonl",
    "amc23": "amc23.jsonl",
}
HOGWILD_LAYOUTS = ("combined", "contiguous", "interleaved")
BASELINES = ("single", "independent")
#: Settings a resumed run must share with the rows already in DIR.
RUN_KEYS = ("dataset", "model", "dtype", "quantize", "workers", "seed", "temperature", "top_p", "collab_every")


# -- configuration and rows ---------------------------------------------------------------------
@dataclass(frozen=True)
class Problem:
    """One dataset row."""

    id: str
    problem: str
    answer: str


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation. ``model`` is what --model said (None: the embedded model)."""

    dataset: str
    out: Path
    limit: int | None = None
    workers: int = 2
    layouts: tuple[str, ...] = ("combined",)
    baselines: tuple[str, ...] = BASELINES
    budgets: tuple[int, ...] = (128, 256, 512)
    seed: int = 0
    temperature: float = 0.6
    top_p: float = 0.95
    collab_every: int | None = None
    model: str | None = None
    dtype: str = "float32"
    quantize: str | None = None  # --quantize (hogwild.models.quantize.SCHEMES)
    batch: int = 1  # runs in flight at once, their workers sharing each forward pass
    collab_stats: bool = False  # attention shares every pass (collab.jsonl, collaboration.png)

    @property
    def methods(self) -> tuple[str, ...]:
        return self.layouts + self.baselines

    @property
    def label(self) -> str:
        """The dataset's short name: a named dataset, or a file's name."""
        return self.dataset if self.dataset in DATASETS else Path(self.dataset).name

    def check(self) -> None:
        for layout in self.layouts:
            if layout not in HOGWILD_LAYOUTS:
                hint = "; use --baselines independent" if layout == "independent" else ""
                raise InputError(f"unknown layout {layout!r}; choose from {', '.join(HOGWILD_LAYOUTS)}{hint}")
        for baseline in self.baselines:
            if baseline not in BASELINES:
                raise InputError(f"unknown baseline {baseline!r}; choose from {', '.join(BASELINES)}")
        if not self.methods:
            raise InputError("nothing to evaluate: give at least one layout or baseline")
        if len(set(self.methods)) != len(self.methods):
            raise InputError("a method is listed twice")
        if not self.budgets or any(b < 1 for b in self.budgets):
            raise InputError(f"budgets must be positive forward-pass counts, got {list(self.budgets)}")
        if self.limit is not None and self.limit < 1:
            raise InputError(f"--limit must be at least 1, got {self.limit}")
        if self.workers < 1:
            raise InputError(f"--workers must be at least 1, got {self.workers}")
        if self.batch < 1:
            raise InputError(f"--batch must be at least 1, got {self.batch}")

    def run_info(self) -> dict[str, Any]:
        """What run.json records: the settings that decide the rows."""
        return {
            "dataset": self.label, "model": self.model or "embedded", "dtype": self.dtype, "quantize": self.quantize,
            "workers": self.workers, "seed": self.seed, "temperature": self.temperature,
            "top_p": self.top_p, "collab_every": self.collab_every,
        }


@dataclass
class Row:
    """One line of results.jsonl: a method's answer to a problem at a budget of forward passes.

    ``answer`` is the raw answer (a worker's \\boxed{} content, the finisher's or the vote's),
    ``extracted`` what math-verify made of it. For ``independent``, ``votes`` holds each worker's
    answer, ``tokens`` their sum and ``forward_passes`` the largest. ``elapsed_s`` is the wall time
    of the run up to that snapshot (for single/independent: the one batched run of both).
    """

    id: str
    method: str
    budget: int
    answer: str | None
    extracted: str | None
    reference: str
    correct: bool
    answered_by: str
    tokens: int
    forward_passes: int
    elapsed_s: float
    seed: int
    votes: list[str | None] | None = None
    error: str | None = None
    duplication: float | None = None  # hogwild layouts: mean over workers of the 8-gram overlap
    others_attention: float | None = None  # with --collab-stats: mean share on others' current steps

    def key(self) -> tuple[str, str, int]:
        return self.id, self.method, self.budget


@dataclass(frozen=True)
class Snapshot:
    """What one run gives at one budget (a SnapshotEvent, reduced)."""

    budget: int
    answer: str | None
    answered_by: str
    forward_passes: int
    tokens: int
    elapsed_s: float
    collaboration: dict = field(default_factory=dict)


@dataclass
class Cell:
    """Accuracy of one method at one budget, and the means of the rows' collaboration measures
    (None where no row has them)."""

    accuracy: float
    stderr: float
    n: int
    duplication: float | None = None
    others_attention: float | None = None


@dataclass
class Summary:
    dataset: str
    n: int
    methods: dict[str, dict[int, Cell]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "n": self.n,
            "methods": {
                m: {str(b): {k: v for k, v in asdict(cell).items() if v is not None} for b, cell in cells.items()}
                for m, cells in self.methods.items()
            },
        }


# -- datasets -----------------------------------------------------------------------------------
def data_dir() -> Path:
    """``$HOGWILD_DATA``, else ``shared/data`` next to the repository."""
    env = os.environ.get("HOGWILD_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def resolve_dataset(name: str) -> Path:
    """A named dataset's file, or ``name`` itself as a path to a JSONL file."""
    if name in DATASETS:
        path = data_dir() / DATASETS[name]
        if not path.is_file():
            raise InputError(
                f"dataset {name!r} not found at {path}; set HOGWILD_DATA to the folder holding {DATASETS[name]}"
            )
        return path
    path = Path(name)
    if not path.is_file():
        raise InputError(f"no dataset {name!r}: give one of {', '.join(DATASETS)} or a path to a .jsonl file")
    return path


def load_problems(path: Path, limit: int | None = None) -> list[Problem]:
    """The first ``limit`` rows of a JSONL file of ``{"id", "problem", "answer"}`` objects."""
    problems: list[Problem] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                problem = Problem(str(data["id"]), str(data["problem"]), str(data["answer"]))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise InputError(
                    f"{path}:{number}: expected a JSON object with id, problem and answer ({exc})"
                ) from None
            if problem.id in seen:
                raise InputError(f"{path}:{number}: the id {problem.id!r} appears twice")
            seen.add(problem.id)
            problems.append(problem)
            if limit is not None and len(problems) >= limit:
                break
    if not problems:
        raise InputError(f"{path} holds no problems")
    return problems


# -- answers ------------------------------------------------------------------------------------
THOUSANDS = re.compile(r"^(-?)(\d{1,3}(?:,\d{3})+)(\.\d+)?$")
#: "18 dollars", "$12 per hour": a number followed by plain words only.
NUMBER_THEN_WORDS = re.compile(r"^(\\?\$?\s*-?\d[\d,]*(?:\.\d+)?)\s*((?:[A-Za-z]+\.?\s*)+)$")
MATH_WORDS = {"pi", "sqrt", "log", "ln", "sin", "cos", "tan", "e", "i", "x", "y", "n", "and", "or"}


def normalize_answer(answer: str) -> str:
    """Trim an answer for parsing: trailing punctuation, thousands separators, unit words."""
    text = answer.strip().rstrip(".;:,").strip()
    match = NUMBER_THEN_WORDS.match(text)
    if match and not any(word.lower().rstrip(".") in MATH_WORDS for word in match.group(2).split()):
        text = match.group(1).strip()
    match = THOUSANDS.match(text)
    if match:
        text = match.group(1) + match.group(2).replace(",", "") + (match.group(3) or "")
    return text


def parse_answer(answer: str | None) -> list:
    """math-verify's parse of an answer (a \\boxed{} content, LaTeX or plain); [] if none."""
    from math_verify import parse

    if answer is None:
        return []
    text = normalize_answer(answer)
    if not text:
        return []
    return parse(f"${text}$") or parse(text)


def _shown(parsed: list) -> str | None:
    """The parsed answer as a string (math-verify's own string form when it gives one)."""
    if not parsed:
        return None
    return str(parsed[1]) if len(parsed) > 1 else str(parsed[0])


def check_answer(answer: str | None, reference: str) -> tuple[bool, str | None]:
    """(correct, extracted): is ``answer`` equivalent to ``reference``? A missing answer is wrong."""
    from math_verify import verify

    predicted = parse_answer(answer)
    if not predicted:
        return False, None
    gold = parse_answer(reference)
    if not gold:  # a reference math-verify cannot read: compare the texts
        return normalize_answer(answer or "") == normalize_answer(reference), _shown(predicted)
    return bool(verify(gold, predicted)), _shown(predicted)


def equivalent(a: str, b: str) -> bool:
    """Do two answers mean the same (math-verify, else the same normalised text)?"""
    from math_verify import verify

    pa, pb = parse_answer(a), parse_answer(b)
    if pa and pb:
        return bool(verify(pa, pb)) or bool(verify(pb, pa))
    return normalize_answer(a) == normalize_answer(b)


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most frequent answer, equivalent answers counted together; ties go to the group seen
    first; missing answers do not vote. Returns the group's first answer as written."""
    groups: list[list[str]] = []
    for answer in answers:
        if answer is None or not answer.strip():
            continue
        for group in groups:
            if equivalent(group[0], answer):
                group.append(answer)
                break
        else:
            groups.append([answer])
    if not groups:
        return None
    return max(groups, key=len)[0]  # max keeps the first of equal-sized groups


# -- running ------------------------------------------------------------------------------------
def derive_seed(seed: int, problem_id: str, label: str) -> int:
    """A fixed seed per (run seed, problem, method or worker), the same on every machine."""
    digest = hashlib.sha256(f"{seed}/{problem_id}/{label}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def _sampling(config: EvalConfig):
    from .sampling import SamplingParams

    return SamplingParams(temperature=config.temperature, top_p=config.top_p)


def _reduce(event) -> Snapshot:
    return Snapshot(event.budget, event.answer, event.answered_by, event.forward_passes,
                    event.tokens_generated, event.elapsed_s, event.collaboration)


def groups(methods: Sequence[str]) -> list[list[str]]:
    """How methods run: each hogwild layout alone, the baselines together in one run."""
    baselines = [m for m in methods if m in BASELINES]
    return [[m] for m in methods if m in HOGWILD_LAYOUTS] + ([baselines] if baselines else [])


@dataclass
class Job:
    """One run in flight: a hogwild layout (one session of K workers), or the baselines (one-worker
    sessions: the first is ``single``, all K vote for ``independent``)."""

    problem: Problem
    group: list[str]
    seeds: list[int]
    sessions: list
    snapshots: list[list[Snapshot]]
    others: list[float] = field(default_factory=list)  # collab_stats: share on others per pass (session 0)

    @property
    def done(self) -> bool:
        return all(s.done for s in self.sessions)

    def close(self) -> None:
        for session in self.sessions:
            session.close()


def make_job(engine, problem: Problem, group: Sequence[str], config: EvalConfig) -> Job:
    """The sessions of one (problem, group) run, not started yet. Raises ContextOverflowError."""
    from .engine.session import SolveConfig

    budgets = tuple(sorted(config.budgets))
    if group[0] in HOGWILD_LAYOUTS:
        seeds = [derive_seed(config.seed, problem.id, group[0])]
        workers, layout = config.workers, group[0]
    else:
        count = config.workers if "independent" in group else 1
        seeds = [derive_seed(config.seed, problem.id, f"solo-{i}") for i in range(count)]
        workers, layout = 1, "independent"
    sessions = [
        engine.session(problem.problem, SolveConfig(
            workers, layout, budgets[-1], _sampling(config), seed, config.collab_every, budgets,
            config.collab_stats,
        ))
        for seed in seeds
    ]
    return Job(problem, list(group), seeds, sessions, [[] for _ in seeds])


def job_rows(job: Job) -> list[Row]:
    """The rows of a finished job: one per method and budget."""
    problem, runs = job.problem, job.snapshots
    if job.group[0] in HOGWILD_LAYOUTS:
        return [_row(problem, job.group[0], s, job.seeds[0], collaboration=True) for s in runs[0]]
    rows = []
    if "single" in job.group:
        rows += [_row(problem, "single", s, job.seeds[0]) for s in runs[0]]
    if "independent" in job.group:
        for snaps in zip(*runs, strict=True):
            votes = [s.answer for s in snaps]
            merged = Snapshot(
                snaps[0].budget, majority_vote(votes), "vote", max(s.forward_passes for s in snaps),
                sum(s.tokens for s in snaps), max(s.elapsed_s for s in snaps),
            )
            rows.append(_row(problem, "independent", merged, job.seeds[0], votes))
    return rows


def _row(problem: Problem, method: str, snap: Snapshot, seed: int, votes: list | None = None,
         collaboration: bool = False) -> Row:
    """collaboration: fill ``duplication`` and ``others_attention`` from the snapshot (hogwild layouts)."""
    from .collaboration import on_others

    correct, extracted = check_answer(snap.answer, problem.answer)
    dup = attention = None
    if collaboration:
        dup = _mean([d["ngram_overlap"] for d in snap.collaboration["duplication"].values()])
        if "attention" in snap.collaboration:
            attention = _mean([on_others(a) for a in snap.collaboration["attention"].values()])
    return Row(
        problem.id, method, snap.budget, snap.answer, extracted, problem.answer, correct, snap.answered_by,
        snap.tokens, snap.forward_passes, round(snap.elapsed_s, 3), seed, votes, duplication=dup,
        others_attention=attention,
    )


def _mean(values: Sequence[float]) -> float | None:
    return round(sum(values) / len(values), 6) if values else None


def _overflow_rows(problem: Problem, group: Sequence[str], config: EvalConfig, error: str) -> list[Row]:
    """A problem that does not fit the model's context counts as unanswered."""
    return [
        Row(problem.id, m, b, None, None, problem.answer, False, "", 0, 0, 0.0, 0, error=error)
        for m in group for b in sorted(config.budgets)
    ]


def run_jobs(
    engine,
    todo: Iterable[tuple[Problem, list[str]]],
    config: EvalConfig,
    on_rows: Callable[[list[Row]], None],
    on_pass: Callable[[int], None] = lambda live: None,
    on_curve: Callable[[Job], None] = lambda job: None,
) -> None:
    """Run (problem, group) jobs, up to ``config.batch`` at a time, every worker of every job in
    flight in one forward pass per step (as ``Engine.stream`` runs one session). ``on_rows`` gets
    each job's rows as soon as it is done; ``on_pass`` the number of jobs in flight after a pass;
    ``on_curve`` (with ``collab_stats``) each done hogwild job, whose ``others`` holds its share on
    others per pass."""
    import torch

    from .collaboration import on_others
    from .engine.batch import BatchLoop
    from .engine.events import CollabEvent, SnapshotEvent

    loop = BatchLoop(engine.runner)
    owner = {}  # session -> (its job, its index in the job)
    queue = iter(todo)
    active: list[Job] = []
    try:
        with torch.no_grad():  # as Runner.forward: the cache is updated in place between passes
            while True:
                while len(active) < config.batch and (item := next(queue, None)) is not None:
                    problem, group = item
                    try:
                        job = make_job(engine, problem, group, config)
                    except ContextOverflowError as exc:
                        log.warning("%s: %s", problem.id, exc)
                        on_rows(_overflow_rows(problem, group, config, str(exc)))
                        continue
                    active.append(job)
                    for i, session in enumerate(job.sessions):
                        owner[session] = job, i
                        loop.add(session)
                if not active:
                    return
                for session, got in loop.step().sessions.items():
                    if got.error is not None:
                        raise got.error
                    job, i = owner[session]
                    if i == 0:
                        job.others += [_mean([on_others(s) for s in e.shares.values()]) for e in got.events
                                       if isinstance(e, CollabEvent)]
                    job.snapshots[i] += [_reduce(e) for e in got.events if isinstance(e, SnapshotEvent)]
                for job in [job for job in active if job.done]:
                    active.remove(job)
                    for session in job.sessions:
                        loop.remove(session)
                        del owner[session]
                    on_rows(job_rows(job))
                    if config.collab_stats and job.group[0] in HOGWILD_LAYOUTS:
                        on_curve(job)
                on_pass(len(active))
    finally:
        for job in active:
            job.close()


# -- results on disk ----------------------------------------------------------------------------
def read_rows(path: Path) -> list[Row]:
    """The rows in results.jsonl; a trailing partial line (an interrupted write) is cut off."""
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        log.warning("%s: dropping a partial last line (%d bytes)", path, len(data) - keep)
        with open(path, "r+b") as f:
            f.truncate(keep)
        data = data[:keep]
    rows = []
    for number, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(Row(**json.loads(line)))
        except (json.JSONDecodeError, TypeError) as exc:
            log.warning("%s:%d: skipping a bad line (%s)", path, number, exc)
    return rows


def append_rows(path: Path, rows: Iterable[Row]) -> None:
    """Append rows as whole lines in one write, flushed to disk."""
    text = "".join(json.dumps(asdict(row), ensure_ascii=False) + "\n" for row in rows)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def check_run_info(out: Path, config: EvalConfig) -> None:
    """Write run.json, or check that DIR's rows came from the same settings."""
    path = out / "run.json"
    info = config.run_info()
    if path.exists():
        old = json.loads(path.read_text())
        diff = [f"{k}: {old.get(k)!r} there, {info[k]!r} now" for k in RUN_KEYS if old.get(k) != info[k]]
        if diff:
            raise InputError(f"{out} holds results of other settings ({'; '.join(diff)}); use another --out")
        return
    path.write_text(json.dumps(info, indent=2) + "\n")


def latest(rows: Iterable[Row]) -> dict[tuple[str, str, int], Row]:
    """Rows by (id, method, budget), the last written winning."""
    return {row.key(): row for row in rows}


def summarize(rows: Iterable[Row], config: EvalConfig, problems: Sequence[Problem]) -> Summary:
    """Accuracy and its standard error sqrt(p(1-p)/n) per method and budget."""
    by_key = latest(rows)
    summary = Summary(config.label, len(problems))
    for method in config.methods:
        cells = {}
        for budget in sorted(config.budgets):
            found = [by_key[(p.id, method, budget)] for p in problems if (p.id, method, budget) in by_key]
            n = len(found)
            p = sum(r.correct for r in found) / n if n else 0.0
            cells[budget] = Cell(
                round(p, 4), round(math.sqrt(p * (1 - p) / n), 4) if n else 0.0, n,
                _mean([r.duplication for r in found if r.duplication is not None]),
                _mean([r.others_attention for r in found if r.others_attention is not None]),
            )
        summary.methods[method] = cells
    return summary


def method_label(method: str, workers: int) -> str:
    if method in HOGWILD_LAYOUTS:
        return f"{method} ({workers} workers)"
    if method == "independent":
        return f"independent ({workers}, vote)"
    return "single worker"


def plot(summary: Summary, config: EvalConfig, path: Path, title: str) -> None:
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
            label=method_label(method, config.workers),
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


def read_curves(path: Path) -> dict[str, dict[str, list[float]]]:
    """collab.jsonl: layout -> problem id -> share on others per forward pass (the last line wins)."""
    curves: dict[str, dict[str, list[float]]] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                data = json.loads(line)
                curves.setdefault(data["method"], {})[data["id"]] = data["others"]
    return curves


def plot_collaboration(curves: dict[str, dict[str, list[float]]], path: Path, title: str) -> None:
    """collaboration.png: the mean over problems of the attention share on others' current steps
    against forward passes, a line per layout."""
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
    from rich.console import Console
    from rich.table import Table

    budgets = sorted(config.budgets)
    table = Table(title=f"{summary.dataset}: accuracy ± standard error ({summary.n} problems)")
    table.add_column("method")
    for b in budgets:
        table.add_column(f"{b} passes", justify="right")
    for method, cells in summary.methods.items():
        table.add_row(method_label(method, config.workers), *(
            f"{100 * cells[b].accuracy:.1f} ± {100 * cells[b].stderr:.1f} %"
            + ("" if cells[b].n == summary.n else f" (n={cells[b].n})")
            for b in budgets
        ))
    Console(file=file or sys.stdout).print(table)


# -- the whole evaluation -----------------------------------------------------------------------
def evaluate(config: EvalConfig, load_engine: Callable[[], Any]) -> Summary:
    """Run what DIR lacks, then write summary.json and accuracy.png; returns the summary.

    ``load_engine`` is called only when something is left to run.
    """
    from tqdm import tqdm

    config.check()
    problems = load_problems(resolve_dataset(config.dataset), config.limit)
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    check_run_info(out, config)
    results = out / "results.jsonl"
    done = set(latest(read_rows(results)))
    budgets = sorted(config.budgets)
    todo = [
        (p, group)
        for p in problems
        for group in groups([m for m in config.methods if any((p.id, m, b) not in done for b in budgets)])
    ]
    skipped = len(problems) * len(config.methods) - sum(len(group) for _, group in todo)
    if skipped:
        log.info("%s: %d (problem, method) runs already done", results, skipped)
    if todo:
        engine = load_engine()
        bar = tqdm(total=sum(len(group) for _, group in todo), unit="run", desc=f"eval {config.label}",
                   file=sys.stderr, mininterval=1.0, dynamic_ncols=True)
        passes = 0

        def on_pass(in_flight: int) -> None:
            nonlocal passes
            passes += 1
            if passes % 16 == 0:
                bar.set_postfix_str(f"pass {passes}, {in_flight} in flight")

        def on_rows(rows: list[Row]) -> None:
            append_rows(results, rows)
            for row in rows:
                if row.budget == budgets[-1]:
                    log.info("%s %s: %r (%s), reference %r", row.id, row.method, row.answer,
                             "right" if row.correct else "wrong", row.reference)
            bar.update(len({row.method for row in rows}))

        def on_curve(job: Job) -> None:
            line = {"id": job.problem.id, "method": job.group[0], "others": job.others}
            with open(out / "collab.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")

        try:
            run_jobs(engine, todo, config, on_rows, on_pass, on_curve)
        finally:
            bar.close()
    summary = summarize(read_rows(results), config, problems)
    (out / "summary.json").write_text(json.dumps(summary.to_json(), indent=2) + "\n")
    model = config.model or "SmolLM2-135M-Instruct"
    plot(summary, config, out / "accuracy.png", f"{config.label}, {model}, {summary.n} problems")
    curves = read_curves(out / "collab.jsonl")
    if curves:
        plot_collaboration(curves, out / "collaboration.png", f"{config.label}, {model}: who reads whom")
    return summary


# -- command line -------------------------------------------------------------------------------
def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _budgets(text: str) -> tuple[int, ...]:
    try:
        return tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"budgets must be comma-separated integers, got {text!r}") from None


def register(sub) -> None:
    from .cli_args import add_model_arguments

    p = sub.add_parser(
        "eval", help="accuracy against forward passes: hogwild layouts vs one worker and independent workers",
        description="Accuracy against the budget of sequential forward passes, with baselines; "
                    "resumable (a rerun with the same --out skips finished runs).",
    )
    p.add_argument("--dataset", required=True, help=f"{', '.join(DATASETS)} or a path to a .jsonl file")
    p.add_argument("--limit", type=int, default=None, help="only the first N problems")
    p.add_argument("--workers", type=int, default=2, help="K: workers of each layout and of 'independent'")
    p.add_argument("--layouts", type=_names, default=("combined",),
                   help=f"comma-separated, from {', '.join(HOGWILD_LAYOUTS)} ('' for none)")
    p.add_argument("--baselines", type=_names, default=BASELINES,
                   help="comma-separated, from single, independent ('' for none)")
    p.add_argument("--budgets", type=_budgets, default=(128, 256, 512), help="forward-pass budgets to snapshot")
    p.add_argument("--seed", type=int, default=0, help="base of the per-(problem, method) seeds")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--collab-every", type=int, default=None,
                   help="tokens between collaboration checks (default: the protocol's; 0: never)")
    p.add_argument("--batch", type=int, default=1,
                   help="runs in flight at once, all their workers in one forward pass (faster; more memory)")
    p.add_argument("--collab-stats", action="store_true",
                   help="record attention shares every pass: summary and collaboration.png")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: eval-results/DATASET)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    add_model_arguments(p)
    p.set_defaults(func=run_eval)


def run_eval(args) -> int:
    from .cli_args import load_from_args, runner_options

    label = args.dataset if args.dataset in DATASETS else Path(args.dataset).stem
    config = EvalConfig(
        dataset=args.dataset, out=args.out or Path("eval-results") / label, limit=args.limit,
        workers=args.workers, layouts=args.layouts, baselines=args.baselines, budgets=args.budgets,
        seed=args.seed, temperature=args.temperature, top_p=args.top_p, collab_every=args.collab_every,
        model=args.model, dtype=args.dtype or ("bfloat16" if args.quantize else "float32"), quantize=args.quantize,
        batch=args.batch, collab_stats=args.collab_stats,
    )
    _sampling(config)  # bad temperature / top-p fail here, before anything runs

    def load_engine():
        from .engine.engine import Engine

        return Engine(load_from_args(args), **runner_options(args))

    started = time.perf_counter()
    try:
        summary = evaluate(config, load_engine)
    except KeyboardInterrupt:
        print(f"interrupted; rerun the same command to resume from {config.out}", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(summary.to_json()))
        return 0
    print_table(summary, config)
    print(f"{config.out}/results.jsonl, summary.json, accuracy.png ({time.perf_counter() - started:.0f} s)")
    return 0
