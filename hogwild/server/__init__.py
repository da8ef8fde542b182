"""``hogwild serve``: an OpenAI-compatible server with continuous batching and a live web page.

The app lives in ``hogwild.server.app`` (``create_app(engine, max_sessions, queue_size, ...)``);
this module only registers the sub-command, so that ``hogwild --help`` does not import FastAPI.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

API_KEY_ENV = "HOGWILD_API_KEY"


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
    p.add_argument("--drain-seconds", type=float, default=30.0,
                   help="on SIGTERM/Ctrl-C, how long running requests may finish before they are ended "
                        "(default 30; a second signal ends them at once)")
    p.add_argument("--allowed-hosts", default="",
                   help="comma-separated Host names to answer besides localhost names and the bound address "
                        "(guards against DNS rebinding); '*' answers any")
    p.add_argument("--api-key", default=None,
                   help=f"require this key as 'Authorization: Bearer KEY' on /v1/... (default: ${API_KEY_ENV}, "
                        "else none)")
    p.add_argument("--docs", action="store_true", help="serve the API docs at /docs and /openapi.json")
    p.add_argument("--max-body-mb", type=float, default=4.0,
                   help="largest request body in MiB; a larger one gets 413 (default 4)")
    p.add_argument("--request-timeout", type=float, default=15.0,
                   help="seconds a request may take to arrive whole (headers and body); a slower one gets 408 "
                        "and its connection is closed (default 15)")
    p.add_argument("--max-connections", type=int, default=256,
                   help="connections open at once; one more gets 503 and is closed (default 256)")
    add_model_arguments(p)
    p.set_defaults(func=run_serve)


def api_key_of(flag: str | None) -> str | None:
    """The API key from ``--api-key``, else from $HOGWILD_API_KEY, else None (no authentication).
    A key that is given but empty or blank is refused (InputError): ``--api-key "$KEY"`` with
    ``KEY`` unset must not serve an open API."""
    from .. import InputError

    source, key = ("--api-key", flag) if flag is not None else (f"${API_KEY_ENV}", os.environ.get(API_KEY_ENV))
    if key is not None and not key.strip():
        raise InputError(f"{source} is empty: give a key, or leave it out to serve without authentication")
    if key is not None and key != key.strip():
        raise InputError(f"{source} starts or ends with whitespace: give the key alone")
    return key


def run_serve(args) -> int:
    from .. import Engine, InputError, distributed
    from ..cli_args import load_from_args, runner_options
    from .app import create_app
    from .connections import ConnectionLimits
    from .lifecycle import DrainingServer, server_config
    from .security import allowed_hosts

    if args.max_sessions < 1:
        raise InputError(f"--max-sessions must be at least 1, got {args.max_sessions}")
    if args.queue_size < 0:
        raise InputError(f"--queue-size must be >= 0, got {args.queue_size}")
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be between 0 and 65535, got {args.port}")
    if not args.drain_seconds >= 0:
        raise InputError(f"--drain-seconds must be >= 0, got {args.drain_seconds}")
    if not args.max_body_mb > 0:
        raise InputError(f"--max-body-mb must be positive, got {args.max_body_mb}")
    if not args.request_timeout > 0:
        raise InputError(f"--request-timeout must be positive, got {args.request_timeout}")
    if args.max_connections < 1:
        raise InputError(f"--max-connections must be at least 1, got {args.max_connections}")
    api_key = api_key_of(args.api_key)
    if args.threads is not None:
        if args.threads < 1:
            raise InputError(f"--threads must be at least 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    engine = Engine(load_from_args(args), **runner_options(args))
    hosts = allowed_hosts(args.host, args.allowed_hosts.split(","))
    app = create_app(engine, args.max_sessions, args.queue_size, hosts=hosts, api_key=api_key, docs=args.docs,
                     max_body_bytes=int(args.max_body_mb * 1024 * 1024))
    limits = ConnectionLimits(args.request_timeout, args.max_connections)
    config = server_config(app, limits, host=args.host, port=args.port, log_level="info" if args.verbose else "warning")
    server = DrainingServer(config, app.state.hogwild.scheduler, args.drain_seconds)
    group = distributed.current()
    if group is not None:  # a lost rank: answer the requests, then exit (not the CLI's immediate exit)
        group.on_failure = server.fail
    print(f"hogwild: serving {engine.model.name} on http://{args.host}:{args.port}/ (Ctrl-C stops)", flush=True)
    print("hogwild: authentication is on: /v1/... wants 'Authorization: Bearer KEY'" if api_key else
          "hogwild: authentication is off: anyone who can reach the server may use it (--api-key sets a key)",
          flush=True)
    server.run()
    if server.failed is not None:
        print(f"hogwild: error: {server.failed}", file=sys.stderr, flush=True)
        return 1
    return 0
