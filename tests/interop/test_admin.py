"""The `chatd user` administration commands, with and without a running
server on the data directory."""

import asyncio
import time

import pytest

from support import ALICE, BOB, CAROL, PASSWORD, Client, bare, local_of


def jids(srv):
    return srv.list_users()


def write_csv(path, rows, header=True):
    lines = (["phone,password"] if header else []) + [f"{p},{pw}" for p, pw in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def phones(n, start=5551000000):
    return [f"+1{start + i}" for i in range(n)]


@pytest.mark.parametrize("running", [False, True], ids=["offline", "online"])
async def test_add_list_passwd_del(make_server, running):
    srv = make_server(users=(), start=running)
    assert jids(srv) == []
    r = srv.cli("add", "+1 (555) 000-0001", "--password", "pw1")
    assert r.stdout.strip() == "added 15550000001@localhost"
    srv.cli("add", "555-000-0002", "--password", "pw2")  # national form, default region US
    assert jids(srv) == ["15550000001@localhost", "15550000002@localhost"]

    dup = srv.cli("add", "+15550000001", "--password", "x", check=False)
    assert dup.returncode == 1 and dup.stderr.startswith("error:"), dup
    for bad in ("hello", "12345", "+1555000000", ""):
        r = srv.cli("add", bad, "--password", "x", check=False)
        assert r.returncode == 1, (bad, r)
        assert "error:" in r.stderr, (bad, r.stderr)
    r = srv.cli("add", "+15550000009", "--password", "", check=False)
    assert r.returncode == 1 and "error:" in r.stderr

    srv.cli("passwd", "+15550000001", "--password", "new-pw")
    missing = srv.cli("passwd", "+15550000099", "--password", "x", check=False)
    assert missing.returncode == 1 and "error:" in missing.stderr

    srv.cli("del", "+15550000002")
    assert jids(srv) == ["15550000001@localhost"]
    again = srv.cli("del", "+15550000002", check=False)
    assert again.returncode == 1 and "error:" in again.stderr
    assert jids(srv) == ["15550000001@localhost"]

    if not running:
        srv.start()

    await Client(srv, "+15550000001", "new-pw").login()
    await Client(srv, "+15550000001", "pw1").expect_login_failure()
    await Client(srv, "+15550000002", "pw2").expect_login_failure()


@pytest.mark.parametrize("running", [False, True], ids=["offline", "online"])
async def test_import(make_server, tmp_path, running):
    srv = make_server(users=(CAROL,), start=running)
    rows = [(p, f"pw-{i}") for i, p in enumerate(phones(200))]
    t0 = time.monotonic()
    r = srv.cli("import", str(write_csv(tmp_path / "users.csv", rows)), timeout=60)
    elapsed = time.monotonic() - t0
    assert "imported 200" in r.stdout, r
    assert elapsed < 30, f"importing 200 accounts took {elapsed:.1f}s"
    listed = set(jids(srv))
    assert len(listed) == 201
    assert {bare(p) for p, _ in rows} | {bare(CAROL)} == listed

    # All rows are validated before anything is written.
    bad_rows = [(p, "pw") for p in phones(50, start=5552000000)]
    bad_rows.insert(25, ("hello", "pw"))
    r = srv.cli("import", str(write_csv(tmp_path / "bad.csv", bad_rows)), check=False)
    assert r.returncode == 1, r
    assert "error:" in r.stderr and "line 27" in r.stderr, r.stderr
    r = srv.cli("import", str(write_csv(tmp_path / "bad2.csv", [("+15553000000", "")], header=False)), check=False)
    assert r.returncode == 1, r
    r = srv.cli("import", str(tmp_path / "missing.csv"), check=False)
    assert r.returncode == 1 and "error:" in r.stderr
    assert set(jids(srv)) == listed, "a failed import wrote accounts"

    if not running:
        srv.start()

    for i in (0, 137, 199):
        c = await Client(srv, rows[i][0], rows[i][1]).login()
        await c.ping_server()
        await c.close()
    await Client(srv, rows[5][0], "pw-6").expect_login_failure()


async def test_import_replaces_passwords(make_server, tmp_path):
    srv = make_server(users=(ALICE,))
    srv.cli("import", str(write_csv(tmp_path / "u.csv", [(ALICE, "imported-pw")], header=False)))

    await Client(srv, ALICE, "imported-pw").login()
    await Client(srv, ALICE, PASSWORD).expect_login_failure()


async def test_add_while_running_logs_in_at_once(server):
    await asyncio.to_thread(server.cli, "add", "+15550000042", "--password", "fresh")
    c = await Client(server, "+15550000042", "fresh").login()
    a = await Client(server, ALICE).login()
    a.chat("+15550000042", "welcome")
    assert (await c.next_message())["body"] == "welcome"


async def test_passwd_while_online_ends_sessions(server):
    b1 = await Client(server, BOB, resource="one").login()
    b2 = await Client(server, BOB, resource="two", sm=True).login()
    other = await Client(server, ALICE).login()
    await asyncio.to_thread(server.cli, "passwd", BOB, "--password", "changed")
    for c in (b1, b2):
        await c.wait_disconnected(5)
        assert c.stream_errors == ["not-authorized"], c.trace()
    assert other.connected
    await other.ping_server()
    await Client(server, BOB).expect_login_failure()
    nb = await Client(server, BOB, "changed").login()
    other.chat(BOB, "after passwd")
    assert (await nb.next_message())["body"] == "after passwd"


async def test_del_while_online_ends_session_and_drops_queue(server):
    b = await Client(server, BOB).login()
    a = await Client(server, ALICE, resource="a").login()
    # Carol is offline with stored messages.
    for i in range(3):
        a.chat(CAROL, f"for carol {i}")
    await a.ping_server()

    await asyncio.to_thread(server.cli, "del", BOB)
    await b.wait_disconnected(5)
    assert b.stream_errors == ["not-authorized"], b.trace()
    await Client(server, BOB).expect_login_failure()
    a.chat(BOB, "to nobody", msg_id="gone1")
    err = await a.next_message()
    assert err["type"] == "error" and err["id"] == "gone1"
    assert err["error"]["condition"] == "service-unavailable"

    await asyncio.to_thread(server.cli, "del", CAROL)
    await asyncio.to_thread(server.cli, "add", CAROL, "--password", PASSWORD)
    c = await Client(server, CAROL).login()
    await asyncio.sleep(0.3)
    a.chat(CAROL, "fresh start")
    first = await c.next_message()
    assert first["body"] == "fresh start", f"deleted account's queue survived: {first}"
    assert await c.messages_for(0.3) == []


async def test_del_offline_drops_queue_and_roster(server):
    a = await Client(server, ALICE, resource="a").login(roster=True)
    await a.update_roster(bare(CAROL), name="Carol", timeout=5)
    c = await Client(server, CAROL).login(roster=True)
    await c.update_roster(bare(ALICE), name="Alice", timeout=5)
    await c.close()
    for i in range(3):
        a.chat(CAROL, f"queued {i}")
    await a.ping_server()
    await a.close()
    server.stop()
    server.cli("del", CAROL)
    server.cli("add", CAROL, "--password", "again")
    server.start()
    c = await Client(server, CAROL, "again").login(roster=True)
    assert "15550000001@localhost" not in "".join(c.raw_in), "old roster or messages survived deletion"
    a = await Client(server, ALICE).login()
    a.chat(CAROL, "new")
    first = await c.next_message()
    assert first["body"] == "new"
    assert local_of(ALICE) in str(first["from"])
