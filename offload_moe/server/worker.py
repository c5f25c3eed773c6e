"""The one thread that runs generations and the bounded queue in front of it: the model is not
thread-safe. Up to `parallel` requests decode together (`batch.DecodeBatch`): each step prefills one
chunk of the oldest request still reading its prompt and advances every other running request by
one token, so a new request's prompt never stalls the streams already flowing. Requests start in
arrival order. A request is a `Job`; the worker hands its pieces back to the request's coroutine on
the event loop and keeps the counters /metrics reports."""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field

from ..generation.batch import DecodeBatch
from ..base.errors import OffloadMoeError
from .responses import ApiError

log = logging.getLogger("offload_moe.server")

@dataclass
class Job:
    prompt_ids: list[int]
    kwargs: dict
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    pieces: bool = True   # post each piece of text as it is made (streaming); False: only the end

    def cancel(self):
        self.cancelled.set()

    def post(self, event: tuple):
        """From the worker thread: hand an event to the request's coroutine."""
        post_all(self.loop, [(self, event)])


def post_all(loop: asyncio.AbstractEventLoop, events: list[tuple[Job, tuple]]) -> None:
    """From the worker thread: hand each job its events in one wake-up of the event loop. Why: each
    wake-up writes to the loop's socket and lets the loop thread take the GIL from the worker; one per
    token of every stream cost ~1.5 ms a token on a busy 2-core machine (more than a batched step)."""
    def deliver():
        for job, event in events:
            job.events.put_nowait(event)
    try:
        loop.call_soon_threadsafe(deliver)
    except RuntimeError:  # the event loop is closed: the server is gone
        for job, _ in events:
            job.cancel()


@dataclass(eq=False)
class _Running:
    """A job being generated: its run (text, stops, result) and its sequence in the batch."""
    job: Job
    run: object
    seq: object
    started: float
    sent: int = 0    # logprob entries already posted


class Worker:
    """The single thread that runs generations, and the bounded queue in front of it."""

    def __init__(self, model, max_queue: int, parallel: int = 1):
        if not isinstance(parallel, int) or isinstance(parallel, bool) or parallel < 1:
            raise OffloadMoeError(f"parallel = {parallel!r}, expected an integer >= 1")
        self.model, self.max_queue, self.parallel = model, max_queue, parallel
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.pending = 0          # accepted and not finished: waiting + running
        self.running: list[Job] = []
        self.counts = {"served": 0, "cancelled": 0, "failed": 0, "rejected": 0}
        self.tokens = {"prompt": 0, "completion": 0}
        self.busy_seconds = 0.0
        self.request_seconds = 1.0  # moving average, for Retry-After
        self.last_decode_tps = 0.0
        self.model_stats = model.stats
        self.outbox: list[tuple[Job, tuple]] = []   # events of this step, posted together (`_flush`)

    # -- from the event loop
    def start(self):
        with self.lock:
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._loop, name="offload-moe-worker", daemon=True)
                self.thread.start()

    def stop(self, timeout: float = 5.0):
        with self.lock:
            thread = self.thread
            for job in self.running:
                job.cancel()
        self.jobs.put(None)
        if thread is not None:
            thread.join(timeout)

    def submit(self, job: Job):
        self.start()
        with self.lock:
            if self.pending >= self.max_queue + self.parallel:
                self.counts["rejected"] += 1
                retry = max(1, math.ceil(self.request_seconds * (self.pending - self.max_queue - self.parallel + 1)
                                         / self.parallel))
                raise ApiError(429, f"the server is busy: {self.waiting} requests are waiting "
                               f"(limit {self.max_queue}); retry after {retry} s",
                               type="rate_limit_error", code="rate_limit_exceeded",
                               headers={"Retry-After": str(retry)})
            self.pending += 1
        self.jobs.put(job)

    @property
    def waiting(self) -> int:
        return self.pending - len(self.running)

    # -- on the worker thread
    def _loop(self):
        self.model.transformer.set_slots(self.parallel)
        batch = DecodeBatch(self.model.transformer)
        active: list[_Running] = []
        while True:
            while len(active) < self.parallel:       # admit waiting jobs, in arrival order
                if not active:
                    self._flush()                    # before waiting for work
                try:
                    job = self.jobs.get(block=not active)
                except queue.Empty:
                    break
                if job is None:
                    for r in list(active):
                        self._finish(batch, active, r, ("cancelled",))
                    self._flush()
                    return
                self._admit(batch, active, job)
            if not active:
                continue
            for r in [r for r in active if r.job.cancelled.is_set()]:
                self._finish(batch, active, r, ("cancelled",))
            t0 = time.perf_counter()
            try:
                produced = batch.step() if batch.sequences else []
            except BaseException:  # never leave a client waiting
                log.exception("worker: unexpected error")
                for r in list(active):
                    self._finish(batch, active, r, ("error", 500, "internal error"))
                continue
            for seq, token_id in produced:
                self._advance(batch, active, seq.owner, token_id)
            self._flush()
            with self.lock:
                self.busy_seconds += time.perf_counter() - t0

    def _post(self, job: Job, event: tuple) -> None:
        self.outbox.append((job, event))

    def _flush(self) -> None:
        """Post this step's events, one wake-up per event loop."""
        if not self.outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for job, event in self.outbox:
            by_loop.setdefault(job.loop, []).append((job, event))
        self.outbox = []
        for loop, events in by_loop.items():
            post_all(loop, events)

    def _admit(self, batch: DecodeBatch, active: list, job: Job):
        with self.lock:
            self.running.append(job)
        r = _Running(job, None, None, time.perf_counter())
        active.append(r)
        if job.cancelled.is_set():
            return self._finish(batch, active, r, ("cancelled",))
        try:
            r.run = self.model.start(job.prompt_ids, should_stop=job.cancelled.is_set, **job.kwargs)
            timing = r.run.begin()
            r.seq = batch.add(r.run.ids, r.run.max_new_tokens, r.run.sampling, timing, r.run.steering, owner=r)
        except OffloadMoeError as e:
            self._finish(batch, active, r, ("error", 400, str(e)))
        except BaseException:
            log.exception("worker: unexpected error")
            self._finish(batch, active, r, ("error", 500, "internal error"))

    def _advance(self, batch: DecodeBatch, active: list, r: _Running, token_id: int | None):
        """Hand one generated token to its run; post its text; finish the job when the run ends."""
        if r not in active:
            return
        if token_id is None:
            return self._finish(batch, active, r, ("error", 400, r.seq.error))
        run = r.run
        piece = run.push(token_id)
        if r.job.cancelled.is_set():
            return self._finish(batch, active, r, ("cancelled",))
        if piece and r.job.pieces:
            self._post(r.job, ("piece", piece, self._entries(r)))
        if run.finish_reason is None and not r.seq.finished:
            return
        tail = run.end()
        if tail and r.job.pieces:
            self._post(r.job, ("piece", tail, self._entries(r)))
        result = run.result
        self.model.last_result, self.model.last_timing = result, run.timing
        self.last_decode_tps = result.stats.get("generation", {}).get("decode_tokens_per_second", 0.0)
        self._finish(batch, active, r, ("done", result, result.logprobs[r.sent:] if result.logprobs is not None
                                        else None))

    @staticmethod
    def _entries(r: _Running):
        if r.run.logprobs is None:
            return None
        n = len(r.run.token_ids)
        entries, r.sent = r.run.logprobs.entries[r.sent:n], n
        return entries

    def _finish(self, batch: DecodeBatch, active: list, r: _Running, event: tuple):
        if r.seq is not None:
            batch.remove(r.seq)
        active.remove(r)
        seconds = time.perf_counter() - r.started
        job = r.job
        with self.lock:
            self.running.remove(job)
            self.pending -= 1
            kind = event[0]
            self.counts[{"done": "served", "cancelled": "cancelled"}.get(kind, "failed")] += 1
            if kind == "done":
                self.request_seconds = 0.7 * self.request_seconds + 0.3 * seconds
                self.tokens["prompt"] += len(job.prompt_ids)
                self.tokens["completion"] += len(event[1].token_ids)
            self.model_stats = self.model.stats
        self._post(job, event)  # after the bookkeeping: a client's next request finds the worker free

    def metrics(self) -> dict:
        with self.lock:
            running = len(self.running)
            return {"requests": dict(self.counts),
                    "queue": {"waiting": self.pending - running, "limit": self.max_queue, "busy": running > 0,
                              "running": running, "parallel": self.parallel},
                    "tokens": dict(self.tokens),
                    "tokens_per_second": {
                        "last_decode": self.last_decode_tps,
                        "average": self.tokens["completion"] / self.busy_seconds if self.busy_seconds else 0.0},
                    "stats": self.model_stats}
