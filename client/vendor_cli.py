"""privface-vendor: the detector vendor's tool (D-KeyGen, E-FD and publishing)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from client import vendor
from client.config import ClientConfig
from client.rpc import PrivfaceClient
from common import secure_cascade as sc
from common.cascade import load_cascade
from common.errors import PrivfaceError


def client_config(args: argparse.Namespace) -> ClientConfig:
    """Transport settings: flags over PRIVFACE_* variables over defaults."""
    def path(value: str | None) -> Path | None:
        return Path(value).expanduser() if value else None

    return ClientConfig.load(tls_ca=path(args.tls_ca), tls_client_cert=path(args.tls_client_cert),
                             tls_client_key=path(args.tls_client_key), insecure=args.insecure)


def cmd_keygen(args: argparse.Namespace) -> int:
    cascade = load_cascade(args.cascade)
    key = sc.generate_product_key(args.detector, cascade, args.version,
                                  prefix_stages=args.prefix_stages)
    out = Path(args.output)
    if out.exists() and not args.force:
        print(f"error: {out} exists (use --force)", file=sys.stderr)
        return 2
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.to_bytes())
    c1, c2 = key.key.condition_numbers()
    print(f"product key {args.detector} v{args.version} written to {out} "
          f"(fingerprint {key.fingerprint().hex()}, cond(M1)={c1:.1f}, cond(M2)={c2:.1f}, "
          f"prefix: {key.prefix_stages} stages in {key.prefix_basis.shape[0]} dims)")
    print("give this file to customers over a secure channel; never to the server")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    key = sc.ProductKey.from_bytes(Path(args.key).read_bytes())
    cascade = load_cascade(args.cascade)
    token = (Path(args.vendor_token_file).read_text().strip() if args.vendor_token_file
             else os.environ.get("PRIVFACE_VENDOR_TOKEN", ""))
    if not token:
        print("error: give --vendor-token-file FILE (the server's <data-dir>/vendor.token) or "
              "set PRIVFACE_VENDOR_TOKEN", file=sys.stderr)
        return 2
    with PrivfaceClient(args.server, config=client_config(args)) as client:
        reply = vendor.publish(client, cascade, key, token)
    print(f"published {reply.detector_id} v{reply.key_version} "
          f"({cascade.n_weak} encrypted weak classifiers, {cascade.n_stages} stages)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    with PrivfaceClient(args.server, config=client_config(args)) as client:
        detectors = client.list_detectors()
    if not detectors:
        print("no detectors published")
    for d in detectors:
        print(f"{d.detector_id} v{d.key_version}: {d.stage_count} stages, {d.weak_count} weak "
              f"classifiers, {d.window_width}x{d.window_height} window, ciphertexts of "
              f"{d.ciphertext_dim} values, key {d.key_fingerprint.hex()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The privface-vendor argument parser."""
    p = argparse.ArgumentParser(prog="privface-vendor", description=(
        "For the detector vendor: make product keys, encrypt the Viola-Jones cascade and "
        "publish it; the server never sees the classifiers, thresholds or the key."))
    p.add_argument("--server", default=os.environ.get("PRIVFACE_SERVER", "127.0.0.1:50051"),
                   help="server host:port (env PRIVFACE_SERVER; default %(default)s)")
    p.add_argument("--tls-ca", metavar="FILE", help="CA certificate (PEM) the server's "
                   "certificate must chain to (env PRIVFACE_TLS_CA)")
    p.add_argument("--tls-client-cert", metavar="FILE",
                   help="mutual TLS: the vendor's certificate (env PRIVFACE_TLS_CLIENT_CERT)")
    p.add_argument("--tls-client-key", metavar="FILE",
                   help="mutual TLS: its private key (env PRIVFACE_TLS_CLIENT_KEY)")
    p.add_argument("--insecure", action="store_const", const=True, default=None,
                   help="connect without TLS to a test server (env PRIVFACE_INSECURE=1)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    keygen = sub.add_parser("keygen", help="D-KeyGen: write a versioned product key")
    keygen.add_argument("-o", "--output", required=True, help="product key file to write")
    keygen.add_argument("--detector", default="frontalface_alt", help="detector id")
    keygen.add_argument("--version", type=int, default=1, help="key version (re-key: +1)")
    keygen.add_argument("--cascade", help="OpenCV cascade XML (default: frontalface_alt)")
    keygen.add_argument("--prefix-stages", type=int, default=sc.DEFAULT_PREFIX_STAGES,
                        help="stages of the cheap first round (0 = none; default %(default)s)")
    keygen.add_argument("--force", action="store_true", help="overwrite the output")
    keygen.set_defaults(fn=cmd_keygen)
    # no abbreviations: `--vendor-token SECRET` must not pass as --vendor-token-file
    publish = sub.add_parser("publish", help="E-FD: encrypt the cascade and upload it",
                             allow_abbrev=False)
    publish.add_argument("--key", required=True, help="product key file")
    publish.add_argument("--cascade", help="OpenCV cascade XML (default: frontalface_alt)")
    publish.add_argument("--vendor-token-file", metavar="FILE",
                         help="file holding the server's vendor token (else the env "
                              "PRIVFACE_VENDOR_TOKEN; never a flag, flags show in `ps`)")
    publish.set_defaults(fn=cmd_publish)
    sub.add_parser("info", help="list published detectors").set_defaults(fn=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of `privface-vendor`."""
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (PrivfaceError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
