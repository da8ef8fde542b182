"""``hogwild bench``: decode-step speed and K/V memory of N workers over one shared prompt, hogwild
against transformers' batched decoding (eager, and compiled with a static cache).

For every (workers N, context L) one prompt of L random token ids (seeded) is decoded by every
method of ``--methods`` (see ``methods.py``), alternating step by step in one process. A step is
one decode pass of all N workers, forward pass plus next-token logits, device synchronised;
greedy tokens are fed back. Reported per method and cell: median ms per step [quartiles] of
``--steps`` steps after ``--warmup`` untimed ones, worker tokens/s (N / step), K/V bytes after
the first decoded token, prefill seconds, and ratios against transformers (and
transformers-compiled). ``--collab-stats`` adds each hogwild method with collaboration statistics
on (``hogwild-torch+stats``...) and its ratio to the same method without them. Output: a Markdown
table (or ``--json``), ``bench.json``, ``bench.png``; ``--profile`` adds ``profile.txt`` and a
Chrome trace per method (``profile.py``). ``--tp K`` under torchrun: rank 0 measures and writes,
the other ranks mirror its hogwild passes (``measure.tp_refusal``).

Layout: ``methods.py`` (what runs), ``measure.py`` (the grid, skips, machine facts),
``profile.py`` (torch.profiler), ``report.py`` (table, plot, files).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

from .measure import BenchConfig, BenchResult, default_methods, run_bench
from .methods import METHODS, with_stats_variants

__all__ = ["BenchConfig", "BenchResult", "METHODS", "register", "run_bench"]

log = logging.getLogger(__name__)


def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def method_list(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown methods {unknown or text!r}; choose from {', '.join(METHODS)}")
    return names


def register(sub) -> None:
    from ..cli_args import add_model_source_arguments

    p = sub.add_parser("bench", help="decode-step speed and K/V memory: hogwild vs transformers' batched decoding")
    add_model_source_arguments(p)
    p.add_argument(
        "--methods", type=method_list, default=None,
        help=f"comma-separated, from {', '.join(METHODS)} (default: hogwild-torch,transformers,materialize on "
        "the CPU; hogwild-triton,hogwild-torch,transformers,transformers-compiled on CUDA)",
    )
    p.add_argument(
        "--collab-stats", action="store_true",
        help="also run each hogwild method with collaboration statistics (hogwild-torch+stats, "
        "hogwild-triton+stats: the same runner, attention shares every pass), and its ratio to the method",
    )
    p.add_argument(
        "--tp", type=int, default=None, metavar="K",
        help="tensor parallel over K ranks (torchrun --nproc-per-node K -m hogwild.cli bench ... --tp K): rank 0 "
        "measures and writes; one hogwild backend per run, no transformers methods",
    )
    p.add_argument("--workers", type=int_list, default=(1, 2, 4), help="worker counts N (default 1,2,4)")
    p.add_argument("--context", type=int_list, default=(512, 2048), help="shared prompt lengths L (default 512,2048)")
    p.add_argument("--steps", type=int, default=20, help="timed decode steps per method and cell (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before them (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompt token ids")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--kv-memory", type=float, default=None, metavar="GIB",
        help="K/V pool of each hogwild runner in GiB (default: the longest prompt plus every worker's steps)",
    )
    p.add_argument(
        "--compile-backend", default="inductor",
        help="torch.compile backend of transformers-compiled (default inductor, mode reduce-overhead; "
        "eager or aot_eager check the capture without generating code)",
    )
    p.add_argument("--profile", action="store_true",
                   help="also profile a few steps of every method at the largest N and L (torch.profiler)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for bench.json, bench.png")
    p.set_defaults(func=run_bench_command)


def run_bench_command(args) -> int:
    """Returns 1 when a method failed with an unexpected error, 130 when interrupted (Ctrl-C, SIGTERM);
    the files are written anyway."""
    import torch

    from .. import InputError
    from ..cli_args import load_from_args
    from .report import markdown_table, not_run_line, progress_line, result_json, write_json, write_outputs

    if args.threads is not None:
        if args.threads < 1:
            raise InputError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.kv_memory is not None and not args.kv_memory > 0:
        raise InputError(f"--kv-memory must be a positive number of GiB, got {args.kv_memory}")
    methods = args.methods or default_methods(args.device)
    if args.collab_stats:
        methods = with_stats_variants(methods)
    config = BenchConfig(
        workers=args.workers, contexts=args.context, methods=methods,
        steps=args.steps, warmup=args.warmup, seed=args.seed, profile=args.profile,
        kv_memory=None if args.kv_memory is None else int(args.kv_memory * (1 << 30)),
        compile_backend=args.compile_backend,
    )
    if args.random_config:  # refuse bad sizes before building a large model
        from .. import RANDOM_CONFIGS

        config.validate(RANDOM_CONFIGS[args.random_config]["max_position_embeddings"])
    model = load_from_args(args)
    config.validate(model.max_positions)

    def on_cell(partial: BenchResult) -> None:  # a run cut short still leaves its cells
        write_json(partial, args.out)
        print(progress_line(partial), file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # e.g. `timeout`: report what is done
    try:
        result = run_bench(model, config, args.out, on_cell)
    finally:
        signal.signal(signal.SIGTERM, previous)
    write_outputs(result, args.out)
    if args.json:
        print(json.dumps(result_json(result)))
    else:
        print(markdown_table(result))
        print(f"\nwrote {args.out / 'bench.json'} and {args.out / 'bench.png'}"
              + (f", profile.txt and the traces in {args.out}" if result.profile else ""))
    errors = [s for s in result.skipped() if s["status"] == "error"]
    for s in errors:
        log.error("%s", not_run_line(s, len(result.cells)))
    if result.interrupted:
        print(f"interrupted: {len(result.cells)} cells measured", file=sys.stderr)
        return 130
    return 1 if errors else 0
