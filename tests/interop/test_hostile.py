"""Malformed and hostile input: each case ends the offending stream with the
right stream error, and the server keeps serving everyone else."""

import asyncio

import pytest

from support import (ALICE, BOB, CAROL, DAVE, Client, RawClient, bare, stream_header)

BILLION_LAUGHS = (
    "<?xml version='1.0'?>"
    "<!DOCTYPE lolz [<!ENTITY lol 'lol'>"
    + "".join(f"<!ENTITY lol{i} '{('&lol' + (str(i - 1) if i > 1 else '') + ';') * 10}'>" for i in range(1, 10))
    + "]>"
)

BIG = "A" * 300_000  # above the default max_stanza_bytes (262144)

# A 60 KB default namespace inherited by 48,000 empty children, and 8,000
# prefix declarations with 29,000 children: both once multiplied into GiBs
# or tens of CPU seconds; now over the element limit.
MEMORY_BOMB = f"<iq type='get' id='m' xmlns='urn:{'x' * 59_996}'>" + "<a/>" * 48_000 + "</iq>"
CPU_BOMB = ("<iq type='get' id='c' " + " ".join(f"xmlns:p{i}='u'" for i in range(8000)) + ">"
            + "<a/>" * 29_000 + "</iq>")

# (id, stage, payload, condition). Stages: "first" — the payload is the
# first thing on the connection; "preauth" — after a stream header, before
# SASL; "bound" — in an authenticated, bound session (after STARTTLS).
CASES = [
    ("oversized-stanza", "bound",
     f"<message to='{bare(BOB)}' type='chat'><body>{BIG}</body></message>", "policy-violation"),
    ("oversized-unterminated", "bound",
     f"<message to='{bare(BOB)}' type='chat'><body>{BIG}", "policy-violation"),
    ("oversized-preauth", "preauth", f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{BIG}</auth>",
     "policy-violation"),
    ("billion-laughs-prolog", "first",
     BILLION_LAUGHS + stream_header(prolog="") , "restricted-xml"),
    ("billion-laughs-bound", "bound",
     BILLION_LAUGHS.replace("<?xml version='1.0'?>", "") + f"<message to='{bare(BOB)}'><body>&lol9;</body></message>",
     "restricted-xml"),
    ("doctype-preauth", "preauth", "<!DOCTYPE foo [<!ENTITY x 'y'>]>", "restricted-xml"),
    ("comment-in-stanza", "bound",
     f"<message to='{bare(BOB)}' type='chat'><!-- hidden --><body>x</body></message>", "restricted-xml"),
    ("comment-between-stanzas", "bound", "<!-- hello -->", "restricted-xml"),
    ("processing-instruction", "bound", "<?evil run='yes'?>", "restricted-xml"),
    ("pi-in-stanza", "bound",
     f"<message to='{bare(BOB)}' type='chat'><?evil x?><body>x</body></message>", "restricted-xml"),
    ("undefined-entity", "bound",
     f"<message to='{bare(BOB)}' type='chat'><body>&xxe;</body></message>", "restricted-xml"),
    ("external-entity-preauth", "first",
     "<?xml version='1.0'?><!DOCTYPE s [<!ENTITY xxe SYSTEM 'file:///etc/passwd'>]>" + stream_header(prolog=""),
     "restricted-xml"),
    ("mismatched-tag", "bound",
     f"<message to='{bare(BOB)}' type='chat'><body>x</bdy></message>", "not-well-formed"),
    ("bad-attribute", "bound", f"<message to='{bare(BOB)}' type=chat><body>x</body></message>", "not-well-formed"),
    ("text-at-stream-level", "bound", "hello there", "not-well-formed"),
    ("invalid-utf8", "bound", b"<message to='x@localhost'><body>\xff\xfe</body></message>", "not-well-formed"),
    ("garbage-first", "first", "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", "not-well-formed"),
    ("stanza-before-auth", "preauth",
     f"<message to='{bare(BOB)}' type='chat'><body>sneaky</body></message>", "not-authorized"),
    ("iq-before-auth", "preauth",
     "<iq type='get' id='r1'><query xmlns='jabber:iq:roster'/></iq>", "not-authorized"),
    ("wrong-host", "first", stream_header(to="example.com"), "host-unknown"),
    ("deep-nesting", "bound", f"<message to='{bare(BOB)}'>" + "<a>" * 5000 + "</a>" * 5000 + "</message>",
     "policy-violation"),
    ("undeclared-prefix", "bound", f"<foo:message to='{bare(BOB)}'><body>x</body></foo:message>", "not-well-formed"),
    ("nul-character", "bound", f"<message to='{bare(BOB)}'><body>\x00</body></message>", "not-well-formed"),
    ("control-char-reference", "bound", f"<message to='{bare(BOB)}'><body>&#1;</body></message>", "not-well-formed"),
    ("wrong-stream-namespace", "first",
     "<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='urn:wrong' to='localhost' version='1.0'>",
     "invalid-namespace"),
    ("no-stream-version", "first",
     "<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
     "xmlns:stream='http://etherx.jabber.org/streams' to='localhost'>", "unsupported-version"),
    ("unknown-top-level-element", "bound", "<foo xmlns='urn:example:x'/>", "unsupported-stanza-type"),
    ("control-char-reference-in-attribute", "bound",
     f"<message to='{bare(BOB)}' type='chat' id='&#1;x'><body>poison</body></message>", "not-well-formed"),
    ("raw-control-char-in-attribute", "bound",
     f"<message to='{bare(BOB)}' type='chat' id='\x1b'><body>x</body></message>", "not-well-formed"),
    ("invalid-element-name", "bound", f"<message to='{bare(BOB)}'><1body>x</1body></message>", "not-well-formed"),
    ("memory-bomb-preauth", "preauth", MEMORY_BOMB, "policy-violation"),
    ("memory-bomb-bound", "bound", MEMORY_BOMB, "policy-violation"),
    ("cpu-bomb-bound", "bound", CPU_BOMB, "policy-violation"),
    ("too-many-attributes", "bound",
     f"<message to='{bare(BOB)}' " + " ".join(f"a{i}='x'" for i in range(100)) + "/>", "policy-violation"),
]


@pytest.mark.parametrize("stage,payload,condition", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_bad_input_gets_stream_error_and_others_keep_working(pserver, stage, payload, condition):
    a = await Client(pserver, ALICE, resource="witness").login()
    b = await Client(pserver, BOB, resource="witness").login()

    raw = RawClient(pserver.host, pserver.c2s_port)
    await raw.open()
    if stage == "preauth":
        await raw.open_stream()
    elif stage == "bound":
        await raw.login(CAROL, resource="attacker")
        raw.send("<presence/>")
    raw.send(payload)
    await raw.expect_stream_error(condition, timeout=10)
    if stage != "first":
        assert raw.buf.count("<stream:error>") == 1

    # Nothing the attacker sent was delivered.
    assert "sneaky" not in "".join(b.raw_in)
    # Established sessions are unaffected...
    a.chat(BOB, "still here")
    m = await b.next_message()
    assert m["body"] == "still here"
    b.chat(ALICE, "me too")
    assert (await a.next_message())["body"] == "me too"
    # ...and new connections are served, including the attacker's account.
    for phone in (CAROL, DAVE):
        c = await Client(pserver, phone).login()
        await c.ping_server()
        await c.close()


async def test_entities_and_character_references_are_fine(pserver):
    b = await Client(pserver, BOB).login()
    raw = RawClient(pserver.host, pserver.c2s_port)
    await raw.login(ALICE, resource="raw")
    raw.send(f"<message to='{bare(BOB)}' type='chat'><body>&lt;&gt;&amp;&apos;&quot;&#65;&#x42;"
             "<![CDATA[<c>]]>é</body></message>")
    m = await b.next_message()
    assert m["body"] == "<>&'\"AB<c>é"
    raw.send("<iq type='get' id='p1'><ping xmlns='urn:xmpp:ping'/></iq>")
    await raw.expect(r"<iq\b[^>]*id=['\"]p1['\"]")
    assert not raw.eof


async def test_stanza_split_across_many_writes(pserver):
    b = await Client(pserver, BOB).login()
    raw = RawClient(pserver.host, pserver.c2s_port)
    await raw.login(ALICE, resource="slow")
    data = f"<message to='{bare(BOB)}' type='chat'><body>dribble ünïcode</body></message>".encode()
    for i in range(len(data)):
        raw.send(data[i:i + 1])
        await raw.drain()
        if i % 8 == 0:
            await asyncio.sleep(0.005)
    m = await b.next_message()
    assert m["body"] == "dribble ünïcode"


async def test_replaced_resource_stays_available_to_others(pserver):
    """A slixmpp client replaced by a new login on its resource sees the
    conflict stream error; the account's other resources end up seeing
    that resource available (no unavailable after the new session's
    presence)."""
    a1 = await Client(pserver, ALICE, resource="x").login(roster=True)
    a2 = await Client(pserver, ALICE, resource="y").login(roster=True)
    await a2.next_presence(pred=lambda p: p["from"].resource == "x")
    a3 = await Client(pserver, ALICE, resource="x").login()
    await a1.wait_disconnected()
    assert a1.stream_errors == ["conflict"]
    await a3.ping_server()
    await asyncio.sleep(0.5)
    seen = []
    while not a2.presences.empty():
        p = a2.presences.get_nowait()
        if p["from"].resource == "x":
            seen.append(p.xml.get("type") or "available")
    assert seen and seen[-1] == "available", seen
