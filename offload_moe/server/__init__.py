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

The modules: `app` (the app and its routes), `endpoints` (the handlers of one model's API), `validation`
(the request bodies), `worker` (the generation thread and its queue), `responses` (JSON, errors and
server-sent events), `prep` (chat templates and tokenizing off the event loop, with a deadline), `http`
(uvicorn's limits: header timeout, connections), `structured` (response_format and forced tool calls as
JSON schemas), `prometheus` (/metrics as Prometheus text).
"""

from .app import INSTALL_HINT, ServerOptions, create_app, require
from .endpoints import COMPLETIONS_DEFAULT_MAX_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TOP_P, MAX_BODY_BYTES, log
from .responses import ApiError

__all__ = ["create_app", "ServerOptions", "require", "ApiError", "INSTALL_HINT", "MAX_BODY_BYTES", "COMPLETIONS_DEFAULT_MAX_TOKENS",
           "DEFAULT_TEMPERATURE", "DEFAULT_TOP_P", "log"]
