"""The REST front's browser defences over plain HTTP against a real gateway without keys (the
session's, on loopback): JSON bodies must say application/json, a foreign Origin or an unknown
Host name (DNS rebinding) is refused before anything runs, and the pages carry a CSP that
forbids framing. The real-browser check is tests/browser/test_page_browser.py."""

import http.client
import json

import pytest

from serving.gateway.browser import BrowserGuard

PROMPT = "a small green square at the top"


def ask(gateway, method: str, path: str, body: bytes | None = None, headers=None):
    """(status, headers, body) over one connection; `headers` may replace Host."""
    connection = http.client.HTTPConnection(gateway.host, gateway.rest_port, timeout=60)
    try:
        connection.putrequest(method, path, skip_host="Host" in (headers or {}))
        for name, value in {**(headers or {}), "Content-Length": str(len(body or b""))}.items():
            connection.putheader(name, value)
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def error_of(answer, status: int, param: str):
    code, headers, body = answer
    assert code == status, body
    error = json.loads(body)["error"]
    assert error["param"] == param and headers["X-Request-Id"], error
    return error


GENERATE = json.dumps({"prompt": PROMPT, "steps": 2}).encode()


@pytest.mark.parametrize("path", ["/v1/images/generations", "/v1/generations"])
def test_json_routes_take_only_declared_json(gateway, path):
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"Content-Type": content_type} if content_type else {}
        error = error_of(ask(gateway, "POST", path, GENERATE, headers), 415, "Content-Type")
        assert "application/json" in error["message"]


def test_a_foreign_origin_is_refused_and_the_gateways_own_is_answered(gateway):
    json_type = {"Content-Type": "application/json"}
    for origin in ("http://attacker.example", "null", f"http://localhost:{gateway.rest_port + 1}"):
        error_of(
            ask(gateway, "POST", "/v1/images/generations", GENERATE, {**json_type, "Origin": origin}), 403, "Origin"
        )
    own = f"http://{gateway.host}:{gateway.rest_port}"
    status, _, body = ask(gateway, "POST", "/v1/images/generations", GENERATE, {**json_type, "Origin": own})
    assert status == 200 and len(json.loads(body)["data"]) == 1


def test_an_unknown_host_name_is_refused_loopback_names_and_addresses_are_answered(gateway):
    error_of(
        ask(gateway, "GET", "/openapi.json", headers={"Host": f"rebound.attacker.example:{gateway.rest_port}"}),
        403,
        "Host",
    )
    for host in (
        "localhost",
        f"localhost:{gateway.rest_port}",
        f"127.0.0.1:{gateway.rest_port}",
        "[::1]",
        "10.1.2.3:80",
    ):
        assert ask(gateway, "GET", "/healthz", headers={"Host": host})[0] == 200, host


def test_pages_forbid_framing_and_scripts_from_elsewhere(gateway):
    for path in ("/", "/docs", "/openapi.json", "/static/app.js"):
        status, headers, _ = ask(gateway, "GET", path)
        assert status == 200 and headers["X-Content-Type-Options"] == "nosniff", path
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"], path
    _, headers, _ = ask(gateway, "GET", "/")
    assert (
        "default-src 'self'" in headers["Content-Security-Policy"]
        and "unsafe-inline" not in headers["Content-Security-Policy"]
    )


def test_the_guard_checks_hosts_only_without_keys_unless_told():
    assert BrowserGuard.of("0.0.0.0", keyed=True).hosts is None
    assert BrowserGuard.of("0.0.0.0", keyed=True, allowed_hosts=("ldm.example",)).hosts == {"localhost", "ldm.example"}
    assert BrowserGuard.of("gw.internal", keyed=False).hosts == {"localhost", "gw.internal"}
    assert BrowserGuard.of("127.0.0.1", keyed=False, allowed_hosts=("*",)).hosts is None
