"""The fleet's TLS certificate authority (cryptography's x509).

One CA per fleet signs the broker's server certificate and, when devices ask for one at enrollment, each device's
client certificate (mutual TLS). A device sends a certificate signing request: its TLS private key never leaves it.
The server sets the subject itself (CN = the device id, which Mosquitto's ``use_identity_as_username`` turns into
the MQTT username the ACL confines), so a request cannot claim another identity. Revocation is a CRL the broker
reloads on SIGHUP, regenerated from the decommissioned devices' certificate serials.

The CA key lives in ``<pki_dir>/ca.key`` (0600) on the server; an operator who wants it offline issues the broker's
certificate once and runs the server without device certificates (passwords over server-verified TLS).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
SERVER_DAYS = 397
DEVICE_DAYS = 825
CRL_DAYS = 30
SKEW = dt.timedelta(minutes=5)  # devices' clocks drift; a certificate valid "from now" fails on a slow one


class PKIError(Exception):
    """No CA, a malformed or unacceptable request, or files that do not belong together."""


def _name(cn: str, org: str = "edgefleet") -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org), x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_secret(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(key, common_name: str = "edgefleet device") -> bytes:
    """A certificate signing request for ``key`` (PEM); the server replaces the subject with the device id."""
    return (x509.CertificateSigningRequestBuilder().subject_name(_name(common_name))
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))


@dataclass(frozen=True)
class Issued:
    cert_pem: bytes
    serial: int
    not_after: dt.datetime


class FleetCA:
    """The CA in ``folder``: ``ca.key`` (0600) and ``ca.crt``."""

    def __init__(self, folder: Path, key, cert: x509.Certificate):
        self.folder, self.key, self.cert = folder, key, cert

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @staticmethod
    def exists(folder: Path) -> bool:
        return (folder / "ca.key").exists() and (folder / "ca.crt").exists()

    @classmethod
    def init(cls, folder: Path, *, name: str = "edgefleet fleet CA", days: int = CA_DAYS) -> FleetCA:
        if cls.exists(folder):
            raise PKIError(f"{folder} already holds a fleet CA; refusing to replace it (every device trusts it)")
        folder.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP384R1())
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - SKEW).not_valid_after(now + dt.timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                             crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(ski, critical=False)
                .sign(key, hashes.SHA384()))
        _write_secret(folder / "ca.key", _pem_key(key))
        (folder / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(folder, key, cert)

    @classmethod
    def load(cls, folder: Path) -> FleetCA:
        if not cls.exists(folder):
            raise PKIError(f"no fleet CA in {folder} (create one with `fleet-server pki init`)")
        try:
            key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), password=None)
            cert = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
        except ValueError as e:
            raise PKIError(f"unreadable fleet CA in {folder}: {e}") from e
        if cert.public_key().public_numbers() != key.public_key().public_numbers():
            raise PKIError(f"{folder}/ca.key does not belong to {folder}/ca.crt")
        return cls(folder, key, cert)

    def _leaf(self, subject: x509.Name, public_key, days: int, *, eku, san=None) -> Issued:
        now = _now()
        serial = x509.random_serial_number()
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(self.cert.subject).public_key(public_key)
             .serial_number(serial).not_valid_before(now - SKEW).not_valid_after(now + dt.timedelta(days=days))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = b.sign(self.key, hashes.SHA384())
        return Issued(cert.public_bytes(serialization.Encoding.PEM), serial, cert.not_valid_after_utc)

    def issue_server(self, hosts: list[str], *, days: int = SERVER_DAYS) -> tuple[bytes, Issued]:
        """A key and certificate for the broker, valid for ``hosts`` (names and/or IP addresses)."""
        if not hosts:
            raise PKIError("the broker certificate needs at least one host name or address")
        san: list[x509.GeneralName] = []
        for h in hosts:
            try:
                san.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                san.append(x509.DNSName(h))
        key = new_key()
        return _pem_key(key), self._leaf(_name(hosts[0]), key.public_key(), days,
                                         eku=ExtendedKeyUsageOID.SERVER_AUTH, san=san)

    def sign_client(self, csr_pem: str | bytes, identity: str, *, days: int = DEVICE_DAYS) -> Issued:
        """A client certificate for ``identity`` (the device id, or the server's account) from a device's CSR."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode() if isinstance(csr_pem, str) else csr_pem)
        except ValueError as e:
            raise PKIError(f"the certificate signing request is not a PEM CSR: {e}") from e
        try:
            if not csr.is_signature_valid:
                raise PKIError("the certificate signing request's signature does not verify")
        except InvalidSignature as e:  # pragma: no cover - some backends raise instead of answering False
            raise PKIError("the certificate signing request's signature does not verify") from e
        pub = csr.public_key()
        if isinstance(pub, ec.EllipticCurvePublicKey):
            if pub.curve.key_size < 256:
                raise PKIError(f"EC key on {pub.curve.name} is too weak (P-256 or stronger)")
        elif isinstance(pub, rsa.RSAPublicKey):
            if pub.key_size < 2048:
                raise PKIError(f"RSA key of {pub.key_size} bits is too weak (2048 or more)")
        else:
            raise PKIError(f"unsupported key type {type(pub).__name__} (EC P-256+ or RSA 2048+)")
        return self._leaf(_name(identity), pub, days, eku=ExtendedKeyUsageOID.CLIENT_AUTH)

    def crl(self, revoked: list[tuple[int, dt.datetime]], *, days: int = CRL_DAYS) -> bytes:
        """The revocation list (PEM): serials with their revocation times. Regenerated on every enrollment and
        decommission, at start-up and daily (``BrokerSync.start_refresh``); OpenSSL refuses every client certificate
        once ``next_update`` has passed, so it lies weeks beyond the next scheduled rewrite."""
        now = _now()
        b = (x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject).last_update(now - SKEW)
             .next_update(now + dt.timedelta(days=days)))
        for serial, when in revoked:
            b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(serial)
                                          .revocation_date(when if when.tzinfo else when.replace(tzinfo=dt.UTC))
                                          .build())
        return b.sign(self.key, hashes.SHA384()).public_bytes(serialization.Encoding.PEM)


def write_pair(folder: Path, stem: str, key_pem: bytes, cert_pem: bytes) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    _write_secret(folder / f"{stem}.key", key_pem)
    (folder / f"{stem}.crt").write_bytes(cert_pem)
    return folder / f"{stem}.key", folder / f"{stem}.crt"
