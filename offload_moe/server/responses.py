"""How the server answers: JSON bodies (NaN and infinity as null), OpenAI-style errors (`ApiError`),
and server-sent events that cancel their job when the client goes away. Plain ASGI callables, so
this module imports without Starlette."""

from __future__ import annotations

import asyncio
import json
import math

try:
    from starlette.requests import ClientDisconnect   # what request.stream() raises when the client leaves
except ImportError:  # the core package without the serve extra: no request is ever read
    class ClientDisconnect(Exception):
        pass


class ApiError(Exception):
    """An error answered as OpenAI does: HTTP status + {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSON:
        return JSON(self.body(), self.status, self.headers)


def bad(message: str, param: str | None = None, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _dumps(obj) -> bytes:
    return json.dumps(_finite(obj), ensure_ascii=False, separators=(",", ":")).encode()


def _finite(obj):
    """JSON has no NaN or infinity: report those as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


class JSON:
    """A JSON response as a plain ASGI callable (so this module imports without Starlette)."""

    def __init__(self, body, status: int = 200, headers: dict | None = None):
        self.body, self.status, self.headers = _dumps(body), status, headers or {}

    async def __call__(self, scope, receive, send):
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(self.body)).encode())]
        headers += [(k.lower().encode(), str(v).encode()) for k, v in self.headers.items()]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})


class Text:
    """A plain-text response (Prometheus metrics)."""

    def __init__(self, body: str, content_type: str, status: int = 200):
        self.body, self.content_type, self.status = body.encode(), content_type, status

    async def __call__(self, scope, receive, send):
        await send({"type": "http.response.start", "status": self.status,
                    "headers": [(b"content-type", self.content_type.encode()),
                                (b"content-length", str(len(self.body)).encode())]})
        await send({"type": "http.response.body", "body": self.body})


def sse(obj) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else _dumps(obj)) + b"\n\n"


class EventStream:
    """Server-sent events from a job: `data: {json}\\n\\n` chunks, then `data: [DONE]\\n\\n`.

    A task watches the connection; when the client disconnects the job is cancelled, which stops its
    generation between two tokens (or drops it from the queue) and frees the worker."""

    def __init__(self, job, chunks):
        self.job, self.chunks = job, chunks

    async def __call__(self, scope, receive, send):
        watcher = asyncio.ensure_future(cancel_on_disconnect(receive, self.job))
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                    (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})
            async for chunk in self.chunks:
                if self.job.cancelled.is_set():
                    break
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the client went away while we wrote
        finally:
            watcher.cancel()
            self.job.cancel()  # no-op when the job is done


async def cancel_on_disconnect(receive, job):
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return
