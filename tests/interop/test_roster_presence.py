"""Roster management, presence subscriptions and broadcast, disco, ping."""

import asyncio

from slixmpp import ET
from slixmpp.exceptions import IqError

from support import ALICE, BOB, CAROL, Client, bare

ROSTER_ITEM = "{jabber:iq:roster}query/{jabber:iq:roster}item"


def push_item(iq):
    item = iq.xml.find(ROSTER_ITEM)
    assert item is not None, str(iq)
    return item


def is_push_for(jid, **attrs):
    def pred(iq):
        item = iq.xml.find(ROSTER_ITEM)
        if item is None or item.get("jid") != jid:
            return False
        return all(item.get(k) == v for k, v in attrs.items())
    return pred


def ptype(t, frm=None):
    """Matches presence of type `t` ("available" for none) from a full or bare JID."""
    def pred(p):
        if (p.xml.get("type") or "available") != t:
            return False
        return frm is None or str(p["from"]) == frm or p["from"].bare == frm
    return pred


async def fetch_roster(c):
    iq = c.Iq(stype="get")
    iq.enable("roster")
    res = await iq.send(timeout=5)
    return {i.get("jid"): i for i in res.xml.findall(ROSTER_ITEM)}


async def test_roster_set_get_push_remove(server):
    a1 = await Client(server, ALICE, resource="one").login(roster=True)
    a2 = await Client(server, ALICE, resource="two").login(roster=True)
    quiet = await Client(server, ALICE, resource="noroster").login()
    assert await fetch_roster(a1) == {}

    await a1.update_roster(bare(BOB), name="Bob", groups=["Friends", "Work"], timeout=5)
    for c in (a1, a2):
        iq = await c.next_roster_push(pred=is_push_for(bare(BOB)))
        item = push_item(iq)
        assert item.get("name") == "Bob"
        assert item.get("subscription") == "none"
        assert sorted(g.text for g in item.findall("{jabber:iq:roster}group")) == ["Friends", "Work"]
    assert quiet.roster_pushes.empty(), "a resource that never fetched the roster got a push"

    roster = await fetch_roster(a2)
    assert set(roster) == {bare(BOB)}
    assert roster[bare(BOB)].get("name") == "Bob"

    await a1.update_roster(bare(BOB), name="Robert", groups=["Friends"], timeout=5)
    item = push_item(await a2.next_roster_push(pred=is_push_for(bare(BOB), name="Robert")))
    assert [g.text for g in item.findall("{jabber:iq:roster}group")] == ["Friends"]

    await a1.del_roster_item(bare(BOB))
    await a2.next_roster_push(pred=is_push_for(bare(BOB), subscription="remove"))
    assert await fetch_roster(a1) == {}
    await asyncio.sleep(0.2)
    assert quiet.roster_pushes.empty()


async def test_roster_survives_restart(server):
    a = await Client(server, ALICE).login(roster=True)
    await a.update_roster(bare(CAROL), name="Carol", timeout=5)
    await a.close()
    server.stop()
    server.start()
    a2 = await Client(server, ALICE).login(roster=True)
    roster = await fetch_roster(a2)
    assert roster[bare(CAROL)].get("name") == "Carol"


async def test_roster_errors(server):
    a = await Client(server, ALICE).login(roster=True)
    iq = a.Iq(stype="set")
    iq.enable("roster")
    iq["roster"]["items"] = {bare(ALICE): {"name": "me"}}
    try:
        await iq.send(timeout=5)
        raise AssertionError("adding oneself to the roster was accepted")
    except IqError as e:
        assert e.iq["error"]["condition"] == "not-allowed"
    iq = a.Iq(stype="set")
    iq.enable("roster")
    iq["roster"]["items"] = {bare(CAROL): {"subscription": "remove"}}
    try:
        await iq.send(timeout=5)
        raise AssertionError("removing a missing item was accepted")
    except IqError as e:
        assert e.iq["error"]["condition"] == "item-not-found"


async def test_subscription_handshake_and_presence_broadcast(server):
    a = await Client(server, ALICE, resource="a").login(roster=True)
    b = await Client(server, BOB, resource="b").login(roster=True)

    # Alice asks Bob.
    a.send_presence(pto=bare(BOB), ptype="subscribe")
    req = await b.next_presence(pred=ptype("subscribe"))
    assert str(req["from"]) == bare(ALICE), str(req)
    await a.next_roster_push(pred=is_push_for(bare(BOB), ask="subscribe"))

    # Bob approves: Alice is told, both rosters change, Alice sees Bob.
    b.send_presence(pto=bare(ALICE), ptype="subscribed")
    ok = await a.next_presence(pred=ptype("subscribed"))
    assert ok["from"].bare == bare(BOB)
    await a.next_roster_push(pred=is_push_for(bare(BOB), subscription="to"))
    await b.next_roster_push(pred=is_push_for(bare(ALICE), subscription="from"))
    avail = await a.next_presence(pred=ptype("available", bare(BOB) + "/b"))
    assert str(avail["from"]) == bare(BOB) + "/b"

    # And the other way round: mutual subscription.
    b.send_presence(pto=bare(ALICE), ptype="subscribe")
    await a.next_presence(pred=ptype("subscribe", bare(BOB)))
    a.send_presence(pto=bare(BOB), ptype="subscribed")
    await b.next_presence(pred=ptype("subscribed", bare(ALICE)))
    await b.next_roster_push(pred=is_push_for(bare(ALICE), subscription="both"))
    await a.next_roster_push(pred=is_push_for(bare(BOB), subscription="both"))
    await b.next_presence(pred=ptype("available", bare(ALICE) + "/a"))
    roster = await fetch_roster(a)
    assert roster[bare(BOB)].get("subscription") == "both"
    assert roster[bare(BOB)].get("ask") is None

    # Presence broadcast to the subscriber, not to strangers.
    c = await Client(server, CAROL).login(roster=True)
    b.send_presence(pshow="dnd", pstatus="in a meeting")
    p = await a.next_presence(pred=lambda p: p["status"] == "in a meeting")
    assert str(p["from"]) == bare(BOB) + "/b" and p["show"] == "dnd"
    assert p["to"].bare in ("", bare(ALICE)), str(p)

    # A new resource of Alice gets Bob's current presence at login.
    a2 = await Client(server, ALICE, resource="a2").login(roster=True)
    p = await a2.next_presence(pred=ptype("available", bare(BOB) + "/b"))
    assert p["status"] == "in a meeting"

    # Bob disconnects: subscribers see him go.
    await b.close()
    gone = await a.next_presence(pred=ptype("unavailable", bare(BOB) + "/b"))
    assert str(gone["from"]) == bare(BOB) + "/b"
    await a2.next_presence(pred=ptype("unavailable", bare(BOB) + "/b"))

    await asyncio.sleep(0.2)
    while not c.presences.empty():
        p = c.presences.get_nowait()
        assert p["from"].bare != bare(BOB), f"presence leaked to a non-subscriber: {p}"


async def test_abrupt_disconnect_broadcasts_unavailable(server):
    a = await Client(server, ALICE, resource="a").login(roster=True)
    b = await Client(server, BOB, resource="b").login(roster=True)
    a.send_presence(pto=bare(BOB), ptype="subscribe")
    await b.next_presence(pred=ptype("subscribe"))
    b.send_presence(pto=bare(ALICE), ptype="subscribed")
    await a.next_presence(pred=ptype("available", bare(BOB) + "/b"))
    b.abort()
    await a.next_presence(pred=ptype("unavailable", bare(BOB) + "/b"))


async def test_subscription_request_to_offline_user_delivered_at_login(server):
    a = await Client(server, ALICE, resource="a").login(roster=True)
    a.send_presence(pto=bare(CAROL), ptype="subscribe")
    await a.next_roster_push(pred=is_push_for(bare(CAROL), ask="subscribe"))
    await a.ping_server()

    c = await Client(server, CAROL).login(roster=True)
    req = await c.next_presence(pred=ptype("subscribe"))
    assert req["from"].bare == bare(ALICE)
    c.send_presence(pto=bare(ALICE), ptype="subscribed")
    await a.next_presence(pred=ptype("subscribed", bare(CAROL)))
    await a.next_roster_push(pred=is_push_for(bare(CAROL), subscription="to"))
    await a.next_presence(pred=ptype("available", bare(CAROL)))

    # Once approved, the request is not repeated at the next login.
    await c.close()
    c2 = await Client(server, CAROL).login(roster=True)
    await asyncio.sleep(0.5)
    while not c2.presences.empty():
        p = c2.presences.get_nowait()
        assert p["type"] != "subscribe", f"approved request re-sent: {p}"


async def test_pending_request_repeated_until_answered(server):
    a = await Client(server, ALICE).login(roster=True)
    a.send_presence(pto=bare(CAROL), ptype="subscribe")
    await a.ping_server()
    for _ in range(2):
        c = await Client(server, CAROL).login(roster=True)
        await c.next_presence(pred=ptype("subscribe", bare(ALICE)))
        await c.close()


async def test_unsubscribe_stops_presence(server):
    a = await Client(server, ALICE, resource="a").login(roster=True)
    b = await Client(server, BOB, resource="b").login(roster=True)
    a.send_presence(pto=bare(BOB), ptype="subscribe")
    await b.next_presence(pred=ptype("subscribe"))
    b.send_presence(pto=bare(ALICE), ptype="subscribed")
    await a.next_presence(pred=ptype("available", bare(BOB) + "/b"))
    a.send_presence(pto=bare(BOB), ptype="unsubscribe")
    await a.next_roster_push(pred=is_push_for(bare(BOB), subscription="none"))
    await b.next_presence(pred=ptype("unsubscribe", bare(ALICE)))
    await a.next_presence(pred=ptype("unavailable", bare(BOB) + "/b"))
    b.send_presence(pstatus="after unsubscribe")
    await asyncio.sleep(0.4)
    while not a.presences.empty():
        p = a.presences.get_nowait()
        assert p["status"] != "after unsubscribe", f"presence after unsubscribe: {p}"


async def test_disco_info_server(server):
    c = await Client(server, ALICE).login()
    info = await c["xep_0030"].get_info(jid="localhost", timeout=5)
    q = info["disco_info"]
    assert ("server", "im") in {(i[0], i[1]) for i in q["identities"]}, str(info)
    feats = set(q["features"])
    for f in ("http://jabber.org/protocol/disco#info", "urn:xmpp:ping"):
        assert f in feats, feats
    items = await c["xep_0030"].get_items(jid="localhost", timeout=5)
    assert items["type"] == "result"


async def test_disco_info_account(server):
    c = await Client(server, ALICE).login()
    info = await c["xep_0030"].get_info(jid=bare(BOB), timeout=5)
    assert ("account", "registered") in {(i[0], i[1]) for i in info["disco_info"]["identities"]}
    try:
        await c["xep_0030"].get_info(jid="15559999999@localhost", timeout=5)
        raise AssertionError("disco#info of a nonexistent account succeeded")
    except IqError as e:
        assert e.iq["error"]["condition"] == "service-unavailable"


async def test_ping(server):
    c = await Client(server, ALICE).login()
    rtt = await c["xep_0199"].ping("localhost", timeout=5)
    assert rtt is not None and 0 <= rtt < 5
    iq = c.Iq(stype="get")
    iq.enable("ping")
    res = await iq.send(timeout=5)
    assert res["type"] == "result"
    rtt = await c["xep_0199"].ping(bare(BOB), timeout=5)
    assert rtt is not None


async def test_iq_to_full_jid_is_forwarded(server):
    a = await Client(server, ALICE).login()
    b = await Client(server, BOB, resource="desk").login()
    rtt = await a["xep_0199"].ping(bare(BOB) + "/desk", timeout=5)
    assert rtt is not None
    assert "urn:xmpp:ping" in "".join(b.raw_in)
    try:
        await a["xep_0199"].send_ping(bare(BOB) + "/nowhere", timeout=5)
        raise AssertionError("ping to a missing resource succeeded")
    except IqError as e:
        assert e.iq["error"]["condition"] == "service-unavailable"


async def test_unknown_iq_payload(server):
    c = await Client(server, ALICE).login()
    iq = c.Iq(stype="get", sto="localhost")
    iq.append(ET.Element("{urn:example:nothing}query"))
    try:
        await iq.send(timeout=5)
        raise AssertionError("unknown payload answered with a result")
    except IqError as e:
        assert e.iq["error"]["condition"] in ("service-unavailable", "feature-not-implemented")
