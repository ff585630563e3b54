"""Crash safety: a message the server acknowledged with XEP-0198 <a h/>
survives kill -9."""

import asyncio
import re

import pytest

from support import ALICE, BOB, Client, RawClient, bare

SID = "{urn:xmpp:sid:0}stanza-id"
DELAY = "{urn:xmpp:delay}delay"


class SmSender:
    """A raw XEP-0198 sender: counts what it sends and waits for the
    server's <a h/> to cover it."""

    def __init__(self, raw: RawClient):
        self.raw = raw
        self.sent = 0
        self.acked = 0

    @classmethod
    async def connect(cls, srv, phone, resource="sender"):
        raw = RawClient(srv.host, srv.c2s_port)
        await raw.login(phone, resource=resource)  # STARTTLS + PLAIN
        raw.send("<enable xmlns='urn:xmpp:sm:3'/>")
        await raw.expect(r"<enabled\b[^>]*xmlns=['\"]urn:xmpp:sm:3['\"][^>]*/?>")
        return cls(raw)

    def message(self, to, body, msg_id):
        self.raw.send(f"<message to='{to}' type='chat' id='{msg_id}'><body>{body}</body></message>")
        self.sent += 1

    async def request_ack(self, timeout=10):
        """Sends <r/>; returns once an <a h/> covers everything sent."""
        self.raw.send("<r xmlns='urn:xmpp:sm:3'/>")
        await self.raw.drain()
        while self.acked < self.sent:
            m = await self.raw.expect(r"<a xmlns=['\"]urn:xmpp:sm:3['\"] h=['\"](\d+)['\"]\s*/>|<r xmlns=['\"]urn:xmpp:sm:3['\"]\s*/>",
                                      timeout=timeout)
            if m.group(1) is None:
                self.raw.send("<a xmlns='urn:xmpp:sm:3' h='0'/>")
                continue
            h = int(m.group(1))
            assert h <= self.sent, f"server acked {h} of {self.sent}"
            assert h >= self.acked, f"ack went backwards: {h} after {self.acked}"
            self.acked = h

    def errors(self):
        return re.findall(r"<message[^>]*type=['\"]error['\"].*?</message>", self.raw.buf, re.S)


async def receive_all(client, n, timeout=30):
    got = []
    for _ in range(n):
        got.append(await client.next_message(timeout))
    return got


@pytest.mark.timeout_s(90)
async def test_acked_messages_survive_kill9(server):
    n = 200
    sender = await SmSender.connect(server, ALICE)
    # Bursts with an ack request after each, then one covering all.
    for batch in range(4):
        for i in range(batch * 50, (batch + 1) * 50):
            sender.message(bare(BOB), f"durable {i:03d}", f"d{i}")
        await sender.request_ack()
        assert sender.acked == (batch + 1) * 50
    assert sender.acked == n
    assert sender.errors() == []

    server.kill9()
    server.start()

    b = await Client(server, BOB, sm=True).login()
    got = await receive_all(b, n)
    assert [m["body"] for m in got] == [f"durable {i:03d}" for i in range(n)]
    assert [m["id"] for m in got] == [f"d{i}" for i in range(n)]
    sids = [int(m.xml.find(SID).get("id")) for m in got]
    assert sids == sorted(sids) and len(set(sids)) == n
    assert all(m.xml.find(DELAY) is not None for m in got)
    assert all(str(m["from"]) == bare(ALICE) + "/sender" for m in got)

    # Exactly once: nothing else is queued behind them.
    a = await Client(server, ALICE).login()
    a.chat(BOB, "marker")
    nxt = await b.next_message(10)
    assert nxt["body"] == "marker", f"duplicate after the {n} messages: {nxt['body']}"


@pytest.mark.timeout_s(60)
async def test_acked_messages_survive_kill9_while_recipient_online_unacked(pserver):
    """Messages pushed live to a recipient that never acknowledged them are
    still stored after a crash."""
    n = 50
    mute = RawClient(pserver.host, pserver.c2s_port)
    await mute.login(BOB, starttls=False, resource="mute")
    mute.send("<presence/>")
    await asyncio.sleep(0.2)
    sender = await SmSender.connect(pserver, ALICE)
    for i in range(n):
        sender.message(bare(BOB), f"live {i:02d}", f"l{i}")
    await sender.request_ack()
    assert sender.acked == n
    await mute.expect(rf"<body>live {n - 1:02d}</body>", timeout=10)

    pserver.kill9()
    pserver.start()

    b = await Client(pserver, BOB, sm=True).login()
    got = await receive_all(b, n)
    assert [m["body"] for m in got] == [f"live {i:02d}" for i in range(n)]
    a = await Client(pserver, ALICE).login()
    a.chat(BOB, "marker")
    assert (await b.next_message(10))["body"] == "marker"


async def test_sm_ack_only_after_everything_is_processed(server):
    """<a h/> counts every stanza sent before <r/>, including non-messages."""
    sender = await SmSender.connect(server, ALICE)
    sender.raw.send("<presence/>")
    sender.sent += 1
    sender.raw.send("<iq type='get' id='p1'><ping xmlns='urn:xmpp:ping'/></iq>")
    sender.sent += 1
    sender.message(bare(BOB), "one", "x1")
    await sender.request_ack()
    assert sender.acked == 3
    # The server requests acks for what it sends: answering them is accepted.
    b = await Client(server, BOB, sm=True).login()
    assert (await b.next_message())["body"] == "one"


async def test_slixmpp_sm_sender_acked_then_kill9(server):
    """The same guarantee through slixmpp's own XEP-0198 implementation."""
    a = await Client(server, ALICE, sm=True).login(presence=False)
    n = 30
    for i in range(n):
        a.chat(BOB, f"slix {i}")
    sm = a["xep_0198"]
    # slixmpp writes stanzas from a queue but <r/> directly: wait for the
    # last message to be on the wire before asking.
    await a.wait_sent(rf"<body>slix {n - 1}</body>")
    sm.request_ack()
    deadline = asyncio.get_running_loop().time() + 10
    while sm.last_ack < n:
        assert asyncio.get_running_loop().time() < deadline, f"acked {sm.last_ack} of {n}\n{a.trace()}"
        await asyncio.sleep(0.02)
    server.kill9()
    server.start()
    b = await Client(server, BOB).login()
    got = await receive_all(b, n)
    assert [m["body"] for m in got] == [f"slix {i}" for i in range(n)]
