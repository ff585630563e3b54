"""Connection security and authentication."""

import base64
import re

import pytest

from support import ALICE, BOB, PASSWORD, Client, RawClient, bare, local_of


async def test_scram_sha256_over_starttls_is_default(server):
    c = await Client(server, ALICE, resource="phone").login()
    assert c.sasl_mechanism == "SCRAM-SHA-256"
    assert re.search(r"<starttls xmlns=.urn:ietf:params:xml:ns:xmpp-tls.", "".join(c.raw_out)), c.trace()
    assert re.search(r"mechanism=.SCRAM-SHA-256.", "".join(c.raw_out))
    assert str(c.boundjid) == bare(ALICE) + "/phone"
    await c.ping_server()
    await c.close()


@pytest.mark.parametrize("mech", ["SCRAM-SHA-1", "PLAIN"])
async def test_other_mechanisms_over_starttls(server, mech):
    c = await Client(server, ALICE, mech=mech).login()
    assert c.sasl_mechanism == mech
    assert re.search(r"mechanism=.%s." % mech, "".join(c.raw_out)), c.trace()
    await c.ping_server()
    await c.close()


async def test_features_offered_after_starttls(server):
    raw = await RawClient(server.host, server.c2s_port).open()
    feats = await raw.open_stream()
    assert re.search(r"<starttls [^>]*>\s*<required/>", feats), feats
    await raw.starttls()
    feats = await raw.open_stream()
    mechs = re.findall(r"<mechanism>([^<]+)</mechanism>", feats)
    for m in ("SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"):
        assert m in mechs, feats
    assert "<starttls" not in feats
    await raw.close()


async def test_direct_tls(server):
    c = await Client(server, BOB, direct_tls=True).login()
    assert c.sasl_mechanism == "SCRAM-SHA-256"
    assert "<starttls" not in "".join(c.raw_out), "direct TLS must not use STARTTLS"
    a = await Client(server, ALICE).login()
    await a.ping_server()
    a.chat(BOB, "over direct tls")
    m = await c.next_message()
    assert m["body"] == "over direct tls"
    await c.close()
    await a.close()


async def test_direct_tls_port_speaks_only_tls(server):
    raw = await RawClient(server.host, server.tls_port).open()
    raw.send("<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
             "xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>")
    tail = await raw.read_to_eof(timeout=10)
    assert "<stream:features" not in tail


async def test_plain_refused_without_tls(server):
    raw = await RawClient(server.host, server.c2s_port).open()
    feats = await raw.open_stream()
    assert "<mechanisms" not in feats, f"SASL offered before TLS: {feats}"
    token = base64.b64encode(f"\0{local_of(ALICE)}\0{PASSWORD}".encode()).decode()
    raw.send(f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{token}</auth>")
    m = await raw.expect(r"<failure\b.*?</failure>|<stream:error>")
    assert "encryption-required" in m.group(0) or "<stream:error>" in m.group(0), raw.trace()
    assert "<success" not in raw.buf
    # Nothing but TLS or the end of the stream may follow.
    raw.send("<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>")
    await raw.expect_stream_error("not-authorized")


async def test_plain_over_cleartext_when_allowed(pserver):
    raw = await RawClient(pserver.host, pserver.c2s_port).open()
    jid = await raw.login(ALICE, starttls=False, resource="lo")
    assert jid == bare(ALICE) + "/lo"
    await raw.close()


@pytest.mark.parametrize("mech", ["SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"])
async def test_wrong_password_fails(server, mech):
    c = Client(server, ALICE, password="not-the-password", mech=mech)
    why = await c.expect_login_failure()
    assert c.auth_failures == ["not-authorized"], why
    assert c.sessions_started == 0
    ok = await Client(server, ALICE, mech=mech).login()
    await ok.close()


async def test_unknown_account_fails(server):
    c = Client(server, "+15557777777")
    await c.expect_login_failure()
    assert c.auth_failures == ["not-authorized"]


async def test_repeated_failures_end_the_stream(pserver):
    raw = await RawClient(pserver.host, pserver.c2s_port).open()
    await raw.open_stream()
    for _ in range(3):
        res = await raw.auth_plain(local_of(ALICE), "wrong")
        assert res.startswith("<failure") and "not-authorized" in res, res
    await raw.expect_stream_error("policy-violation")
    # The account is not locked out.
    raw2 = await RawClient(pserver.host, pserver.c2s_port).open()
    await raw2.login(ALICE, PASSWORD, starttls=False)


def _scram_messages(hash_name, user, password, gs2, nonce):
    """A small SCRAM client (RFC 5802): returns a function computing the
    client-final message and expected server signature from server-first."""
    import hashlib
    import hmac

    def h(data):
        return hashlib.new(hash_name, data).digest()

    def mac(key, data):
        return hmac.new(key, data, hash_name).digest()

    first_bare = f"n={user},r={nonce}"

    def final(server_first: str):
        attrs = dict(kv.split("=", 1) for kv in server_first.split(","))
        assert attrs["r"].startswith(nonce), server_first
        salted = hashlib.pbkdf2_hmac(hash_name, password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"]))
        client_key = mac(salted, b"Client Key")
        without_proof = f"c={base64.b64encode(gs2.encode()).decode()},r={attrs['r']}"
        auth = f"{first_bare},{server_first},{without_proof}".encode()
        proof = bytes(a ^ b for a, b in zip(client_key, mac(h(client_key), auth)))
        server_sig = mac(mac(salted, b"Server Key"), auth)
        return f"{without_proof},p={base64.b64encode(proof).decode()}", base64.b64encode(server_sig).decode()

    return gs2 + first_bare, final


async def _scram_login(raw, mech, gs2, password=PASSWORD):
    hash_name = "sha256" if "256" in mech else "sha1"
    first, final = _scram_messages(hash_name, local_of(ALICE), password, gs2, "rawnonce123456")
    raw.send(f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='{mech}'>"
             f"{base64.b64encode(first.encode()).decode()}</auth>")
    m = await raw.expect(r"<challenge\b[^>]*>([^<]*)</challenge>|<failure\b.*?</failure>")
    if m.group(0).startswith("<failure"):
        return m.group(0), None
    client_final, server_sig = final(base64.b64decode(m.group(1)).decode())
    raw.send(f"<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"
             f"{base64.b64encode(client_final.encode()).decode()}</response>")
    m = await raw.expect(r"<success\b[^>]*>([^<]*)</success>|<success\b[^>]*/>|<failure\b.*?</failure>")
    return m.group(0), (server_sig, m.group(1))


@pytest.mark.parametrize("mech", ["SCRAM-SHA-256", "SCRAM-SHA-1"])
async def test_scram_raw_mutual_auth(server, mech):
    raw = await RawClient(server.host, server.c2s_port).open()
    await raw.open_stream()
    await raw.starttls()
    await raw.open_stream()
    result, sigs = await _scram_login(raw, mech, "n,,")
    assert result.startswith("<success"), result
    expected, got = sigs
    assert base64.b64decode(got).decode() == f"v={expected}", "server signature does not verify"


async def test_scram_rejects_channel_binding_downgrade(server):
    """The client says it supports channel binding but believes the server
    does not ('y'), while the server did offer -PLUS: authentication fails."""
    raw = await RawClient(server.host, server.c2s_port).open()
    await raw.open_stream()
    await raw.starttls()
    feats = await raw.open_stream()
    assert ">SCRAM-SHA-256-PLUS<" in feats, feats
    result, _ = await _scram_login(raw, "SCRAM-SHA-256", "y,,")
    assert result.startswith("<failure"), f"downgrade accepted: {result}"


async def test_scram_wrong_password_raw(server):
    raw = await RawClient(server.host, server.c2s_port).open()
    await raw.open_stream()
    await raw.starttls()
    await raw.open_stream()
    result, _ = await _scram_login(raw, "SCRAM-SHA-256", "n,,", password="wrong")
    assert result.startswith("<failure") and "not-authorized" in result, result


async def test_plain_authzid_cannot_assume_another_account(pserver):
    raw = await RawClient(pserver.host, pserver.c2s_port).open()
    await raw.open_stream()
    token = base64.b64encode(f"{bare(BOB)}\0{local_of(ALICE)}\0{PASSWORD}".encode()).decode()
    raw.send(f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{token}</auth>")
    m = await raw.expect(r"<success\b.*?(/>|</success>)|<failure\b.*?</failure>")
    if m.group(0).startswith("<success"):
        await raw.open_stream()
        jid = await raw.bind("z")
        assert jid.startswith(bare(ALICE) + "/"), f"authorization identity {bare(BOB)} granted: bound {jid}"


async def test_bind_rejects_oversized_resource(pserver):
    raw = await RawClient(pserver.host, pserver.c2s_port).open()
    await raw.open_stream()
    assert (await raw.auth_plain(local_of(ALICE), PASSWORD)).startswith("<success")
    await raw.open_stream()
    raw.send(f"<iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
             f"<resource>{'r' * 2000}</resource></bind></iq>")
    m = await raw.expect(r"<iq\b[^>]*id=['\"]b1['\"].*?</iq>")
    assert "type='error'" in m.group(0) or 'type="error"' in m.group(0), m.group(0)
    assert await raw.bind("fine") == bare(ALICE) + "/fine"
