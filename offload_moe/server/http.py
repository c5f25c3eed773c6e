"""How uvicorn runs the app: limits on connections and on slow clients.

uvicorn closes an idle keep-alive connection (`timeout_keep_alive`) but has no limit on how long a
request's headers may take: a client that sends half a request line and waits keeps its connection
(and a file descriptor) forever, and a thousand of them exhaust the process. `HeaderTimeout` is
uvicorn's h11 protocol with one more timer: from the first byte of a request (or the connection's
start) to the end of its headers at most `header_timeout` seconds, else the connection is closed.
The body has its own deadline in the app (`create_app(body_timeout=...)`). `limit_concurrency`
answers 503 past that many open connections, and the process's file descriptor limit is raised to
its hard limit so those connections fail as HTTP answers, not as accept() errors in the log.
"""

from __future__ import annotations

import logging

log = logging.getLogger("offload_moe.server")

HEADER_TIMEOUT = 10.0      # seconds from a request's first byte to the end of its headers
KEEP_ALIVE_TIMEOUT = 5.0   # seconds an idle keep-alive connection stays open (uvicorn's default)
MAX_CONNECTIONS = 512      # open connections before new requests get 503


def header_timeout_protocol(header_timeout: float):
    """uvicorn's H11Protocol, closing a connection whose request headers take longer than `header_timeout`."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeout(H11Protocol):
        header_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                if self.header_timer is None:   # a new request has begun: its headers are on the clock
                    self._arm()
            else:
                self._disarm()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def _arm(self):
            self.header_timer = self.loop.call_later(header_timeout, self._slow_headers)

        def _disarm(self):
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def _slow_headers(self):
            self.header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():  # headers still incomplete
                log.debug("closed a connection whose request headers took longer than %g s", header_timeout)
                self.transport.close()

        def on_response_complete(self):
            super().on_response_complete()
            self._disarm()   # an idle keep-alive connection is timed by timeout_keep_alive until it sends

    return HeaderTimeout


def raise_file_limit() -> None:
    """Lift the soft limit on open files to the hard one (many connections must not fail in accept())."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):  # not on this platform, or not allowed: keep the limit
        pass


def uvicorn_config(app, *, header_timeout: float = HEADER_TIMEOUT, keep_alive_timeout: float = KEEP_ALIVE_TIMEOUT,
                   max_connections: int = MAX_CONNECTIONS, **kwargs):
    """A uvicorn.Config for `app` with these limits (kwargs: the rest of uvicorn.Config's arguments)."""
    import uvicorn

    return uvicorn.Config(app, http=header_timeout_protocol(header_timeout), timeout_keep_alive=keep_alive_timeout,
                          limit_concurrency=max_connections, **kwargs)
