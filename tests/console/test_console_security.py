"""The console's red-team checks without a browser: a viewer can change nothing through any route, the console's own
routes only read and bound what they read, the page's CSP holds and its scripts never build markup from strings."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from fleet_server.app import create_app
from fleet_server.auth import issue_token
from fleet_server.console.router import STATIC
from fleet_server.keys import init_keys
from fleet_server.migrate import upgrade
from fleet_server.models import Role
from fleet_server.settings import ServerSettings

PUBLIC = {"/v1/enroll"}  # a device's enrollment: its own token, no role


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    work = tmp_path_factory.mktemp("console-security")
    url = f"sqlite:///{work / 'fleet.db'}"
    upgrade(url)
    settings = ServerSettings(database_url=url, data_dir=work / "data", broker_url="mqtt://127.0.0.1:1")
    init_keys(settings.data_dir, work / "root.pem")
    app = create_app(settings)
    with Session(app.state.engine) as s:
        viewer = issue_token(s, name="viewer-bot", role=Role.VIEWER, created_by="test")[1]
    with TestClient(app) as c:
        c.headers["Authorization"] = f"Bearer {viewer}"
        yield c
    app.state.engine.dispose()


def _filled(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "1", path)


def _operations(client) -> list[tuple[str, str]]:
    """(METHOD, path) of every API operation (the app keeps included routers opaque: read its OpenAPI document)."""
    return [(method.upper(), path) for path, ops in client.app.openapi()["paths"].items() for method in ops]


def test_console_viewer_is_refused_every_mutating_route(client):
    refused = {f"{method} {path}": client.request(method, _filled(path), json={}).status_code
               for method, path in _operations(client)
               if method not in ("GET", "HEAD") and path.startswith("/v1") and path not in PUBLIC}
    assert len(refused) >= 10 and {k: v for k, v in refused.items() if v != 403} == {}


def test_console_routes_only_read(client):
    console = [(m, p) for m, p in _operations(client) if p.startswith("/v1/console")]
    assert len(console) >= 9 and {m for m, _ in console} == {"GET"}


@pytest.mark.parametrize(("path", "params"), [
    ("/v1/console/devices", {"q": "x" * 65}),  # id search length
    ("/v1/console/devices", {"limit": 501}),  # paging
    ("/v1/console/devices", {"offset": 10_000_001}),
    ("/v1/console/devices", {"profile": "p" * 65}),
    ("/v1/console/devices", {"version": "v" * 129}),
    ("/v1/console/devices", {"tag": "<b>"}),
    ("/v1/console/devices/d1/series", {"points": 2001}),  # series point cap
    ("/v1/console/devices/d1/drift", {"window_s": 31 * 86400}),
    ("/v1/console/selector-preview", {"tag": [f"t{i}" for i in range(101)]}),
    ("/v1/console/selector-preview", {"tag": "a%"}),
    ("/v1/console/selector-preview", {"profile": "p" * 65}),
    ("/v1/console/selector-preview", {"model": "m" * 65}),
])
def test_console_routes_bound_their_queries(client, path, params):
    assert client.get(path, params=params).status_code == 422


def test_console_page_sends_its_csp_and_runs_no_inline_code(client):
    for path in ("/ui", "/ui/static/js/app.js", "/ui/static/console.css"):
        answer = client.get(path)
        assert answer.status_code == 200
        csp = answer.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe" not in csp
        assert answer.headers["x-content-type-options"] == "nosniff"
    page = client.get("/ui").text
    assert re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", page) == []  # every script is a file
    assert not re.search(r"\son[a-z]+=|\sstyle=", page)  # no inline handler or style


def test_console_scripts_never_build_markup_from_strings():
    risky = re.compile(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function|"
                       r"javascript:")
    code = lambda text: re.sub(r"^\s*//.*$", "", text, flags=re.M)  # noqa: E731 - comments may name them
    found = {p.name: risky.findall(code(p.read_text())) for p in STATIC.rglob("*.js")}
    assert len(found) >= 9 and {k: v for k, v in found.items() if v} == {}
