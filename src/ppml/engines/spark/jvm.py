"""ppml's JVM side for Spark: a Parquet `KmsClient` that hands out keys the driver released.

Spark's own Parquet reader decrypts Parquet Modular Encryption when
``parquet.crypto.factory.class`` names parquet-mr's ``PropertiesDrivenCryptoFactory`` and
``parquet.encryption.kms.client.class`` a KMS client. ppml's client
(`KMS_CLIENT_CLASS`, in ``jars/ppml-spark.jar``, built from ``jvm/`` by ``scripts/build_jar.sh``)
never reaches a KMS: the driver unwraps the key-encryption keys of exactly the files a scan
reads (through the attested key provider, so the KMS audits and gates each one) and passes them
in the scan's key access token. Spark ships that token to the executors inside the scan's Hadoop
configuration, over its authenticated, encrypted channels; the option's name contains "token",
so Spark redacts it from plans, the UI and event logs.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "CRYPTO_FACTORY_CLASS",
    "KMS_CLIENT_CLASS",
    "TOKEN_PREFIX",
    "jvm_class_available",
    "kms_client_jar",
    "load_kms_client",
    "released_keys_token",
    "scan_options",
]

KMS_CLIENT_CLASS = "org.ppml.spark.ReleasedKeyKmsClient"
CRYPTO_FACTORY_CLASS = "org.apache.parquet.crypto.keytools.PropertiesDrivenCryptoFactory"
TOKEN_PREFIX = "ppml-released-v1:"  # noqa: S105 - a format tag, not a secret


def kms_client_jar() -> Path:
    """The path of the jar shipped inside the package (put it in ``spark.jars``)."""
    return Path(__file__).resolve().parent / "jars" / "ppml-spark.jar"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii")


def released_keys_token(keys: Mapping[tuple[str, str], bytes]) -> str:
    """The key access token for `KMS_CLIENT_CLASS`: {(master key id, wrapped key): key}."""
    lines = "".join(
        f"{_b64(master.encode())}\t{_b64(wrapped.encode())}\t{_b64(key)}\n"
        for (master, wrapped), key in sorted(keys.items())
    )
    return TOKEN_PREFIX + _b64(lines.encode())


def scan_options(keys: Mapping[tuple[str, str], bytes]) -> dict[str, str]:
    """The Parquet reader options that decrypt with `keys` (and nothing else)."""
    return {
        "parquet.crypto.factory.class": CRYPTO_FACTORY_CLASS,
        "parquet.encryption.kms.client.class": KMS_CLIENT_CLASS,
        "parquet.encryption.key.access.token": released_keys_token(keys),
    }


def jvm_class_available(spark: Any, name: str = KMS_CLIENT_CLASS) -> bool:
    """Whether the session's driver JVM can load `name` (False for Spark Connect sessions)."""
    try:
        jvm = spark.sparkContext._jvm
        loader = jvm.org.apache.spark.util.Utils.getContextOrSparkClassLoader()
        jvm.java.lang.Class.forName(name, False, loader)
    except Exception:  # py4j errors, missing attributes: not available
        return False
    return True


def load_kms_client(spark: Any) -> bool:
    """Make `KMS_CLIENT_CLASS` loadable in a running session; whether it is.

    A session started with the jar in ``spark.jars`` has it already. In a JVM started without it
    (a session made before, by other code) the jar is added at run time: to the driver's class
    loader (Spark's, which takes URLs at run time) and with ``SparkContext.addJar`` for the
    executors, which fetch it before their next task.
    """
    if jvm_class_available(spark):
        return True
    jar = kms_client_jar()
    if not jar.is_file():
        return False
    try:
        sc = spark.sparkContext
        jvm = sc._jvm
        loader = jvm.org.apache.spark.util.Utils.getContextOrSparkClassLoader()
        loader.addURL(jvm.java.io.File(str(jar)).toURI().toURL())
        if str(jar) not in str(sc._jsc.sc().listJars()):
            sc._jsc.sc().addJar(str(jar))
    except Exception:  # not Spark's mutable loader, Spark Connect, ...: the Python reader
        return False
    return jvm_class_available(spark)
