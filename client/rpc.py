"""Thin client over the gRPC API: deadlines, chunking, credentials, error translation.

Nothing here sees a key: callers pass ciphertexts in and get ciphertexts out.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import queue
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from client.config import ClientConfig
from common import errors
from common import secure_cascade as sc
from common.labels import MatchMode
from privface.v1 import (
    detection_pb2,
    detection_pb2_grpc,
    faces_pb2,
    faces_pb2_grpc,
    family_pb2,
    family_pb2_grpc,
    photos_pb2,
    photos_pb2_grpc,
)

log = logging.getLogger(__name__)

CLIENT_VERSION = "privface/0.2"

T = TypeVar("T")

_MODE_TO_PROTO = {
    MatchMode.ALL: photos_pb2.MATCH_MODE_ALL,
    MatchMode.ANY: photos_pb2.MATCH_MODE_ANY,
    MatchMode.RANKED: photos_pb2.MATCH_MODE_RANKED,
}


class ServerUnavailableError(errors.PrivfaceError):
    """The server cannot be reached."""


class TransportSecurityError(errors.PrivfaceError):
    """No usable TLS settings, or the TLS handshake with the server failed."""


class ServerAddressError(errors.PrivfaceError):
    """The server setting is not one address, a list of IP addresses or one DNS name."""


_ERROR_OF = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.MalformedInputError,
    grpc.StatusCode.FAILED_PRECONDITION: errors.PreconditionError,
    grpc.StatusCode.NOT_FOUND: errors.NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExistsError,
    grpc.StatusCode.UNAUTHENTICATED: errors.AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.LimitExceededError,
    grpc.StatusCode.ABORTED: errors.VersionConflictError,
}


class RemoteError(errors.PrivfaceError):
    """Any other server-side failure; carries the gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code


_TLS_FAILURE = re.compile(r"tls handshake|ssl|certificate|hostname verification", re.I)
_TLS_HINTS = (
    ("CERTIFICATE_VERIFY_FAILED", "the server's certificate is not signed by the CA this "
     "client trusts (--tls-ca, PRIVFACE_TLS_CA)"),
    ("WRONG_VERSION_NUMBER", "the server does not speak TLS (was it started with "
     "--insecure?)"),
    ("Hostname Verification", "the server's certificate does not name the host in the "
     "address: connect by a name it lists, or set PRIVFACE_TLS_SERVER_NAME"),
)


def _tls_failure(details: str, address: str) -> TransportSecurityError:
    reason = details.split("OPENSSL_internal:")[-1] if "OPENSSL_internal:" in details else \
        details.split(": ", 2)[-1]
    reason = reason.removesuffix(": OK").strip()
    hint = next((h for marker, h in _TLS_HINTS if marker in details),
                "check that the server's certificate chains to the CA in --tls-ca "
                "(PRIVFACE_TLS_CA) and names this host")
    return TransportSecurityError(f"TLS handshake with the privface server at {address} "
                                  f"failed ({reason}): {hint}")


def translate(exc: grpc.RpcError, address: str, tls: bool | None = None
              ) -> errors.PrivfaceError:
    """A domain error for a gRPC failure (keeps the server's message). ``tls`` (whether
    the channel speaks TLS) sharpens the advice when the server drops the connection."""
    code, details = exc.code(), exc.details() or ""
    if code is grpc.StatusCode.UNAVAILABLE and _TLS_FAILURE.search(details):
        return _tls_failure(details, address)
    if code is grpc.StatusCode.UNAVAILABLE and "socket closed" in details.lower() and \
            tls is not None:
        return ServerUnavailableError(
            f"the privface server at {address} closed the connection while it was being set "
            "up: " + ("if it requires client certificates (mutual TLS), give one its CA "
                      "signed (--tls-client-cert/--tls-client-key, PRIVFACE_TLS_CLIENT_CERT/"
                      "PRIVFACE_TLS_CLIENT_KEY)" if tls else
                      "it probably speaks TLS: drop --insecure and trust its CA with "
                      "--tls-ca (PRIVFACE_TLS_CA)"))
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and \
            ("connect" in details.lower() or code is grpc.StatusCode.UNAVAILABLE):
        servers = server_addresses(address)
        where = (f"any privface server of {', '.join(servers)}" if len(servers) > 1 else
                 f"the privface server at {address}")
        return ServerUnavailableError(
            f"cannot reach {where} ({details}): is privface-server running there? (set "
            "--server or PRIVFACE_SERVER)")
    cls = _ERROR_OF.get(code)
    if cls is not None:
        return cls(details)
    return RemoteError(code, details)


# -- retries: which calls may be sent again ---------------------------------------------


@dataclass(frozen=True)
class Idempotency:
    """Whether a call may be sent again after UNAVAILABLE (the replica went away or could not
    be reached; the call may or may not have been applied), and which status a *retry* may
    get because an earlier attempt did the work before its answer was lost."""

    retry: bool
    done_on_retry: grpc.StatusCode | None = None


_NO = Idempotency(False)
_YES = Idempotency(True)

# Every RPC, by method name (unique across the four services). Only UNAVAILABLE is retried;
# DEADLINE_EXCEEDED never is (the call's time is up, and the work may still be running).
# gRPC's own transparent retry still resends any call that provably never left the client.
RETRY_POLICY: dict[str, Idempotency] = {
    # FamilyService
    "RegisterFamily": _NO,  # a retry after a lost answer creates a second family
    "UploadPublicContext": _YES,  # the same key id again is an idempotent re-upload (the
    # store says so); a different key under a gallery is refused either way
    "GetFamily": _YES,  # read
    "GetSealedItem": _YES,  # read
    # Compare-and-set: a retry after a lost answer gets ABORTED (the version moved on, by
    # this very write). Handled consciously: put_sealed_item reads the item back and counts
    # the write as done only if it holds exactly these bytes at expected_version + 1 (sealed
    # bytes carry a random nonce, so equal bytes are this write); else the conflict stands
    # and the caller's re-read-and-merge loop runs, as for any other phone's write.
    "PutSealedItem": Idempotency(True, grpc.StatusCode.ABORTED),
    "CreateDeviceInvite": _NO,  # each call mints another one-time invitation
    "JoinFamily": _NO,  # consumes a one-time invitation: a retry would be refused
    "ListDevices": _YES,  # read
    "RevokeDevice": _YES,  # the server answers OK for an already revoked device (checked
    # before the last-device rule), so a repeat changes nothing
    "DeleteFamily": _NO,  # a retry after a lost answer is refused (the credentials are
    # gone with the family), which would misreport a completed deletion as a failure
    # PhotoService
    "BackupPhoto": _YES,  # idempotent by the client-chosen photo id: a repeat with the
    # same bytes is answered already_stored=True, nothing is stored twice
    "SearchPhotos": _YES,  # read
    "FetchPhoto": _YES,  # read
    "DeletePhoto": Idempotency(True, grpc.StatusCode.NOT_FOUND),  # deleting twice: the
    # server answers NOT_FOUND for an unknown id, so NOT_FOUND on a *retry* means done
    "ListPhotos": _YES,  # read
    # FaceService
    "AddGalleryEntries": _NO,  # positional compare-and-set (first_position): a retry after
    # a lost answer is refused as "another phone enrolled", which would mislead
    "RemoveGallerySlot": _YES,  # marks a slot's entries dead: a repeat changes nothing
    # (its count of newly removed entries is then 0; the count is informational)
    "GetGalleryLayout": _YES,  # read
    "GetGalleryBlock": _YES,  # read
    "ReplaceGallery": _NO,  # compare-and-set on the position count only: after a lost
    # answer another phone may enrol back to that count, and a retry would then silently
    # drop its entries (ABA); compacting again from a fresh layout is the safe retry
    "MatchFaces": _YES,  # read (encrypted distances; nothing stored)
    # DetectorService
    "PublishDetector": _YES,  # replaces the same (detector id, key version): a repeat
    # stores the same detector again
    "ListDetectors": _YES,  # read
    "DetectFaces": _NO,  # bidirectional: the batches already sent cannot be replayed here;
    # a failed detection is reported, and detecting the photo again is the retry
}

# gRPC's retry policy (service config) for the unary and server-streaming calls that are
# plainly idempotent: a quick in-core resend, landing on another replica under round_robin.
# Client-streaming uploads are not in it (gRPC cannot replay a request stream beyond its
# buffer) and neither are the calls whose retry must be visible (done_on_retry): the retry
# loop in PrivfaceClient covers those, and backs the rest up over a longer, logged budget.
_MIN_ATTEMPT_SECONDS = 0.1  # a retry needs at least this much of the call's time left
_GRPC_RETRY = {"maxAttempts": 3, "initialBackoff": "0.1s", "maxBackoff": "2s",
               "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}
_SERVICES = [service for module in (family_pb2, photos_pb2, faces_pb2, detection_pb2)
             for service in module.DESCRIPTOR.services_by_name.values()]


def service_config(balanced: bool) -> str:
    """The channel's service config (JSON): round_robin when ``balanced``, and gRPC's retry
    policy for the idempotent unary and server-streaming methods."""
    names = [{"service": service.full_name, "method": method.name}
             for service in _SERVICES for method in service.methods
             if RETRY_POLICY[method.name].retry and RETRY_POLICY[method.name].done_on_retry
             is None and not method.client_streaming]
    config: dict[str, Any] = {
        "methodConfig": [{"name": names, "retryPolicy": _GRPC_RETRY}],
        # gRPC stops its own retries on a channel whose calls keep failing; the loop's stay.
        "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1}}
    if balanced:
        config["loadBalancingConfig"] = [{"round_robin": {}}]
    return json.dumps(config)


# -- replicas: one channel over every address, balanced round-robin ---------------------

# Backoff of the Python retry loop is in ClientConfig (retry_attempts, retry_initial_backoff,
# retry_max_backoff). The channel reconnects to a replica that went away on a short backoff
# too (gRPC's default starts at 1 s and grows to 120 s), so a restarted replica is seen again
# within the retry budget.
_RECONNECT_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.enable_retries", 1),
    # The client's policies come from here, never from a DNS TXT record.
    ("grpc.service_config_disable_resolution", 1),
]


@dataclass(frozen=True)
class ChannelTarget:
    """How one channel reaches the configured server(s)."""

    target: str  # the gRPC target
    balanced: bool  # round_robin over several addresses (a list, or what a name resolves to)
    tls_name: str  # the name the certificate must list when the target does not say it ("")
    authority: str  # the :authority to send when the target does not say it ("")


def server_addresses(server: str) -> list[str]:
    """The addresses of a --server setting (comma-separated, blanks dropped)."""
    return [part.strip() for part in server.split(",") if part.strip()]


def _host_of(address: str) -> str:
    """The host of HOST:PORT, [V6]:PORT, HOST or V6 (brackets removed)."""
    if address.startswith("["):
        return address[1:address.find("]")] if "]" in address else address[1:]
    if address.count(":") == 1:
        return address.rsplit(":", 1)[0]
    return address  # no port, or a bare IPv6 literal


def _ip_version(host: str) -> int | None:
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None


def channel_target(server: str) -> ChannelTarget:
    """The gRPC target for a server setting.

    One IP address (HOST:PORT): the target as given, as a single server always was. One
    host name: ``dns:///NAME:PORT``, balanced over every address it resolves to (replicas
    behind one DNS name). Several addresses, all IPv4 or all IPv6 literals:
    ``ipv4:A,B`` / ``ipv6:[A],[B]``, balanced; the certificate is checked against the first
    address's host unless tls_server_name says otherwise. An explicit ``dns:`` target is
    used as given, balanced, and so is an explicit ``ipv4:``/``ipv6:`` list."""
    text = server.strip()
    scheme, _, rest = text.partition(":")
    if scheme in ("dns", "unix", "unix-abstract", "vsock"):
        return ChannelTarget(text, scheme == "dns", "", "")
    parts = server_addresses(rest if scheme in ("ipv4", "ipv6") else text)
    if not parts:
        raise ServerAddressError("no server address: set --server or PRIVFACE_SERVER")
    if len(parts) == 1 and scheme not in ("ipv4", "ipv6"):
        if _ip_version(_host_of(parts[0])) is None:
            return ChannelTarget(f"dns:///{parts[0]}", True, "", "")
        return ChannelTarget(parts[0], False, "", "")
    versions = {_ip_version(_host_of(part)) for part in parts}
    if None in versions:
        names = [p for p in parts if _ip_version(_host_of(p)) is None]
        raise ServerAddressError(
            f"several servers must be given as IP addresses ({', '.join(names)} is not one): "
            "list the replicas' IP:PORT, or give one DNS name that resolves to all of them")
    if len(versions) > 1:
        raise ServerAddressError(
            f"the server list {server} mixes IPv4 and IPv6 addresses: list one kind, or give "
            "one DNS name that resolves to all replicas")
    scheme = "ipv4" if versions == {4} else "ipv6"
    return ChannelTarget(f"{scheme}:{','.join(parts)}", True, _host_of(parts[0]), parts[0])


_insecure_warned = False


def _read_pem(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TransportSecurityError(f"cannot read the {what} {path}: "
                                     f"{exc.strerror or exc}") from None


def open_channel(address: str, config: ClientConfig) -> grpc.Channel:
    """A TLS channel trusting config.tls_ca (presenting a client certificate for mutual TLS
    when one is configured), or a plaintext one only with config.insecure (warned once per
    process). Refuses anything else with a TransportSecurityError saying how to fix it.

    ``address`` may list several servers (replicas) or be a DNS name: one channel balances
    calls over all of them (round_robin; see channel_target), and gRPC retries idempotent
    reads on UNAVAILABLE (service_config)."""
    global _insecure_warned
    where = channel_target(address)
    options: list[tuple[str, int | str]] = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        *_RECONNECT_OPTIONS,
        ("grpc.service_config", service_config(where.balanced))]
    if where.authority:
        options.append(("grpc.default_authority", where.authority))
    tls_given = [flag for flag, value in (("--tls-ca", config.tls_ca),
                                           ("--tls-client-cert", config.tls_client_cert),
                                           ("--tls-client-key", config.tls_client_key))
                 if value]
    if config.insecure:
        if tls_given:
            raise TransportSecurityError(
                f"both --insecure (PRIVFACE_INSECURE) and TLS settings ({', '.join(tls_given)})"
                " are given: drop --insecure to connect with TLS")
        if not _insecure_warned:
            _insecure_warned = True
            log.warning("connecting WITHOUT TLS (--insecure): the access token and all "
                        "traffic cross the network in the clear; for local testing only")
        return grpc.insecure_channel(where.target, options=options)
    if config.tls_ca is None:
        raise TransportSecurityError(
            f"no TLS settings to connect to {address}: give the CA that signed the server's "
            "certificate with --tls-ca FILE (PRIVFACE_TLS_CA; `privface-server tls-init DIR` "
            "writes a development one as DIR/ca.pem), or --insecure (PRIVFACE_INSECURE=1) "
            "for a plaintext test server")
    if bool(config.tls_client_cert) != bool(config.tls_client_key):
        raise TransportSecurityError(
            "mutual TLS needs both --tls-client-cert and --tls-client-key "
            "(PRIVFACE_TLS_CLIENT_CERT, PRIVFACE_TLS_CLIENT_KEY)")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read_pem(config.tls_ca, "CA file (--tls-ca, PRIVFACE_TLS_CA)"),
        private_key=(_read_pem(config.tls_client_key, "client key (--tls-client-key)")
                     if config.tls_client_key else None),
        certificate_chain=(_read_pem(config.tls_client_cert,
                                     "client certificate (--tls-client-cert)")
                           if config.tls_client_cert else None))
    # The certificate must name tls_server_name if set; else, for a list of replicas, the
    # first address's host (every replica's certificate lists it, like a shared DNS name);
    # else the host of the one address, which gRPC checks by itself.
    if config.tls_server_name or where.tls_name:
        options.append(("grpc.ssl_target_name_override",
                        config.tls_server_name or where.tls_name))
    return grpc.secure_channel(where.target, credentials, options=options)


@dataclass(frozen=True)
class Credentials:
    """A family's id and this device's access token."""

    family_id: str
    access_token: str

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("x-privface-family", self.family_id),
                ("authorization", f"Bearer {self.access_token}"))


class Traffic:
    """Bytes of the protobuf messages one client sent and received, every attempt of every
    call counted (TLS and HTTP/2 framing not included). Thread-safe: the app's workers
    share one client."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sent = 0
        self._received = 0

    def add(self, sent: int = 0, received: int = 0) -> None:
        with self._lock:
            self._sent += sent
            self._received += received

    def snapshot(self) -> tuple[int, int]:
        """(bytes sent, bytes received) so far."""
        with self._lock:
            return self._sent, self._received

    def sending(self, messages: Iterator[T]) -> Iterator[T]:
        """``messages``, each counted as it is sent."""
        for message in messages:
            self.add(sent=_size(message))
            yield message

    def receiving(self, messages: Iterator[T]) -> Iterator[T]:
        """``messages``, each counted as it arrives."""
        for message in messages:
            self.add(received=_size(message))
            yield message


def _size(message: object) -> int:
    return message.ByteSize() if isinstance(message, Message) else 0


class PrivfaceClient:
    """One channel to a server (TLS per ``config``; without one, ClientConfig.load(): the
    PRIVFACE_* environment). Use as a context manager or call close()."""

    def __init__(self, address: str, credentials: Credentials | None = None,
                 config: ClientConfig | None = None) -> None:
        self.address = address
        self.credentials = credentials
        self.config = config or ClientConfig.load()
        self.timeout = self.config.timeout
        self._upload_timeout = self.config.upload_timeout
        self._chunk = self.config.chunk_bytes
        self.tls = not self.config.insecure
        self.channel = open_channel(address, self.config)
        self.traffic = Traffic()
        self.family = family_pb2_grpc.FamilyServiceStub(self.channel)
        self.photos = photos_pb2_grpc.PhotoServiceStub(self.channel)
        self.faces = faces_pb2_grpc.FaceServiceStub(self.channel)
        self.detector = detection_pb2_grpc.DetectorServiceStub(self.channel)

    def __enter__(self) -> PrivfaceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel."""
        self.channel.close()

    # -- plumbing ------------------------------------------------------------------------

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Credentials metadata; an error if the client has none."""
        if self.credentials is None:
            raise errors.AuthenticationError("this call needs a family: create one first")
        return self.credentials.metadata()

    def call(self, fn: Callable[..., T], request: Any, *, timeout: float | None = None,
             auth: bool = True, metadata: tuple[tuple[str, str], ...] | None = None,
             done: Callable[[], T | None] | None = None) -> T:
        """A unary or client-streaming call with deadline, credentials (the family's, or
        ``metadata`` when given), translated errors; retried on UNAVAILABLE if RETRY_POLICY
        allows. ``request``: a message, or for a client-streaming call a function returning
        a fresh request iterator (called once per attempt; a bare iterator is sent once).
        ``done``: what a retry's done_on_retry status means (None: the error stands)."""
        if metadata is None and auth:
            metadata = self.metadata()
        replayable = callable(request) or isinstance(request, Message)

        def attempt(seconds: float) -> T:
            sent = request() if callable(request) else request
            if isinstance(sent, Message):
                self.traffic.add(sent=sent.ByteSize())
            else:
                sent = self.traffic.sending(sent)
            response = fn(sent, timeout=seconds, metadata=metadata)
            self.traffic.add(received=_size(response))
            return response
        return self._with_retries(self.method_name(fn) if replayable else "", attempt,
                                  timeout or self.timeout, done)

    def stream(self, fn: Callable[..., Iterator[T]], request: Any, *,
               timeout: float | None = None) -> Iterator[T]:
        """A server-streaming call; errors are translated while iterating. Retried (if
        RETRY_POLICY allows) only until its first message arrives: what the caller already
        has cannot be taken back (collect() retries a whole stream)."""
        metadata = self.metadata()

        def first(seconds: float) -> tuple[Iterator[T], list[T]]:
            self.traffic.add(sent=_size(request))
            responses = self.traffic.receiving(fn(request, timeout=seconds, metadata=metadata))
            return responses, [message for message in (next(responses, None),)
                               if message is not None]
        responses, head = self._with_retries(self.method_name(fn), first,
                                             timeout or self.timeout)
        if not head:
            return
        yield head[0]
        try:
            yield from responses
        except grpc.RpcError as exc:
            raise translate(exc, self.address, self.tls) from None

    def collect(self, fn: Callable[..., Iterator[T]], request: Any, *,
                timeout: float | None = None) -> list[T]:
        """Every message of a server-streaming call; retried as a whole (if RETRY_POLICY
        allows): a stream broken midway is read again from its start."""
        metadata = self.metadata()

        def attempt(seconds: float) -> list[T]:
            self.traffic.add(sent=_size(request))
            return list(self.traffic.receiving(fn(request, timeout=seconds,
                                                  metadata=metadata)))
        return self._with_retries(self.method_name(fn), attempt, timeout or self.timeout)

    def method_name(self, fn: Callable[..., Any]) -> str:
        """The RPC that one of this client's stub callables makes ("" for anything else)."""
        stubs = (self.family, self.photos, self.faces, self.detector)
        for stub, service in zip(stubs, _SERVICES, strict=True):
            for method in service.methods:
                if getattr(stub, method.name, None) is fn:
                    return str(method.name)
        return ""

    def _with_retries(self, method: str, attempt: Callable[[float], T], timeout: float,
                      done: Callable[[], T | None] | None = None) -> T:
        """``attempt(seconds)`` until it succeeds, fails for good, or the retries allowed
        for ``method`` (RETRY_POLICY; none for "") are spent: at most retry_attempts tries,
        exponential backoff with jitter, all within ``timeout`` seconds."""
        policy = RETRY_POLICY.get(method, _NO)
        deadline = time.monotonic() + timeout
        tries = 1
        while True:
            try:
                return attempt(timeout if tries == 1 else deadline - time.monotonic())
            except grpc.RpcError as exc:
                code = exc.code()
                if tries > 1 and done is not None and code is policy.done_on_retry:
                    log.info("%s: %s on attempt %d: an earlier attempt was applied and its "
                             "answer lost", method, code.name, tries)
                    settled = done()
                    if settled is not None:
                        return settled
                delay = self._retry_delay(policy, exc, tries, deadline)
                if delay is None:
                    raise translate(exc, self.address, self.tls) from None
                log.info("%s failed with %s (attempt %d of %d): retrying in %.2f s", method,
                         code.name, tries, self.config.retry_attempts, delay)
                time.sleep(delay)
            tries += 1

    def _retry_delay(self, policy: Idempotency, exc: grpc.RpcError, tries: int,
                     deadline: float) -> float | None:
        """Seconds to wait before trying again, or None: not retried."""
        if not policy.retry or exc.code() is not grpc.StatusCode.UNAVAILABLE:
            return None
        if _TLS_FAILURE.search(exc.details() or ""):
            return None  # a certificate the client does not trust stays untrusted
        if tries >= self.config.retry_attempts:
            return None
        backoff = self.config.retry_initial_backoff * 2.0 ** (tries - 1)
        delay = min(backoff * random.uniform(0.8, 1.2), self.config.retry_max_backoff)
        if deadline - time.monotonic() - delay < _MIN_ATTEMPT_SECONDS:
            return None  # no time left for another useful attempt
        return delay

    # -- family --------------------------------------------------------------------------

    def register_family(self, label_key_fingerprint: bytes, label_dim: int,
                        device_id: str = "", sealed_device_name: bytes = b"") -> Credentials:
        """Creates a family on the server; returns (and adopts) its credentials."""
        response: family_pb2.RegisterFamilyResponse = self.call(
            self.family.RegisterFamily, family_pb2.RegisterFamilyRequest(
                client_version=CLIENT_VERSION, label_key_fingerprint=label_key_fingerprint,
                label_ciphertext_dim=label_dim, device_id=device_id,
                sealed_device_name=sealed_device_name), auth=False)
        self.credentials = Credentials(response.family_id, response.access_token)
        return self.credentials

    def join_family(self, family_id: str, invite_token: str, device_id: str,
                    sealed_device_name: bytes) -> Credentials:
        """Registers this phone with a one-time invitation; returns (and adopts) its
        credentials."""
        response: family_pb2.JoinFamilyResponse = self.call(
            self.family.JoinFamily, family_pb2.JoinFamilyRequest(
                family_id=family_id, invite_token=invite_token, device_id=device_id,
                sealed_device_name=sealed_device_name), auth=False)
        self.credentials = Credentials(family_id, response.access_token)
        return self.credentials

    def create_device_invite(self, ttl_seconds: int = 0) -> tuple[str, float]:
        """A one-time invitation token for another phone and when it expires."""
        response: family_pb2.CreateDeviceInviteResponse = self.call(
            self.family.CreateDeviceInvite,
            family_pb2.CreateDeviceInviteRequest(ttl_seconds=ttl_seconds))
        return response.invite_token, response.expires_at

    def list_devices(self) -> list[DeviceRecord]:
        """The family's devices, oldest first (names still sealed)."""
        response: family_pb2.ListDevicesResponse = self.call(
            self.family.ListDevices, family_pb2.ListDevicesRequest())
        return [DeviceRecord(d.device_id, d.sealed_name, d.created_at, d.last_seen_at,
                             d.revoked) for d in response.devices]

    def revoke_device(self, device_id: str) -> None:
        """Revokes another device of the family."""
        self.call(self.family.RevokeDevice, family_pb2.RevokeDeviceRequest(device_id=device_id))

    def delete_family(self) -> FamilyDeletion:
        """Deletes this family and everything the server holds for it, for every phone."""
        family_id = self.credentials.family_id if self.credentials else ""
        r: family_pb2.DeleteFamilyResponse = self.call(
            self.family.DeleteFamily, family_pb2.DeleteFamilyRequest(confirm_family_id=family_id),
            timeout=self._upload_timeout)
        return FamilyDeletion(family_id, r.photos_deleted, r.gallery_entries_deleted,
                              r.devices_deleted, r.sealed_items_deleted)

    def get_sealed_item(self, name: str) -> tuple[int, bytes]:
        """(version, sealed bytes) of one family item; (0, b"") if never written."""
        response: family_pb2.GetSealedItemResponse = self.call(
            self.family.GetSealedItem, family_pb2.GetSealedItemRequest(name=name),
            timeout=self._upload_timeout)
        return response.version, response.data

    def put_sealed_item(self, name: str, expected_version: int, data: bytes) -> int:
        """Writes one family item if still at ``expected_version``; returns the new version
        (VersionConflictError if another phone wrote first)."""
        def settled() -> family_pb2.PutSealedItemResponse | None:
            """A retry's conflict: done if the item now holds exactly this write (see
            RETRY_POLICY), else the conflict stands."""
            version, stored = self.get_sealed_item(name)
            if version == expected_version + 1 and stored == data:
                return family_pb2.PutSealedItemResponse(version=version)
            return None
        response: family_pb2.PutSealedItemResponse = self.call(
            self.family.PutSealedItem, family_pb2.PutSealedItemRequest(
                name=name, expected_version=expected_version, data=data),
            timeout=self._upload_timeout, done=settled)
        return response.version

    def get_family(self) -> FamilySummary:
        """Counts the server holds for this family."""
        r: family_pb2.GetFamilyResponse = self.call(self.family.GetFamily,
                                                    family_pb2.GetFamilyRequest())
        return FamilySummary(r.family_id, r.photo_count, r.gallery_entry_count,
                             r.has_public_context, bytes(r.ckks_key_id), r.device_id)

    def upload_public_context(self, data: bytes) -> tuple[int, int]:
        """Uploads the public CKKS context in chunks; returns (bytes stored, rotation keys)."""
        digest = hashlib.sha256(data).digest()

        def requests() -> Iterator[family_pb2.UploadPublicContextRequest]:
            for start in range(0, max(len(data), 1), self._chunk):
                last = start + self._chunk >= len(data)
                yield family_pb2.UploadPublicContextRequest(
                    total_size=len(data), chunk=data[start:start + self._chunk],
                    sha256=digest if last else b"")
        response: family_pb2.UploadPublicContextResponse = self.call(
            self.family.UploadPublicContext, requests, timeout=self._upload_timeout)
        return response.size, response.galois_key_count

    # -- photos --------------------------------------------------------------------------

    def backup_photo(self, photo_id: str, blob: bytes, encrypted_labels: bytes,
                     label_key_fingerprint: bytes, encrypted_thumbnail: bytes = b""
                     ) -> bool:
        """Uploads one encrypted photo (header, then chunks); True if the server already
        had it (also when a retry follows an attempt whose answer was lost)."""
        header = photos_pb2.PhotoHeader(
            photo_id=photo_id, blob_size=len(blob), blob_sha256=hashlib.sha256(blob).digest(),
            encrypted_labels=encrypted_labels, label_key_fingerprint=label_key_fingerprint,
            encrypted_thumbnail=encrypted_thumbnail)

        def requests() -> Iterator[photos_pb2.BackupPhotoRequest]:
            yield photos_pb2.BackupPhotoRequest(header=header)
            for start in range(0, len(blob), self._chunk):
                yield photos_pb2.BackupPhotoRequest(chunk=blob[start:start + self._chunk])
        response: photos_pb2.BackupPhotoResponse = self.call(
            self.photos.BackupPhoto, requests, timeout=self._upload_timeout)
        return response.already_stored

    def search_photos(self, encrypted_query: bytes, label_key_fingerprint: bytes,
                      mode: MatchMode = MatchMode.ALL, top_n: int = 0
                      ) -> tuple[list[str], float]:
        """All matching ids (pages joined) and the server's match time in ms."""
        ids: list[str] = []
        server_ms = 0.0
        for page in self.collect(self.photos.SearchPhotos, photos_pb2.SearchPhotosRequest(
                encrypted_query=encrypted_query, label_key_fingerprint=label_key_fingerprint,
                mode=_MODE_TO_PROTO[mode], top_n=top_n)):
            ids.extend(page.photo_ids)
            server_ms = max(server_ms, page.server_ms)
        return ids, server_ms

    def fetch_photo(self, photo_id: str, thumbnail_only: bool = False) -> bytes:
        """Downloads one encrypted blob and checks its SHA-256."""
        parts, expected = [], b""
        for msg in self.collect(self.photos.FetchPhoto, photos_pb2.FetchPhotoRequest(
                photo_id=photo_id, thumbnail_only=thumbnail_only), timeout=self._upload_timeout):
            if msg.blob_sha256:
                expected = msg.blob_sha256
            parts.append(msg.chunk)
        blob = b"".join(parts)
        if expected and hashlib.sha256(blob).digest() != expected:
            raise errors.DecryptionError(f"photo {photo_id} arrived corrupted: retry")
        return blob

    def delete_photo(self, photo_id: str) -> None:
        """Deletes one photo (a retry that finds it gone counts as done: RETRY_POLICY)."""
        self.call(self.photos.DeletePhoto, photos_pb2.DeletePhotoRequest(photo_id=photo_id),
                  done=lambda: photos_pb2.DeletePhotoResponse(photo_id=photo_id))

    def list_photos(self) -> list[str]:
        """All photo ids, newest first."""
        ids: list[str] = []
        for page in self.collect(self.photos.ListPhotos, photos_pb2.ListPhotosRequest()):
            ids.extend(page.photo_ids)
        return ids

    # -- faces ---------------------------------------------------------------------------

    def gallery_layout(self) -> dict[int, list[int]]:
        """block -> slot of each position (-1 for a dead one)."""
        response: faces_pb2.GetGalleryLayoutResponse = self.call(
            self.faces.GetGalleryLayout, faces_pb2.GetGalleryLayoutRequest())
        return {b.block: list(b.position_slots) for b in response.blocks}

    def add_gallery_entries(self, slot: int, block: int, first_position: int, count: int,
                            ciphertexts: list[bytes]) -> int:
        """Adds encrypted entries; returns the gallery's entry count."""
        response: faces_pb2.AddGalleryEntriesResponse = self.call(
            self.faces.AddGalleryEntries, faces_pb2.AddGalleryEntriesRequest(
                slot=slot, block=block, first_position=first_position, count=count,
                ciphertexts=faces_pb2.Ciphertexts(items=ciphertexts)),
            timeout=self._upload_timeout)
        return response.gallery_entry_count

    def remove_gallery_slot(self, slot: int) -> int:
        """Marks a member's gallery entries dead; returns how many."""
        response: faces_pb2.RemoveGallerySlotResponse = self.call(
            self.faces.RemoveGallerySlot, faces_pb2.RemoveGallerySlotRequest(slot=slot))
        return response.removed

    def match_faces(self, faces: list[list[bytes]]) -> list[BlockDistances]:
        """Encrypted distances of each face to each gallery block."""
        request = faces_pb2.MatchFacesRequest(faces=[faces_pb2.Ciphertexts(items=f)
                                                     for f in faces])
        return [BlockDistances(r.face, r.block, r.distances, list(r.position_slots))
                for r in self.collect(self.faces.MatchFaces, request,
                                      timeout=self._upload_timeout)]

    # -- detectors -----------------------------------------------------------------------

    def publish_detector(self, header: detection_pb2.DetectorHeader, matrix: bytes,
                         vendor_token: str) -> PublishedDetector:
        """Uploads an encrypted detector (header, then chunks) with the vendor token."""
        def requests() -> Iterator[detection_pb2.PublishDetectorRequest]:
            yield detection_pb2.PublishDetectorRequest(header=header)
            for start in range(0, len(matrix), self._chunk):
                yield detection_pb2.PublishDetectorRequest(chunk=matrix[start:start + self._chunk])
        response: detection_pb2.PublishDetectorResponse = self.call(
            self.detector.PublishDetector, requests, timeout=self._upload_timeout,
            metadata=(("authorization", f"Bearer {vendor_token}"),))
        return PublishedDetector(response.detector_id, response.key_version)

    def list_detectors(self) -> list[detection_pb2.DetectorInfo]:
        """Published detectors (public descriptions only)."""
        response: detection_pb2.ListDetectorsResponse = self.call(
            self.detector.ListDetectors, detection_pb2.ListDetectorsRequest(), auth=False)
        return list(response.detectors)

    def gallery_block(self, block: int) -> tuple[list[bytes], list[int]]:
        """One block's ciphertexts and the slot of each position."""
        r: faces_pb2.GetGalleryBlockResponse = self.call(
            self.faces.GetGalleryBlock, faces_pb2.GetGalleryBlockRequest(block=block),
            timeout=self._upload_timeout)
        return list(r.ciphertexts.items), list(r.position_slots)

    def replace_gallery(self, expected_positions: int,
                        blocks: list[tuple[list[bytes], list[int]]]) -> int:
        """Swaps in a re-packed gallery; returns the live entry count."""
        def requests() -> Iterator[faces_pb2.ReplaceGalleryRequest]:
            yield faces_pb2.ReplaceGalleryRequest(header=faces_pb2.ReplaceGalleryHeader(
                expected_positions=expected_positions, block_count=len(blocks)))
            for cts, slots in blocks:
                yield faces_pb2.ReplaceGalleryRequest(block=faces_pb2.ReplacementBlock(
                    ciphertexts=faces_pb2.Ciphertexts(items=cts), slots=slots))
        response: faces_pb2.ReplaceGalleryResponse = self.call(
            self.faces.ReplaceGallery, requests, timeout=self._upload_timeout)
        return response.gallery_entry_count

    def open_detection(self, detector_id: str, key_version: int, key_fingerprint: bytes
                       ) -> DetectionStream:
        """Opens one bidirectional DetectFaces call for a photo's encrypted windows."""
        return DetectionStream(self, detection_pb2.DetectionSession(
            detector_id=detector_id, key_version=key_version, key_fingerprint=key_fingerprint))


def detector_header(enc: sc.EncryptedCascade) -> detection_pb2.DetectorHeader:
    """The public part of an encrypted detector: ids, sizes, leaf values, stage thresholds."""
    matrix = enc.matrix_bytes()
    stages = []
    start = 0
    for stop, threshold in zip(enc.stage_ends, enc.stage_thresholds, strict=True):
        stop = int(stop)
        stages.append(detection_pb2.CascadeStage(
            weak_count=stop - start, threshold=float(threshold),
            left_values=enc.left_values[start:stop].tolist(),
            right_values=enc.right_values[start:stop].tolist()))
        start = stop
    prefix_size = enc.prefix_classifiers.size * 8 if enc.prefix_stages else 0
    return detection_pb2.DetectorHeader(
        detector_id=enc.detector_id, key_version=enc.key_version,
        key_fingerprint=enc.key_fingerprint, window_width=enc.window_size[0],
        window_height=enc.window_size[1], ciphertext_dim=enc.cipher_dim, stages=stages,
        matrix_size=len(matrix), matrix_sha256=hashlib.sha256(matrix).digest(),
        prefix_stages=enc.prefix_stages, prefix_ciphertext_dim=enc.prefix_cipher_dim,
        prefix_matrix_size=prefix_size)


@dataclass(frozen=True)
class PublishedDetector:
    """What the server stored of a published detector."""

    detector_id: str
    key_version: int


@dataclass(frozen=True)
class FamilyDeletion:
    """What the server deleted with a family."""

    family_id: str
    photos: int
    gallery_entries: int
    devices: int
    sealed_items: int


@dataclass(frozen=True)
class FamilySummary:
    """What the server holds for a family (counts and public ids only)."""

    family_id: str
    photo_count: int
    gallery_entry_count: int
    has_public_context: bool
    ckks_key_id: bytes
    device_id: str


@dataclass(frozen=True)
class DeviceRecord:
    """One device of the family as the server knows it (its name sealed)."""

    device_id: str
    sealed_name: bytes
    created_at: float
    last_seen_at: float
    revoked: bool


@dataclass(frozen=True)
class BlockDistances:
    """The encrypted distances of one query face to one gallery block."""

    face: int
    block: int
    ciphertext: bytes
    position_slots: list[int]


@dataclass(frozen=True)
class WindowOutcomes:
    """The server's answer to one batch of encrypted windows."""

    outcomes: bytes  # one common.secure_cascade.Outcome byte per window
    server_ms: float
    request_bytes: int


class DetectionStream:
    """One DetectFaces call driven synchronously: send a batch, read its outcomes."""

    def __init__(self, client: PrivfaceClient, session: detection_pb2.DetectionSession
                 ) -> None:
        self._address = client.address
        self._tls = client.tls
        self._traffic = client.traffic
        self._requests: queue.Queue[detection_pb2.DetectFacesRequest | None] = queue.Queue()
        opening = detection_pb2.DetectFacesRequest(session=session)
        self._traffic.add(sent=opening.ByteSize())
        self._requests.put(opening)
        self._responses = client.detector.DetectFaces(
            iter(self._requests.get, None), timeout=client.config.detect_timeout,
            metadata=client.metadata())
        self._next_id = 0

    def run(self, windows: bytes, count: int, encoding: int, first_stage: int,
            prefix: bool) -> WindowOutcomes:
        """Sends ``count`` encrypted windows and waits for their outcomes."""
        batch = detection_pb2.WindowBatch(
            batch_id=self._next_id, count=count, windows=windows,
            encoding=detection_pb2.WindowEncoding.Name(encoding),
            first_stage=first_stage,
            kind=detection_pb2.WINDOW_KIND_PREFIX if prefix else detection_pb2.WINDOW_KIND_FULL)
        self._next_id += 1
        request = detection_pb2.DetectFacesRequest(batch=batch)
        self._requests.put(request)
        try:
            response = next(self._responses)
        except grpc.RpcError as exc:
            raise translate(exc, self._address, self._tls) from None
        except StopIteration:
            raise errors.MalformedInputError("the server ended detection early") from None
        self._traffic.add(sent=request.ByteSize(), received=response.ByteSize())
        if response.batch_id != batch.batch_id or response.count != count:
            raise errors.MalformedInputError("the server answered another batch")
        return WindowOutcomes(response.outcomes, response.server_ms, request.ByteSize())

    def close(self) -> None:
        """Ends the request stream and drains the call. A failed call's error was already
        raised (translated) by run(); it is not raised again here."""
        self._requests.put(None)
        try:
            for _ in self._responses:
                pass
        except grpc.RpcError:
            pass
