"""Property-based requests generated from the OpenAPI schema: whatever they send, the server never answers 5xx."""

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from sqlmodel import Session

from fleet_server.app import create_app
from fleet_server.auth import issue_token
from fleet_server.keys import init_keys
from fleet_server.migrate import upgrade
from fleet_server.models import Role
from fleet_server.settings import ServerSettings


def _app(tmp_path_factory):
    d = tmp_path_factory.mktemp("schemathesis")
    url = f"sqlite:///{d / 'fleet.db'}"
    upgrade(url)
    s = ServerSettings(database_url=url, data_dir=d / "data", broker_url="mqtt://127.0.0.1:1")
    init_keys(s.data_dir, d / "root.pem")
    app = create_app(s)
    with Session(app.state.engine) as session:
        _, token = issue_token(session, name="fuzzer", role=Role.ADMIN, created_by="test")
    app.state.test_token = token
    return app


SKIP = {("POST", "/v1/models/{name}/{version}/conversions"),  # real conversion jobs per example: the job tests'
        ("GET", "/ready")}  # 503 while the broker is down is its answer, not an error


def test_no_generated_request_gets_a_5xx(tmp_path_factory):
    app = _app(tmp_path_factory)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    headers = {"Authorization": f"Bearer {app.state.test_token}"}
    checked = 0
    for result in schema.get_all_operations():
        op = result.ok()
        if (op.method.upper(), op.path) in SKIP:
            continue

        @given(case=op.as_strategy())
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                  derandomize=True)  # the same examples on every run: CI is deterministic
        def check(case):
            case.call_and_validate(headers=headers, checks=[not_a_server_error])

        check()
        checked += 1
    assert checked >= 15  # every endpoint was exercised
