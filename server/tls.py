"""Transport security: the server's TLS credentials and a development certificate helper.

The server speaks TLS (a certificate and key, optionally requiring client certificates
signed by a given CA) or, only when told ``--insecure``, plaintext. ``write_dev_certs``
makes a throwaway CA, a server certificate for localhost and a client certificate, for
tests, benchmarks, the demo and local use (``privface-server tls-init DIR``).
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from server.config import ServerConfig

log = logging.getLogger(__name__)

DEV_HOSTS = ("localhost", "127.0.0.1", "::1")
DEV_VALIDITY = datetime.timedelta(days=365)
FIX_HINT = ("give --tls-cert and --tls-key (PRIVFACE_TLS_CERT, PRIVFACE_TLS_KEY; "
            "`privface-server tls-init DIR` makes a development pair), or --insecure "
            "(PRIVFACE_INSECURE=1) for local testing only")


class TransportConfigError(ValueError):
    """The TLS settings are missing, contradictory or unreadable."""


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TransportConfigError(f"cannot read the {what} {path}: "
                                   f"{exc.strerror or exc}") from None


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """The TLS credentials the config asks for, or None for an explicit ``--insecure``
    (logged as a warning). Refuses a config with neither, or with both."""
    tls_given = [name for name in ("tls_cert", "tls_key", "tls_client_ca")
                 if getattr(config, name)]
    if config.insecure:
        if tls_given:
            raise TransportConfigError(
                f"both --insecure and TLS settings ({', '.join(tls_given)}) are given: "
                "drop --insecure (PRIVFACE_INSECURE) to serve TLS")
        log.warning("serving PLAINTEXT gRPC (--insecure): tokens, keys and ciphertexts cross "
                    "the network unprotected; for local testing only")
        return None
    if not (config.tls_cert and config.tls_key):
        missing = "--tls-key" if config.tls_cert else "--tls-cert" if config.tls_key else None
        raise TransportConfigError(
            (f"{missing} is missing: TLS needs both a certificate and its key"
             if missing else "no TLS certificate configured: refusing to serve plaintext")
            + f". To fix: {FIX_HINT}")
    cert = _read(config.tls_cert, "TLS certificate (--tls-cert)")
    key = _read(config.tls_key, "TLS key (--tls-key)")
    client_ca = (_read(config.tls_client_ca, "client CA (--tls-client-ca)")
                 if config.tls_client_ca else None)
    try:
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                           require_client_auth=client_ca is not None)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise TransportConfigError(f"unusable TLS material: {exc}") from None


# -- development certificates ----------------------------------------------------------


@dataclass(frozen=True)
class DevCerts:
    """Where ``write_dev_certs`` put each file (PEM)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "privface development"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _issue(subject: x509.Name, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
           issuer_key: ec.EllipticCurvePrivateKey, extensions: list[tuple[x509.ExtensionType,
                                                                          bool]]
           ) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + DEV_VALIDITY))
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def write_dev_certs(directory: str | Path, hosts: list[str] | None = None) -> DevCerts:
    """A throwaway CA (its key is discarded), a server certificate naming ``hosts``
    (default localhost, 127.0.0.1, ::1) and a client certificate, all ECDSA P-256, valid
    for a year. Keys are written mode 0600. For development and tests, not production."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    names = list(dict.fromkeys([*DEV_HOSTS, *(hosts or [])]))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("privface development CA")
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = _issue(ca_name, ca_key, ca_name, ca_key, [
        (x509.BasicConstraints(ca=True, path_length=0), True),
        (x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                       content_commitment=False, key_encipherment=False,
                       data_encipherment=False, key_agreement=False, encipher_only=False,
                       decipher_only=False), True),
        (ca_ski, False)])
    aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)

    def leaf(common_name: str, usage: x509.ObjectIdentifier, san: list[str]
             ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(_name(common_name), key, ca_name, ca_key, [
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                           content_commitment=False, key_encipherment=False,
                           data_encipherment=False, key_agreement=False,
                           encipher_only=False, decipher_only=False), True),
            (x509.ExtendedKeyUsage([usage]), False),
            (_san(san), False), (aki, False)])
        return cert, key

    server_cert, server_key = leaf(names[0], ExtendedKeyUsageOID.SERVER_AUTH, names)
    client_cert, client_key = leaf("privface development client",
                                   ExtendedKeyUsageOID.CLIENT_AUTH, ["privface-client"])
    paths = DevCerts(out / "ca.pem", out / "server.pem", out / "server.key",
                     out / "client.pem", out / "client.key")
    pem = serialization.Encoding.PEM
    for cert, key, cert_path, key_path in ((server_cert, server_key, paths.server_cert,
                                            paths.server_key),
                                           (client_cert, client_key, paths.client_cert,
                                            paths.client_key)):
        _write(key_path, key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()), 0o600)
        _write(cert_path, cert.public_bytes(pem), 0o644)
    _write(paths.ca, ca.public_bytes(pem), 0o644)
    return paths
