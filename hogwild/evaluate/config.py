"""What an evaluation runs: ``EvalConfig`` (checked before anything loads) and the method names.

A method is a hogwild layout (K workers in one session), ``answering`` (answer while thinking: a
writer and ``thinkers`` thinkers) or a baseline (``single``: one worker; ``independent``: K
one-worker sessions and a majority vote; ``nothink``: the writer alone, no thinking). Budgets are
counts of sequential forward passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import InputError, SamplingParams
from .data import DATASETS

HOGWILD_LAYOUTS = ("combined", "contiguous", "interleaved")
BASELINES = ("single", "independent", "nothink")
DEFAULT_BASELINES = ("single", "independent")
#: Baselines of one-worker hogwild sessions (run together, from one batch of K sessions).
SOLO = ("single", "independent")
#: Methods run as answer-while-thinking sessions, one session per budget: with ``thinkers``, and none.
ANSWERING = ("answering", "nothink")
#: Settings a resumed run must share with the rows already in DIR.
RUN_KEYS = ("dataset", "model", "dtype", "quantize", "workers", "seed", "temperature", "top_p", "collab_every",
            "thinkers")
#: Settings run.json gained later, with the value that runs written before them had.
LEGACY_RUN_INFO = {"thinkers": 1}


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation. ``model`` is what --model said (None: the embedded model)."""

    dataset: str
    out: Path
    limit: int | None = None
    workers: int = 2
    layouts: tuple[str, ...] = ("combined",)
    baselines: tuple[str, ...] = DEFAULT_BASELINES
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
    answering: bool = False  # the "answering" method: answer while thinking
    thinkers: int = 1  # its thinkers beside the writer

    @property
    def methods(self) -> tuple[str, ...]:
        return self.layouts + (("answering",) if self.answering else ()) + self.baselines

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
        if not 1 <= self.thinkers <= 8:
            raise InputError(f"--thinkers must be between 1 and 8, got {self.thinkers} "
                             "(--baselines nothink is the run without thinking)")
        if self.thinkers != 1 and not self.answering:
            raise InputError("--thinkers needs --answering")

    def sampling(self) -> SamplingParams:
        """Every run's sampling settings; raises InputError for a bad temperature or top-p."""
        return SamplingParams(temperature=self.temperature, top_p=self.top_p)

    def run_info(self) -> dict[str, Any]:
        """What run.json records: the settings that decide the rows."""
        return {
            "dataset": self.label, "model": self.model or "embedded", "dtype": self.dtype, "quantize": self.quantize,
            "workers": self.workers, "seed": self.seed, "temperature": self.temperature,
            "top_p": self.top_p, "collab_every": self.collab_every, "thinkers": self.thinkers,
        }
