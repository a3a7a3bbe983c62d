"""``fleet-agent enroll``: make this device's keys, enroll with the fleet server, write its config and secrets.

The private keys never leave the device: the server gets the public halves (Ed25519 for identity, X25519 for
encrypted delivery) and answers with the device id, MQTT credentials and the root metadata to pin. Secrets are
written with 0600 permissions; an existing config is never overwritten silently.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from fleet_protocol.crypto import generate_device_key


class EnrollError(Exception):
    """Enrollment refused or impossible (with the server's reason)."""


def _secret(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def enroll(*, server: str, token: str, profile: str | None, config: Path, state_dir: Path, tags: list[str],
           agent_version: str = "0.1.0", api_port: int = 8470, force: bool = False, timeout: float = 30.0,
           client_cert: bool = False) -> dict:
    """Enroll; with ``client_cert`` also get a TLS client certificate for mutual TLS with the broker (the TLS key
    is made here and only a signing request leaves the device)."""
    if config.exists() and not force:
        raise EnrollError(f"{config} exists: this device is enrolled already (use --force to enroll again)")
    signing = Ed25519PrivateKey.generate()
    signing_public = signing.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    x_private, x_public = generate_device_key()
    body = {"token": token, "profile": profile, "signing_public_key": signing_public.hex(),
            "x25519_public_key": x_public.hex(), "agent_version": agent_version, "tags": tags}
    tls_key = None
    if client_cert:
        tls_key = ec.generate_private_key(ec.SECP256R1())
        body["client_csr"] = (x509.CertificateSigningRequestBuilder()
                              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgefleet device")]))
                              .sign(tls_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode())
    req = urllib.request.Request(f"{server.rstrip('/')}/v1/enroll", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            answer = json.loads(resp.read())
    except urllib.error.HTTPError as e:
        try:
            detail = json.loads(e.read()).get("detail")
        except ValueError:
            detail = e.reason
        raise EnrollError(f"the server refused enrollment ({e.code}): {detail}") from e
    except (urllib.error.URLError, OSError) as e:
        raise EnrollError(f"cannot reach {server}: {e}") from e
    identity = state_dir / "identity"
    _secret(identity / "device.pem", signing.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    _secret(identity / "device.x25519", x_private)
    _secret(identity / "mqtt.password", answer["mqtt_password"].encode())
    (identity / "root.json").write_text(answer["trust_root"])
    settings = {"device_id": answer["device_id"], "profile": answer["profile"], "broker_url": answer["broker_url"],
                "username": answer["mqtt_username"], "password_file": str(identity / "mqtt.password"),
                "trust_root": str(identity / "root.json"), "device_key_file": str(identity / "device.x25519"),
                "state_dir": str(state_dir), "api_port": api_port}
    if answer.get("broker_ca"):  # the agent trusts exactly the fleet CA for the broker, not the system's store
        (identity / "broker-ca.pem").write_text(answer["broker_ca"])
        settings["tls_ca"] = str(identity / "broker-ca.pem")
    if tls_key is not None:
        if not answer.get("client_cert"):
            raise EnrollError("the server enrolled this device but issued no client certificate")
        _secret(identity / "tls.key", tls_key.private_bytes(serialization.Encoding.PEM,
                                                            serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption()))
        (identity / "tls.crt").write_text(answer["client_cert"])
        settings |= {"tls_cert": str(identity / "tls.crt"), "tls_key": str(identity / "tls.key")}
    _secret(config, "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()).encode())
    os.chmod(state_dir, 0o700)
    return {"device_id": answer["device_id"], "profile": answer["profile"], "config": str(config)}
