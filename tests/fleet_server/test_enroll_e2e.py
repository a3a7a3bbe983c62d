"""`fleet-agent enroll` against the real server over HTTP (uvicorn on a loopback port), on both databases."""

import os
import stat
import subprocess
import sys
import threading

import pytest
import uvicorn

from agent.settings import load_settings
from fleet_protocol.metadata import UpdateVerifier
from tests.fleet_driver import free_port, wait_port


@pytest.fixture
def live_server(server):
    port = free_port()
    config = uvicorn.Config(server.app, host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    wait_port(port)
    yield f"http://127.0.0.1:{port}", server
    srv.should_exit = True
    t.join(10)


def fleet_agent(*args, cwd):
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd, env={k: v for k, v in os.environ.items() if not k.startswith("EF_AGENT_")})


def test_enroll_writes_keys_credentials_and_a_working_config(live_server, tmp_path):
    url, server = live_server
    token = server.post("/v1/enrollment-tokens", json={"profile": "rpi5", "tags": ["site:lab"]},
                        headers=server.as_("admin")).json()["token"]
    cfg, state = tmp_path / "agent.toml", tmp_path / "state"
    done = fleet_agent("enroll", "--server", url, "--token", token, "--config", str(cfg), "--state-dir", str(state),
                       "--tag", "floor:1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    settings = load_settings(cfg)
    assert settings.profile == "rpi5" and settings.username == settings.device_id
    for secret in (cfg, settings.password_file, settings.device_key_file, state / "identity" / "device.pem"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    assert len(settings.device_key()) == 32 and settings.broker_password()
    UpdateVerifier(settings.trust_root.read_bytes(), device_id=settings.device_id, profile="rpi5")
    device = server.get(f"/v1/devices/{settings.device_id}", headers=server.as_("viewer")).json()
    assert device["tags"] == ["floor:1", "site:lab"]

    again = fleet_agent("enroll", "--server", url, "--token", token, "--config", str(cfg), "--state-dir",
                        str(state), cwd=tmp_path)
    assert again.returncode == 1 and "enrolled already" in again.stderr
    refused = fleet_agent("enroll", "--server", url, "--token", token, "--config", str(tmp_path / "b.toml"),
                          "--state-dir", str(tmp_path / "s2"), cwd=tmp_path)
    assert refused.returncode == 1 and "exhausted" in refused.stderr and not (tmp_path / "b.toml").exists()
    down = fleet_agent("enroll", "--server", f"http://127.0.0.1:{free_port()}", "--token", token, "--config",
                       str(tmp_path / "c.toml"), "--state-dir", str(tmp_path / "s3"), cwd=tmp_path)
    assert down.returncode == 1 and "cannot reach" in down.stderr


def test_enroll_with_a_client_certificate_keeps_the_tls_key_on_the_device(live_server, tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID

    from fleet_server.pki import FleetCA

    url, server = live_server
    token = server.post("/v1/enrollment-tokens", json={"profile": "jetson-orin-nano", "max_uses": 2},
                        headers=server.as_("admin")).json()["token"]
    no_ca = fleet_agent("enroll", "--server", url, "--token", token, "--config", str(tmp_path / "x.toml"),
                        "--state-dir", str(tmp_path / "x"), "--client-cert", cwd=tmp_path)
    assert no_ca.returncode == 1 and "no fleet CA" in no_ca.stderr and not (tmp_path / "x.toml").exists()
    ca = FleetCA.init(server.app.state.settings.pki_folder)
    cfg = tmp_path / "agent.toml"
    done = fleet_agent("enroll", "--server", url, "--token", token, "--config", str(cfg), "--state-dir",
                       str(tmp_path / "state"), "--client-cert", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    settings = load_settings(cfg)
    assert settings.tls_ca.read_bytes() == ca.cert_pem and stat.S_IMODE(settings.tls_key.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(settings.tls_cert.read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == settings.device_id
    key = serialization.load_pem_private_key(settings.tls_key.read_bytes(), None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()  # its own key, made here
    cert.verify_directly_issued_by(ca.cert)  # signed by the fleet CA
