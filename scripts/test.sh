#!/usr/bin/env bash
# Runs every test: Rust unit and integration tests, then the interop suite
# that drives the real server with slixmpp. Installs what the tests need.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
echo "== installing test dependencies"
"$PY" -m pip install --quiet --disable-pip-version-check -r tests/interop/requirements.txt

echo "== building"
cargo build --release --locked -p chatd

echo "== cargo test"
cargo test --release --locked -p chatd 2>&1 | tee /tmp/chatd-cargo-test.log
grep -E "^test result:" /tmp/chatd-cargo-test.log | awk '{p+=$4; f+=$6} END {print "cargo test summary: " p " passed, " f " failed"}'

echo "== interop tests (slixmpp)"
CHATD_BIN="$PWD/target/release/chatd" "$PY" -m pytest -q tests/interop
