"""Throw-away certificates for the TLS tests, made with the ``openssl`` command-line tool.

One CA signs a server certificate (for ``127.0.0.1`` only, not ``localhost``), another for the
name ``elsewhere.invalid`` only, and a client certificate; a second, unrelated CA ("rogue")
signs a client certificate of its own, for the tests that must be refused. EC P-256 keys:
quick to make, and accepted by every TLS library.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

KEY_PASSWORD = "correct horse battery staple"

_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[server_elsewhere]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:elsewhere.invalid
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


@dataclass(frozen=True)
class Certificates:
    ca: Path
    server_cert: Path
    server_key: Path
    elsewhere_cert: Path  # a server certificate of the same CA for another name only
    elsewhere_key: Path
    client_cert: Path
    client_key: Path
    client_key_encrypted: Path  # the client key under KEY_PASSWORD
    client_combined: Path  # the client certificate and its key in one file
    rogue_ca: Path
    rogue_client_cert: Path
    rogue_client_key: Path


# CI sets this so that a missing TLS prerequisite fails the run instead of skipping the tests.
REQUIRE_TLS = "FASTAPI_LEADER_REQUIRE_TLS"


def skip_without_tls(reason: str) -> None:
    """Skip the test for ``reason`` (one line), or fail it where TLS tests are required."""
    if os.environ.get(REQUIRE_TLS, "") not in ("", "0"):
        pytest.fail(f"{reason} (and {REQUIRE_TLS} is set)", pytrace=False)
    pytest.skip(reason)


def openssl_or_skip() -> str:
    openssl = shutil.which("openssl")
    if openssl is None:
        skip_without_tls("no `openssl` command to make test certificates with")
        raise AssertionError("unreachable")
    return openssl


def make_certificates(directory: Path) -> Certificates:
    """Write a CA, server and client certificates into ``directory`` (skips without openssl)."""
    openssl = openssl_or_skip()
    config = directory / "openssl.cnf"
    config.write_text(_CONFIG)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=directory, check=True, capture_output=True, timeout=60)

    def new_ca(name: str) -> Path:
        run(
            "req", "-x509", "-new", "-nodes", "-newkey", "ec",
            "-pkeyopt", "ec_paramgen_curve:P-256", "-keyout", f"{name}.key",
            "-out", f"{name}.crt", "-days", "2", "-sha256",
            "-config", str(config), "-extensions", "ca", "-subj", f"/CN=fastapi-leader {name}",
        )  # fmt: skip
        return directory / f"{name}.crt"

    def new_leaf(name: str, ca: str, extensions: str, serial: int) -> tuple[Path, Path]:
        run(
            "req", "-new", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-config", str(config), "-subj", f"/CN=fastapi-leader {name}",
        )  # fmt: skip
        run(
            "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
            "-set_serial", str(serial), "-days", "2", "-sha256",
            "-extfile", str(config), "-extensions", extensions, "-out", f"{name}.crt",
        )  # fmt: skip
        return directory / f"{name}.crt", directory / f"{name}.key"

    ca = new_ca("ca")
    server_cert, server_key = new_leaf("server", "ca", "server", 2)
    client_cert, client_key = new_leaf("client", "ca", "client", 3)
    elsewhere_cert, elsewhere_key = new_leaf("elsewhere", "ca", "server_elsewhere", 5)
    run(
        "pkey", "-in", "client.key", "-aes256", "-passout", f"pass:{KEY_PASSWORD}",
        "-out", "client-encrypted.key",
    )  # fmt: skip
    combined = directory / "client-combined.pem"
    combined.write_bytes(client_cert.read_bytes() + client_key.read_bytes())
    rogue_ca = new_ca("rogue-ca")
    rogue_cert, rogue_key = new_leaf("rogue-client", "rogue-ca", "client", 4)
    return Certificates(
        ca=ca,
        server_cert=server_cert,
        server_key=server_key,
        elsewhere_cert=elsewhere_cert,
        elsewhere_key=elsewhere_key,
        client_cert=client_cert,
        client_key=client_key,
        client_key_encrypted=directory / "client-encrypted.key",
        client_combined=combined,
        rogue_ca=rogue_ca,
        rogue_client_cert=rogue_cert,
        rogue_client_key=rogue_key,
    )
