"""The domain exception tree. The server maps each class to one gRPC status in one place
(server/errors.py); the client maps gRPC statuses back (client/rpc.py)."""

from __future__ import annotations


class PrivfaceError(Exception):
    """Base of every error privface raises on purpose."""


class MalformedInputError(PrivfaceError, ValueError):
    """Input of the wrong shape, size or encoding (gRPC INVALID_ARGUMENT)."""


class PreconditionError(PrivfaceError):
    """The call needs state that does not exist yet (gRPC FAILED_PRECONDITION)."""


class KeyMismatchError(PreconditionError):
    """Data encrypted under another key or key version (gRPC FAILED_PRECONDITION)."""


class NotFoundError(PrivfaceError, KeyError):
    """An unknown id (gRPC NOT_FOUND)."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


class AlreadyExistsError(PrivfaceError):
    """An id reused for different content (gRPC ALREADY_EXISTS)."""


class AuthenticationError(PrivfaceError):
    """Missing or wrong credentials (gRPC UNAUTHENTICATED)."""


class PermissionDeniedError(AuthenticationError):
    """Valid credentials that may no longer act, e.g. a revoked device (gRPC PERMISSION_DENIED)."""


class VersionConflictError(PrivfaceError):
    """A compare-and-set write lost a race: re-read and retry (gRPC ABORTED)."""


class LimitExceededError(PrivfaceError):
    """A size or count limit was exceeded (gRPC RESOURCE_EXHAUSTED)."""


class StreamIdleError(PrivfaceError):
    """A stream sent nothing for longer than the server waits (gRPC DEADLINE_EXCEEDED)."""


class StorageUnavailableError(PrivfaceError):
    """The server's database or blob store cannot be reached: retry shortly, possibly on
    another replica (gRPC UNAVAILABLE)."""


class DecryptionError(PrivfaceError):
    """Authenticated decryption failed: wrong key, or the data was altered."""


class WrongPassphraseError(DecryptionError):
    """The family bundle passphrase is wrong (or the bundle file was altered)."""
