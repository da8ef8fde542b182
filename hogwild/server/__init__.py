"""``hogwild serve``: an OpenAI-compatible server with continuous batching and a live web page.

The app lives in ``hogwild.server.app`` (``create_app(engine, max_sessions, queue_size)``); this
module only registers the sub-command, so that ``hogwild --help`` does not import FastAPI.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def register(sub) -> None:
    from ..cli_args import add_model_arguments

    p = sub.add_parser("serve", help="OpenAI-compatible server with a live web view (FastAPI + uvicorn)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-sessions", type=int, default=8,
                   help="sessions decoded together at most (bounds the cache's memory; default 8)")
    p.add_argument("--queue-size", type=int, default=32,
                   help="requests that may wait for a session slot; beyond it they get 503 (default 32)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; leave a core to the web server)")
    add_model_arguments(p)
    p.set_defaults(func=run_serve)


def run_serve(args) -> int:
    import uvicorn

    from ..cli_args import load_from_args
    from ..engine.engine import Engine
    from ..errors import InputError
    from .app import create_app

    if args.max_sessions < 1:
        raise InputError(f"--max-sessions must be at least 1, got {args.max_sessions}")
    if args.queue_size < 0:
        raise InputError(f"--queue-size must be >= 0, got {args.queue_size}")
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be between 0 and 65535, got {args.port}")
    if args.threads is not None:
        if args.threads < 1:
            raise InputError(f"--threads must be at least 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    engine = Engine(load_from_args(args))
    app = create_app(engine, args.max_sessions, args.queue_size)
    print(f"hogwild: serving {engine.model.name} on http://{args.host}:{args.port}/ (Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning")
    return 0
