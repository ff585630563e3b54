"""The client matrix: the same scenario with each real client library, over
STARTTLS and over Direct TLS (XEP-0368):

- log in (the driver waits for the echo of its initial presence);
- an online message with a receipt request (XEP-0184), and the receipt;
- a message to an offline account, delivered with a delay stamp
  (XEP-0203) at its next login;
- repeated logins: every one must succeed.

Each client is a small driver program (see README.md here) run as a
separate process. A client that is not installed is skipped locally, and
fails the run when CHATD_CI=1 (scripts/test.sh sets it).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from support import ALICE, BOB, PASSWORD, bare

HERE = Path(__file__).resolve().parent
DEBIAN_PYTHON = "/usr/bin/python3"
REPEAT = int(os.environ.get("CHATD_CLIENT_LOGINS", "40"))


@dataclass
class Kind:
    name: str
    cmd: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    missing: str | None = None


def _probe(cmd: list[str], env: dict[str, str] | None = None) -> str | None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=dict(os.environ, **(env or {})))
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    return None if r.returncode == 0 else (r.stderr.strip() or r.stdout.strip() or f"exit {r.returncode}")


def _slixmpp_debian() -> Kind:
    # Debian's package first, even if pip put a newer slixmpp in /usr/local.
    env = {"PYTHONPATH": "/usr/lib/python3/dist-packages"}
    k = Kind("slixmpp-debian", [DEBIAN_PYTHON, str(HERE / "slixmpp_client.py")], env)
    if not os.path.exists(DEBIAN_PYTHON):
        k.missing = f"{DEBIAN_PYTHON} not found"
    else:
        k.missing = _probe(
            [DEBIAN_PYTHON, "-c", "import slixmpp; assert slixmpp.__version__.startswith('1.8.'), slixmpp.__version__"],
            env,
        )
        if k.missing:
            k.missing = f"Debian's python3-slixmpp 1.8 is not installed: {k.missing}"
    return k


def _slixmpp_pypi() -> Kind:
    k = Kind("slixmpp-pypi", [sys.executable, str(HERE / "slixmpp_client.py")])
    k.missing = _probe([sys.executable, "-c", "import slixmpp"])
    return k


def _xmppjs() -> Kind:
    k = Kind("xmpp.js", ["node", str(HERE / "node" / "client.mjs")], {"NODE_TLS_REJECT_UNAUTHORIZED": "0"})
    if not shutil.which("node"):
        k.missing = "node not found"
    elif not (HERE / "node" / "node_modules" / "@xmpp" / "client").is_dir():
        k.missing = "run `npm ci` in tests/clients/node"
    return k


def _libstrophe(build_dir: Path) -> Kind:
    exe = build_dir / "strophe_client"
    k = Kind("libstrophe", [str(exe)])
    if not shutil.which("gcc"):
        k.missing = "gcc not found"
        return k
    r = subprocess.run(
        ["gcc", "-O1", "-Wall", "-o", str(exe), str(HERE / "strophe_client.c"), "-lstrophe"],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        k.missing = f"cannot build against libstrophe-dev: {r.stderr.strip()[:300]}"
    return k


KIND_NAMES = ["slixmpp-debian", "slixmpp-pypi", "xmpp.js", "libstrophe"]


@pytest.fixture(scope="session")
def kinds(tmp_path_factory) -> dict[str, Kind]:
    build = tmp_path_factory.mktemp("clients")
    ks = [_slixmpp_debian(), _slixmpp_pypi(), _xmppjs(), _libstrophe(build)]
    return {k.name: k for k in ks}


@pytest.fixture
def kind(request, kinds) -> Kind:
    k = kinds[request.param]
    if k.missing:
        if os.environ.get("CHATD_CI") == "1":
            pytest.fail(f"{k.name} missing in CI: {k.missing}")
        pytest.skip(f"{k.name}: {k.missing}")
    return k


class Driver:
    """One driver process; its JSON-lines events arrive on a queue."""

    def __init__(self, k: Kind, port: int, direct_tls: bool, phone: str, *args: str, timeout: float = 15):
        cmd = [*k.cmd, "--port", str(port), "--jid", bare(phone), "--password", PASSWORD, "--timeout", str(timeout)]
        if direct_tls:
            cmd.append("--direct-tls")
        cmd += list(args)
        env = dict(os.environ, **k.env)
        self.name = k.name
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.events: queue.Queue = queue.Queue()
        self.log: list[str] = []
        self.err: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=lambda: self.err.extend(self.proc.stderr), daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.log.append(line.rstrip())
            try:
                self.events.put(json.loads(line))
            except ValueError:
                pass
        self.events.put(None)

    def expect(self, event: str, timeout: float = 30) -> dict:
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            try:
                ev = self.events.get(timeout=left)
            except queue.Empty:
                break
            if ev is None:
                break
            if ev.get("event") == event:
                return ev
        raise AssertionError(f"{self.name}: no '{event}' event; output: {self.log}; stderr: {''.join(self.err)[-2000:]}")

    def finish(self, timeout: float = 30) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"{self.name} did not exit; output: {self.log}")


def _port(server, transport: str) -> tuple[int, bool]:
    return (server.tls_port, True) if transport == "direct_tls" else (server.c2s_port, False)


@pytest.mark.parametrize("transport", ["starttls", "direct_tls"])
@pytest.mark.parametrize("kind", KIND_NAMES, indirect=True)
def test_scenario(server, kind, transport):
    port, direct = _port(server, transport)
    tag = uuid.uuid4().hex[:8]

    # Online message with a receipt.
    online_body = f"online {tag}"
    b = Driver(kind, port, direct, BOB, "--until", online_body)
    b.expect("online")
    a = Driver(kind, port, direct, ALICE, "--send", bare(BOB), online_body, "--id", f"on-{tag}", "--wait-receipt")
    a.expect("online")
    assert a.expect("receipt")["id"] == f"on-{tag}"
    m = b.expect("message")
    assert (m["from"], m["body"], m["delay"]) == (bare(ALICE), online_body, None), m
    assert a.finish() == 0 and b.finish() == 0

    # Offline message: stored, then delivered with a delay stamp.
    offline_body = f"offline {tag}"
    a = Driver(kind, port, direct, ALICE, "--send", bare(BOB), offline_body, "--id", f"off-{tag}")
    a.expect("sent")
    a.expect("done")
    assert a.finish() == 0
    b = Driver(kind, port, direct, BOB, "--until", offline_body)
    b.expect("online")
    while (m := b.expect("message"))["body"] != offline_body:
        pass
    assert m["from"] == bare(ALICE) and m["delay"], f"offline message without a delay stamp: {m}"
    assert b.finish() == 0


@pytest.mark.parametrize("transport", ["starttls", "direct_tls"])
@pytest.mark.parametrize("kind", KIND_NAMES, indirect=True)
def test_repeated_logins(server, kind, transport):
    port, direct = _port(server, transport)
    n = REPEAT if transport == "starttls" else max(1, REPEAT // 4)
    d = Driver(kind, port, direct, ALICE, "--repeat", str(n))
    ev = d.expect("logins", timeout=20 + 3 * n)
    d.finish()
    print(f"\n{kind.name} {transport}: {ev['ok']} of {ev['total']} logins succeeded {ev}")
    assert ev["ok"] == ev["total"], ev
