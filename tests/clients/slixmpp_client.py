"""Client-matrix driver on slixmpp: runs under any slixmpp from 1.8 (Debian
12's python3-slixmpp, with /usr/bin/python3) to the latest from PyPI.

Speaks the driver protocol shared by every client in tests/clients (see
README.md there): JSON lines on stdout, one per event.
"""

import argparse
import asyncio
import inspect
import json
import ssl
import sys
import xml.etree.ElementTree as ET

import slixmpp
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

RECEIPTS = "urn:xmpp:receipts"
DELAY = "urn:xmpp:delay"


def emit(**kw):
    print(json.dumps(kw), flush=True)


class Driver(slixmpp.ClientXMPP):
    def __init__(self, args):
        super().__init__(args.jid, args.password)
        self.args = args
        self.ssl_context.check_hostname = False
        self.ssl_context.verify_mode = ssl.CERT_NONE
        self.online = asyncio.get_event_loop().create_future()
        self.self_presence = asyncio.Event()
        self.messages = asyncio.Queue()
        self.receipts = asyncio.Queue()
        self.closed = asyncio.Event()
        self.add_event_handler("session_start", self._start)
        self.add_event_handler("failed_auth", self._failed)
        self.add_event_handler("disconnected", self._disconnected)
        self.add_event_handler("message", self._message)
        # slixmpp's "message" event only covers messages with a body.
        self.register_handler(
            Callback("receipt", MatchXPath("{jabber:client}message/{%s}received" % RECEIPTS), self._receipt)
        )
        self.add_event_handler("presence_available", self._presence)

    def connect_to(self):
        host, port, direct = "127.0.0.1", self.args.port, self.args.direct_tls
        params = inspect.signature(self.connect).parameters
        if "use_ssl" in params:  # slixmpp < 1.8.4
            self.connect((host, port), use_ssl=direct, force_starttls=not direct, disable_starttls=direct)
        else:
            self.enable_direct_tls = direct
            self.enable_starttls = not direct
            self.enable_plaintext = False
            self.connect(host, port)

    def mechanism(self):
        mech = getattr(self.plugin["feature_mechanisms"], "mech", None)
        return getattr(mech, "name", None)

    def _start(self, _):
        self.send_presence()
        if not self.online.done():
            self.online.set_result(True)

    def _failed(self, stanza):
        emit(event="auth_failure", detail=str(stanza))

    def _disconnected(self, *_):
        self.closed.set()
        if not self.online.done():
            self.online.set_result(False)

    def _presence(self, p):
        if p["from"] == self.boundjid:
            self.self_presence.set()

    def _receipt(self, msg):
        rec = msg.xml.find("{%s}received" % RECEIPTS)
        if rec is not None:
            self.receipts.put_nowait(rec.get("id"))

    def _message(self, msg):
        x = msg.xml
        if msg["body"]:
            if x.find("{%s}request" % RECEIPTS) is not None and msg["id"]:
                r = self.make_message(mto=msg["from"], mtype="chat")
                r.xml.append(ET.Element("{%s}received" % RECEIPTS, {"id": msg["id"]}))
                r.send()
            d = x.find("{%s}delay" % DELAY)
            self.messages.put_nowait(
                {"from": str(msg["from"].bare), "body": msg["body"], "delay": d.get("stamp") if d is not None else None}
            )

    async def close(self):
        self.disconnect()
        try:
            await asyncio.wait_for(self.closed.wait(), 5)
        except asyncio.TimeoutError:
            pass


async def login(args):
    c = Driver(args)
    c.connect_to()
    try:
        ok = await asyncio.wait_for(c.online, args.timeout)
    except asyncio.TimeoutError:
        ok = False
    return c, ok


async def main(args):
    if args.repeat:
        good, mechs = 0, set()
        for _ in range(args.repeat):
            c, ok = await login(args)
            if ok:
                good += 1
                mechs.add(c.mechanism())
            await c.close()
        emit(event="logins", ok=good, total=args.repeat, mechanisms=sorted(m for m in mechs if m))
        return 0
    c, ok = await login(args)
    if not ok:
        emit(event="login_failed")
        return 1
    # Online once the server echoed our initial presence (RFC 6121 §4.2.2).
    try:
        await asyncio.wait_for(c.self_presence.wait(), args.timeout)
    except asyncio.TimeoutError:
        emit(event="no_presence_echo")
        await c.close()
        return 1
    emit(event="online", jid=str(c.boundjid), mechanism=c.mechanism(), version=slixmpp.__version__)
    if args.send:
        to, body = args.send
        m = c.make_message(mto=to, mbody=body, mtype="chat")
        m["id"] = args.id
        m.xml.append(ET.Element("{%s}request" % RECEIPTS))
        m.send()
        emit(event="sent", id=args.id)
        if args.wait_receipt:
            try:
                rid = await asyncio.wait_for(c.receipts.get(), args.timeout)
                emit(event="receipt", id=rid)
            except asyncio.TimeoutError:
                emit(event="no_receipt")
    while args.until is not None:
        try:
            m = await asyncio.wait_for(c.messages.get(), args.timeout)
        except asyncio.TimeoutError:
            emit(event="timeout")
            break
        emit(event="message", **m)
        if m["body"] == args.until:
            break
    # Let receipts and the last stanzas reach the server before closing.
    await asyncio.sleep(0.3)
    await c.close()
    emit(event="done")
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--direct-tls", action="store_true")
    ap.add_argument("--jid", required=True)
    ap.add_argument("--password", required=True)
    ap.add_argument("--repeat", type=int, default=0)
    ap.add_argument("--send", nargs=2, metavar=("TO", "BODY"))
    ap.add_argument("--id", default="m1")
    ap.add_argument("--wait-receipt", action="store_true")
    ap.add_argument("--until", help="read messages until one with this body")
    ap.add_argument("--timeout", type=float, default=15)
    a = ap.parse_args()
    sys.exit(asyncio.run(main(a)) if sys.version_info >= (3, 7) else 1)
