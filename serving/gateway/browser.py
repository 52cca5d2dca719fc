"""What keeps web pages a user visits from using a gateway that user's browser can reach (one on
loopback without keys above all): the REST front's Host and Origin allow-lists and the headers
that confine its own pages.

- Host: a page on attacker.example whose name is re-pointed to 127.0.0.1 (DNS rebinding) is
  same-origin with the gateway in the browser's eyes, and could read its answers; its requests
  carry `Host: attacker.example`. A gateway without keys therefore answers only Host names it
  knows (loopback names and its own address by default, more with --allowed-hosts; IP literals
  always, as no rebinding yields one). With keys a rebinding page has no key to send, so Host is
  checked only when --allowed-hosts is given.
- Origin: a browser sends it on cross-origin requests (and on same-origin POSTs); a request
  whose Origin is neither the gateway's own (its Host) nor in --allowed-origins is refused
  before anything runs, so a cross-origin page cannot start a generation even with a "simple"
  (text/plain or multipart) request that needs no preflight. Clients that are not browsers send
  no Origin. JSON bodies must also say `Content-Type: application/json` (rest_api.read_json),
  which a cross-origin page cannot send without a preflight this server never grants.
- Headers: every answer says `X-Content-Type-Options: nosniff` and may not be framed
  (`frame-ancestors 'none'`); the pages get a Content-Security-Policy allowing their own files
  only (/docs: its inline script and style by hash).
"""

import base64
from dataclasses import dataclass
import hashlib
import ipaddress
from pathlib import Path
import re
from urllib.parse import urlsplit

from aiohttp import web

from serving.gateway.errors import PERMISSION_DENIED, ApiError

LOOPBACK_NAMES = ("localhost",)
WILDCARDS = ("", "0.0.0.0", "::")
STATIC = Path(__file__).resolve().parent / "static"
FRAMING = "frame-ancestors 'none'"
PAGE_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; form-action 'self'; " + FRAMING
)


def _inline_hashes(page: Path, tag: str) -> str:
    """CSP sources for the inline <tag> blocks (script or style) of a page."""
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page.read_text(), re.S)
    return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'" for body in blocks)


DOCS_POLICY = PAGE_POLICY.replace(
    "default-src 'self';",
    (
        f"default-src 'self'; script-src 'self' {_inline_hashes(STATIC / 'docs.html', 'script')}; "
        f"style-src 'self' {_inline_hashes(STATIC / 'docs.html', 'style')};"
    ),
)
POLICIES = {"/": PAGE_POLICY, "/docs": DOCS_POLICY}


def host_name(authority: str) -> str:
    """The name of `host[:port]` (IPv6 in brackets), lowercased."""
    authority = authority.strip().lower()
    if authority.startswith("["):
        return authority[1:].split("]", 1)[0]
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


@dataclass(frozen=True)
class BrowserGuard:
    hosts: frozenset | None  # Host names answered (IP literals always are); None: any
    suffixes: tuple = ()  # and any name ending with one of these (".<peer domain>")
    origins: frozenset = frozenset()  # foreign origins allowed, "scheme://host[:port]"

    @classmethod
    def of(cls, listen_host: str, keyed: bool, allowed_hosts=(), allowed_origins=(), peer_domain=None):
        """The guard of a gateway listening on `listen_host`; `allowed_hosts` "*" answers any; with
        a peer domain, the replicas' names under it (a forwarded steer is addressed so)."""
        origins = frozenset(o.rstrip("/").lower() for o in allowed_origins)
        if "*" in allowed_hosts or (keyed and not allowed_hosts):
            return cls(None, origins=origins)
        names = {*LOOPBACK_NAMES, *(h.lower() for h in allowed_hosts)}
        if listen_host not in WILDCARDS:
            names.add(listen_host.lower())
        return cls(frozenset(names), (f".{peer_domain.lower()}",) if peer_domain else (), origins)

    def check(self, request: web.Request) -> None:
        host = request.headers.get("Host", "")
        name = host_name(host)
        if self.hosts is not None and not (is_ip(name) or name in self.hosts or name.endswith(self.suffixes)):
            raise ApiError(
                PERMISSION_DENIED,
                f"this gateway does not answer to the name {name!r}; add it with --allowed-hosts",
                "Host",
            )
        origin = request.headers.get("Origin")
        if origin is None or origin.lower() in self.origins:
            return
        if urlsplit(origin).netloc.lower() != host.lower():
            raise ApiError(
                PERMISSION_DENIED,
                f"requests from pages at {origin} are not allowed; add the origin with --allowed-origins",
                "Origin",
            )


def install(app: web.Application, guard: BrowserGuard) -> None:
    """Adds the guard (inside the error middleware, so a refusal is the documented JSON) and the
    headers to `app`."""

    @web.middleware
    async def guarded(request, handler):
        guard.check(request)
        return await handler(request)

    async def headers(request, response):
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Content-Security-Policy"] = POLICIES.get(request.path, "default-src 'none'; " + FRAMING)
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "no-referrer"

    app.middlewares.append(guarded)
    app.on_response_prepare.append(headers)
