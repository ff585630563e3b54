"""Timeouts and resource limits from the configuration."""

import asyncio
import os
import time

import pytest

from support import ALICE, BOB, CAROL, Client, RawClient, bare, client_ssl_context, DOMAIN


async def test_handshake_timeout_closes_silent_connections(make_server):
    srv = make_server({"limits": {"handshake_timeout_secs": 2}}, plaintext=True)
    ok = await Client(srv, ALICE).login()
    t0 = time.monotonic()

    silent = await RawClient(srv.host, srv.c2s_port).open()
    header_only = await RawClient(srv.host, srv.c2s_port).open()
    await header_only.open_stream()
    authed = await RawClient(srv.host, srv.c2s_port).open()
    await authed.open_stream()
    assert (await authed.auth_plain("15550000002", "s3cret-pw")).startswith("<success")
    await authed.open_stream()  # authenticated, never binds
    tls_silent = await RawClient(srv.host, srv.c2s_port).open()
    await tls_silent.open_stream()
    await tls_silent.starttls()  # TLS up, no stream header on it

    async def timed(raw):
        await raw.expect_stream_error("connection-timeout", timeout=8)
        return time.monotonic() - t0

    elapsed = await asyncio.gather(*(timed(r) for r in (silent, header_only, authed, tls_silent)))
    for e in elapsed:
        assert 1.5 <= e <= 6, elapsed
    assert silent.buf.startswith("<?xml") or "<stream:stream" in silent.buf, silent.buf

    # A silent direct-TLS connection (no TLS handshake) is dropped as well.
    sock_r, sock_w = await asyncio.open_connection(srv.host, srv.tls_port)
    data = await asyncio.wait_for(sock_r.read(100), 8)
    assert data == b"", data
    sock_w.close()

    # The session that finished its handshake in time is unaffected.
    assert ok.connected
    await ok.ping_server()


HEADER = ("<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
          "xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>")


async def served(raw, within):
    """Whether the server answers a stream header within `within` seconds."""
    raw.send(HEADER)
    got = await raw.silent_for(within)
    return "<stream:features" in got


async def test_connection_cap_serves_exactly_max_connections(make_server):
    """max_connections=3: three clients are served, the fourth waits."""
    srv = make_server({"limits": {"max_connections": 3}}, plaintext=True)
    a = await Client(srv, ALICE).login()
    b = await Client(srv, BOB).login()
    third = await RawClient(srv.host, srv.c2s_port).open()
    assert await served(third, 2.0), "the 3rd of max_connections=3 connections was not served"
    fourth = await RawClient(srv.host, srv.c2s_port).open()
    assert not await served(fourth, 1.0), "a 4th connection was served with max_connections=3"
    await a.ping_server()
    await b.ping_server()


async def test_connection_cap_waiting_clients_served_when_others_close(make_server):
    """The cap counts both listeners; clients beyond it wait in the backlog
    and are served, in turn, as connections close."""
    cap = 4
    srv = make_server({"limits": {"max_connections": cap}}, plaintext=True)
    a = await Client(srv, ALICE).login()
    b = await Client(srv, BOB).login()
    conns = []
    waiting = None
    for _ in range(cap):
        raw = await RawClient(srv.host, srv.c2s_port).open()
        if await served(raw, 1.0):
            conns.append(raw)
        else:
            waiting = raw
            break
    assert waiting is not None, f"more than max_connections={cap} connections served on c2s"
    tls_task = asyncio.ensure_future(asyncio.open_connection(
        srv.host, srv.tls_port, ssl=client_ssl_context(), server_hostname=DOMAIN))
    done, _ = await asyncio.wait({tls_task}, timeout=1.0)
    tls_served = bool(done)
    total = 2 + len(conns) + tls_served
    assert total == cap, f"{total} connections served with max_connections={cap}"

    c = Client(srv, CAROL)
    c_login = asyncio.ensure_future(c.login(timeout=30))
    # Whatever happens below, the login task's outcome is consumed.
    c_login.add_done_callback(lambda t: t.cancelled() or t.exception())
    await asyncio.sleep(0.5)
    assert not c_login.done(), "a login completed beyond max_connections"

    # Existing sessions keep working while the server is full.
    a.chat(BOB, "full house")
    assert (await b.next_message())["body"] == "full house"

    # Closing connections lets the waiting ones in.
    waiting_feat = asyncio.ensure_future(waiting.expect(r"<stream:features\b", timeout=20))
    waiting_feat.add_done_callback(lambda t: t.cancelled() or t.exception())
    pending = {waiting_feat, c_login} | (set() if tls_served else {tls_task})
    n_pending = len(pending)
    releasable = [x.close for x in conns] + [a.close]
    for release in releasable:
        await release()
        done, pending = await asyncio.wait(pending, timeout=5, return_when=asyncio.FIRST_COMPLETED)
        assert done, "no waiting connection was served after one closed"
        for d in done:
            d.result()
        if not pending:
            break
    assert not pending, f"{len(pending)} of {n_pending} waiting connections never served"
    await c.ping_server()
    r, w = tls_task.result()
    w.close()


async def test_idle_ping_timeout_closes_dead_client(make_server):
    srv = make_server({"limits": {"ping_interval_secs": 2, "ping_timeout_secs": 2}}, plaintext=True)
    watcher = await Client(srv, BOB, resource="watcher").login(roster=True)
    live = await Client(srv, ALICE, resource="live").login()

    dead = RawClient(srv.host, srv.c2s_port)
    await dead.login(BOB, resource="dead")
    dead.send("<presence/>")
    await watcher.next_presence(pred=lambda p: p["from"].resource == "dead" and not p.xml.get("type"))
    t0 = time.monotonic()
    ping = await dead.expect(r"<iq\b[^>]*>\s*<ping xmlns=['\"]urn:xmpp:ping['\"]\s*/>\s*</iq>", timeout=6)
    t_ping = time.monotonic() - t0
    assert "type='get'" in ping.group(0) or 'type="get"' in ping.group(0), ping.group(0)
    await dead.expect_stream_error("connection-timeout", timeout=6)
    t_close = time.monotonic() - t0
    assert 1.0 <= t_ping <= 4.5, t_ping
    assert 1.5 <= t_close - t_ping <= 4.5, (t_ping, t_close)

    gone = await watcher.next_presence(pred=lambda p: p["from"].resource == "dead", timeout=5)
    assert gone.xml.get("type") == "unavailable"

    # Clients that answer pings stay connected through several intervals.
    await asyncio.sleep(max(0.0, 6.5 - (time.monotonic() - t0)))
    for c in (watcher, live):
        assert c.connected, c.trace()
        assert "urn:xmpp:ping" in "".join(c.raw_in), "the idle client was never pinged"
        await c.ping_server()
    live.chat(bare(BOB) + "/watcher", "alive")
    assert (await watcher.next_message())["body"] == "alive"


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="needs Linux /proc")
@pytest.mark.timeout_s(60)
async def test_client_that_stops_reading_is_disconnected(make_server):
    """A client that stops reading its socket must not hold its connection
    forever: the sender is never blocked, the reader is dropped (as a slow
    consumer, or by the ping timeout), and every message stays stored."""
    srv = make_server({"limits": {"ping_interval_secs": 1, "ping_timeout_secs": 1, "session_queue": 16}},
                      plaintext=True)
    a = await Client(srv, ALICE).login()
    raw = RawClient(srv.host, srv.c2s_port)
    await raw.login(BOB, starttls=False, resource="stuck")
    raw.send("<presence/>")
    await raw.drain()
    await asyncio.sleep(0.2)
    client_port = raw.writer.get_extra_info("sockname")[1]
    assert srv.holds_connection(client_port)
    raw.writer.transport.pause_reading()

    n, big = 60, "x" * 200_000  # ~12 MB: more than the socket buffers hold
    t0 = time.monotonic()
    for i in range(n):
        a.chat(BOB, f"{i:02d} {big}")
    await a.ping_server(timeout=10)
    assert time.monotonic() - t0 < 10, "the sender was held up by a slow recipient"

    deadline = time.monotonic() + 10
    while srv.holds_connection(client_port):
        assert time.monotonic() < deadline, \
            "server still holds the connection of a client that stopped reading 10s ago " \
            "(ping_interval_secs=1, ping_timeout_secs=1)"
        await asyncio.sleep(0.25)
    raw.abort()
    b = await Client(srv, BOB, sm=True).login()
    got = [(await b.next_message(20))["body"][:2] for _ in range(n)]
    assert got == [f"{i:02d}" for i in range(n)]


async def test_ping_answer_keeps_raw_client_alive(make_server):
    srv = make_server({"limits": {"ping_interval_secs": 1, "ping_timeout_secs": 2}}, plaintext=True)
    raw = RawClient(srv.host, srv.c2s_port)
    await raw.login(ALICE, resource="polite")
    for _ in range(3):
        m = await raw.expect(r"<iq\b[^>]*\bid=['\"]([^'\"]+)['\"][^>]*>\s*<ping xmlns=['\"]urn:xmpp:ping['\"]",
                             timeout=5)
        raw.send(f"<iq type='result' id='{m.group(1)}' to='localhost'/>")
    raw.send("<iq type='get' id='me'><ping xmlns='urn:xmpp:ping'/></iq>")
    await raw.expect(r"<iq\b[^>]*id=['\"]me['\"]")
    assert "<stream:error>" not in raw.buf


async def test_max_resources_evicts_oldest(make_server):
    srv = make_server({"limits": {"max_resources": 2}})
    r1 = await Client(srv, ALICE, resource="r1").login()
    r2 = await Client(srv, ALICE, resource="r2").login()
    r3 = await Client(srv, ALICE, resource="r3").login()
    await r1.wait_disconnected()
    assert r1.stream_errors == ["conflict"], r1.trace()
    assert r2.connected and r3.connected
    b = await Client(srv, BOB).login()
    b.chat(ALICE, "to both")
    assert (await r2.next_message())["body"] == "to both"
    assert (await r3.next_message())["body"] == "to both"


async def test_max_stanza_bytes_config(make_server):
    srv = make_server({"limits": {"max_stanza_bytes": 4096}}, plaintext=True)
    b = await Client(srv, BOB).login()
    raw = RawClient(srv.host, srv.c2s_port)
    await raw.login(ALICE, resource="big")
    raw.send(f"<message to='{bare(BOB)}' type='chat'><body>{'y' * 3000}</body></message>")
    assert (await b.next_message())["body"] == "y" * 3000
    raw.send(f"<message to='{bare(BOB)}' type='chat'><body>{'z' * 5000}</body></message>")
    await raw.expect_stream_error("policy-violation")
    assert await b.messages_for(0.3) == []


async def test_sigterm_shuts_down_cleanly(server):
    a = await Client(server, ALICE).login()
    b = await Client(server, BOB, sm=True).login()
    a.chat(CAROL, "kept across restart")
    await a.ping_server()
    t0 = time.monotonic()
    rc = await asyncio.to_thread(server.stop)
    assert rc == 0, f"exit code {rc}"
    assert time.monotonic() - t0 < 5
    for c in (a, b):
        await c.wait_disconnected(5)
        assert c.stream_errors == ["system-shutdown"], c.trace()
    assert not (server.data_dir / "admin.sock").exists()
    server.start()
    c = await Client(server, CAROL).login()
    m = await c.next_message()
    assert m["body"] == "kept across restart"
    await c.ping_server()
