"""The one thread that runs generations, in arrival order, and the bounded queue in front of it: the
model is not thread-safe. A request is a `Job`; the worker hands its pieces back to the request's
coroutine on the event loop and keeps the counters /metrics reports."""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field

from ..errors import OffloadMoeError
from .responses import ApiError

log = logging.getLogger("offload_moe.server")


@dataclass
class Job:
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


class Worker:
    """The single thread that runs generations, and the bounded queue in front of it."""

    def __init__(self, model, max_queue: int):
        self.model, self.max_queue = model, max_queue
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.pending = 0          # accepted and not finished: waiting + running
        self.running: Job | None = None
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

    def submit(self, job: Job):
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
                event = ("error", 500, "internal error")  # the body says no more; the log has it
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

    def _run(self, job: Job) -> tuple:
        """Posts ("piece", text, logprob entries or None) per piece; returns the final event."""
        model = self.model
        try:
            run = model.start(job.prompt_ids, should_stop=job.cancelled.is_set, **job.kwargs)
            pieces = iter(run)
            sent = 0
            try:
                for piece in pieces:
                    if job.cancelled.is_set():
                        break
                    entries = None
                    if run.logprobs is not None:
                        n = len(run.token_ids)
                        entries, sent = run.logprobs.entries[sent:n], n
                    job.post(("piece", piece, entries))
            finally:
                pieces.close()
        except OffloadMoeError as e:
            return ("error", 400, str(e))
        finally:
            self.model_stats = model.stats
        if job.cancelled.is_set():
            return ("cancelled",)
        result = model.last_result = run.result
        self.last_decode_tps = result.stats.get("generation", {}).get("decode_tokens_per_second", 0.0)
        return ("done", result, result.logprobs[sent:] if result.logprobs is not None else None)

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
