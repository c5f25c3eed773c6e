"""`offload-moe serve`: an OpenAI-compatible HTTP server for one model (logs on stderr)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from ..base.errors import OffloadMoeError, read_user_file
from ..checkpoints.hub import model_name
from .common import add_model_arguments, check_model_argument, fetch, load_kwargs, warn_about
from .console import progress_bar, stderr
from .parser import EXIT_INTERRUPTED

# The defaults, restated here so `serve --help` works without the serve extra installed.
PREPARE_TIMEOUT, HEADER_TIMEOUT, BODY_TIMEOUT, MAX_CONNECTIONS = 4.0, 10.0, 60.0, 512
DEFAULT_PARALLEL = 4


def add_parser(sub):
    p = sub.add_parser(
        "serve", help="serve the model over an OpenAI-compatible HTTP API",
        description="Serve one model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, "
                    "/v1/models, streaming or not), plus /health and /metrics. Point any OpenAI client at "
                    "http://HOST:PORT/v1. Needs starlette and uvicorn: pip install '.[serve]' in a clone.")
    add_model_arguments(p)
    if "--profile" not in p._option_string_actions:  # unless the shared model arguments grew one
        p.add_argument("--profile", default=None, metavar="P",
                       help="memory profile for the expert cache (default: the loader's choice)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 opens it "
                        "to the network)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    p.add_argument("--api-key", metavar="KEY", default=None,
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health "
                        "(default: $OFFLOAD_MOE_API_KEY, else no key); visible in `ps`: prefer "
                        "--api-key-file or the environment variable")
    p.add_argument("--api-key-file", metavar="FILE", default=None,
                   help="read the API key from the first line of FILE (default: none)")
    p.add_argument("--allowed-origin", metavar="ORIGIN", action="append", default=[],
                   help="a browser origin (e.g. https://app.example) allowed to call the server besides "
                        "its own host names; repeatable (default: none)")
    p.add_argument("--max-queue", type=int, default=8, metavar="N",
                   help="requests that may wait behind the one generating; more get HTTP 429 (default: 8)")
    p.add_argument("--parallel", type=int, default=DEFAULT_PARALLEL, metavar="N",
                   help="requests decoded together, each with its own KV cache of the full context "
                        f"(continuous batching; default: {DEFAULT_PARALLEL}, as llama-server)")
    p.add_argument("--prepare-timeout", type=float, default=PREPARE_TIMEOUT, metavar="S",
                   help="seconds a request may wait for its prompt (chat template and tokenizer, run off the "
                        f"event loop) before it gets an error (default: {PREPARE_TIMEOUT:g})")
    p.add_argument("--header-timeout", type=float, default=HEADER_TIMEOUT, metavar="S",
                   help=f"seconds a client may take to send a request's headers (default: {HEADER_TIMEOUT:g})")
    p.add_argument("--body-timeout", type=float, default=BODY_TIMEOUT, metavar="S",
                   help=f"seconds a client may take to send a request's body (default: {BODY_TIMEOUT:g})")
    p.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS, metavar="N",
                   help=f"open connections before new requests get HTTP 503 (default: {MAX_CONNECTIONS})")
    p.add_argument("--model-name", metavar="NAME", default=None,
                   help="the model id clients see in /v1/models (default: the checkpoint directory's name)")
    p.set_defaults(func=run)


def _listen(host: str, port: int) -> socket.socket:
    if not 0 <= port <= 65535:
        raise OffloadMoeError(f"--port {port}: expected a TCP port number 0..65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise OffloadMoeError(f"--host {host!r}: cannot resolve the address ({e.strerror})") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise OffloadMoeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def _log_config() -> dict:
    """uvicorn's logging, all of it on stderr (stdout stays clean)."""
    handler = {"class": "logging.StreamHandler", "stream": "ext://sys.stderr"}
    return {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {
            "default": {"()": "uvicorn.logging.DefaultFormatter", "fmt": "%(levelprefix)s %(message)s"},
            "access": {"()": "uvicorn.logging.AccessFormatter",
                       "fmt": '%(levelprefix)s %(client_addr)s - "%(request_line)s" %(status_code)s'}},
        "handlers": {"default": {**handler, "formatter": "default"}, "access": {**handler, "formatter": "access"}},
        "loggers": {"uvicorn": {"handlers": ["default"], "level": "INFO", "propagate": False},
                    "uvicorn.error": {"level": "INFO"},
                    "uvicorn.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
                    "offload_moe.server": {"handlers": ["default"], "level": "INFO", "propagate": False}},
    }


def run(args) -> int:
    from ..server import create_app, require
    from ..server.guard import allowed_hosts_for

    require("starlette")
    require("uvicorn")
    from .. import load

    from ..server.http import raise_file_limit, uvicorn_config

    if args.max_queue < 0:
        raise OffloadMoeError(f"--max-queue {args.max_queue}: expected an integer >= 0")
    for flag, value in (("--prepare-timeout", args.prepare_timeout), ("--header-timeout", args.header_timeout),
                        ("--body-timeout", args.body_timeout)):
        if not value > 0 or value == float("inf"):
            raise OffloadMoeError(f"{flag} {value}: expected a number of seconds > 0")
    if args.max_connections < 1:
        raise OffloadMoeError(f"--max-connections {args.max_connections}: expected an integer >= 1")
    if args.parallel < 1:
        raise OffloadMoeError(f"--parallel {args.parallel}: expected an integer >= 1")
    if args.api_key is not None:
        stderr.print("offload-moe: warning: --api-key is visible to every user of this machine (ps); prefer "
                     "--api-key-file FILE or $OFFLOAD_MOE_API_KEY", highlight=False, markup=False)
    elif args.api_key_file is None:
        args.api_key = os.environ.get("OFFLOAD_MOE_API_KEY")
    if args.api_key_file is not None:
        lines = read_user_file(Path(args.api_key_file), "API key file").splitlines()
        args.api_key = lines[0] if lines else ""
        if not args.api_key.strip():
            raise OffloadMoeError(f"{args.api_key_file}: the API key file is empty")
    if args.api_key is not None and not args.api_key.strip():
        raise OffloadMoeError("--api-key is empty")
    check_model_argument(args)
    sock = _listen(args.host, args.port)  # before loading: a busy port fails fast
    try:
        kwargs = load_kwargs(args)
        if args.profile is not None:
            kwargs.setdefault("profile", args.profile)
        path = fetch(args.model)  # a Hugging Face repo id: from the cache, else downloaded
        with progress_bar() as report:
            model = load(path, progress=report, **kwargs)
        name = args.model_name or (model_name(args.model) if args.model else "offload-moe-demo")
        warn_about(model)
        app = create_app(model, model_name=name, api_key=args.api_key, max_queue=args.max_queue,
                         parallel=args.parallel, allowed_hosts=allowed_hosts_for(args.host),
                         allowed_origins=tuple(args.allowed_origin),
                         prepare_timeout=args.prepare_timeout, body_timeout=args.body_timeout)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        stderr.print(f"offload-moe: serving {name!r} (context {model.context_length} tokens; default "
                     f"{model.generation.describe()}) at http://{shown}:{port}/v1", highlight=False, markup=False)
        if args.api_key is None and host not in ("127.0.0.1", "::1", "localhost"):
            stderr.print(f"offload-moe: warning: listening on {host} without --api-key: anyone who can reach "
                         "this port can use the model", highlight=False, markup=False)
        raise_file_limit()
        config = uvicorn_config(app, header_timeout=args.header_timeout, max_connections=args.max_connections,
                                log_config=_log_config(), timeout_graceful_shutdown=3)
        status = 0
        try:
            require("uvicorn").Server(config).run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn shut down cleanly, then re-raised the Ctrl-C it caught
            status = EXIT_INTERRUPTED  # as every command ends on Ctrl-C (parser.EXIT_CODES)
        stderr.print("offload-moe: server stopped", highlight=False, markup=False)
    finally:
        sock.close()
    return status
