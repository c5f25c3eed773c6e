"""`create_app`: the Starlette app for one loaded model: its options (`ServerOptions`), routes, the
wrapper that turns any error into an OpenAI-style answer, and the worker's lifespan. The endpoints
themselves are in `endpoints.py`."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import contextlib
import importlib

from ..base.errors import OffloadMoeError
from .guard import LOOPBACK_NAMES, RequestGuard, public_message
from .responses import ApiError, ClientDisconnect

from .endpoints import BODY_TIMEOUT, INTERNAL_ERROR, PREPARE_TIMEOUT, Endpoints, log

INSTALL_HINT = "pip install starlette uvicorn (or pip install '.[serve]' in a clone of offload-moe)"


def require(module: str):
    """Import one of the `serve` extra's modules, or explain in one line how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        name = (getattr(e, "name", None) or module).split(".")[0]
        raise OffloadMoeError(f"the server needs the {name!r} package, which is not installed: "
                              f"{INSTALL_HINT}") from None


def _endpoint(handler, guard: RequestGuard):
    """Check the request's Host, Origin and type; turn ApiError / OffloadMoeError / anything
    unexpected into an OpenAI-style JSON error (a bug: logged, answered 500 with a generic body)."""
    async def endpoint(request):
        try:
            guard.check(request)
            return await handler(request)
        except ClientDisconnect:  # gone mid-upload: nobody to answer
            log.info("%s %s: the client went away while sending the request", request.method, request.url.path)
            return ApiError(499, "client closed the request", code="cancelled").response()
        except ApiError as e:
            e.message = public_message(e.message)
            return e.response()
        except OffloadMoeError as e:
            return ApiError(400, public_message(str(e)), code=None).response()
        except Exception:
            log.exception("%s %s: unexpected error", request.method, request.url.path)
            return ApiError(500, INTERNAL_ERROR, type="server_error", code=None).response()
    return endpoint


@dataclass(frozen=True)
class ServerOptions:
    """How the server admits and runs requests.

    `api_key`: require `Authorization: Bearer <key>` (except on /health). `max_queue`: requests that
    may wait behind the running ones (then 429). `parallel`: requests decoded together (continuous
    batching; one KV cache slot each). `allowed_hosts`: the Host names requests may carry (None: any;
    `guard.allowed_hosts_for` gives them for a bind address); `allowed_origins`: browser origins
    allowed besides those hosts. `prepare_timeout`: seconds a request waits for its prompt (chat
    template, tokenizer; run off the event loop) before it gets an error; `body_timeout`: seconds its
    body may take to arrive."""
    api_key: str | None = None
    max_queue: int = 8
    parallel: int = 1
    allowed_hosts: tuple[str, ...] | None = LOOPBACK_NAMES
    allowed_origins: tuple[str, ...] = ()
    prepare_timeout: float = PREPARE_TIMEOUT
    body_timeout: float = BODY_TIMEOUT


def create_app(model, options: ServerOptions | None = None, *, model_name: str, **given):
    """The ASGI app serving `model` under `model_name`, as `options` (a `ServerOptions`) with the fields
    given as keywords replaced (`create_app(model, model_name="m", parallel=4)`). While the app runs
    it owns the model: all generation happens on its one worker thread."""
    unknown = sorted(set(given) - {f.name for f in fields(ServerOptions)})
    if unknown:
        raise TypeError(f"create_app() got an unexpected keyword argument {unknown[0]!r}")
    o = replace(options or ServerOptions(), **given)
    api_key, max_queue, parallel = o.api_key, o.max_queue, o.parallel
    allowed_hosts, allowed_origins = o.allowed_hosts, o.allowed_origins
    prepare_timeout, body_timeout = o.prepare_timeout, o.body_timeout
    require("starlette")
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Route

    if not isinstance(model_name, str) or not model_name:
        raise OffloadMoeError(f"model_name = {model_name!r}, expected a non-empty string")
    if not isinstance(max_queue, int) or isinstance(max_queue, bool) or max_queue < 0:
        raise OffloadMoeError(f"max_queue = {max_queue!r}, expected an integer >= 0")
    if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
        raise OffloadMoeError("api_key is empty (expected a non-empty string, or None for no key)")
    for name, value in (("prepare_timeout", prepare_timeout), ("body_timeout", body_timeout)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise OffloadMoeError(f"{name} = {value!r}, expected a number of seconds > 0")
    server = Endpoints(model, model_name, api_key.strip() if api_key else None, max_queue, float(prepare_timeout),
                     float(body_timeout), parallel)
    guard = RequestGuard(allowed_hosts, tuple(allowed_origins))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.worker.start()
        try:
            yield
        finally:
            server.worker.stop()

    async def http_error(request, exc: HTTPException):
        if exc.status_code == 404:
            error = ApiError(404, f"no such endpoint: {request.method} {request.url.path}", code="not_found")
        elif exc.status_code == 405:
            error = ApiError(405, f"method {request.method} is not allowed on {request.url.path}",
                             code="method_not_allowed", headers=exc.headers)
        else:
            error = ApiError(exc.status_code, str(exc.detail), code=None, headers=exc.headers)
        return error.response()

    routes = [
        Route("/health", _endpoint(server.health, guard), methods=["GET"]),
        Route("/metrics", _endpoint(server.metrics, guard), methods=["GET"]),
        Route("/v1/models", _endpoint(server.models, guard), methods=["GET"]),
        Route("/v1/models/{name:path}", _endpoint(server.retrieve_model, guard), methods=["GET"]),
        Route("/v1/chat/completions", _endpoint(server.chat_completions, guard), methods=["POST"]),
        Route("/v1/completions", _endpoint(server.completions, guard), methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error}, lifespan=lifespan)
    app.state.server = server
    return app
