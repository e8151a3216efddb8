#!/usr/bin/env bash
# Install ppml into ./.venv and run the main job: a new workspace, a key, an encrypt -> decrypt
# round trip of the sample data, with a look at the encrypted file and the audit log.
source "$(dirname "$0")/_venv.sh"
"$VENV/bin/pip" install -q -e "$ROOT"
PPML="$VENV/bin/ppml"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
export PPML_HOME="$WORK/workspace"
# A throwaway passphrase for the throwaway demo workspace (real use: a prompt, or --passphrase-file).
PPML_PASSPHRASE="$("$VENV/bin/python" -c 'import secrets; print(secrets.token_urlsafe(24))')"
export PPML_PASSPHRASE

set -x
"$PPML" init --dev
"$PPML" key create sales
"$PPML" encrypt "$ROOT/examples/data/people.csv" -o "$WORK/people.csv.ppml" --key sales
"$PPML" inspect "$WORK/people.csv.ppml"
"$PPML" decrypt "$WORK/people.csv.ppml" -o "$WORK/people.csv"
cmp "$ROOT/examples/data/people.csv" "$WORK/people.csv"
"$PPML" key rotate sales
"$PPML" rewrap "$WORK/people.csv.ppml"
"$PPML" decrypt "$WORK/people.csv.ppml" -o "$WORK/again.csv"
cmp "$ROOT/examples/data/people.csv" "$WORK/again.csv"
"$PPML" audit verify
set +x
echo "demo ok: encrypted, decrypted, rotated, rewrapped, audit chain intact"
