"""Two families, as in python-tuf: bad data (never retried; the bytes will not get better) and transport failures
(retried by the caller)."""

from __future__ import annotations


class ProtocolError(Exception):
    """Root of fleet_protocol's errors."""

    retryable = False


class VerificationError(ProtocolError):
    """Untrusted bytes failed verification. Fatal for those bytes: report, do not retry them."""


class MalformedError(VerificationError):
    """Not parseable, or not of the expected shape (JSON, schema, types)."""


class OversizedError(VerificationError):
    """More bytes than the explicit limit allows (endless-data attack)."""


class SignatureError(VerificationError):
    """A signature does not verify against the key it claims."""


class ThresholdError(VerificationError):
    """Fewer valid signatures from listed keys than the role's threshold."""


class UntrustedKeyError(VerificationError):
    """Signed only by keys the trusted root does not list for the role."""


class RollbackError(VerificationError):
    """A version older than or equal to the one already trusted."""


class ExpiredError(VerificationError):
    """Metadata past its expiry (freeze attack)."""


class MixAndMatchError(VerificationError):
    """Metadata for another device, cohort or hardware profile."""


class TargetMismatchError(VerificationError):
    """Bytes whose length or sha256 differs from the signed metadata."""


class DeltaError(VerificationError):
    """A delta that cannot be applied: wrong base, corrupt patch, or a result that does not match."""


class ChunkError(VerificationError):
    """A chunk with a wrong index, size or hash."""


class SchemaVersionError(MalformedError):
    """A message schema version this side does not speak."""


class TopicError(MalformedError):
    """A topic outside the fleet namespace or outside this device's own topics."""


class TransportError(ProtocolError):
    """Bytes did not arrive (timeout, disconnect): worth retrying."""

    retryable = True


class DecryptError(VerificationError):
    """An encrypted artifact that does not decrypt: tampered, truncated, or for another device's key."""
