"""XEP-0198 details seen on the wire, and XEP-0352 client state indication."""

import asyncio
import re

from support import ALICE, BOB, Client, RawClient, bare

SM = "xmlns='urn:xmpp:sm:3'"
ENABLED = r"<enabled\b[^>]*urn:xmpp:sm:3[^>]*/?>"
FAILED = r"<failed\b[^>]*urn:xmpp:sm:3.*?(</failed>|/>)"


async def test_enable_before_bind_fails(pserver):
    raw = await RawClient(pserver.host, pserver.c2s_port).open()
    await raw.open_stream()
    assert (await raw.auth_plain("15550000001", "s3cret-pw")).startswith("<success")
    feats = await raw.open_stream()
    assert "urn:xmpp:sm:3" in feats, feats
    raw.send(f"<enable {SM}/>")
    await raw.expect(FAILED)
    await raw.bind("late")
    raw.send(f"<enable {SM}/>")
    await raw.expect(ENABLED)
    raw.send(f"<enable {SM}/>")
    await raw.expect(FAILED)
    raw.send("<iq type='get' id='p'><ping xmlns='urn:xmpp:ping'/></iq>")
    await raw.expect(r"<iq\b[^>]*id=['\"]p['\"]")


async def test_server_requests_acks_and_counts_stanzas(pserver):
    a = await Client(pserver, ALICE).login()
    raw = RawClient(pserver.host, pserver.c2s_port)
    await raw.login(BOB, starttls=False, resource="sm")
    raw.send(f"<enable {SM}/>")
    await raw.expect(ENABLED)
    raw.send("<presence/>")
    raw.send("<iq type='get' id='sync'><ping xmlns='urn:xmpp:ping'/></iq>")
    await raw.expect(r"<iq\b[^>]*id=['\"]sync['\"]")  # stanza 2 from the server (after the presence echo)
    a.chat(BOB, "first")
    a.chat(BOB, "second")
    await raw.expect(r"<body>first</body>")
    await raw.expect(r"<body>second</body>")
    # The server asks for acknowledgement of what it sent (at least once).
    assert re.search(r"<r xmlns=['\"]urn:xmpp:sm:3['\"]\s*/>", raw.buf), raw.trace()
    # Sent so far: the echo of our presence (RFC 6121 §4.2.2), the ping
    # result and the two messages.
    raw.send(f"<a {SM} h='4'/>")
    raw.send(f"<r {SM}/>")
    # Received from the client after <enable/>: presence and the ping.
    await raw.expect(r"<a xmlns=['\"]urn:xmpp:sm:3['\"] h=['\"]2['\"]\s*/>")
    # Acknowledging more than was sent is a stream error.
    raw.send(f"<a {SM} h='10'/>")
    await raw.expect_stream_error("undefined-condition")
    # The two acknowledged messages are not redelivered.
    b = await Client(pserver, BOB, sm=True).login()
    await asyncio.sleep(0.3)
    a.chat(BOB, "third")
    assert (await b.next_message())["body"] == "third"


async def test_partial_ack_keeps_the_rest(pserver):
    a = await Client(pserver, ALICE).login()
    for i in range(3):
        a.chat(BOB, f"m{i}")
    await a.ping_server()
    raw = RawClient(pserver.host, pserver.c2s_port)
    await raw.login(BOB, starttls=False, resource="sm")
    raw.send(f"<enable {SM}/>")
    await raw.expect(ENABLED)
    raw.send("<presence/>")
    for i in range(3):
        await raw.expect(rf"<body>m{i}</body>")
    await raw.expect(r"<r xmlns=['\"]urn:xmpp:sm:3['\"]\s*/>")  # after the stored messages
    # The echo of our presence (RFC 6121 §4.2.2) comes first, then m0.
    raw.send(f"<a {SM} h='2'/>")
    raw.send("<iq type='get' id='sync'><ping xmlns='urn:xmpp:ping'/></iq>")
    await raw.expect(r"<iq\b[^>]*id=['\"]sync['\"]")
    raw.abort()
    b = await Client(pserver, BOB, sm=True).login()
    got = [(await b.next_message())["body"] for _ in range(2)]
    assert got == ["m1", "m2"]


async def test_csi_holds_presence_not_messages(server):
    a = await Client(server, ALICE, resource="a").login(roster=True)
    b = await Client(server, BOB, resource="b").login(roster=True)
    b.send_presence(pto=bare(ALICE), ptype="subscribe")
    await a.next_presence(pred=lambda p: p.xml.get("type") == "subscribe")
    a.send_presence(pto=bare(BOB), ptype="subscribed")
    await b.next_presence(pred=lambda p: p["from"].bare == bare(ALICE) and not p.xml.get("type"))

    b.send_raw("<inactive xmlns='urn:xmpp:csi:0'/>")
    await b.ping_server()
    for status in ("one", "two", "three"):
        a.send_presence(pstatus=status)
    a.chat(BOB, "urgent")
    m = await b.next_message()
    assert m["body"] == "urgent"
    await asyncio.sleep(0.3)
    held = [p for p in _drain(b.presences) if p["from"].bare == bare(ALICE)]
    assert held == [], f"presence delivered to an inactive client: {held}"

    b.send_raw("<active xmlns='urn:xmpp:csi:0'/>")
    p = await b.next_presence(pred=lambda p: p["from"].bare == bare(ALICE))
    assert p["status"] == "three"
    await asyncio.sleep(0.3)
    rest = [p["status"] for p in _drain(b.presences) if p["from"].bare == bare(ALICE)]
    assert rest == [], f"stale presence flushed: {rest}"


def _drain(q):
    out = []
    while not q.empty():
        out.append(q.get_nowait())
    return out
