"""Optional artifact encryption to one device.

Each device holds an X25519 key pair. The sender makes an ephemeral X25519 key, derives a key-encryption key with
HKDF-SHA256 over the shared secret, wraps a random AES-256 content key with AES-GCM, and encrypts the artifact (or
delta) with AES-256-GCM under the content key. Tampering with any byte — the ephemeral key, either nonce, the
wrapped key or the ciphertext — fails authentication.

Envelope: ``EFE1`` | ephemeral public (32) | wrap nonce (12) | wrapped key (48) | nonce (12) | ciphertext+tag.
"""

from __future__ import annotations

import hashlib
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fleet_protocol.errors import DecryptError

MAGIC = b"EFE1"
_RAW = serialization.Encoding.Raw
_HEAD = len(MAGIC) + 32 + 12 + 48 + 12
INFO = b"edgefleet artifact key v1"


def generate_device_key() -> tuple[bytes, bytes]:
    """(private, public) X25519 keys as raw 32-byte strings."""
    private = X25519PrivateKey.generate()
    return (private.private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption()),
            private.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw))


def key_id(public: bytes) -> str:
    return hashlib.sha256(public).hexdigest()[:32]


def _kek(shared: bytes, eph_public: bytes, device_public: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=eph_public + device_public, info=INFO).derive(shared)


def encrypt_for(device_public: bytes, plaintext: bytes, *, aad: bytes = b"") -> bytes:
    """Encrypt to one device. ``aad`` (e.g. the target sha256) is authenticated but not stored."""
    try:
        peer = X25519PublicKey.from_public_bytes(device_public)
    except ValueError as e:
        raise DecryptError(f"not an X25519 public key: {e}") from e
    eph = X25519PrivateKey.generate()
    eph_public = eph.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)
    content_key, wrap_nonce, nonce = AESGCM.generate_key(256), os.urandom(12), os.urandom(12)
    wrapped = AESGCM(_kek(eph.exchange(peer), eph_public, device_public)).encrypt(wrap_nonce, content_key, eph_public)
    body = AESGCM(content_key).encrypt(nonce, plaintext, MAGIC + eph_public + aad)
    return MAGIC + eph_public + wrap_nonce + wrapped + nonce + body


def decrypt(device_private: bytes, envelope: bytes, *, aad: bytes = b"") -> bytes:
    if len(envelope) < _HEAD + 16 or envelope[:4] != MAGIC:
        raise DecryptError("not an edgefleet encrypted artifact (bad magic or truncated)")
    eph_public = envelope[4:36]
    wrap_nonce, wrapped, nonce, body = envelope[36:48], envelope[48:96], envelope[96:108], envelope[108:]
    try:
        private = X25519PrivateKey.from_private_bytes(device_private)
        device_public = private.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)
        kek = _kek(private.exchange(X25519PublicKey.from_public_bytes(eph_public)), eph_public, device_public)
        content_key = AESGCM(kek).decrypt(wrap_nonce, wrapped, eph_public)
        return AESGCM(content_key).decrypt(nonce, body, MAGIC + eph_public + aad)
    except (InvalidTag, ValueError) as e:
        raise DecryptError("encrypted artifact fails authentication (tampered, or for another device)") from e
