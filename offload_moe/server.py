"""An OpenAI-compatible HTTP server for one loaded `Model`: `create_app(model, model_name=...)`.

Endpoints: `GET /v1/models[/{id}]`, `POST /v1/chat/completions`, `POST /v1/completions` (both with
`stream: true` as server-sent events in the format the official `openai` client parses), `GET /health`
and `GET /metrics`.

One model, one worker: the model is not thread-safe, so every generation runs on a single worker
thread, in arrival order. Requests wait in a bounded queue (`max_queue` requests besides the one
running); past that they get 429 with `Retry-After`. A client that goes away (mid-stream or while
queued) has its request cancelled: the worker checks a flag before every forward pass, i.e. between
tokens, and moves on to the next request.

Requests are validated up front: malformed JSON, wrong types, unknown fields, missing fields,
`n` > 1 and prompt + max_tokens beyond the context window are 400s with an OpenAI-style error body
`{"error": {"message", "type", "param", "code"}}`. The `model` field is required but any name is
accepted (there is only one model; responses carry the served name).

Starlette is imported lazily (`pip install 'offload-moe[serve]'`) so the core package works without
it. Nothing here prints; unexpected errors are logged to the `offload_moe.server` logger.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

from .errors import OffloadMoeError

log = logging.getLogger("offload_moe.server")

INSTALL_HINT = "pip install 'offload-moe[serve]'"
MAX_BODY_BYTES = 8 * 1024 * 1024
COMPLETIONS_DEFAULT_MAX_TOKENS = 16   # OpenAI's default for /v1/completions; chat defaults to the context left
DEFAULT_TEMPERATURE, DEFAULT_TOP_P = 0.7, 0.95  # the library's defaults (as `offload-moe generate`)


def require(module: str):
    """Import one of the `serve` extra's modules, or explain in one line how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        name = (getattr(e, "name", None) or module).split(".")[0]
        raise OffloadMoeError(f"the server needs the {name!r} package, which is not installed: "
                              f"{INSTALL_HINT}") from None


# ---------------------------------------------------------------- errors


class ApiError(Exception):
    """An error answered as OpenAI does: HTTP status + {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> _JSON:
        return _JSON(self.body(), self.status, self.headers)


def _bad(message: str, param: str | None = None, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


# ---------------------------------------------------------------- raw ASGI responses


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


class _JSON:
    """A JSON response as a plain ASGI callable (so this module imports without Starlette)."""

    def __init__(self, body, status: int = 200, headers: dict | None = None):
        self.body, self.status, self.headers = _dumps(body), status, headers or {}

    async def __call__(self, scope, receive, send):
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(self.body)).encode())]
        headers += [(k.lower().encode(), str(v).encode()) for k, v in self.headers.items()]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})


def _sse(obj) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else _dumps(obj)) + b"\n\n"


class _EventStream:
    """Server-sent events from a job: `data: {json}\\n\\n` chunks, then `data: [DONE]\\n\\n`.

    A task watches the connection; when the client disconnects the job is cancelled, which stops its
    generation between two tokens (or drops it from the queue) and frees the worker."""

    def __init__(self, job: _Job, chunks):
        self.job, self.chunks = job, chunks

    async def __call__(self, scope, receive, send):
        watcher = asyncio.ensure_future(_cancel_on_disconnect(receive, self.job))
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


async def _cancel_on_disconnect(receive, job: _Job):
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


# ---------------------------------------------------------------- the worker


@dataclass
class _Job:
    prompt_ids: list[int]
    kwargs: dict
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self):
        self.cancelled.set()

    def post(self, event: tuple):
        """From the worker thread: hand an event to the request's coroutine."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is gone
            self.cancel()


class _Worker:
    """The single thread that runs generations, and the bounded queue in front of it."""

    def __init__(self, model, max_queue: int):
        self.model, self.max_queue = model, max_queue
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.pending = 0          # accepted and not finished: waiting + running
        self.running: _Job | None = None
        self.counts = {"served": 0, "cancelled": 0, "failed": 0, "rejected": 0}
        self.tokens = {"prompt": 0, "completion": 0}
        self.busy_seconds = 0.0
        self.request_seconds = 1.0  # moving average, for Retry-After
        self.last_decode_tps = 0.0
        self.model_stats = model.stats

    # -- from the event loop
    def start(self):
        with self.lock:
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._loop, name="offload-moe-worker", daemon=True)
                self.thread.start()

    def stop(self, timeout: float = 5.0):
        with self.lock:
            thread = self.thread
            if self.running is not None:
                self.running.cancel()
        self.jobs.put(None)
        if thread is not None:
            thread.join(timeout)

    def submit(self, job: _Job):
        self.start()
        with self.lock:
            if self.pending >= self.max_queue + 1:
                self.counts["rejected"] += 1
                retry = max(1, math.ceil(self.request_seconds * (self.pending - self.max_queue)))
                raise ApiError(429, f"the server is busy: {self.waiting} requests are waiting "
                               f"(limit {self.max_queue}); retry after {retry} s",
                               type="rate_limit_error", code="rate_limit_exceeded",
                               headers={"Retry-After": str(retry)})
            self.pending += 1
        self.jobs.put(job)

    @property
    def waiting(self) -> int:
        return self.pending - (self.running is not None)

    # -- on the worker thread
    def _loop(self):
        while True:
            job = self.jobs.get()
            if job is None:
                return
            with self.lock:
                self.running = job
            t0 = time.perf_counter()
            try:
                event = ("cancelled",) if job.cancelled.is_set() else self._run(job)
            except BaseException as e:  # never leave a client waiting
                log.exception("worker: unexpected error")
                event = ("error", 500, f"internal error: {type(e).__name__}: {e}")
            seconds = time.perf_counter() - t0
            with self.lock:
                self.running = None
                self.pending -= 1
                kind = event[0]
                self.counts[{"done": "served", "cancelled": "cancelled"}.get(kind, "failed")] += 1
                if kind == "done":
                    self.busy_seconds += seconds
                    self.request_seconds = 0.7 * self.request_seconds + 0.3 * seconds
                    self.tokens["prompt"] += len(job.prompt_ids)
                    self.tokens["completion"] += len(event[1].token_ids)
            job.post(event)  # after the bookkeeping: a client's next request finds the worker free

    def _run(self, job: _Job) -> tuple:
        model = self.model
        try:
            pieces = model.stream(job.prompt_ids, should_stop=job.cancelled.is_set, **job.kwargs)
            try:
                for piece in pieces:
                    if job.cancelled.is_set():
                        break
                    job.post(("piece", piece))
            finally:
                pieces.close()
        except OffloadMoeError as e:
            return ("error", 400, str(e))
        finally:
            self.model_stats = model.stats
        if job.cancelled.is_set():
            return ("cancelled",)
        result = model.last_result
        self.last_decode_tps = result.stats.get("generation", {}).get("decode_tokens_per_second", 0.0)
        return ("done", result)

    def metrics(self) -> dict:
        with self.lock:
            busy = self.running is not None
            return {"requests": dict(self.counts),
                    "queue": {"waiting": self.pending - busy, "limit": self.max_queue, "busy": busy},
                    "tokens": dict(self.tokens),
                    "tokens_per_second": {
                        "last_decode": self.last_decode_tps,
                        "average": self.tokens["completion"] / self.busy_seconds if self.busy_seconds else 0.0},
                    "stats": self.model_stats}


# ---------------------------------------------------------------- request validation


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _type_error(name: str, expected: str, value) -> ApiError:
    return _bad(f"{name}: expected {expected}, got {json.dumps(value)[:80]}", name, "invalid_type")


def _int(name, value, lo=None, hi=None):
    if not _is_int(value):
        raise _type_error(name, "an integer", value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise _bad(f"{name} = {value}: expected an integer {bounds}", name)
    return value


def _number(name, value, lo, hi, lo_open=False):
    if not _is_number(value):
        raise _type_error(name, "a number", value)
    if not (lo < value <= hi if lo_open else lo <= value <= hi):
        raise _bad(f"{name} = {value}: expected a number {'>' if lo_open else '>='} {lo} and <= {hi}", name)
    return float(value)


def _bool(name, value):
    if not isinstance(value, bool):
        raise _type_error(name, "true or false", value)
    return value


def _string(name, value):
    if not isinstance(value, str):
        raise _type_error(name, "a string", value)
    return value


def _stop(name, value):
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise _type_error(name, "a string or a list of strings", value)
    if len(value) > 16:
        raise _bad(f"{name}: {len(value)} stop sequences, at most 16 are supported", name)
    return value


def _only(allowed, what):
    """A field this server accepts only at its default value."""
    def check(name, value):
        if value not in allowed:
            raise _bad(f"{name} = {json.dumps(value)[:80]} is not supported by this server ({what})",
                       name, "unsupported_value")
        return value
    return check


def _stream_options(name, value):
    if not isinstance(value, dict):
        raise _type_error(name, "an object", value)
    for key, v in value.items():
        if key != "include_usage":
            raise _bad(f"{name}.{key}: unrecognized option", f"{name}.{key}", "unknown_parameter")
        _bool(f"{name}.{key}", v)
    return value


def _response_format(name, value):
    if not isinstance(value, dict) or value.get("type") != "text" or len(value) != 1:
        raise _bad(f"{name}: only {{\"type\": \"text\"}} is supported by this server", name, "unsupported_value")
    return value


_COMMON_FIELDS = {
    "model": _string,
    "max_tokens": lambda n, v: _int(n, v, 1),
    "temperature": lambda n, v: _number(n, v, 0, 2),
    "top_p": lambda n, v: _number(n, v, 0, 1),
    "top_k": lambda n, v: _int(n, v, -1),                   # extension (as vLLM): 0 or -1 is no cut
    "seed": lambda n, v: _int(n, v, -2**63, 2**64 - 1),
    "stop": _stop,
    "stream": _bool,
    "stream_options": _stream_options,
    "n": lambda n, v: _only({1}, "one choice per request; send the request again")(n, _int(n, v, 1)),
    "user": _string,
    "ignore_eos": _bool,                                    # extension (as vLLM): generate max_tokens tokens
    "presence_penalty": lambda n, v: _only({0}, "no penalties")(n, _number(n, v, -2, 2)),
    "frequency_penalty": lambda n, v: _only({0}, "no penalties")(n, _number(n, v, -2, 2)),
}
_CHAT_FIELDS = {**_COMMON_FIELDS, "messages": None, "max_completion_tokens": lambda n, v: _int(n, v, 1),
                "logprobs": _only({False}, "no log-probabilities"), "response_format": _response_format}
_COMPLETION_FIELDS = {**_COMMON_FIELDS, "prompt": None, "echo": _only({False}, "no echo"),
                      "logprobs": _only({0}, "no log-probabilities"), "best_of": _only({1}, "one choice"),
                      "suffix": _only({""}, "no suffix")}
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _fields(body, allowed: dict, required: list[str]) -> dict:
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None, "invalid_type")
    for name in body:
        if name not in allowed:
            raise _bad(f"unrecognized request argument supplied: {name!r}", name, "unknown_parameter")
    for name in required:
        if body.get(name) is None:
            raise _bad(f"missing required parameter: {name!r}", name, "missing_required_parameter")
    out = {}
    for name, value in body.items():
        if value is None:
            continue  # null means the default, as in OpenAI's API
        check = allowed[name]
        out[name] = check(name, value) if check else value
    return out


def _messages(value) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise _type_error("messages", "a non-empty list of messages", value)
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _type_error(where, "an object with 'role' and 'content'", m)
        for key in m:
            if key not in ("role", "content", "name"):
                raise _bad(f"{where}.{key}: unrecognized or unsupported message field", f"{where}.{key}",
                           "unknown_parameter")
        role, content = m.get("role"), m.get("content")
        if role is None or content is None:
            missing = "role" if role is None else "content"
            raise _bad(f"missing required parameter: '{where}.{missing}'", f"{where}.{missing}",
                       "missing_required_parameter")
        if role not in _ROLES:
            raise _bad(f"{where}.role = {json.dumps(role)[:40]}: expected one of {', '.join(_ROLES)}",
                       f"{where}.role")
        if isinstance(content, list):  # content parts: text only
            texts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                        and set(part) <= {"type", "text"}):
                    raise _bad(f"{where}.content[{j}]: only text parts {{\"type\": \"text\", \"text\": ...}} "
                               "are supported", f"{where}.content", "unsupported_value")
                texts.append(part["text"])
            content = "\n".join(texts)
        elif not isinstance(content, str):
            raise _type_error(f"{where}.content", "a string or a list of text parts", content)
        out.append({"role": _ROLES[role], "content": content})
    return out


def _prompt(model, value) -> list[int]:
    """A completion prompt: a string, a list of token ids, or a one-element list of either."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
    elif isinstance(value, list) and value and all(isinstance(v, (str, list)) for v in value):
        raise _bad(f"prompt: {len(value)} prompts in one request; this server takes one per request",
                   "prompt", "unsupported_value")
    if isinstance(value, str):
        if not value:
            raise _bad("prompt is empty", "prompt")
        return model.encode_prompt(value)
    if isinstance(value, list) and value and all(_is_int(v) for v in value):
        if not all(0 <= v < model.config.vocab_size for v in value):
            raise _bad(f"prompt: token ids must be in 0..{model.config.vocab_size - 1}", "prompt")
        return list(value)
    raise _type_error("prompt", "a string or a non-empty list of token ids", value)


# ---------------------------------------------------------------- the app


class _Server:
    def __init__(self, model, model_name: str, api_key: str | None, max_queue: int):
        self.model, self.model_name, self.api_key = model, model_name, api_key
        self.worker = _Worker(model, max_queue)
        self.created = int(time.time())
        self.started = time.time()

    # -- plumbing
    def _check_key(self, request):
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise ApiError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "incorrect API key provided", code="invalid_api_key")

    async def _body(self, request):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body of {size} bytes exceeds the limit of {MAX_BODY_BYTES}")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_BODY_BYTES:
                raise ApiError(413, f"request body exceeds the limit of {MAX_BODY_BYTES} bytes")
        try:
            return json.loads(bytes(data))
        except (ValueError, RecursionError) as e:
            raise ApiError(400, f"could not parse the JSON body of the request ({type(e).__name__}: {e})",
                           code=None) from None

    def _max_tokens(self, prompt_tokens: int, requested: int | None, default: int | None, param: str,
                    prompt_param: str) -> int:
        context = self.model.context_length
        if requested is None:
            left = context - prompt_tokens
            if left >= 1:
                return left if default is None else min(default, left)
            requested = 1
        if prompt_tokens + requested > context:
            raise ApiError(400, f"this model's maximum context length is {context} tokens, but "
                           f"{prompt_tokens + requested} were requested ({prompt_tokens} in the {prompt_param}, "
                           f"{requested} in the completion); reduce the length of the {prompt_param} "
                           f"or {param}", param=prompt_param, code="context_length_exceeded")
        return requested

    @staticmethod
    def _sampling(p: dict, max_tokens: int) -> dict:
        top_p = p.get("top_p", DEFAULT_TOP_P)
        return dict(max_new_tokens=max_tokens, temperature=p.get("temperature", DEFAULT_TEMPERATURE),
                    top_p=top_p if top_p > 0 else 1e-9,  # top_p = 0 keeps the most likely token only
                    top_k=max(p.get("top_k", 0), 0), seed=p.get("seed"), stop=p.get("stop"),
                    ignore_eos=p.get("ignore_eos", False))

    async def _finish(self, request, job: _Job) -> tuple[str, object]:
        """Wait for a non-streamed job (cancelling it if the client leaves); return its text and result."""
        watcher = asyncio.ensure_future(_cancel_on_disconnect(request.receive, job))
        pieces = []
        try:
            while True:
                event = await job.events.get()
                if event[0] == "piece":
                    pieces.append(event[1])
                elif event[0] == "done":
                    return "".join(pieces), event[1]
                elif event[0] == "error":
                    raise ApiError(event[1], event[2], type="invalid_request_error" if event[1] < 500
                                   else "server_error", code=None)
                else:  # cancelled: the client is gone; answer anyway (nobody reads it)
                    raise ApiError(499, "request cancelled", code="cancelled")
        finally:
            watcher.cancel()
            job.cancel()

    async def _events(self, job: _Job, chunk, final, usage_chunk, include_usage: bool):
        """SSE bytes for a streamed job: one chunk per text piece, the finish chunk, usage, [DONE]."""
        first = chunk(None)
        if first is not None:
            yield _sse(first)
        while True:
            event = await job.events.get()
            if event[0] == "piece":
                yield _sse(chunk(event[1]))
            elif event[0] == "done":
                result = event[1]
                yield _sse(final(result.finish_reason))
                if include_usage:
                    yield _sse(usage_chunk(self._usage(len(job.prompt_ids), result)))
                yield _sse(b"[DONE]")
                return
            elif event[0] == "error":
                yield _sse(ApiError(event[1], event[2], code=None,
                                    type="invalid_request_error" if event[1] < 500 else "server_error").body())
                return
            else:
                return

    @staticmethod
    def _usage(prompt_tokens: int, result) -> dict:
        completion = len(result.token_ids)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    def _job(self, ids: list[int], kwargs: dict) -> _Job:
        job = _Job(ids, kwargs, asyncio.get_running_loop())
        self.worker.submit(job)
        return job

    # -- endpoints
    async def health(self, request):
        return _JSON({"status": "ok", "model": self.model_name})

    async def metrics(self, request):
        self._check_key(request)
        return _JSON({"model": self.model_name, "uptime_seconds": time.time() - self.started,
                      "context_length": self.model.context_length, **self.worker.metrics()})

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "offload-moe"}

    async def models(self, request):
        self._check_key(request)
        return _JSON({"object": "list", "data": [self._model_card()]})

    async def retrieve_model(self, request):
        self._check_key(request)
        name = request.path_params["name"]
        if name != self.model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        return _JSON(self._model_card())

    async def chat_completions(self, request):
        self._check_key(request)
        p = _fields(await self._body(request), _CHAT_FIELDS, ["model", "messages"])
        messages = _messages(p["messages"])
        if "max_tokens" in p and "max_completion_tokens" in p and p["max_tokens"] != p["max_completion_tokens"]:
            raise _bad("max_tokens and max_completion_tokens disagree; send one of them", "max_tokens")
        requested = p.get("max_completion_tokens", p.get("max_tokens"))
        param = "max_completion_tokens" if "max_completion_tokens" in p else "max_tokens"
        ids = self.model.chat_ids(messages)
        max_tokens = self._max_tokens(len(ids), requested, None, param, "messages")
        job = self._job(ids, self._sampling(p, max_tokens))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name}
        if p.get("stream"):
            def chunk(piece):
                delta = {"role": "assistant", "content": ""} if piece is None else {"content": piece}
                return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]}

            def final(reason):
                return {**head, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason}]}

            def usage_chunk(usage):
                return {**head, "choices": [], "usage": usage}

            include = p.get("stream_options", {}).get("include_usage", False)
            return _EventStream(job, self._events(job, chunk, final, usage_chunk, include))
        text, result = await self._finish(request, job)
        return _JSON({**head, "object": "chat.completion",
                      "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                   "logprobs": None, "finish_reason": result.finish_reason}],
                      "usage": self._usage(len(ids), result)})

    async def completions(self, request):
        self._check_key(request)
        p = _fields(await self._body(request), _COMPLETION_FIELDS, ["model", "prompt"])
        ids = _prompt(self.model, p["prompt"])
        max_tokens = self._max_tokens(len(ids), p.get("max_tokens"), COMPLETIONS_DEFAULT_MAX_TOKENS,
                                      "max_tokens", "prompt")
        job = self._job(ids, self._sampling(p, max_tokens))
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": self.model_name}

        def choice(text, reason):
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}

        if p.get("stream"):
            include = p.get("stream_options", {}).get("include_usage", False)
            return _EventStream(job, self._events(
                job, lambda piece: None if piece is None else {**head, "choices": [choice(piece, None)]},
                lambda reason: {**head, "choices": [choice("", reason)]},
                lambda usage: {**head, "choices": [], "usage": usage}, include))
        text, result = await self._finish(request, job)
        return _JSON({**head, "choices": [choice(text, result.finish_reason)],
                      "usage": self._usage(len(ids), result)})


def _endpoint(handler):
    """Turn ApiError / OffloadMoeError / anything unexpected into an OpenAI-style JSON error."""
    async def endpoint(request):
        try:
            return await handler(request)
        except ApiError as e:
            return e.response()
        except OffloadMoeError as e:
            return ApiError(400, str(e), code=None).response()
        except Exception as e:
            log.exception("%s %s: unexpected error", request.method, request.url.path)
            return ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").response()
    return endpoint


def create_app(model, *, model_name: str, api_key: str | None = None, max_queue: int = 8):
    """The ASGI app serving `model` under `model_name`. While the app runs it owns the model: all
    generation happens on its one worker thread. `api_key`: require `Authorization: Bearer <key>`
    (except on /health). `max_queue`: requests that may wait behind the running one (then 429)."""
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
    server = _Server(model, model_name, api_key.strip() if api_key else None, max_queue)

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
        Route("/health", _endpoint(server.health), methods=["GET"]),
        Route("/metrics", _endpoint(server.metrics), methods=["GET"]),
        Route("/v1/models", _endpoint(server.models), methods=["GET"]),
        Route("/v1/models/{name:path}", _endpoint(server.retrieve_model), methods=["GET"]),
        Route("/v1/chat/completions", _endpoint(server.chat_completions), methods=["POST"]),
        Route("/v1/completions", _endpoint(server.completions), methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error}, lifespan=lifespan)
    app.state.server = server
    return app
