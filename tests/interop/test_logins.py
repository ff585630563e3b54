"""Logins as real clients do them: channel-binding types, the order in which
clients fall back through mechanisms, server nonces every SCRAM parser
accepts, reasons in SASL failures, whitespace after <starttls/>, and SCRAM
for unknown accounts that looks like SCRAM for real ones."""

import asyncio
import base64
import hashlib
import hmac
import re
import ssl

import pytest

from support import ALICE, DOMAIN, PASSWORD, RawClient, client_ssl_context, local_of

SASL = "urn:ietf:params:xml:ns:xmpp-sasl"


def b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


class Scram:
    """A SCRAM client (RFC 5802) with a chosen gs2 header and binding data."""

    def __init__(self, hash_name: str, user: str, password: str, gs2: str, cb_data: bytes = b""):
        self.h, self.user, self.password, self.gs2, self.cb = hash_name, user, password, gs2, cb_data
        self.cnonce = "c" + base64.b64encode(hashlib.sha256(user.encode()).digest()[:12]).decode()
        self.bare = f"n={user},r={self.cnonce}"

    def first(self) -> str:
        return b64((self.gs2 + self.bare).encode())

    def final(self, server_first: str) -> tuple[str, str]:
        attrs = dict(kv.split("=", 1) for kv in server_first.split(","))
        salt, iters = base64.b64decode(attrs["s"]), int(attrs["i"])
        assert attrs["r"].startswith(self.cnonce)
        salted = hashlib.pbkdf2_hmac(self.h, self.password.encode(), salt, iters)
        client_key = hmac.new(salted, b"Client Key", self.h).digest()
        stored = hashlib.new(self.h, client_key).digest()
        without = f"c={b64(self.gs2.encode() + self.cb)},r={attrs['r']}"
        auth = f"{self.bare},{server_first},{without}".encode()
        sig = hmac.new(stored, auth, self.h).digest()
        proof = bytes(a ^ b for a, b in zip(client_key, sig))
        server_key = hmac.new(salted, b"Server Key", self.h).digest()
        expect_v = "v=" + b64(hmac.new(server_key, auth, self.h).digest())
        return b64(f"{without},p={b64(proof)}".encode()), expect_v


async def scram(raw: RawClient, mech: str, s: Scram) -> str:
    """Runs one exchange; returns '<success…>' or the '<failure…>' XML."""
    raw.send(f"<auth xmlns='{SASL}' mechanism='{mech}'>{s.first()}</auth>")
    m = await raw.expect(r"<challenge\b[^>]*>([^<]*)</challenge>|<failure\b.*?</failure>")
    if m.group(0).startswith("<failure"):
        return m.group(0)
    server_first = base64.b64decode(m.group(1)).decode()
    resp, expect_v = s.final(server_first)
    raw.send(f"<response xmlns='{SASL}'>{resp}</response>")
    m = await raw.expect(r"<success\b[^>]*>([^<]*)</success>|<failure\b.*?</failure>")
    if m.group(0).startswith("<success"):
        assert base64.b64decode(m.group(1)).decode() == expect_v, "server signature"
    return m.group(0)


async def server_first(raw: RawClient, mech: str, user: str) -> dict:
    raw.send(f"<auth xmlns='{SASL}' mechanism='{mech}'>{b64(f'n,,n={user},r=abcdef'.encode())}</auth>")
    m = await raw.expect(r"<challenge\b[^>]*>([^<]*)</challenge>")
    sf = base64.b64decode(m.group(1)).decode()
    raw.send(f"<abort xmlns='{SASL}'/>")
    await raw.expect(r"<failure\b.*?</failure>")
    return dict(kv.split("=", 1) for kv in sf.split(","))


async def tls_stream(server, *, max_version=None) -> tuple[RawClient, str, bytes]:
    """STARTTLS, optionally capped at a TLS version. Returns the client, the
    features, and the server certificate (DER)."""
    raw = await RawClient(server.host, server.c2s_port).open()
    await raw.open_stream()
    raw.send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    await raw.expect(r"<proceed\b[^>]*/>")
    ctx = client_ssl_context()
    if max_version:
        ctx.maximum_version = max_version
    await asyncio.wait_for(raw.writer.start_tls(ctx, server_hostname=DOMAIN), 5)
    feats = await raw.open_stream()
    cert = raw.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return raw, feats, cert


@pytest.mark.parametrize("version", ["TLSv1_3", "TLSv1_2"])
async def test_scram_plus_with_tls_server_end_point(server, version):
    """tls-server-end-point (RFC 5929) works on TLS 1.2 and 1.3: -PLUS is
    offered on both, and the binding is checked."""
    raw, feats, cert = await tls_stream(server, max_version=getattr(ssl.TLSVersion, version))
    assert raw.writer.get_extra_info("ssl_object").version() == version.replace("_", ".")
    assert ">SCRAM-SHA-256-PLUS<" in feats, feats
    types = re.findall(r"<channel-binding type=['\"]([^'\"]+)", feats)
    assert "tls-server-end-point" in types, feats
    assert ("tls-exporter" in types) == (version == "TLSv1_3"), feats
    end_point = hashlib.sha256(cert).digest()
    # The wrong certificate hash fails without counting as a wrong password.
    bad = await scram(raw, "SCRAM-SHA-256-PLUS",
                      Scram("sha256", local_of(ALICE), PASSWORD, "p=tls-server-end-point,,", b"\0" * 32))
    assert bad.startswith("<failure") and "does not match" in bad, bad
    ok = await scram(raw, "SCRAM-SHA-256-PLUS",
                     Scram("sha256", local_of(ALICE), PASSWORD, "p=tls-server-end-point,,", end_point))
    assert ok.startswith("<success"), ok
    await raw.close()


async def test_fallback_from_tls_unique_reaches_plain(server):
    """slixmpp 1.8's sequence on one connection: -PLUS with tls-unique
    (undefined on TLS 1.3) twice, SCRAM with gs2 flag 'y' twice (a downgrade
    where -PLUS was offered, refused), then PLAIN. No password was checked
    by the first four, so the stream stays open and PLAIN succeeds."""
    raw, feats, _ = await tls_stream(server)
    user = local_of(ALICE)
    for mech, h in (("SCRAM-SHA-256-PLUS", "sha256"), ("SCRAM-SHA-1-PLUS", "sha1")):
        r = await scram(raw, mech, Scram(h, user, PASSWORD, "p=tls-unique,,", b"x" * 12))
        assert r.startswith("<failure") and "tls-unique" in r, r
    for mech, h in (("SCRAM-SHA-256", "sha256"), ("SCRAM-SHA-1", "sha1")):
        r = await scram(raw, mech, Scram(h, user, PASSWORD, "y,,"))
        assert r.startswith("<failure") and "downgrade" in r, r
    assert (await raw.auth_plain(user, PASSWORD)).startswith("<success")
    await raw.close()


async def test_sasl_failures_say_why_and_are_logged(server):
    raw, _, _ = await tls_stream(server)
    r = await raw.auth_plain(local_of(ALICE), "wrong")
    assert re.search(r"<not-authorized/><text>[^<]+</text></failure>", r), r
    raw.send(f"<auth xmlns='{SASL}' mechanism='DIGEST-MD5'/>")
    r = (await raw.expect(r"<failure\b.*?</failure>")).group(0)
    assert "<invalid-mechanism/>" in r and "<text>" in r, r
    raw.send(f"<auth xmlns='{SASL}' mechanism='PLAIN'>!!notbase64</auth>")
    r = (await raw.expect(r"<failure\b.*?</failure>")).group(0)
    assert "<incorrect-encoding/>" in r and "<text>" in r, r
    await raw.close()
    await asyncio.sleep(0.2)
    log = server.log_tail(400)
    assert "SASL failure" in log and "wrong username or password" in log, log


async def test_server_nonces_are_alphanumeric(server):
    """Some SCRAM parsers (@xmpp/client 0.14) break on '"' or ',' in the
    server nonce; it must come from a safe alphabet."""
    seen = set()
    for _ in range(5):
        # Attempts per connection are capped (auth.max_attempts_per_connection).
        raw, _, _ = await tls_stream(server)
        for _ in range(6):
            sf = await server_first(raw, "SCRAM-SHA-1", local_of(ALICE))
            snonce = sf["r"][len("abcdef"):]
            assert re.fullmatch(r"[A-Za-z0-9]{24,}", snonce), snonce
            seen.add(snonce)
        await raw.close()
    assert len(seen) == 30


async def test_unknown_account_scram_looks_like_a_real_one(make_server):
    """Same salt length and iteration count as a real account, and a salt
    that is stable per name, across connections and restarts."""
    srv = make_server()

    async def probe(user, mech="SCRAM-SHA-256"):
        raw, _, _ = await tls_stream(srv)
        sf = await server_first(raw, mech, user)
        await raw.close()
        return base64.b64decode(sf["s"]), sf["i"]

    for mech in ("SCRAM-SHA-256", "SCRAM-SHA-1"):
        real = await probe(local_of(ALICE), mech)
        u1, u1_again, u2 = await probe("15559990001", mech), await probe("15559990001", mech), await probe("15559990002", mech)
        assert u1 == u1_again, "unknown account salt must be stable"
        assert u1[0] != u2[0], "different unknown accounts get different salts"
        assert (len(u1[0]), u1[1]) == (len(real[0]), real[1])
    before = await probe("15559990001")
    srv.stop()
    srv.start()
    assert await probe("15559990001") == before, "salt changed across a restart"


async def test_whitespace_after_starttls_is_accepted(server):
    """go-sendxmpp sends `<starttls/>\\n` in one write."""
    raw = await RawClient(server.host, server.c2s_port).open()
    await raw.open_stream()
    raw.send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>\n \r\n\t")
    await raw.expect(r"<proceed\b[^>]*/>")
    await asyncio.wait_for(raw.writer.start_tls(client_ssl_context(), server_hostname=DOMAIN), 5)
    feats = await raw.open_stream()
    assert "<mechanisms" in feats, feats
    assert (await raw.auth_plain(local_of(ALICE), PASSWORD)).startswith("<success")
    await raw.close()


async def test_data_after_starttls_is_refused_and_logged(server):
    raw = await RawClient(server.host, server.c2s_port).open()
    await raw.open_stream()
    raw.send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>\n<iq type='get' id='x'/>")
    await raw.expect(r"<proceed\b[^>]*/>")
    await raw.read_to_eof(timeout=5)
    await asyncio.sleep(0.2)
    assert "data after <starttls/>" in server.log_tail(200)
