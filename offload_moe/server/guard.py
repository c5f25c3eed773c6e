"""What a request must look like before it is read, and what an error may say.

A server on localhost is reachable from every web page the user opens: a page can POST `text/plain`
without a CORS preflight (cross-site request forgery), and a DNS name rebound to 127.0.0.1 sends its
own `Host` header (DNS rebinding). So every request's `Host` must name the bound address (the
loopback names by default), a browser's `Origin`, when sent, must be one of those hosts or an
`--allowed-origin`, and a POST must say `application/json`. Error messages leave the server with
absolute paths reduced to their last component.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from .responses import ApiError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~/:])(?:/[^\s/'\"`,;()\[\]{}]+)+/?")


def public_message(message: str) -> str:
    """`message` with every absolute path replaced by its last component."""
    return _ABSOLUTE_PATH.sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1] or "/", message)


def _host_name(value: str) -> str:
    """'Host' header or netloc -> the host name alone, lower case, without brackets or port."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def allowed_hosts_for(bind_host: str) -> tuple[str, ...] | None:
    """The Host names a server bound to `bind_host` answers to (None: any, for a wildcard address)."""
    try:
        ip = ipaddress.ip_address(bind_host.strip("[]"))
    except ValueError:
        return tuple(dict.fromkeys((*LOOPBACK_NAMES, bind_host.lower())))
    if ip.is_unspecified:
        return None
    return tuple(dict.fromkeys((*LOOPBACK_NAMES, str(ip))))


class RequestGuard:
    def __init__(self, allowed_hosts: tuple[str, ...] | None = LOOPBACK_NAMES,
                 allowed_origins: tuple[str, ...] = ()):
        self.hosts = None if allowed_hosts is None else {h.lower().strip("[]") for h in allowed_hosts}
        self.origins = {o.rstrip("/").lower() for o in allowed_origins}

    def check(self, request) -> None:
        host = request.headers.get("host", "")
        if self.hosts is not None and _host_name(host) not in self.hosts:
            raise ApiError(421, f"Host {host!r} is not this server's address (expected one of "
                           f"{', '.join(sorted(self.hosts))})", code="host_not_allowed")
        origin = request.headers.get("origin")
        if origin is not None and not self._origin_ok(origin, _host_name(host)):
            raise ApiError(403, f"Origin {origin!r} is not allowed (start the server with --allowed-origin "
                           f"{origin} to allow it)", code="origin_not_allowed")
        if request.method == "POST":
            kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                raise ApiError(415, f"Content-Type {kind or '(none)'!r} is not accepted: send "
                               "'Content-Type: application/json'", code="unsupported_media_type")

    def _origin_ok(self, origin: str, host: str) -> bool:
        """A browser's Origin: an allowed one, the server's own (same as Host), or a host it answers to."""
        if origin.rstrip("/").lower() in self.origins:
            return True
        if "://" not in origin:  # "null" (sandboxed frames, file://) and anything malformed
            return False
        name = _host_name(urlsplit(origin).netloc)
        return name == host or (self.hosts is not None and name in self.hosts)
