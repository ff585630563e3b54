"""XEP-0363 HTTP File Upload with slixmpp: the upload service is found
through service discovery, slots are requested over the stream, files go
up and come down over verified HTTPS (urllib with the server's
certificate), and the link travels in a message. With aiohttp installed,
slixmpp's own xep_0363 upload_file is exercised as well."""

import hashlib
import os
import socket
import ssl
import urllib.error
import urllib.request

import pytest
from slixmpp import ET

from support import ALICE, BOB, DOMAIN, Client, bare

UPLOAD = "urn:xmpp:http:upload:0"
JPEG = bytes.fromhex("ffd8ffe000104a46494600010100000100010000")
MP4 = bytes.fromhex("00000018667479706d703432000000006d70343269736f6d0000000866726565")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def media_server(make_server, tmp_path):
    port = free_port()
    cfg = {
        "listen": {"http": f"127.0.0.1:{port}"},
        "media": {"fast_dir": str(tmp_path / "ssd"), "bulk_dir": str(tmp_path / "sata"), "max_file_bytes": 4_000_000},
    }
    srv = make_server(cfg)
    srv.http_port = port
    srv.fast = tmp_path / "ssd"
    srv.bulk = tmp_path / "sata"
    return srv


def tls(srv) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(srv.data_dir / "tls" / "cert.pem"))


def http(srv, method: str, url: str, data: bytes | None = None, headers: dict | None = None):
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, context=tls(srv), timeout=20) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


async def request_slot(client: Client, name: str, size: int, ctype: str):
    iq = client.make_iq_get(ito=DOMAIN)
    req = ET.Element(f"{{{UPLOAD}}}request", filename=name, size=str(size))
    req.set("content-type", ctype)
    iq.append(req)
    reply = await iq.send(timeout=10)
    slot = reply.xml.find(f"{{{UPLOAD}}}slot")
    return slot.find(f"{{{UPLOAD}}}put").get("url"), slot.find(f"{{{UPLOAD}}}get").get("url")


def blob(root, data: bytes):
    h = hashlib.sha256(data).hexdigest()
    return root / h[0:2] / h[2:4] / h


async def test_discovery_slot_upload_message_and_download(media_server):
    srv = media_server
    a = Client(srv, ALICE, resource="phone")
    a.register_plugin("xep_0004")
    a.register_plugin("xep_0128")
    await a.login()
    b = await Client(srv, BOB, resource="phone").login()

    info = await a["xep_0030"].get_info(jid=DOMAIN, timeout=10)
    identities = info["disco_info"]["identities"]
    assert any(i[0] == "store" and i[1] == "file" for i in identities), identities
    assert UPLOAD in info["disco_info"]["features"]
    forms = [f["values"] for f in info["disco_info"].iterables if f["values"].get("FORM_TYPE") == [UPLOAD]]
    assert forms and int(forms[0]["max-file-size"]) == 4_000_000

    photo = JPEG + os.urandom(100 * 1024 - len(JPEG))
    video = MP4 + os.urandom(2_000_000 - len(MP4))
    links = []
    for name, data, ctype in (("photo.jpg", photo, "image/jpeg"), ("clip.mp4", video, "video/mp4")):
        put, get = await request_slot(a, name, len(data), ctype)
        assert put.startswith(f"https://{DOMAIN}:{srv.http_port}/media/"), put
        status, _, body = http(srv, "PUT", put, data, {"Content-Type": ctype})
        assert status == 201, body
        links.append(get)
    assert blob(srv.fast, photo).read_bytes() == photo
    assert blob(srv.bulk, video).read_bytes() == video

    a.send_message(mto=bare(BOB), mbody=" ".join(links), mtype="chat")
    m = await b.next_message()
    got = m["body"].split()
    assert got == links
    status, headers, body = http(srv, "GET", got[0])
    assert status == 200 and body == photo and headers["Content-Type"] == "image/jpeg"
    status, headers, body = http(srv, "GET", got[1], headers={"Range": "bytes=1000-1999"})
    assert status == 206 and body == video[1000:2000]
    assert headers["Content-Range"] == f"bytes 1000-1999/{len(video)}"


async def test_refusals(media_server):
    srv = media_server
    a = await Client(srv, ALICE).login()
    # Over the advertised limit: XEP-0363 file-too-large.
    iq = a.make_iq_get(ito=DOMAIN)
    req = ET.Element(f"{{{UPLOAD}}}request", filename="big.mp4", size="4000001")
    iq.append(req)
    with pytest.raises(Exception) as exc:
        await iq.send(timeout=10)
    err = getattr(exc.value, "iq", None)
    assert err is not None and err["error"]["condition"] == "not-acceptable"
    assert err.xml.find(f".//{{{UPLOAD}}}max-file-size").text == "4000000"

    data = JPEG + os.urandom(5000)
    put, get = await request_slot(a, "x.jpg", len(data), "image/jpeg")
    # Tampered signature, wrong type, wrong size.
    status, _, body = http(srv, "PUT", put[:-2] + ("AA" if not put.endswith("AA") else "BB"), data, {"Content-Type": "image/jpeg"})
    assert status == 403 and b"signature" in body
    png = bytes.fromhex("89504e470d0a1a0a0000000d49484452") + os.urandom(len(data) - 16)
    status, _, body = http(srv, "PUT", put, png, {"Content-Type": "image/jpeg"})
    assert status == 415 and b"image/png" in body
    status, _, _ = http(srv, "PUT", put, data + b"x", {"Content-Type": "image/jpeg"})
    assert status == 413
    assert not any(p.is_file() for p in srv.fast.rglob("*"))
    status, _, _ = http(srv, "GET", get)
    assert status == 404
    # The slot still works after the refusals, once.
    assert http(srv, "PUT", put, data, {"Content-Type": "image/jpeg"})[0] == 201
    assert http(srv, "PUT", put, data, {"Content-Type": "image/jpeg"})[0] == 409


async def test_slixmpp_upload_file(make_server, tmp_path):
    pytest.importorskip("aiohttp")
    # slixmpp's uploader offers no way to trust a self-signed certificate,
    # so this server hands out plain-HTTP URLs (loopback with
    # --allow-plaintext only).
    port = free_port()
    srv = make_server({"listen": {"http": f"127.0.0.1:{port}"},
                       "media": {"public_url": f"http://localhost:{port}"}}, plaintext=True)
    a = Client(srv, ALICE)
    a.register_plugin("xep_0363")
    await a.login()
    f = tmp_path / "voice.ogg"
    f.write_bytes(b"OggS\x00\x02" + os.urandom(30_000))
    url = await a["xep_0363"].upload_file(f, content_type="audio/ogg", timeout=20)
    assert url.startswith(f"http://localhost:{port}/media/")
    with urllib.request.urlopen(url, timeout=20) as r:
        assert r.status == 200 and r.read() == f.read_bytes() and r.headers["Content-Type"] == "audio/ogg"
    # The limit came from the service's disco form.
    assert a["xep_0363"].max_file_size == 100 * 1024 * 1024
