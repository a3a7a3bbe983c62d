"""Hardening of the HTTP API (issue 14): bodies are bounded and authenticated before they are read, errors never echo
what was sent, NUL characters are refused, device ids cannot collide, nothing secret is logged, 401s and failed
operator actions are audited (bounded) with the client's address, and the SQLite files are private.

On the real app, SQLite and PostgreSQL (the ``server`` fixture), and against a real ``fleet-server serve``."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from fleet_server.app import create_app
from fleet_server.auth import AuditLimiter, issue_token
from fleet_server.db import make_engine
from fleet_server.guard import JSON_BODY_LIMIT
from fleet_server.migrate import upgrade
from fleet_server.models import Device, Role
from fleet_server.settings import ServerSettings
from tests.fleet_driver import free_port, wait_port

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def key() -> str:
    return secrets.token_hex(32)


def enrollment_token(server, **body) -> str:
    r = server.post("/v1/enrollment-tokens", json=body, headers=server.as_("admin"))
    assert r.status_code == 201, r.text
    return r.json()["token"]


def audit_rows(server, **params) -> list[dict]:
    r = server.get("/v1/audit", params={"limit": 1000, **params}, headers=server.as_("admin"))
    assert r.status_code == 200, r.text
    return r.json()


# ----------------------------------------------------------------------------- bodies


def _vm_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


@pytest.fixture
def served(tmp_path):
    """`fleet-server serve` on SQLite, without the broker link (nothing here needs it)."""
    port = free_port()
    env = {**os.environ, "EF_SERVER_DATABASE_URL": f"sqlite:///{tmp_path / 'fleet.db'}",
           "EF_SERVER_DATA_DIR": str(tmp_path / "data"), "EF_SERVER_BROKER_URL": "mqtt://127.0.0.1:1",
           "EF_SERVER_ROLLOUT_ENGINE": "false"}
    with open(tmp_path / "server.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "fleet_server.cli", "serve", "--port", str(port)], env=env,
                                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_port(port, 60)
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _hundred_mib():
    for _ in range(100):
        yield b"x" * MiB


def test_security_100_mib_unauthenticated_bodies_leave_the_server_small(served):
    """Before: the enroll body was read, parsed and echoed (HWM +402 MB, a 105 MB 422); the body of a tokenless call
    to an authenticated route was read before its 401."""
    proc, url = served
    with httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/health").status_code == 200
        hwm_before = _vm_kib(proc.pid, "VmHWM")
        for path, headers, expected in (("/v1/enroll", {}, 413),  # chunked: counted as it arrives
                                        ("/v1/enroll", {"content-length": str(100 * MiB)}, 413),
                                        ("/v1/tokens", {}, 401)):  # no token: refused before the body
            t0 = time.monotonic()
            r = http.post(path, content=_hundred_mib(), headers={"content-type": "application/json", **headers})
            assert r.status_code == expected, (path, r.status_code)
            assert len(r.content) < 200 and time.monotonic() - t0 < 10
        grown_mib = (_vm_kib(proc.pid, "VmHWM") - hwm_before) / 1024
    assert grown_mib < 50, f"the server grew by {grown_mib:.0f} MiB"


def _asgi_post(app, path: str, headers: list[tuple[bytes, bytes]], chunks: int = 40) -> tuple[int, int]:
    """A chunked POST straight into the ASGI app: (status, how many body chunks the app asked for)."""
    asked, answers = [0], []

    async def receive():
        asked[0] += 1
        return {"type": "http.request", "body": b"{" * 65536, "more_body": asked[0] < chunks}

    async def send(message):
        if message["type"] == "http.response.start":
            answers.append(message["status"])

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"transfer-encoding", b"chunked"), *headers],
             "client": ("127.0.0.9", 40000), "server": ("127.0.0.1", 8000)}
    asyncio.run(app(scope, receive, send))
    return answers[0], asked[0]


def test_security_authentication_comes_before_the_body_is_read(server):
    """Before: FastAPI read all 40 chunks, then ran the token dependency."""
    revoked = server.post("/v1/tokens", json={"name": "gone", "role": "admin"}, headers=server.as_("admin")).json()
    server.delete(f"/v1/tokens/{revoked['id']}", headers=server.as_("admin"))
    for headers in ([], [(b"authorization", b"Bearer nope")],
                    [(b"authorization", f"Bearer {revoked['token']}".encode())]):
        assert _asgi_post(server.app, "/v1/tokens", headers) == (401, 0)
    admin = [(b"authorization", f"Bearer {server.tokens['admin']}".encode())]
    status, asked = _asgi_post(server.app, "/v1/tokens", admin)
    assert status == 413 and asked == 2  # one chunk past 64 KiB, not 40


def test_security_oversized_and_invalid_bodies_are_refused_without_echo(server):
    admin = server.as_("admin")
    big = server.post("/v1/tokens", content=b'{"name": "' + b"A" * (20 * MiB) + b'"}',
                      headers={**admin, "content-type": "application/json"})
    assert big.status_code == 413 and len(big.content) < 200  # before: 422 of 42 MB, the body echoed twice
    chunked = server.post("/v1/tokens", content=iter([b'{"name": "', b"B" * JSON_BODY_LIMIT, b'"}']),
                          headers={**admin, "content-type": "application/json"})
    assert chunked.status_code == 413
    bad = server.post("/v1/tokens", json={"name": "SECRET-" * 40, "role": "wizard-SECRET"}, headers=admin)
    assert bad.status_code == 422 and "SECRET" not in bad.text
    assert {tuple(e["loc"]) for e in bad.json()["detail"]} == {("body", "name"), ("body", "role")}
    broken = server.post("/v1/tokens", content=b'{"name": "SECRET-unterminated',
                         headers={**admin, "content-type": "application/json"})
    assert broken.status_code == 422 and "SECRET" not in broken.text
    many = server.post("/v1/rollouts", json={"model": "m", "version": "1",
                                             "selector": {"devices": [{"SECRET": i} for i in range(500)]}},
                       headers=server.as_("operator"))
    assert many.status_code == 422 and len(many.json()["detail"]) <= 20 and "SECRET" not in many.text
    # The routes that need more keep it: a rollout may name 10,000 devices, an upload is streamed.
    selector = {"devices": [f"dev-{i:016x}" for i in range(10_000)]}
    rollout = server.post("/v1/rollouts", json={"model": "m", "version": "1", "selector": selector},
                          headers=server.as_("operator"))
    assert rollout.status_code == 404  # past the 64 KiB default, to the route: no such model
    upload = server.post("/v1/artifacts", content=os.urandom(JSON_BODY_LIMIT * 3), headers=server.as_("operator"))
    assert upload.status_code == 201


# ----------------------------------------------------------------------------- enrollment ids, secrets in logs


def test_security_device_id_prefix_collision_is_no_500_and_logs_no_hash(server, caplog):
    """Before: the second key (same first 16 hex digits) got a 500 whose IntegrityError carried its new password
    hash into the log."""
    token = enrollment_token(server, max_uses=10, profile="rpi5")
    common = key()[:60]
    keys = [common + secrets.token_hex(2) for _ in range(4)]
    assert len(set(keys)) == 4
    with caplog.at_level(logging.DEBUG):
        ids = []
        for k in keys[:3]:
            r = server.post("/v1/enroll", json={"token": token, "signing_public_key": k})
            assert r.status_code == 201, r.text
            ids.append(r.json()["device_id"])
        assert ids == [f"dev-{keys[0][:16]}", f"dev-{keys[1][:32]}", f"dev-{keys[2][:60]}"]
        taken = server.post("/v1/enroll", json={"token": token, "signing_public_key": keys[3]})
        assert taken.status_code == 409 and "new key" in taken.json()["detail"]
        again = server.post("/v1/enroll", json={"token": token, "signing_public_key": keys[0]})
        assert again.status_code == 409 and "already enrolled" in again.json()["detail"]  # as before
    with Session(server.app.state.engine) as s:
        hashes = [s.get(Device, i).mqtt_password_hash for i in ids]
    logged = caplog.text + "".join(str(r.__dict__) for r in caplog.records)
    assert "$7$" not in logged and not any(h in logged for h in hashes)


def test_security_database_errors_carry_no_statement_parameters(server):
    """An IntegrityError's text went into the log with every value of the failed INSERT."""
    secret_hash = "$7$" + secrets.token_hex(16)
    with Session(server.app.state.engine) as s:
        s.add(Device(id="dev-twice", profile="rpi5", signing_public_key=key(), mqtt_password_hash=secret_hash))
        s.commit()
        s.add(Device(id="dev-twice", profile="rpi5", signing_public_key=key(), mqtt_password_hash=secret_hash))
        with pytest.raises(IntegrityError) as failed:
            s.commit()
    assert secret_hash not in str(failed.value)  # (PostgreSQL's own DETAIL still names the duplicate key)


# ----------------------------------------------------------------------------- NUL characters


def test_security_nul_in_tokens_device_ids_filters_and_enrollment_is_422(server):
    """Before: 500 on PostgreSQL (it cannot store NUL), 404/201 on SQLite."""
    viewer, operator, admin = server.as_("viewer"), server.as_("operator"), server.as_("admin")
    good = enrollment_token(server, max_uses=5)
    refused = [
        server.post("/v1/tokens", json={"name": "a\x00b"}, headers=admin),
        server.post("/v1/enrollment-tokens", json={"profile": "rpi5\x00"}, headers=admin),
        server.get("/v1/devices/dev-%00", headers=viewer),
        server.patch("/v1/devices/x%00y", json={"tags": []}, headers=operator),
        server.get("/v1/devices", params={"profile": "a\x00"}, headers=viewer),
        server.get("/v1/devices", params={"model_version": "\x00"}, headers=viewer),
        server.get("/v1/audit", params={"actor": "x\x00"}, headers=admin),
        server.get("/v1/rollouts", params={"state": "\x00"}, headers=viewer),
        server.get("/v1/telemetry", params={"model_version": "1\x00"}, headers=viewer),
        server.post("/v1/enroll", json={"token": "efe_\x00" + "x" * 30, "signing_public_key": key()}),
        server.post("/v1/enroll", json={"token": good, "signing_public_key": key(), "profile": "rpi5",
                                        "agent_version": "1.0\x00"}),
        server.post("/v1/enroll", json={"token": good, "signing_public_key": key(), "profile": "rpi5",
                                        "tags": ["ok", {"\x00": 1}]}),
    ]
    for r in refused:
        assert r.status_code == 422, (r.request.method, r.request.url, r.status_code, r.text)
        assert "\x00" not in r.text and r.json()["detail"][0]["type"] == "nul_character"
    assert refused[-2].json()["detail"][0]["loc"] == ["body", "agent_version"]
    assert server.get("/v1/devices", headers=viewer).json()["total"] == 0  # nothing enrolled


# ----------------------------------------------------------------------------- the audit log


def test_security_401s_and_failed_operator_actions_are_audited_with_the_source_address(server):
    """Before: no row for a 401 (not even a revoked admin token's), none for a failed 404/409/422, no address."""
    admin, operator = server.as_("admin"), server.as_("operator")
    made = server.post("/v1/tokens", json={"name": "old-admin", "role": "admin"}, headers=admin).json()
    assert server.delete(f"/v1/tokens/{made['id']}", headers=admin).status_code == 200
    assert server.get("/v1/devices", headers={"Authorization": f"Bearer {made['token']}"}).status_code == 401
    assert server.post("/v1/tokens", json={"name": "x"}).status_code == 401
    assert server.post("/v1/rollouts/999/pause", headers=operator).status_code == 404
    assert server.post("/v1/rollouts", json={"model": "m", "version": "SECRET" * 20},
                       headers=operator).status_code == 422
    assert server.patch("/v1/devices/nope", json={"tags": []}, headers=operator).status_code == 404
    assert server.patch("/v1/devices/nope", json={"tags": []}, headers=server.as_("viewer")).status_code == 403
    rows = audit_rows(server)
    assert all(row["source"] == "testclient" for row in rows)  # TestClient's client address
    found = {(r["actor"], r["action"], r["outcome"], r["status"], r["detail"]) for r in rows}
    assert ("old-admin", "GET /v1/devices", "denied", 401, "revoked token") in found
    assert ("anonymous", "POST /v1/tokens", "denied", 401, "missing bearer token") in found
    assert ("operator-bot", "POST /v1/rollouts/{rollout_id}/{operation}", "failed", 404, "no rollout 999") in found
    assert ("operator-bot", "PATCH /v1/devices/{device_id}", "failed", 404, "no device nope") in found
    invalid = [r for r in rows if r["status"] == 422]
    assert len(invalid) == 1 and invalid[0]["detail"] == "invalid body.version" and "SECRET" not in str(invalid)
    denied = [r for r in rows if r["status"] == 403]
    assert len(denied) == 1 and denied[0]["actor"] == "viewer-bot"  # require()'s row, not a second one


def test_security_unauthenticated_audit_rows_are_bounded_per_address(server):
    """An unauthenticated flood adds at most 10 rows a minute per address; the rest are counted in a metric."""
    server.app.state.audit_limiter.clock = lambda: 0.0  # one minute throughout, wherever the wall clock is
    for _ in range(25):
        assert server.get("/v1/devices", headers={"Authorization": "Bearer wrong"}).status_code == 401
    for _ in range(5):
        assert server.post("/v1/enroll", json={"token": "efe_" + "x" * 30, "signing_public_key": key()}
                           ).status_code == 401
    assert len([r for r in audit_rows(server) if r["status"] == 401]) == 10
    assert "edgefleet_audit_rows_dropped_total 20.0" in server.get("/metrics").text


def test_security_audit_limiter_counts_per_address_and_minute():
    now, dropped = [0.0], []
    limiter = AuditLimiter(per_source=2, total=3, clock=lambda: now[0], on_drop=lambda: dropped.append(1))
    assert [limiter.admit("a") for _ in range(3)] == [True, True, False]
    assert [limiter.admit("b") for _ in range(2)] == [True, False]  # the total of 3 a minute is reached
    now[0] = 60.0
    assert limiter.admit("a") and limiter.admit("b") and len(dropped) == 2


# ----------------------------------------------------------------------------- files


def test_security_sqlite_files_are_0600_and_the_data_dir_0700(tmp_path):
    """Before: fleet.db, -wal and -shm 0644, the data folder 0755."""
    url = f"sqlite:///{tmp_path / 'db' / 'fleet.db'}"
    upgrade(url)
    app = create_app(ServerSettings(database_url=url, data_dir=tmp_path / "data", broker_url="mqtt://127.0.0.1:1"))
    with Session(app.state.engine) as s:
        issue_token(s, name="t", role=Role.VIEWER, created_by="test")  # the WAL and its index exist now
        files = [tmp_path / "db" / name for name in ("fleet.db", "fleet.db-wal", "fleet.db-shm")]
        assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {f.name: "0o600" for f in files}
    app.state.engine.dispose()
    assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "db").stat().st_mode) == 0o700
    files[0].chmod(0o644)  # one left readable by an older version is tightened
    make_engine(url).dispose()
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
