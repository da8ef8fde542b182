"""``hogwild eval``: accuracy against the budget of sequential forward passes, with baselines.

Every (problem, method) of hogwild sessions is run once up to the largest budget and snapshotted
at every budget (the state after that many forward passes, finished by the finisher when no worker
has answered yet), so one run gives a row per budget. Methods:

- a hogwild layout (``combined``, ``contiguous``, ``interleaved``) with K workers;
- ``answering`` (``--answering``): answer while thinking, a writer and ``--thinkers`` thinkers;
- ``single``: one worker with the same forward-pass budget (think, then answer);
- ``independent``: K workers that never see each other; the answer is the majority vote of their
  answers (self-consistency), equal answers grouped by math-verify;
- ``nothink``: the writer alone, answering at once (no thinking).

``answering`` and ``nothink`` run one session per budget, all of a (problem, method) in flight
together (their sessions have no snapshots: the budget decides when the writer is cut off); their
rows add the forward passes and seconds to the writer's first answer token.

``single`` and ``independent`` come from one batched run of K one-worker sessions (seeds derived
from ``--seed``): ``single`` is the first of them, ``independent`` votes over all K. Answers are
checked with math-verify. DIR gets ``results.jsonl`` (appended one (problem, method) at a time, so
a rerun with the same DIR skips what is done), ``summary.json``, ``accuracy.png`` and ``run.json``
(the settings that must match to resume). Each row of a hogwild layout carries its duplication
(mean over workers of the 8-gram overlap with others' earlier steps) and, with ``--collab-stats``,
its mean attention share on the other workers' current steps; then ``collab.jsonl`` gets each
run's share on others per forward pass, and ``collaboration.png`` plots it (docs/collaboration.md).

Layout: ``config.py`` (``EvalConfig``, method names), ``data.py`` (datasets, ``Problem``),
``grading.py`` (answer checking, majority vote), ``run.py`` (``ProblemRun``s on the shared batching
loop), ``store.py`` (``ResultRow``s in results.jsonl, run.json, collab.jsonl: resume), ``report.py``
(summary, table, plots); here: the whole evaluation and the ``eval`` command (docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import Engine
from ..cli_args import add_model_arguments, load_from_args, runner_options
from .config import ANSWERING, BASELINES, DEFAULT_BASELINES, HOGWILD_LAYOUTS, EvalConfig
from .data import DATASETS, Problem, data_dir, load_problems, resolve_dataset
from .grading import check_answer, majority_vote
from .report import Summary, SummaryCell, plot_accuracy, plot_collaboration, print_table, summarize
from .run import ProblemRun, derive_seed, method_groups, run_problems
from .store import ResultRow, append_curve, append_rows, check_run_info, latest, read_curves, read_rows

__all__ = [
    "ANSWERING", "BASELINES", "DATASETS", "DEFAULT_BASELINES", "HOGWILD_LAYOUTS", "EvalConfig", "Problem",
    "ProblemRun", "ResultRow", "Summary", "SummaryCell", "check_answer", "data_dir", "derive_seed", "evaluate",
    "load_problems", "majority_vote", "read_curves", "read_rows", "register", "resolve_dataset", "run_problems",
    "summarize",
]

log = logging.getLogger(__name__)


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
        for group in method_groups([m for m in config.methods if any((p.id, m, b) not in done for b in budgets)])
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

        def on_rows(rows: list[ResultRow]) -> None:
            append_rows(results, rows)
            for row in rows:
                if row.budget == budgets[-1]:
                    log.info("%s %s: %r (%s), reference %r", row.id, row.method, row.answer,
                             "right" if row.correct else "wrong", row.reference)
            bar.update(len({row.method for row in rows}))

        def on_curve(run: ProblemRun) -> None:
            append_curve(out / "collab.jsonl", run.problem.id, run.group[0], run.others)

        try:
            run_problems(engine, todo, config, on_rows, on_pass, on_curve)
        finally:
            bar.close()
    summary = summarize(read_rows(results), config, problems)
    (out / "summary.json").write_text(json.dumps(summary.to_json(), indent=2) + "\n")
    model = config.model or "SmolLM2-135M-Instruct"
    plot_accuracy(summary, config, out / "accuracy.png", f"{config.label}, {model}, {summary.n} problems")
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
    p = sub.add_parser(
        "eval", help="accuracy against forward passes: hogwild layouts and answer while thinking vs baselines",
        description="Accuracy against the budget of sequential forward passes, with baselines; "
                    "resumable (a rerun with the same --out skips finished runs).",
    )
    p.add_argument("--dataset", required=True, help=f"{', '.join(DATASETS)} or a path to a .jsonl file")
    p.add_argument("--limit", type=int, default=None, help="only the first N problems")
    p.add_argument("--workers", type=int, default=2, help="K: workers of each layout and of 'independent'")
    p.add_argument("--layouts", type=_names, default=("combined",),
                   help=f"comma-separated, from {', '.join(HOGWILD_LAYOUTS)} ('' for none)")
    p.add_argument("--baselines", type=_names, default=DEFAULT_BASELINES,
                   help=f"comma-separated, from {', '.join(BASELINES)} (default: single,independent; '' for none)")
    p.add_argument("--answering", action="store_true",
                   help="also run 'answering': a writer answers while --thinkers think (a run per budget)")
    p.add_argument("--thinkers", type=int, default=1, help="thinkers of 'answering', 1 to 8")
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
    label = args.dataset if args.dataset in DATASETS else Path(args.dataset).stem
    config = EvalConfig(
        dataset=args.dataset, out=args.out or Path("eval-results") / label, limit=args.limit,
        workers=args.workers, layouts=args.layouts, baselines=args.baselines, budgets=args.budgets,
        seed=args.seed, temperature=args.temperature, top_p=args.top_p, collab_every=args.collab_every,
        model=args.model, dtype=args.dtype or ("bfloat16" if args.quantize else "float32"), quantize=args.quantize,
        batch=args.batch, collab_stats=args.collab_stats, answering=args.answering, thinkers=args.thinkers,
    )
    config.sampling()  # bad temperature / top-p fail here, before anything runs

    def load_engine() -> Engine:
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
