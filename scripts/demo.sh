#!/usr/bin/env bash
# Install ppml into ./.venv and run `ppml demo`: a sensitive dataset encrypted, an analyst's
# script measured and allowed, an attested run (sim TEE) computing aggregates with SQL, the
# encrypted result decrypted, and a one-byte change to the script refused by the KMS.
source "$(dirname "$0")/_venv.sh"
"$VENV/bin/pip" install -q -e "$ROOT"
exec "$VENV/bin/ppml" demo "$@"
