"""Message routing and store-and-forward delivery."""

import asyncio
import datetime as dt

import pytest

from support import (ALICE, BOB, CAROL, Client, RawClient, bare, stanza_error, wait_acked, wait_confirmed)

DELAY = "{urn:xmpp:delay}delay"
SID = "{urn:xmpp:sid:0}stanza-id"


def bodies(msgs):
    return [m["body"] for m in msgs]


async def collect(client, n, timeout=10):
    return [await client.next_message(timeout) for _ in range(n)]


async def test_online_delivery(server):
    a = await Client(server, ALICE, resource="a").login()
    b = await Client(server, BOB, resource="b").login()
    a.chat(BOB, "hello bob", msg_id="m1")
    m = await b.next_message()
    assert m["body"] == "hello bob"
    assert m["type"] == "chat"
    assert m["id"] == "m1"
    assert str(m["from"]) == bare(ALICE) + "/a"
    assert m.xml.find(DELAY) is None, "a live message carries no delay"
    sid = m.xml.find(SID)
    assert sid is not None and sid.get("by") == bare(BOB) and sid.get("id"), str(m)
    b.chat(ALICE, "hello alice")
    r = await a.next_message()
    assert r["body"] == "hello alice" and str(r["from"]) == bare(BOB) + "/b"


async def test_message_to_full_jid_reaches_only_that_resource(server):
    a = await Client(server, ALICE).login()
    b1 = await Client(server, BOB, resource="phone").login()
    b2 = await Client(server, BOB, resource="laptop").login()
    a.chat(bare(BOB) + "/laptop", "only laptop")
    m = await b2.next_message()
    assert m["body"] == "only laptop"
    a.chat(BOB, "everyone")
    assert (await b1.next_message())["body"] == "everyone"
    assert (await b2.next_message())["body"] == "everyone"
    assert await b1.messages_for(0.3) == []


async def test_two_resources_both_receive_bare_jid_message(server):
    b1 = await Client(server, BOB, resource="phone").login()
    b2 = await Client(server, BOB, resource="laptop").login()
    a = await Client(server, ALICE).login()
    for i in range(3):
        a.chat(BOB, f"both {i}")
    got1 = bodies(await collect(b1, 3))
    got2 = bodies(await collect(b2, 3))
    assert got1 == got2 == ["both 0", "both 1", "both 2"]


async def test_resource_conflict(server):
    old = await Client(server, BOB, resource="phone").login()
    new = await Client(server, BOB, resource="phone").login()
    await old.wait_disconnected()
    assert old.stream_errors == ["conflict"], old.trace()
    assert new.connected
    a = await Client(server, ALICE).login()
    a.chat(bare(BOB) + "/phone", "to the new one")
    assert (await new.next_message())["body"] == "to the new one"


async def _send_offline(server, n, prefix="offline"):
    a = await Client(server, ALICE, resource="a").login()
    for i in range(n):
        a.chat(BOB, f"{prefix} {i}")
    await a.ping_server()
    return a


@pytest.mark.parametrize("sm", [True, False], ids=["sm", "no-sm"])
async def test_offline_delivery_with_delay_in_order(server, sm):
    before = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=5)
    a = await _send_offline(server, 5)
    assert await a.messages_for(0.2) == [], "no error expected for an offline recipient"
    b = await Client(server, BOB, sm=sm).login()
    got = await collect(b, 5)
    after = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=5)
    assert bodies(got) == [f"offline {i}" for i in range(5)]
    ids = []
    for m in got:
        assert str(m["from"]) == bare(ALICE) + "/a"
        d = m.xml.find(DELAY)
        assert d is not None, f"no delay: {m}"
        assert d.get("from") == "localhost"
        stamp = dt.datetime.fromisoformat(d.get("stamp").replace("Z", "+00:00"))
        assert before <= stamp <= after, d.get("stamp")
        assert m["delay"]["stamp"] is not None
        sid = m.xml.find(SID)
        assert sid is not None and sid.get("by") == bare(BOB)
        ids.append(int(sid.get("id")))
    assert ids == sorted(ids) and len(set(ids)) == 5, ids


async def test_offline_messages_wait_for_initial_presence(server):
    await _send_offline(server, 2)
    b = await Client(server, BOB).login(presence=False)
    assert await b.messages_for(0.7) == [], "stored messages before initial presence"
    b.send_presence()
    assert bodies(await collect(b, 2)) == ["offline 0", "offline 1"]


async def test_no_redelivery_after_sm_ack(server):
    a = await _send_offline(server, 4)
    b = await Client(server, BOB, sm=True).login()
    got = await collect(b, 4)
    assert bodies(got) == [f"offline {i}" for i in range(4)]
    await wait_acked(b, 4)
    await b.close()
    b2 = await Client(server, BOB, sm=True).login()
    await asyncio.sleep(0.3)
    a.chat(BOB, "marker")
    first = await b2.next_message()
    assert first["body"] == "marker", f"redelivered after ack: {first}"
    assert await b2.messages_for(0.3) == []


async def test_no_redelivery_after_confirmation_ping(server):
    a = await _send_offline(server, 3)
    b = await Client(server, BOB, sm=False).login()
    got = await collect(b, 3)
    assert bodies(got) == [f"offline {i}" for i in range(3)]
    # The server asks a client without XEP-0198 to answer a ping sent after
    # the messages; slixmpp answers it.
    await wait_confirmed(b, "offline 2")
    assert "urn:xmpp:sm:3" not in "".join(b.raw_out)
    await b.close()
    b2 = await Client(server, BOB, sm=False).login()
    await asyncio.sleep(0.3)
    a.chat(BOB, "marker")
    first = await b2.next_message()
    assert first["body"] == "marker", f"redelivered after confirmation: {first}"
    assert await b2.messages_for(0.3) == []


async def test_unacknowledged_messages_are_redelivered(pserver):
    """A device that takes messages but never acknowledges them gets them again."""
    await _send_offline(pserver, 3)
    raw = RawClient(pserver.host, pserver.c2s_port)
    await raw.login(BOB, starttls=False, resource="mute")
    raw.send("<presence/>")
    for i in range(3):
        await raw.expect(rf"<body>offline {i}</body>")
    raw.abort()
    b = await Client(pserver, BOB, sm=True).login()
    got = await collect(b, 3)
    assert bodies(got) == [f"offline {i}" for i in range(3)]


async def test_live_messages_not_acked_are_stored(server):
    """A live message pushed to a session that vanishes without acknowledging
    it is delivered at the next login."""
    b = await Client(server, BOB, sm=True).login()
    b.remove_handler("Stream Management Request Ack")
    a = await Client(server, ALICE).login()
    a.chat(BOB, "live but unacked")
    assert (await b.next_message())["body"] == "live but unacked"
    b.abort()
    await b.wait_disconnected()
    b2 = await Client(server, BOB, sm=True).login()
    m = await b2.next_message()
    assert m["body"] == "live but unacked"
    assert m.xml.find(DELAY) is not None


async def test_unknown_recipient_service_unavailable(server):
    a = await Client(server, ALICE).login()
    a.chat("15559999999@localhost", "anyone?", msg_id="u1")
    err = await a.next_message()
    assert err["type"] == "error"
    assert err["id"] == "u1"
    assert stanza_error(err)[0] == "service-unavailable", str(err)


async def test_queue_limit_resource_constraint(make_server):
    srv = make_server({"offline": {"max_queue": 3, "sender_share_percent": 100}})
    a = await Client(srv, ALICE).login()
    for i in range(4):
        a.chat(BOB, f"q{i}", msg_id=f"q{i}")
    err = await a.next_message()
    assert err["type"] == "error" and err["id"] == "q3", str(err)
    assert stanza_error(err) == ("resource-constraint", "wait"), str(err)
    assert await a.messages_for(0.2) == []
    b = await Client(srv, BOB, sm=True).login()
    assert bodies(await collect(b, 3)) == ["q0", "q1", "q2"]
    await wait_acked(b, 3)
    await b.close()
    # The queue drained: the sender may send again.
    for i in range(3):
        a.chat(BOB, f"r{i}", msg_id=f"r{i}")
    await a.ping_server()
    assert await a.messages_for(0.3) == []
    b2 = await Client(srv, BOB).login()
    assert bodies(await collect(b2, 3)) == ["r0", "r1", "r2"]


async def test_forged_from_is_replaced(server):
    a = await Client(server, ALICE, resource="real").login()
    b = await Client(server, BOB).login()
    a.send_raw(f"<message from='{bare(CAROL)}/evil' to='{bare(BOB)}' type='chat' id='f1'>"
               "<body>who am i</body></message>")
    got = await b.next_message()
    assert got["body"] == "who am i"
    assert str(got["from"]) == bare(ALICE) + "/real"
    # A forged bare JID of the sender's own account is replaced as well.
    a.send_raw(f"<message from='{bare(ALICE)}/other' to='{bare(BOB)}' type='chat'><body>again</body></message>")
    got = await b.next_message()
    assert got["body"] == "again" and str(got["from"]) == bare(ALICE) + "/real"


async def test_chat_state_only_messages_are_not_stored(server):
    a = await Client(server, ALICE).login()
    a.send_raw(f"<message to='{bare(BOB)}' type='chat'>"
               "<composing xmlns='http://jabber.org/protocol/chatstates'/></message>")
    a.chat(BOB, "real text")
    await a.ping_server()
    b = await Client(server, BOB).login()
    got = await b.next_message()
    assert got["body"] == "real text"
    assert await b.messages_for(0.4) == []


async def test_large_stanza_under_limit_is_delivered(server):
    a = await Client(server, ALICE).login()
    b = await Client(server, BOB).login()
    body = "x" * 100_000
    a.chat(BOB, body)
    m = await b.next_message(10)
    assert m["body"] == body


@pytest.mark.parametrize("sm", [True, False], ids=["sm", "no-sm"])
async def test_large_offline_backlog_in_order_then_gone(server, sm):
    """More stored messages than one read batch: all arrive in order, each
    once, and are gone after the device confirmed them."""
    n = 450
    raw = RawClient(server.host, server.c2s_port)
    await raw.login(ALICE, resource="bulk")
    for i in range(n):
        raw.send(f"<message to='{bare(BOB)}' type='chat'><body>bulk {i:03d}</body></message>")
    raw.send("<iq type='get' id='done'><ping xmlns='urn:xmpp:ping'/></iq>")
    await raw.expect(r"<iq\b[^>]*id=['\"]done['\"]", timeout=20)
    assert "type='error'" not in raw.buf and 'type="error"' not in raw.buf, raw.trace()

    b = await Client(server, BOB, sm=sm).login()
    got = await collect(b, n, timeout=20)
    assert bodies(got) == [f"bulk {i:03d}" for i in range(n)]
    if sm:
        await wait_acked(b, n, timeout=10)
    else:
        await wait_confirmed(b, f"bulk {n - 1:03d}")
    await b.close()

    b2 = await Client(server, BOB, sm=sm).login()
    await asyncio.sleep(0.3)
    a = await Client(server, ALICE).login()
    a.chat(BOB, "marker")
    first = await b2.next_message(10)
    assert first["body"] == "marker", f"redelivered after confirmation: {first['body']}"


async def test_receipts_are_stored_but_headlines_are_not(server):
    a = await Client(server, ALICE).login()
    a.send_raw(f"<message to='{bare(BOB)}' id='rcpt'><received xmlns='urn:xmpp:receipts' id='orig-1'/></message>")
    a.send_raw(f"<message to='{bare(BOB)}' type='headline'><body>news flash</body></message>")
    a.send_raw(f"<message to='{bare(BOB)}' type='chat'><body>ignored</body>"
               "<no-store xmlns='urn:xmpp:hints'/></message>")
    a.chat(BOB, "last")
    await a.ping_server()
    b = await Client(server, BOB).login()
    first = await b.next_message()
    rcv = first.xml.find("{urn:xmpp:receipts}received")
    assert rcv is not None and rcv.get("id") == "orig-1", str(first)
    assert first.xml.find(DELAY) is not None
    assert (await b.next_message())["body"] == "last"
    assert await b.messages_for(0.3) == []


async def test_message_to_own_bare_jid_reaches_other_resources(server):
    a1 = await Client(server, ALICE, resource="one").login()
    a2 = await Client(server, ALICE, resource="two").login()
    a1.chat(ALICE, "note to self")
    m = await a2.next_message()
    assert m["body"] == "note to self" and str(m["from"]) == bare(ALICE) + "/one"


async def test_invalid_recipient_jid(server):
    a = await Client(server, ALICE).login()
    a.send_raw("<message to='a@b@c' type='chat' id='bad1'><body>x</body></message>")
    err = await a.next_message()
    assert err["type"] == "error" and err["id"] == "bad1"
    assert stanza_error(err)[0] == "jid-malformed", str(err)
    a.send_raw("<message to='someone@elsewhere.example' type='chat' id='bad2'><body>x</body></message>")
    err = await a.next_message()
    assert err["id"] == "bad2"
    assert stanza_error(err)[0] in ("remote-server-not-found", "service-unavailable"), str(err)
    await a.ping_server()


async def test_offline_messages_expire(make_server):
    """expiry_days=0: the reaper deletes every stored message on its next
    run, and the freed queue accepts messages again."""
    srv = make_server({"offline": {"expiry_days": 0, "reap_interval_secs": 1, "max_queue": 2,
                                       "sender_share_percent": 100}})
    a = await Client(srv, ALICE).login()
    a.chat(BOB, "e1")
    a.chat(BOB, "e2")
    a.chat(BOB, "e3", msg_id="e3")
    err = await a.next_message()
    assert err["id"] == "e3" and stanza_error(err)[0] == "resource-constraint"
    await asyncio.sleep(2.5)
    a.chat(BOB, "e4", msg_id="e4")
    a.chat(BOB, "e5", msg_id="e5")
    await a.ping_server()
    assert await a.messages_for(0.2) == [], "queue still full after expiry"
    await asyncio.sleep(2.5)
    b = await Client(srv, BOB).login()
    assert await b.messages_for(0.5) == []
    a.chat(BOB, "live")
    assert (await b.next_message())["body"] == "live"
