"""Fixtures: the chatd binary, fresh servers per test, and a runner for
`async def` tests (each bounded by a wall-clock timeout)."""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import support
from support import DEFAULT_USERS, ChatdServer

REPO = Path(__file__).resolve().parents[2]
DEFAULT_TIMEOUT = 30


@pytest.fixture(scope="session")
def chatd_bin() -> str:
    env = os.environ.get("CHATD_BIN")
    if env:
        assert os.access(env, os.X_OK), f"CHATD_BIN={env} is not executable"
        return env
    path = REPO / "target" / "release" / "chatd"
    if not path.exists():
        subprocess.run(["cargo", "build", "--release", "-p", "chatd"], cwd=REPO, check=True, timeout=1800)
    assert path.exists(), f"{path} missing after build"
    return str(path)


@pytest.fixture(scope="session")
def template_dir(chatd_bin, tmp_path_factory) -> Path:
    """A data directory holding DEFAULT_USERS, copied for each server."""
    d = tmp_path_factory.mktemp("template") / "data"
    srv = ChatdServer(chatd_bin, d)
    for phone in DEFAULT_USERS:
        srv.add_user(phone)
    return d


@pytest.fixture
def make_server(chatd_bin, template_dir, tmp_path, request):
    """Factory: make_server(config=None, plaintext=False, users=DEFAULT_USERS,
    start=True) → ChatdServer with accounts created (password
    support.PASSWORD). Every server is stopped at teardown."""
    servers: list[ChatdServer] = []

    def make(config: dict | None = None, *, plaintext: bool = False, users=DEFAULT_USERS,
             start: bool = True, name: str | None = None) -> ChatdServer:
        name = name or f"data{len(servers)}"
        srv = ChatdServer(chatd_bin, tmp_path / name, config=config, allow_plaintext=plaintext, log_dir=tmp_path)
        if tuple(users) == tuple(DEFAULT_USERS):
            shutil.copytree(template_dir, srv.data_dir)
        else:
            for phone in users:
                srv.add_user(phone)
        servers.append(srv)
        if start:
            srv.start()
        return srv

    yield make
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for srv in servers:
        # SIGTERM now, reap at the end of the session: a clean shutdown
        # takes a moment, and test_sigterm_shuts_down_cleanly checks it.
        if srv.running:
            srv.proc.send_signal(signal.SIGTERM)
            _reap.append(srv)
        if failed:
            print(f"\n==== chatd log ({srv.data_dir.name}) ====\n{srv.log_tail()}")


_reap: list[ChatdServer] = []


@pytest.fixture(scope="session", autouse=True)
def _reap_servers():
    yield
    for srv in _reap:
        try:
            srv.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            sys.__stderr__.write(f"\nchatd in {srv.data_dir} ignored SIGTERM for 10s; killing it\n")
            srv.kill9()
        if os.environ.get("CHATD_TEST_DEBUG"):
            sys.__stderr__.write(f"\n{srv.data_dir}: exit {srv.proc.returncode}\n")
    _reap.clear()


@pytest.fixture
def server(make_server) -> ChatdServer:
    """A running server (STARTTLS required) with ALICE, BOB, CAROL, DAVE."""
    return make_server()


@pytest.fixture
def pserver(make_server) -> ChatdServer:
    """Like `server`, started with --allow-plaintext."""
    return make_server(plaintext=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


async def _run_bounded(fn, kwargs, timeout):
    support.LIVE_CLIENTS.clear()
    try:
        await asyncio.wait_for(fn(**kwargs), timeout)
    except asyncio.TimeoutError:
        raise AssertionError(f"test exceeded its {timeout}s limit") from None
    finally:
        for c in list(support.LIVE_CLIENTS):
            try:
                c.abort()
            except Exception:
                pass
        support.LIVE_CLIENTS.clear()
        await asyncio.sleep(0.05)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    fn = pyfuncitem.obj
    if not inspect.iscoroutinefunction(fn):
        return None
    marker = pyfuncitem.get_closest_marker("timeout_s")
    timeout = marker.args[0] if marker else DEFAULT_TIMEOUT
    names = pyfuncitem._fixtureinfo.argnames
    kwargs = {n: pyfuncitem.funcargs[n] for n in names}
    asyncio.run(_run_bounded(fn, kwargs, timeout))
    return True
