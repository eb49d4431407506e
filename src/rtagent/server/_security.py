"""What keeps other websites away from a server on the user's own machine.

A page open in the user's browser can reach ``127.0.0.1`` too. Three checks stop it from driving
the agent (whose tools may refund and order):

- ``Host``: only the loopback names and the ``--allowed-host`` ones are served, so a site whose
  name was made to resolve to 127.0.0.1 (DNS rebinding) gets nothing back;
- ``Origin``: a request that carries one (browsers add it to every POST and WebSocket handshake,
  clients such as curl and the SDKs send none) must carry the server's own origin or one of
  ``--cors-origin``;
- a POST body must be ``application/json``: text, form and multipart bodies are what a browser
  sends from another site without asking first (no CORS preflight).

Every HTTP response also gets the page's Content-Security-Policy (with ``frame-ancestors``, which a
``<meta>`` tag cannot set), ``nosniff`` and ``Referrer-Policy``.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._limits import deny, error, is_loopback

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; "
    "require-trusted-types-for 'script'; trusted-types 'none'"
)
HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
# Load balancers probe by address, under no name the server knows; the answer holds nothing private.
UNCHECKED_PATHS = frozenset({"/healthz"})


class Hosts:
    """The names the server answers to: loopback ones always, plus ``allowed``, where ``*.shop.example``
    matches every subdomain of shop.example and ``*`` every name (for a proxy that checks them)."""

    def __init__(self, allowed: Iterable[str]) -> None:
        names = {name.strip().lower() for name in allowed if name.strip()}
        self.any = "*" in names
        self.exact = {name for name in names if not name.startswith("*.")}
        self.suffixes = tuple(name[1:] for name in names if name.startswith("*."))

    def allow(self, host: str) -> bool:
        if self.any:
            return True
        name = host.lower()
        return is_loopback(name) or name in self.exact or name.endswith(self.suffixes)


def host_name(authority: str) -> str:
    """``authority`` (a ``Host`` header or the netloc of an origin) without its port."""
    if authority.startswith("["):  # an IPv6 address, whose colons are not the port's
        return authority[: authority.find("]") + 1]
    return authority.rpartition(":")[0] if ":" in authority else authority


class SameSite:
    """The checks of the module docstring, before anything else sees the request."""

    def __init__(self, app: ASGIApp, *, allowed_hosts: Iterable[str], cors_origins: Iterable[str]) -> None:
        self.app = app
        self.hosts = Hosts(allowed_hosts)
        self.cors_origins = frozenset(cors_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        send = _with_headers(send) if scope["type"] == "http" else send
        refusal = self._refusal(scope)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        status, code, message = refusal
        await deny(scope, receive, send, error(status, code, message))

    def _refusal(self, scope: Scope) -> tuple[int, str, str] | None:
        headers = {name: value.decode("latin-1") for name, value in scope["headers"]}
        host = headers.get(b"host", "")
        if scope["path"] not in UNCHECKED_PATHS and not self.hosts.allow(host_name(host)):
            shown = repr(host[:80]) if host else "no Host header"
            return 400, "invalid_host", f"this server does not answer to {shown}: see --allowed-host"
        origin = headers.get(b"origin")
        if origin is not None and origin not in self.cors_origins and urlsplit(origin).netloc != host:
            return 403, "forbidden_origin", f"requests from {origin[:80]} are not allowed: see --cors-origin"
        if scope.get("method") == "POST" and not _is_json(headers):
            given = headers.get(b"content-type", "none")
            return 415, "unsupported_media_type", f"send the body as application/json, not {given[:80]}"
        return None


def _is_json(headers: dict[bytes, str]) -> bool:
    content_type = headers.get(b"content-type")
    if content_type is None:
        # No body to misread: ``curl -X POST .../stop``. A browser's cross-site one carries an Origin.
        return headers.get(b"content-length", "0") == "0" and b"transfer-encoding" not in headers
    return content_type.partition(";")[0].strip().lower() == "application/json"


def _with_headers(send: Send) -> Send:
    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", []), *HEADERS]
        await send(message)

    return sending
