"""Ed25519 keys for signing fleet metadata (via securesystemslib, as python-tuf uses them)."""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from securesystemslib.signer import CryptoSigner, SSlibKey

from fleet_protocol.errors import MalformedError


def generate_signer() -> CryptoSigner:
    return CryptoSigner.generate_ed25519()


def signer_to_pem(signer: CryptoSigner) -> bytes:
    """The private key as unencrypted PKCS#8 PEM (store it with 0600 permissions, or in an HSM/KMS)."""
    return signer._private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def signer_from_pem(pem: bytes) -> CryptoSigner:
    try:
        private = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise MalformedError(f"not a PEM private key: {e}") from e
    if not isinstance(private, Ed25519PrivateKey):
        raise MalformedError("fleet signing keys are Ed25519")
    return CryptoSigner(private, SSlibKey.from_crypto(private.public_key()))



def public_pem(signer: CryptoSigner) -> bytes:
    """The public half as SubjectPublicKeyInfo PEM: what verifiers pin."""
    return signer._private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_from_public_pem(pem: bytes) -> SSlibKey:
    try:
        public = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as e:
        raise MalformedError(f"not a PEM public key: {e}") from e
    if not isinstance(public, Ed25519PublicKey):
        raise MalformedError("fleet signing keys are Ed25519")
    return SSlibKey.from_crypto(public)
