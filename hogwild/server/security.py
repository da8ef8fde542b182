"""ASGI guards in front of the app: a Host allow-list, an optional API key, a body size limit, and a
last net that turns any unexpected exception into a JSON 500 (the connection stays usable).

Each answers in OpenAI's error shape, before the app reads anything it does not need.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import secrets
from collections.abc import Iterable

from fastapi import HTTPException
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .responses import error_response

log = logging.getLogger(__name__)

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
WILDCARD_ADDRESSES = ("", "0.0.0.0", "::")
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
HOST = re.compile(r"(?:\[(?P<ip6>[0-9a-f:.]+)\]|(?P<name>[a-z0-9_.-]+))(?::[0-9]{1,5})?")
MAX_SHOWN_CHARS = 64


def allowed_hosts(bind_host: str, extra: Iterable[str] = ()) -> frozenset[str] | None:
    """The Host names the server answers: localhost names, the address it is bound to (unless it
    is a wildcard) and ``extra``; None when ``extra`` holds ``*`` (any host)."""
    extra = [h.strip().lower() for h in extra if h.strip()]
    if "*" in extra:
        return None
    hosts = {*LOCAL_HOSTS, *extra}
    bind = host_name(bind_host)
    if bind not in WILDCARD_ADDRESSES:
        hosts.add(bind)
    return frozenset(hosts)


def host_name(host: str | None) -> str:
    """The name in a Host header, without the port and the brackets of an IPv6 address; "" for a
    header that is not ``name[:port]``, ``[ipv6][:port]`` or a bare IPv6 address (such as
    ``127.0.0.1:8000@evil.example``)."""
    host = (host or "").strip().lower()
    match = HOST.fullmatch(host)
    if match is None or match["ip6"] is not None:
        try:
            return str(ipaddress.IPv6Address(match["ip6"] if match else host))
        except ValueError:
            return ""
    return match["name"].rstrip(".")


class HostGuard:
    """Refuse requests whose Host header is not allowed (DNS rebinding against a local server)."""

    def __init__(self, app: ASGIApp, hosts: frozenset[str] | None):
        self.app = app
        self.hosts = hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.hosts is not None and scope["type"] in ("http", "websocket"):
            raw = Headers(scope=scope).get("host") or ""
            host = host_name(raw)
            if host not in self.hosts:
                message = (f"the Host header {host!r} is not one this server answers to (start it with "
                           "--allowed-hosts to add names)" if host else
                           f"the Host header {raw[:MAX_SHOWN_CHARS]!r} is not a host name with an optional port")
                response = error_response(400, message, code="invalid_host")
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class ApiKeyGuard:
    """Require ``Authorization: Bearer KEY`` on the API (``/v1/...``), as OpenAI's servers do."""

    def __init__(self, app: ASGIApp, api_key: str | None, prefix: str = "/v1/"):
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.key is not None and scope["type"] == "http" and scope["path"].startswith(self.prefix):
            scheme, _, token = (Headers(scope=scope).get("authorization") or "").partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                message = "no API key: send it in an Authorization header (Authorization: Bearer KEY)"
            elif not secrets.compare_digest(token.strip().encode(), self.key):
                message = "incorrect API key"
            else:
                return await self.app(scope, receive, send)
            response = error_response(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        await self.app(scope, receive, send)


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than {limit} bytes")


class BodyLimit:
    """Refuse a request body over ``max_bytes`` (413): at once when its Content-Length says so
    (the server then discards the body unread), else as soon as the bytes received pass it."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await error_response(413, BodyTooLarge(self.max_bytes).detail)(scope, receive, send)
        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, receive_limited, send)


class CatchAll:
    """Turn an exception that escaped every handler into a JSON 500, without re-raising it, so
    that the server does not drop the keep-alive connection (a bug must not look like an outage)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception:
            log.exception("unexpected error in %s %s", scope.get("method"), scope.get("path"))
            if started:  # half a response is out: only closing the connection can end it
                raise
            await error_response(500, "internal error: the server hit a bug; see its log")(scope, receive, send)
