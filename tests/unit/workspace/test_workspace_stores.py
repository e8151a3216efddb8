"""The PKCS12 key store and trust store Spark's JVM reads, checked with pyca and the JDK keytool."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs12

from ppml.workspace import Workspace

KEYTOOL = shutil.which("keytool")


def _ca(ws: Workspace) -> x509.Certificate:
    return x509.load_pem_x509_certificate(ws.ca_cert.read_bytes())


def test_keystore_opens_with_the_sealed_password(shared_ws: Workspace) -> None:
    data = shared_ws.keystore.read_bytes()
    with pytest.raises(ValueError):
        pkcs12.load_pkcs12(data, b"wrong password")
    store = pkcs12.load_pkcs12(data, shared_ws.secret("keystore-password").encode())
    assert store.key is not None and store.cert is not None
    assert store.cert.friendly_name == b"ppml-server"
    server = x509.load_pem_x509_certificate(shared_ws.server_cert.read_bytes())
    assert store.cert.certificate == server
    assert store.key.public_key() == server.public_key()
    assert [c.certificate for c in store.additional_certs] == [_ca(shared_ws)]


def test_truststore_holds_the_ca(shared_ws: Workspace) -> None:
    store = pkcs12.load_pkcs12(
        shared_ws.truststore.read_bytes(), shared_ws.secret("keystore-password").encode()
    )
    assert store.key is None
    certs = [store.cert, *store.additional_certs] if store.cert else store.additional_certs
    assert [c.certificate for c in certs] == [_ca(shared_ws)]


def _keytool_list(store: Path, password: str) -> str:
    assert KEYTOOL is not None
    env = {**os.environ, "PPML_TEST_STOREPASS": password}
    done = subprocess.run(
        [
            KEYTOOL,
            "-list",
            "-v",
            "-storetype",
            "PKCS12",
            "-keystore",
            str(store),
            "-storepass:env",
            "PPML_TEST_STOREPASS",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert password not in done.stdout + done.stderr
    return done.stdout


@pytest.mark.skipif(KEYTOOL is None, reason="the JDK's keytool is not installed on this machine")
def test_keytool_reads_the_keystore(shared_ws: Workspace) -> None:
    out = _keytool_list(shared_ws.keystore, shared_ws.secret("keystore-password"))
    assert "Alias name: ppml-server" in out
    assert "Entry type: PrivateKeyEntry" in out
    assert "Certificate chain length: 2" in out


@pytest.mark.skipif(KEYTOOL is None, reason="the JDK's keytool is not installed on this machine")
def test_keytool_reads_the_truststore(shared_ws: Workspace) -> None:
    out = _keytool_list(shared_ws.truststore, shared_ws.secret("keystore-password"))
    assert "Alias name: ppml-ca" in out
    assert "Entry type: trustedCertEntry" in out


@pytest.mark.skipif(KEYTOOL is None, reason="the JDK's keytool is not installed on this machine")
def test_keytool_refuses_a_wrong_password(shared_ws: Workspace) -> None:
    env = {**os.environ, "PPML_TEST_STOREPASS": "wrong password"}
    done = subprocess.run(
        [
            str(KEYTOOL),
            "-list",
            "-storetype",
            "PKCS12",
            "-keystore",
            str(shared_ws.keystore),
            "-storepass:env",
            "PPML_TEST_STOREPASS",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode != 0
