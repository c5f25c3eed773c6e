"""The OpenAI-compatible endpoints of one loaded model (`Endpoints`): check the key, read and validate
the request (bounded body, known fields, the prompt prepared off the event loop), queue a job on the
worker and answer it as JSON or as a stream of server-sent events. `app.create_app` routes to them."""

from __future__ import annotations


import asyncio
import hmac
import json
import logging
import time
import uuid

from ..generation.constrain import grammar_from
from ..generation.generate import DEFAULT_SAMPLING
from .logprobs import TokenText, chat_logprobs, completion_logprobs
from .guard import public_message
from .prep import PrepPool, max_token_chars
from .prometheus import CONTENT_TYPE as PROMETHEUS_TYPE, render as prometheus_text, wants_prometheus
from .responses import JSON, ApiError, EventStream, Text, bad, cancel_on_disconnect, sse
from .structured import forced_call, response_format_schema
from .tools import HARMONY, ToolCallParser, tool_format
from .validation import CHAT_FIELDS, COMPLETION_FIELDS, IGNORED_FIELDS, chat_messages, check_fields, completion_prompt
from .worker import Job, Worker

log = logging.getLogger("offload_moe.server")

MAX_BODY_BYTES = 8 * 1024 * 1024
COMPLETIONS_DEFAULT_MAX_TOKENS = 16   # OpenAI's default for /v1/completions; chat defaults to the context left
DEFAULT_TEMPERATURE, DEFAULT_TOP_P = DEFAULT_SAMPLING.temperature, DEFAULT_SAMPLING.top_p  # the library's
INTERNAL_ERROR = "internal server error (a bug in offload-moe; the server log has the details)"
PREPARE_TIMEOUT = 4.0   # seconds a request may wait for its prompt (template + tokenizer): one error within 5 s
BODY_TIMEOUT = 60.0     # seconds from the end of the headers to the end of the body
PREP_THREADS = 2        # prompts prepared at once (a stuck template holds one until it ends)
PARSE_IN_THREAD = 64 * 1024  # bodies larger than this are parsed off the event loop


class Endpoints:
    def __init__(self, model, model_name: str, api_key: str | None, max_queue: int, prepare_timeout: float,
                 body_timeout: float, parallel: int = 1):
        self.model, self.model_name, self.api_key = model, model_name, api_key
        self.worker = Worker(model, max_queue, parallel)
        self.prep = PrepPool(PREP_THREADS, prepare_timeout, backlog=max_queue + parallel)
        self.body_timeout = body_timeout
        self.created = int(time.time())
        self.started = time.time()
        self.ignored_logged: set[str] = set()
        # No prompt longer than this can fit the context, whatever it says (each token covers at most
        # max_token_chars characters; x4 for normalizers that merge characters): refused before tokenizing.
        chars = max_token_chars(model.tokenizer) if model.tokenizer is not None else 0
        self.max_prompt_chars = 4 * chars * model.context_length if chars else None

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
        """The request's JSON body: its size checked before it is read (Content-Length) and as it
        arrives, read within body_timeout seconds, parsed off the event loop when large."""
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body of {size} bytes exceeds the limit of {MAX_BODY_BYTES}",
                           headers={"Connection": "close"})
        data = bytearray()

        async def read():
            async for chunk in request.stream():
                data.extend(chunk)
                if len(data) > MAX_BODY_BYTES:
                    raise ApiError(413, f"request body exceeds the limit of {MAX_BODY_BYTES} bytes",
                                   headers={"Connection": "close"})
        try:
            await asyncio.wait_for(read(), self.body_timeout)
        except asyncio.TimeoutError:
            log.info("%s: the request body did not arrive within %g s (%d bytes came): answered 408",
                     request.url.path, self.body_timeout, len(data))
            raise ApiError(408, f"the request body did not arrive within {self.body_timeout:g} s",
                           code="timeout", headers={"Connection": "close"}) from None
        try:
            if len(data) > PARSE_IN_THREAD:  # (json.loads keeps the GIL: ~10 ms per MB here, a pause at most)
                return await self.prep.run(json.loads, data, what="parsing the request body")
            return json.loads(data)
        except (ValueError, RecursionError) as e:
            raise ApiError(400, f"could not parse the JSON body of the request ({type(e).__name__}: {e})",
                           code=None) from None

    def _fields(self, body, allowed: dict, required: list[str]) -> dict:
        """check_fields, logging once per field the accepted-but-ignored ones a request carried."""
        p = check_fields(body, allowed, required)
        for name in IGNORED_FIELDS:
            if name in body and name not in allowed and name not in self.ignored_logged:
                self.ignored_logged.add(name)
                log.info("request field %r accepted and ignored (it does not change generation here; "
                         "logged once)", name)
        return p

    def _check_logit_bias(self, p: dict):
        vocab = self.model.config.vocab_size
        for token in p.get("logit_bias", {}):
            if token >= vocab:
                raise bad(f"logit_bias: token id {token} is outside the vocabulary (0..{vocab - 1})", "logit_bias")

    def _check_prompt_chars(self, chars: int, param: str):
        if self.max_prompt_chars is not None and chars > self.max_prompt_chars:
            context = self.model.context_length
            raise ApiError(400, f"this model's maximum context length is {context} tokens, and the {param} has "
                           f"{chars:,} characters, more than {context} tokens can hold; reduce the length of "
                           f"the {param}", param=param, code="context_length_exceeded")

    def _chat_ids(self, messages, tools, template_vars: dict, schema) -> list[int]:
        """On a prep thread: the chat template rendered, its size checked, tokenized; the schema checked."""
        if schema is not None:
            grammar_from(json_schema=schema)
        text = self.model.chat_text(messages, tools, **template_vars)
        self._check_prompt_chars(len(text), "messages")
        return self.model.encode_chat(text)

    def _prompt_ids(self, prompt: str) -> list[int]:
        return self.model.encode_prompt(prompt)

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
        # What the request leaves out (None) is the model's default: generation_config.json, else the library's.
        top_p, top_k = p.get("top_p"), p.get("top_k")
        return dict(max_new_tokens=max_tokens, temperature=p.get("temperature"),
                    top_p=top_p if top_p is None or top_p > 0 else 1e-9,  # top_p = 0 keeps the most likely token
                    top_k=None if top_k is None else max(top_k, 0), seed=p.get("seed"), stop=p.get("stop"),
                    logit_bias=p.get("logit_bias"),
                    ignore_eos=p.get("ignore_eos", False), min_p=p.get("min_p", 0.0),
                    repetition_penalty=p.get("repetition_penalty", 1.0),
                    presence_penalty=p.get("presence_penalty", 0.0),
                    frequency_penalty=p.get("frequency_penalty", 0.0))

    async def _finish(self, request, job: Job) -> tuple[str, object]:
        """Wait for a non-streamed job (cancelling it if the client leaves); return its text and result
        (whose `.logprobs` has the entries of every generated token when they were asked for)."""
        watcher = asyncio.ensure_future(cancel_on_disconnect(request.receive, job))
        try:
            while True:
                event = await job.events.get()
                if event[0] == "piece":   # (a job made with pieces=False gets none)
                    continue
                elif event[0] == "done":
                    return event[1].text, event[1]
                elif event[0] == "error":
                    raise _failed(event)
                else:  # cancelled: the client is gone; answer anyway (nobody reads it)
                    raise ApiError(499, "request cancelled", code="cancelled")
        finally:
            watcher.cancel()
            job.cancel()

    async def _events(self, job: Job, chunk, final, usage_chunk, include_usage: bool):
        """SSE bytes for a streamed job: the chunks `chunk(piece, logprob entries)` returns for each
        text piece (a dict or a list of them), those of `final(result, remaining entries)`, usage, [DONE]."""
        for obj in _listed(chunk(None, None)):
            yield sse(obj)
        while True:
            event = await job.events.get()
            if event[0] == "piece":
                for obj in _listed(chunk(event[1], event[2])):
                    yield sse(obj)
            elif event[0] == "done":
                result = event[1]
                for obj in _listed(final(result, event[2])):
                    yield sse(obj)
                if include_usage:
                    yield sse(usage_chunk(self._usage(len(job.prompt_ids), result)))
                yield sse(b"[DONE]")
                return
            elif event[0] == "error":
                yield sse(_failed(event).body())
                return
            else:
                return

    @staticmethod
    def _usage(prompt_tokens: int, result) -> dict:
        completion = len(result.token_ids)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    def _job(self, ids: list[int], kwargs: dict, stream: bool) -> Job:
        job = Job(ids, kwargs, asyncio.get_running_loop(), pieces=stream)
        self.worker.submit(job)
        return job

    # -- endpoints
    async def health(self, request):
        return JSON({"status": "ok", "model": self.model_name})

    async def metrics(self, request):
        """JSON, or Prometheus' text format for `?format=prometheus` or an Accept of text/plain or
        application/openmetrics-text (what Prometheus sends)."""
        self._check_key(request)
        metrics = {"model": self.model_name, "uptime_seconds": time.time() - self.started,
                   "context_length": self.model.context_length, **self.worker.metrics(),
                   "prepare": self.prep.metrics()}
        if wants_prometheus(request.query_params, request.headers.get("accept", "")):
            return Text(prometheus_text(metrics, self.model_name), PROMETHEUS_TYPE)
        return JSON(metrics)

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "offload-moe"}

    async def models(self, request):
        self._check_key(request)
        return JSON({"object": "list", "data": [self._model_card()]})

    async def retrieve_model(self, request):
        self._check_key(request)
        name = request.path_params["name"]
        if name != self.model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        return JSON(self._model_card())

    async def chat_completions(self, request):
        self._check_key(request)
        p = self._fields(await self._body(request), CHAT_FIELDS, ["model", "messages"])
        self._check_logit_bias(p)
        messages = chat_messages(p["messages"])
        if "max_tokens" in p and "max_completion_tokens" in p and p["max_tokens"] != p["max_completion_tokens"]:
            raise bad("max_tokens and max_completion_tokens disagree; send one of them", "max_tokens")
        if "top_logprobs" in p and not p.get("logprobs"):
            raise bad("top_logprobs needs logprobs: true", "top_logprobs")
        requested = p.get("max_completion_tokens", p.get("max_tokens"))
        param = "max_completion_tokens" if "max_completion_tokens" in p else "max_tokens"
        tools = p.get("tools") or None
        if p.get("tool_choice") == "none":
            tools = None
        forced = forced_call(p.get("tool_choice"), tools)   # a tool call the request forces, as bare JSON
        schema = forced.schema if forced is not None else response_format_schema(p.get("response_format"))
        if forced is not None and p.get("response_format", {}).get("type", "text") != "text":
            raise bad("response_format and a forced tool_choice both constrain the output; send one",
                      "response_format")
        fmt = tool_format(self.model.tokenizer.chat_template if self.model.tokenizer else None)
        if tools and fmt is None and forced is None:
            raise bad("tools: this model's chat template defines no tool-call format this server can parse "
                      "(it knows Qwen's <tool_call>, Mistral's [TOOL_CALLS] and gpt-oss's channels)", "tools",
                      "unsupported_value")
        # Constrained output is bare JSON, never in the template's tool-call or channel format: no parser.
        parser = ToolCallParser(fmt) if fmt is not None and schema is None and (tools or fmt == HARMONY) else None
        template_vars = {"reasoning_effort": p["reasoning_effort"]} if "reasoning_effort" in p else {}
        self._check_prompt_chars(sum(len(m["content"]) for m in messages), "messages")
        ids = await self.prep.run(self._chat_ids, messages, tools, template_vars, schema)
        max_tokens = self._max_tokens(len(ids), requested, None, param, "messages")
        kwargs = self._sampling(p, max_tokens)
        if schema is not None:
            kwargs["json_schema"] = schema
        if p.get("logprobs"):
            kwargs["logprobs"] = p.get("top_logprobs", 0)
        if parser is not None:
            kwargs["skip_special_tokens"] = False   # the markers are special tokens in some families
        job = self._job(ids, kwargs, bool(p.get("stream")))
        text_of = TokenText(self.model.tokenizer)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name}

        def logprobs_of(entries):
            return chat_logprobs(entries, text_of) if entries is not None else None

        if p.get("stream"):
            calls_sent = []

            def delta_chunks(content, calls, entries):
                out = []
                if content or entries:
                    out.append({"content": content})
                for call in calls:
                    out.append({"tool_calls": [{"index": len(calls_sent), **call}]})
                    calls_sent.append(call)
                lp = logprobs_of(entries) if entries else None
                return [{**head, "choices": [{"index": 0, "delta": d, "logprobs": lp if i == 0 else None,
                                              "finish_reason": None}]} for i, d in enumerate(out)]

            forced_text = []

            def chunk(piece, entries):
                if piece is None:
                    return {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}]}
                if forced is not None:  # the call's JSON: sent whole at the end
                    forced_text.append(piece)
                    return None
                content, calls = parser.feed(piece) if parser is not None else (piece, [])
                return delta_chunks(content, calls, entries)

            def final(result, entries):
                content, calls = parser.finish() if parser is not None else ("", [])
                if forced is not None:
                    call = forced.call("".join(forced_text))
                    content, calls = ("", [call]) if call is not None else ("".join(forced_text), [])
                reason = "tool_calls" if calls_sent or calls else result.finish_reason
                return delta_chunks(content, calls, entries) + [
                    {**head, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason}]}]

            def usage_chunk(usage):
                return {**head, "choices": [], "usage": usage}

            include = p.get("stream_options", {}).get("include_usage", False)
            return EventStream(job, self._events(job, chunk, final, usage_chunk, include))
        text, result = await self._finish(request, job)
        message = {"role": "assistant", "content": text}
        reason = result.finish_reason
        call = forced.call(text) if forced is not None else None
        if call is not None:
            message["content"], message["tool_calls"], reason = None, [call], "tool_calls"
        if parser is not None:
            content, calls = parser.feed(text)
            more, later = parser.finish()
            message["content"] = (content + more) or None
            if calls + later:
                message["tool_calls"], reason = calls + later, "tool_calls"
                message["content"] = message["content"] if (message["content"] or "").strip() else None
        return JSON({**head, "object": "chat.completion",
                      "choices": [{"index": 0, "message": message, "logprobs": logprobs_of(result.logprobs),
                                   "finish_reason": reason}],
                      "usage": self._usage(len(ids), result)})

    async def completions(self, request):
        self._check_key(request)
        p = self._fields(await self._body(request), COMPLETION_FIELDS, ["model", "prompt"])
        self._check_logit_bias(p)
        prompt = completion_prompt(self.model, p["prompt"])
        if isinstance(prompt, str):
            self._check_prompt_chars(len(prompt), "prompt")
            ids = await self.prep.run(self._prompt_ids, prompt)
        else:
            ids = prompt
        max_tokens = self._max_tokens(len(ids), p.get("max_tokens"), COMPLETIONS_DEFAULT_MAX_TOKENS,
                                      "max_tokens", "prompt")
        kwargs = self._sampling(p, max_tokens)
        if "logprobs" in p:
            kwargs["logprobs"] = p["logprobs"]
        job = self._job(ids, kwargs, bool(p.get("stream")))
        text_of = TokenText(self.model.tokenizer)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": self.model_name}
        offset = [0]

        def choice(text, reason, entries):
            lp = None
            if entries is not None:
                lp = completion_logprobs(entries, text_of, offset[0])
                offset[0] += sum(len(t) for t in lp["tokens"])
            return {"index": 0, "text": text, "logprobs": lp, "finish_reason": reason}

        if p.get("stream"):
            include = p.get("stream_options", {}).get("include_usage", False)
            return EventStream(job, self._events(
                job, lambda piece, entries: None if piece is None else {**head, "choices": [choice(piece, None, entries)]},
                lambda result, entries: {**head, "choices": [choice("", result.finish_reason, entries)]},
                lambda usage: {**head, "choices": [], "usage": usage}, include))
        text, result = await self._finish(request, job)
        return JSON({**head, "choices": [choice(text, result.finish_reason, result.logprobs)],
                      "usage": self._usage(len(ids), result)})


def _listed(obj) -> list:
    return [] if obj is None else obj if isinstance(obj, list) else [obj]


def _failed(event: tuple) -> ApiError:
    """The answer to a worker's ("error", status, message) event."""
    status, message = event[1], public_message(event[2]) if event[1] < 500 else INTERNAL_ERROR
    return ApiError(status, message, type="invalid_request_error" if status < 500 else "server_error", code=None)


