"""Prompt preparation off the event loop: rendering the chat template and tokenizing run on a few
daemon threads, with a deadline per request and a bound on how many run at once.

Why: the event loop answers every connection (health checks included); a chat template with nested
loops, or tokenizing megabytes of text, would freeze all of them if it ran there. Here a request
waits at most `timeout` seconds for its prompt and then gets one clear error, whatever the work
still does in its thread. A thread that is stuck (a template that never ends) keeps its place in
the pool until it returns, so at most `threads` of them ever run: later requests are told the server
is busy instead of piling up threads. The threads are daemons: they never hold up the process when
it is told to stop (SIGTERM, Ctrl-C), which a `concurrent.futures` pool would (it joins at exit).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable

from .responses import ApiError

log = logging.getLogger("offload_moe.server")


class PrepPool:
    """`await pool.run(fn, *args)`: fn(*args) on a pool thread, within `timeout` seconds."""

    def __init__(self, threads: int = 2, timeout: float = 4.0):
        self.size, self.timeout = threads, timeout
        self.work: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        self.busy = 0              # calls accepted and not yet returned (queued or running)
        self.timeouts = 0          # requests answered with a timeout error (for /metrics)
        self.threads: list[threading.Thread] = []

    def _start(self):
        while len(self.threads) < self.size:
            thread = threading.Thread(target=self._loop, name=f"offload-moe-prep-{len(self.threads)}", daemon=True)
            thread.start()
            self.threads.append(thread)

    async def run(self, fn: Callable, *args, what: str = "preparing the prompt"):
        """fn(*args) off the event loop. Raises 503 when every thread is busy, 408 past the deadline
        (the work goes on in its thread; its result is dropped), or what fn raised."""
        with self.lock:
            if self.busy >= self.size:
                raise ApiError(503, f"the server is busy preparing {self.busy} other prompts; retry shortly",
                               type="server_error", code="server_busy", headers={"Retry-After": "1"})
            self.busy += 1
            self._start()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.work.put((fn, args, loop, future))
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.timeout)
        except asyncio.TimeoutError:
            with self.lock:
                self.timeouts += 1
            log.warning("%s took longer than %g s: answered with an error (the work goes on in its thread)",
                        what, self.timeout)
            raise ApiError(408, f"{what} took longer than {self.timeout:g} s (the chat template or the tokenizer "
                           "on this input is too slow); send a shorter conversation", code="timeout") from None

    def _loop(self):
        while True:
            fn, args, loop, future = self.work.get()
            try:
                result, error = fn(*args), None
            except BaseException as e:  # handed to the request that asked
                result, error = None, e
            with self.lock:
                self.busy -= 1
            try:
                loop.call_soon_threadsafe(_settle, future, result, error)
            except RuntimeError:  # the event loop is closed: the server is gone
                pass

    def metrics(self) -> dict:
        with self.lock:
            return {"busy": self.busy, "threads": self.size, "timeouts": self.timeouts}


def _settle(future: asyncio.Future, result, error):
    if future.done():  # nobody waits any more (the request timed out or went away)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def max_token_chars(tokenizer) -> int:
    """The most characters one token can stand for: the longest entry of the vocabulary (a byte-level
    token's string has one character per byte, and a byte is at least one character's worth)."""
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    return max((len(token) for token in vocab), default=1)
