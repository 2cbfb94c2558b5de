"""Transport security: TLS end to end, clients that do not trust the server, mutual TLS,
plaintext only when asked for, and the vendor token's rotation without a restart."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from client import rpc
from client.config import ClientConfig
from client.pipeline import photos as pipeline
from client.pipeline.family import create_family
from client.rpc import PrivfaceClient, ServerUnavailableError, TransportSecurityError
from client.vendor_cli import build_parser as vendor_parser
from client.vendor_cli import main as vendor_main
from common import labels
from common.errors import AuthenticationError, MalformedInputError
from server.app import create_server, vendor_token
from server.config import ServerConfig
from server.tls import DevCerts, TransportConfigError, write_dev_certs
from tests.server.test_photo_service import _photo_bytes

QUICK = 5.0  # seconds: a refused handshake fails fast on loopback


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> DevCerts:
    """A second, unrelated development CA with its own server and client certificates."""
    return write_dev_certs(tmp_path_factory.mktemp("other-tls"))


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[[ServerConfig], str]]:
    """Starts servers from configs; stops them all at the end. Returns the address."""
    servers: list[grpc.Server] = []

    def start(config: ServerConfig) -> str:
        config = dataclasses.replace(config, data_dir=tmp_path / f"server{len(servers)}")
        server, port, _ = create_server(config)
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(0).wait()


def test_family_backup_and_search_over_tls(address: str, client_config: ClientConfig) -> None:
    assert client_config.tls_ca is not None and not client_config.insecure
    with PrivfaceClient(address, config=client_config) as client:
        assert client.tls
        bundle = create_family(client)
        mum, tom = bundle.add_member("Mum"), bundle.add_member("Tom")
        data = _photo_bytes("over tls")
        receipt = pipeline.backup_photo(client, bundle, data, [mum, tom])
        found, _ms = pipeline.search_photos(client, bundle, [mum, tom], labels.MatchMode.ALL)
        assert found == [receipt.photo_id]
        assert pipeline.fetch_photo(client, bundle, receipt.photo_id) == data
    # The same server refuses a plaintext client: it really speaks TLS only.
    with PrivfaceClient(address, config=ClientConfig(insecure=True, timeout=QUICK)) as plain, \
            pytest.raises(ServerUnavailableError, match=r"probably speaks TLS.*--tls-ca"):
        plain.list_detectors()


def test_client_trusting_another_ca_fails_with_a_tls_message(
        address: str, other_ca: DevCerts) -> None:
    config = ClientConfig(tls_ca=other_ca.ca, timeout=QUICK)
    with PrivfaceClient(address, config=config) as client, \
            pytest.raises(TransportSecurityError) as info:
        create_family(client)
    message = str(info.value)
    assert message.startswith(f"TLS handshake with the privface server at {address} failed")
    assert "CERTIFICATE_VERIFY_FAILED" in message and "not signed by the CA" in message
    assert "--tls-ca" in message and "PRIVFACE_TLS_CA" in message


def test_client_without_tls_settings_refuses_to_connect(address: str) -> None:
    with pytest.raises(TransportSecurityError) as info:
        PrivfaceClient(address, config=ClientConfig())
    message = str(info.value)
    assert f"no TLS settings to connect to {address}" in message
    for fix in ("--tls-ca", "PRIVFACE_TLS_CA", "privface-server tls-init", "--insecure"):
        assert fix in message
    with pytest.raises(TransportSecurityError, match="cannot read the CA file"):
        PrivfaceClient(address, config=ClientConfig(tls_ca=Path("/nonexistent/ca.pem")))
    with pytest.raises(TransportSecurityError, match="both --insecure"):
        PrivfaceClient(address, config=ClientConfig(tls_ca=Path("ca.pem"), insecure=True))


def test_certificate_for_another_name_is_refused_unless_overridden(
        serve, tmp_path: Path) -> None:
    certs = write_dev_certs(tmp_path / "tls")  # names localhost, 127.0.0.1, ::1 only
    address = serve(ServerConfig(host="127.0.0.1", port=0, tls_cert=certs.server_cert,
                                 tls_key=certs.server_key))
    port = address.rsplit(":", 1)[1]
    # the same server reached by a name its certificate does not list
    alias = f"127.0.0.1:{port}"
    with PrivfaceClient(alias, config=ClientConfig(tls_ca=certs.ca, timeout=QUICK,
                                                   tls_server_name="photos.example")) as c, \
            pytest.raises(TransportSecurityError, match="does not name the host"):
        c.list_detectors()
    with PrivfaceClient(f"localhost:{port}", config=ClientConfig(tls_ca=certs.ca)) as c:
        assert c.list_detectors() == []


def test_tls_client_to_a_plaintext_server_is_told_so(serve, tls_certs: DevCerts) -> None:
    address = serve(ServerConfig(host="127.0.0.1", port=0, insecure=True))
    with PrivfaceClient(address, config=ClientConfig(tls_ca=tls_certs.ca, timeout=QUICK)
                        ) as client, \
            pytest.raises(TransportSecurityError, match=r"does not speak TLS.*--insecure"):
        client.list_detectors()


def test_mutual_tls_refuses_clients_without_a_certificate_it_trusts(
        serve, tls_certs: DevCerts, other_ca: DevCerts) -> None:
    address = serve(ServerConfig(host="127.0.0.1", port=0, tls_cert=tls_certs.server_cert,
                                 tls_key=tls_certs.server_key, tls_client_ca=tls_certs.ca))
    no_cert = ClientConfig(tls_ca=tls_certs.ca, timeout=QUICK)
    foreign = dataclasses.replace(no_cert, tls_client_cert=other_ca.client_cert,
                                  tls_client_key=other_ca.client_key)
    for config in (no_cert, foreign):
        with PrivfaceClient(address, config=config) as client, \
                pytest.raises(ServerUnavailableError, match="requires client certificates"):
            create_family(client)
    mutual = dataclasses.replace(no_cert, tls_client_cert=tls_certs.client_cert,
                                 tls_client_key=tls_certs.client_key)
    with PrivfaceClient(address, config=mutual) as client:
        bundle = create_family(client)
        assert client.get_family().family_id == bundle.family_id
    with pytest.raises(TransportSecurityError, match="needs both --tls-client-cert"):
        PrivfaceClient(address, config=dataclasses.replace(mutual, tls_client_key=None))


def test_server_refuses_to_start_without_tls_or_insecure(tmp_path: Path,
                                                         tls_certs: DevCerts) -> None:
    base = ServerConfig(host="127.0.0.1", port=0, data_dir=tmp_path / "data")
    with pytest.raises(TransportConfigError, match="refusing to serve plaintext") as info:
        create_server(base)
    assert "--insecure" in str(info.value) and "tls-init" in str(info.value)
    with pytest.raises(TransportConfigError, match="--tls-key is missing"):
        create_server(dataclasses.replace(base, tls_cert=tls_certs.server_cert))
    with pytest.raises(TransportConfigError, match="both --insecure and TLS settings"):
        create_server(dataclasses.replace(base, insecure=True, tls_cert=tls_certs.server_cert,
                                          tls_key=tls_certs.server_key))
    with pytest.raises(TransportConfigError, match="cannot read the TLS key"):
        create_server(dataclasses.replace(base, tls_cert=tls_certs.server_cert,
                                          tls_key=tmp_path / "missing.key"))
    assert not (tmp_path / "data").exists()  # refused before any storage was made


def test_insecure_is_warned_once_per_process_and_works(
        serve, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rpc, "_insecure_warned", False)
    with caplog.at_level(logging.WARNING):
        address = serve(ServerConfig(host="127.0.0.1", port=0, insecure=True))
        for _ in range(3):
            with PrivfaceClient(address, config=ClientConfig(insecure=True)) as client:
                assert client.list_detectors() == []
    server_warnings = [r for r in caplog.records if r.name == "server.tls"]
    client_warnings = [r for r in caplog.records if r.name == "client.rpc"]
    assert len(server_warnings) == 1 and "PLAINTEXT" in server_warnings[0].getMessage()
    assert len(client_warnings) == 1 and "WITHOUT TLS" in client_warnings[0].getMessage()
    assert all(r.levelno == logging.WARNING for r in server_warnings + client_warnings)


def test_client_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch,
                                                   tls_certs: DevCerts) -> None:
    monkeypatch.setenv("PRIVFACE_TLS_CLIENT_CERT", str(tls_certs.client_cert))
    monkeypatch.setenv("PRIVFACE_TLS_CLIENT_KEY", str(tls_certs.client_key))
    monkeypatch.setenv("PRIVFACE_INSECURE", "0")
    config = ClientConfig.load()
    assert config.tls_ca == tls_certs.ca  # conftest's session-wide PRIVFACE_TLS_CA
    assert (config.tls_client_cert, config.tls_client_key, config.insecure) == (
        tls_certs.client_cert, tls_certs.client_key, False)
    monkeypatch.setenv("PRIVFACE_INSECURE", "1")
    assert ClientConfig.load().insecure


# -- the vendor token ------------------------------------------------------------------


def _publish_auth(client: PrivfaceClient, token: str) -> type[Exception]:
    """Which error an (empty) publish with ``token`` gets: MalformedInputError means the
    token was accepted and the missing header refused next."""
    try:
        client.call(client.detector.PublishDetector, iter([]),
                    metadata=(("authorization", f"Bearer {token}"),))
    except (AuthenticationError, MalformedInputError) as exc:
        return type(exc)
    raise AssertionError("an empty publish was accepted")


def test_vendor_token_rotation_needs_no_restart(server, family) -> None:
    _address, config = server
    client, _bundle = family
    old = vendor_token(config)
    assert _publish_auth(client, old) is MalformedInputError
    path = config.data_dir / "vendor.token"
    assert path.stat().st_mode & 0o777 == 0o600
    out = subprocess.run([sys.executable, "-m", "server", "rotate-vendor-token", "--data-dir",
                          str(config.data_dir)], capture_output=True, text=True, check=True)
    assert str(path) in out.stdout
    new = path.read_text().strip()
    assert new != old and len(new) >= 40 and new not in out.stdout + out.stderr
    assert path.stat().st_mode & 0o777 == 0o600
    assert _publish_auth(client, old) is AuthenticationError  # the old one is refused now
    assert _publish_auth(client, new) is MalformedInputError
    assert vendor_token(config) == new


def test_vendor_tool_takes_no_token_on_the_command_line(tmp_path: Path, address: str,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    with pytest.raises(SystemExit):
        vendor_parser().parse_args(["publish", "--help"])
    help_text = capsys.readouterr().out
    assert "--vendor-token-file" in help_text and "PRIVFACE_VENDOR_TOKEN" in help_text
    assert "--vendor-token " not in help_text.replace("--vendor-token-file", "")
    with pytest.raises(SystemExit):
        vendor_parser().parse_args(["publish", "--key", "k", "--vendor-token", "s3cret"])
    assert "unrecognized arguments" in capsys.readouterr().err
    # info over TLS, trusting the CA named in the environment (conftest)
    assert vendor_main(["--server", address, "info"]) == 0
    assert "no detectors published" in capsys.readouterr().out
