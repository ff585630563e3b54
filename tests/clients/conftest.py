"""Fixtures for the client matrix: the chatd binary and a fresh server per
test (the process manager is shared with tests/interop)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "tests" / "interop"))

from support import DEFAULT_USERS, ChatdServer  # noqa: E402


@pytest.fixture(scope="session")
def chatd_bin() -> str:
    env = os.environ.get("CHATD_BIN")
    if env:
        assert os.access(env, os.X_OK), f"CHATD_BIN={env} is not executable"
        return env
    path = REPO / "target" / "release" / "chatd"
    if not path.exists():
        subprocess.run(["cargo", "build", "--release", "-p", "chatd"], cwd=REPO, check=True, timeout=1800)
    return str(path)


@pytest.fixture
def server(chatd_bin, tmp_path, request):
    srv = ChatdServer(chatd_bin, tmp_path / "data", log_dir=tmp_path)
    for phone in DEFAULT_USERS:
        srv.add_user(phone)
    srv.start()
    yield srv
    srv.stop()
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        print(f"\n==== chatd log ====\n{srv.log_tail(120)}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
