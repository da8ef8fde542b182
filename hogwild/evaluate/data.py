"""Datasets: the named JSONL files of ``shared/data`` (or ``$HOGWILD_DATA``) or any JSONL path,
read into ``Problem`` records (``{"id", "problem", "answer"}`` per line, ids unique)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .. import InputError

#: Named datasets: files in ``<repo>/../shared/data`` (or ``$HOGWILD_DATA``).
DATASETS = {
    "gsm8k": "gsm8k_dev.jsonl",
    "math500": "math500.jsonl",
    "aime24": "aime24.jsonl",
    "amc23": "amc23.jsonl",
}


@dataclass(frozen=True)
class Problem:
    """One dataset row."""

    id: str
    problem: str
    answer: str


def data_dir() -> Path:
    """``$HOGWILD_DATA``, else ``shared/data`` next to the repository."""
    env = os.environ.get("HOGWILD_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


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
