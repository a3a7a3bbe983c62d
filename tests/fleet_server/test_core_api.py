"""Tokens, audit, enrollment and devices on SQLite and PostgreSQL, failure cases included."""

import secrets
from datetime import datetime

from fleet_protocol.metadata import UpdateVerifier


def key() -> str:
    return secrets.token_hex(32)


def test_health_ready_metrics_and_openapi(server):
    assert server.get("/health").json() == {"status": "ok"}
    ready = server.get("/ready")
    assert ready.status_code == 503 and ready.json()["database"] is True and ready.json()["broker"] is False
    assert "edgefleet_api_requests_total" in server.get("/metrics").text
    roots = server.get("/v1/trust/roots").json()  # public
    assert [r["signed"]["version"] for r in roots] == [1]
    schema = server.get("/openapi.json").json()
    assert "/v1/enroll" in schema["paths"] and "/v1/devices" in schema["paths"]
    assert schema["components"]["schemas"]["EnrollRequest"]["examples"][0]["profile"] == "rpi5"


def test_missing_wrong_revoked_tokens_are_401_and_low_roles_403_audited(server):
    assert server.get("/v1/devices").status_code == 401
    assert server.get("/v1/devices", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert server.get("/v1/devices", headers=server.as_("viewer")).status_code == 200
    r = server.post("/v1/enrollment-tokens", json={}, headers=server.as_("operator"))
    assert r.status_code == 403 and "admin" in r.json()["detail"]
    made = server.post("/v1/tokens", json={"name": "ci", "role": "viewer"}, headers=server.as_("admin")).json()
    headers = {"Authorization": f"Bearer {made['token']}"}
    assert server.get("/v1/devices", headers=headers).status_code == 200
    assert server.delete(f"/v1/tokens/{made['id']}", headers=server.as_("admin")).status_code == 200
    assert server.get("/v1/devices", headers=headers).status_code == 401
    log = server.get("/v1/audit", headers=server.as_("admin")).json()
    actions = [(e["actor"], e["action"], e["outcome"]) for e in log]
    assert ("operator-bot", "POST /v1/enrollment-tokens", "denied") in actions
    assert ("admin-bot", "token.revoke", "ok") in actions and ("admin-bot", "token.create", "ok") in actions
    assert server.get("/v1/audit", headers=server.as_("operator")).status_code == 403


def enroll_token(server, **body):
    r = server.post("/v1/enrollment-tokens", json=body, headers=server.as_("admin"))
    assert r.status_code == 201, r.text
    return r.json()["token"]


def test_enrollment_gives_identity_credentials_and_the_pinned_root(server):
    token = enroll_token(server, max_uses=2, profile="rpi5", tags=["site:lab"])
    r = server.post("/v1/enroll", json={"token": token, "signing_public_key": key(), "x25519_public_key": key(),
                                         "agent_version": "0.1.0", "tags": ["floor:2"]})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["profile"] == "rpi5" and body["mqtt_username"] == body["device_id"] and len(body["mqtt_password"]) > 20
    UpdateVerifier(body["trust_root"].encode(), device_id=body["device_id"], profile="rpi5")  # a valid root
    device = server.get(f"/v1/devices/{body['device_id']}", headers=server.as_("viewer")).json()
    assert device["tags"] == ["floor:2", "site:lab"] and device["agent_version"] == "0.1.0"
    assert "mqtt_password" not in device and "mqtt_password_hash" not in device


def test_enrollment_failures(server):
    one = enroll_token(server, max_uses=1)
    k = key()
    bad_profile = server.post("/v1/enroll", json={"token": one, "signing_public_key": k, "profile": "toaster"})
    assert bad_profile.status_code == 422 and "unknown hardware profile" in bad_profile.text
    assert server.post("/v1/enroll", json={"token": one, "signing_public_key": k, "profile": "rpi4"}).status_code == 201
    again = server.post("/v1/enroll", json={"token": one, "signing_public_key": key(), "profile": "rpi4"})
    assert again.status_code == 401 and "exhausted" in again.text
    dup = server.post("/v1/enroll", json={"token": enroll_token(server), "signing_public_key": k, "profile": "rpi4"})
    assert dup.status_code == 409
    fake = server.post("/v1/enroll", json={"token": "efe_" + "x" * 30, "signing_public_key": key(), "profile": "rpi4"})
    assert fake.status_code == 401
    expired = enroll_token(server, expires_in_s=1)
    import time

    time.sleep(1.2)
    late = server.post("/v1/enroll", json={"token": expired, "signing_public_key": key(), "profile": "rpi4"})
    assert late.status_code == 401 and "expired" in late.text
    malformed = server.post("/v1/enroll", json={"token": one, "signing_public_key": "not hex"})
    assert malformed.status_code == 422


def test_device_list_filters_pages_tags_and_decommission(server):
    tok = enroll_token(server, max_uses=30)
    ids = []
    for i in range(25):
        profile = "rpi5" if i % 2 else "jetson-orin-nano"
        r = server.post("/v1/enroll", json={"token": tok, "signing_public_key": key(), "profile": profile,
                                             "tags": ["even"] if i % 2 == 0 else []})
        ids.append(r.json()["device_id"])
    v = server.as_("viewer")
    page = server.get("/v1/devices", params={"limit": 10, "offset": 20}, headers=v).json()
    assert page["total"] == 25 and len(page["items"]) == 5
    for item in page["items"]:  # the list's hand-built JSON says what the validated detail model says
        detail = server.get(f"/v1/devices/{item['id']}", headers=v).json()
        assert item.keys() == detail.keys() and item["tags"] == detail["tags"] and item["online"] is detail["online"]
        assert item["enrolled_at"].endswith("Z") and detail["enrolled_at"].endswith("Z")
        assert datetime.fromisoformat(item["enrolled_at"]) == datetime.fromisoformat(detail["enrolled_at"])
        item.pop("enrolled_at"), detail.pop("enrolled_at")
        assert item == detail
    assert [d["id"] for d in server.get("/v1/devices", headers=v).json()["items"]] == sorted(ids)
    assert server.get("/v1/devices", params={"profile": "rpi5"}, headers=v).json()["total"] == 12
    assert server.get("/v1/devices", params={"tag": "even"}, headers=v).json()["total"] == 13
    assert server.get("/v1/devices", params={"online": True}, headers=v).json()["total"] == 0
    assert server.get("/v1/devices", params={"limit": 0}, headers=v).status_code == 422
    patched = server.patch(f"/v1/devices/{ids[0]}", json={"tags": ["b", "a", "a"]}, headers=server.as_("operator"))
    assert patched.json()["tags"] == ["a", "b"]
    assert server.patch(f"/v1/devices/{ids[0]}", json={"tags": ["bad tag!"]},
                        headers=server.as_("operator")).status_code == 422
    assert server.post(f"/v1/devices/{ids[1]}/decommission", headers=server.as_("operator")).status_code == 403
    gone = server.post(f"/v1/devices/{ids[1]}/decommission", headers=server.as_("admin")).json()
    assert gone["decommissioned_at"] is not None
    assert server.get("/v1/devices", headers=v).json()["total"] == 24
    assert server.get("/v1/devices/nope", headers=v).status_code == 404


def test_access_log_is_structured_json_without_secrets(server, caplog):
    import json as _json
    import logging

    from fleet_server.logs import JsonFormatter

    with caplog.at_level(logging.INFO, logger="fleet_server.access"):
        server.get("/v1/devices/x?secret=1", headers={**server.as_("viewer"), "X-Request-Id": "req-42"})
    record = next(r for r in caplog.records if r.name == "fleet_server.access")
    doc = _json.loads(JsonFormatter().format(record))
    assert doc["route"] == "/v1/devices/{device_id}" and doc["status"] == 404 and doc["request_id"] == "req-42"
    line = JsonFormatter().format(record)
    assert "secret" not in line and server.tokens["viewer"] not in line and doc["ms"] >= 0
