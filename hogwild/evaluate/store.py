"""Results on disk, resumable: ``results.jsonl`` (one ``ResultRow`` a line, appended a whole
(problem, method) run at a time), ``run.json`` (the settings a resumed run must share) and
``collab.jsonl`` (per hogwild run, its attention share on others per forward pass)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import InputError
from .config import LEGACY_RUN_INFO, RUN_KEYS, EvalConfig

log = logging.getLogger(__name__)


@dataclass
class ResultRow:
    """One line of results.jsonl: a method's answer to a problem at a budget of forward passes.

    ``answer`` is the raw answer (a worker's \\boxed{} content, the finisher's or the vote's),
    ``extracted`` what math-verify made of it. For ``independent``, ``votes`` holds each worker's
    answer, ``tokens`` their sum and ``forward_passes`` the largest. ``elapsed_s`` is the wall time
    of the run up to that snapshot (for single/independent: the one batched run of both). For
    ``answering`` and ``nothink`` (a run per budget): ``first_answer_passes`` and ``first_answer_s``,
    the forward passes and seconds to the writer's first token (None: the writer wrote nothing, the
    finisher answered at the end), and ``probe_passes``, the extra passes of the probes.
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
    first_answer_passes: int | None = None
    first_answer_s: float | None = None
    probe_passes: int | None = None

    def key(self) -> tuple[str, str, int]:
        return self.id, self.method, self.budget


def rounded_mean(values: Sequence[float]) -> float | None:
    """The mean to 6 places, as rows and summaries store it; None for no values."""
    return round(sum(values) / len(values), 6) if values else None


def read_rows(path: Path) -> list[ResultRow]:
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
            rows.append(ResultRow(**json.loads(line)))
        except (json.JSONDecodeError, TypeError) as exc:
            log.warning("%s:%d: skipping a bad line (%s)", path, number, exc)
    return rows


def append_rows(path: Path, rows: Iterable[ResultRow]) -> None:
    """Append rows as whole lines in one write, flushed to disk."""
    text = "".join(json.dumps(asdict(row), ensure_ascii=False) + "\n" for row in rows)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def latest(rows: Iterable[ResultRow]) -> dict[tuple[str, str, int], ResultRow]:
    """Rows by (id, method, budget), the last written winning."""
    return {row.key(): row for row in rows}


def check_run_info(out: Path, config: EvalConfig) -> None:
    """Write run.json, or check that DIR's rows came from the same settings."""
    path = out / "run.json"
    info = config.run_info()
    if path.exists():
        old = LEGACY_RUN_INFO | json.loads(path.read_text())
        diff = [f"{k}: {old.get(k)!r} there, {info[k]!r} now" for k in RUN_KEYS if old.get(k) != info[k]]
        if diff:
            raise InputError(f"{out} holds results of other settings ({'; '.join(diff)}); use another --out")
        return
    path.write_text(json.dumps(info, indent=2) + "\n")


def append_curve(path: Path, problem_id: str, layout: str, others: Sequence[float]) -> None:
    """Add one hogwild run's share on others per forward pass to collab.jsonl."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"id": problem_id, "method": layout, "others": list(others)}) + "\n")


def read_curves(path: Path) -> dict[str, dict[str, list[float]]]:
    """collab.jsonl: layout -> problem id -> share on others per forward pass (the last line wins)."""
    curves: dict[str, dict[str, list[float]]] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                data = json.loads(line)
                curves.setdefault(data["method"], {})[data["id"]] = data["others"]
    return curves
