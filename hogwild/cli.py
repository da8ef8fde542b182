"""The ``hogwild`` command. Each sub-command lives in its front-end module and registers here.

Errors that hogwild raises on purpose (bad input, unknown model, context overflow) print one
clear line and exit with code 2, like argparse's own usage errors.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .bench import register as register_bench
from .cli_args import add_model_arguments, load_from_args, runner_options
from .errors import HogwildError, InputError
from .evaluate import register as register_eval
from .server import register as register_serve

log = logging.getLogger("hogwild")


# -- generate -----------------------------------------------------------------------------------
def register_generate(sub) -> None:
    p = sub.add_parser("generate", help="raw parallel continuation by several workers over one shared prompt")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument(
        "--worker-prefix", action="append", default=None, metavar="TEXT",
        help="text a worker starts with; repeat once per worker (default: two workers, empty prefixes)",
    )
    p.add_argument("--layout", choices=["independent", "contiguous"], default="contiguous")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print exactly one JSON object")
    add_model_arguments(p)
    p.set_defaults(func=run_generate)


def run_generate(args) -> int:
    from .engine.generate import generate
    from .engine.runner import Runner
    from .errors import InputError
    from .sampling import SamplingParams

    if not args.prompt.strip():
        raise InputError("the prompt is empty")
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    model = load_from_args(args)
    tokenizer = model.tokenizer
    if args.chat:
        prompt_ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}], add_generation_prompt=True, tokenize=True,
            return_dict=True,
        )["input_ids"]
    else:
        prompt_ids = tokenizer(args.prompt, add_special_tokens=False).input_ids
    prefixes = args.worker_prefix or ["", ""]
    prefix_ids = [tokenizer(p, add_special_tokens=False).input_ids if p else [] for p in prefixes]
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p)
    result = generate(
        Runner.for_model(model, **runner_options(args)), prompt_ids, prefix_ids, args.layout, args.max_new_tokens,
        sampling, args.seed,
    )
    if args.json:
        print(json.dumps({
            "model": result.model,
            "prompt_token_ids": result.prompt_token_ids,
            "workers": [
                {"prefix_token_ids": w.prefix_token_ids, "token_ids": w.token_ids, "text": w.text}
                for w in result.workers
            ],
            "forward_passes": result.forward_passes,
            "elapsed_s": round(result.elapsed_s, 4),
        }))
        return 0
    from rich.console import Console
    from rich.panel import Panel

    console = Console()
    for i, (prefix, w) in enumerate(zip(prefixes, result.workers)):
        console.print(Panel(prefix + w.text, title=f"worker {i}", expand=True))
    console.print(
        f"[dim]{result.forward_passes} forward passes, {result.elapsed_s:.1f} s, "
        f"{len(result.workers) * args.max_new_tokens / result.elapsed_s:.1f} tokens/s[/dim]"
    )
    return 0


# -- solve --------------------------------------------------------------------------------------
SAMPLE_PROBLEM = (
    "A bakery sells muffins for $3 each and cookies for $2 each. On Monday it sold 14 muffins and "
    "25 cookies. How much money did the bakery make on Monday?"
)


def register_solve(sub) -> None:
    p = sub.add_parser("solve", help="several workers solve a problem together, shown live")
    p.add_argument("problem", nargs="?", help="the problem text")
    p.add_argument("--problem-file", help="read the problem from this file")
    p.add_argument("--sample", action="store_true", help="solve a built-in sample problem")
    p.add_argument("--workers", type=int, default=None, help="hogwild workers (default: 2)")
    p.add_argument("--layout", default=None, help="combined (the default), contiguous, interleaved or independent")
    p.add_argument("--budget", type=int, default=512,
                   help="forward passes (each: one token per worker; with --async per thinker and the writer)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--collab-every", type=int, default=None, help="tokens between redundancy checks (0: off)")
    p.add_argument("--collab-stats", action="store_true",
                   help="record where each worker's attention goes, every pass (decode passes run eagerly)")
    p.add_argument("--async", dest="answer_async", action="store_true",
                   help="answer while thinking: a writer streams the answer while --thinkers reason (docs/async.md)")
    p.add_argument("--thinkers", type=int, default=None,
                   help="with --async: thinkers beside the writer, 0 to 8 (default: 1; 0: no thinking)")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object")
    p.add_argument("--transcript", help="write a Markdown transcript to this file")
    add_model_arguments(p)
    p.set_defaults(func=run_solve)


#: solve's options that only a hogwild solve reads (argument name, flag): --async refuses them.
HOGWILD_ONLY = (("workers", "--workers"), ("layout", "--layout"), ("collab_every", "--collab-every"),
                ("collab_stats", "--collab-stats"))


def check_solve_flags(args) -> None:
    """Refuse flags that make no sense together, before anything loads."""
    if not args.answer_async:
        if args.thinkers is not None:
            raise InputError("--thinkers needs --async (a hogwild solve has --workers)")
        return
    for name, flag in HOGWILD_ONLY:
        if getattr(args, name) not in (None, False):
            raise InputError(f"{flag} does not apply to --async (one writer and --thinkers thinkers); drop it")


def read_problem(args) -> str:
    from pathlib import Path

    from .errors import InputError

    if args.sample:
        return SAMPLE_PROBLEM
    if args.problem_file:
        try:
            return Path(args.problem_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise InputError(f"cannot read --problem-file: {exc}") from exc
    if args.problem is None:
        raise InputError("give a problem, --problem-file FILE or --sample")
    return args.problem


def run_solve(args) -> int:
    from . import AnsweringConfig, Engine, FirstAnswerTokenEvent, ModeEvent, ProbeEvent, SamplingParams, SolveConfig

    check_solve_flags(args)
    problem = read_problem(args)
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p)
    if args.answer_async:
        thinkers = 1 if args.thinkers is None else args.thinkers
        AnsweringConfig(thinkers, args.budget, sampling, args.seed).check()  # before the model loads
    engine = Engine(load_from_args(args), **runner_options(args))
    if args.answer_async:
        stream = engine.stream_answer(problem, thinkers=thinkers, budget=args.budget, sampling=sampling,
                                      seed=args.seed)
        keep = (ModeEvent, ProbeEvent, FirstAnswerTokenEvent)  # the transcript's timeline
    else:
        workers = 2 if args.workers is None else args.workers
        layout = "combined" if args.layout is None else args.layout
        config = SolveConfig(workers, layout, args.budget, sampling, args.seed, args.collab_every)
        config.check(engine.protocol)  # bad input fails before the live view starts
        stream = engine.stream(
            problem, workers=workers, layout=layout, budget=args.budget, sampling=sampling,
            seed=args.seed, collab_every=args.collab_every, collab_stats=args.collab_stats,
        )
        keep = ()
    view = None
    if not args.json:
        from .live import AnsweringView, LiveView

        view = (AnsweringView(thinkers, args.budget) if args.answer_async else
                LiveView([engine.protocol.name(i) for i in range(workers)], args.budget))
    result, kept = drive(stream, view, keep)
    if result is None:
        return 130
    report_solve(args, problem, result, engine, kept)
    return 130 if result.interrupted else 0


def drive(stream, view, keep: tuple[type, ...] = ()):
    """Run a solve's event stream to its DoneEvent, drawing ``view`` live when there is one.
    Returns (the Result, or None when Ctrl-C came before the run could hand one back; the events of
    the types in ``keep``). Ctrl-C stops the engine, which hands back the partial run."""
    from . import DoneEvent

    result, kept = None, []
    live = None
    if view is not None:
        from rich.console import Console
        from rich.live import Live

        live = Live(view.render(), console=Console(), refresh_per_second=8, transient=False)
    try:
        if live is not None:
            live.start()
        for event in stream:
            if isinstance(event, keep):
                kept.append(event)
            if isinstance(event, DoneEvent):
                result = event.result
            if view is not None:
                view.update(event)
                live.update(view.render())
    except KeyboardInterrupt:
        try:
            result = stream.throw(KeyboardInterrupt).result  # the engine stops and hands back the partial run
        except (KeyboardInterrupt, StopIteration):
            result = None
    finally:
        stream.close()  # frees the session's blocks (a no-op once the stream has ended)
        if live is not None:
            live.stop()
    return result, kept


def report_solve(args, problem: str, result, engine, events: list) -> None:
    """The transcript file, then the JSON object or the answer line (a partial run: its transcript too)."""
    from .transcript import to_markdown, write_atomically

    if args.transcript:
        write_atomically(args.transcript, to_markdown(problem, result, events))
    if args.json:
        data = {
            "answer": result.answer,
            "workers": [{"name": w.name, "text": w.text} for w in result.workers],
            "history": [{"worker": h.worker, "step": h.step, "text": h.text} for h in result.history],
            "forward_passes": result.forward_passes,
            "tokens_generated": result.tokens_generated,
            "elapsed_s": round(result.elapsed_s, 4),
            "timings": {part: round(seconds, 4) for part, seconds in result.timings.items()},
            "model": result.model,
            "weights": {"quantization": engine.model.quantization, "bytes": engine.model.weight_bytes},
            "layout": result.layout,
            "collaboration": result.collaboration,
        }
        if result.layout == "answering":  # the writer's text and the metrics (docs/async.md)
            data |= {"answered_by": result.answered_by, "answering": result.answering}
        print(json.dumps(data))
        return
    from rich.console import Console

    console = Console()
    if result.interrupted:
        console.print("[bold red]Interrupted.[/] The partial transcript:")
        console.print(to_markdown(problem, result, events))
    extra = ""
    if result.answering.get("first_answer_s") is not None:
        extra = (f"; first answer token after {result.answering['first_answer_passes']} passes, "
                 f"{result.answering['first_answer_s']:.1f} s")
    console.print(
        f"[bold]Answer:[/] {result.answer} [dim](by {result.answered_by}; {result.forward_passes} passes, "
        f"{result.tokens_generated} tokens, {result.elapsed_s:.1f} s{extra})[/dim]"
    )


# -- prepare ------------------------------------------------------------------------------------
def register_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="convert the embedded model once (make setup runs this)")
    p.set_defaults(func=run_prepare)


def run_prepare(args) -> int:
    from .models import resolve

    name, path = resolve(None)
    print(f"{name} is ready in {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hogwild", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = parser.add_subparsers(dest="command", required=True)
    for register in REGISTER:
        register(sub)
    return parser


REGISTER = [register_generate, register_solve, register_prepare, register_bench, register_eval, register_serve]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not args.verbose:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    tp = getattr(args, "tp", None) or 1
    follower = tp > 1 and int(os.environ.get("RANK", "0")) > 0
    if follower:  # rank 0 does all output; a follower only reports its own failures (on stderr)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    try:
        return args.func(args)
    except HogwildError as exc:
        if not (follower and isinstance(exc, InputError)):  # input errors: every rank has the same
            print(f"hogwild: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if tp == 1:
            raise
        print(f"hogwild: error: tensor-parallel run failed ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 1
    finally:
        if tp > 1:
            from .distributed import shutdown

            shutdown()


if __name__ == "__main__":
    sys.exit(main())
