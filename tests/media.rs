//! Media over HTTPS (XEP-0363) end to end: the real `chatd` binary, a raw
//! XMPP client asking for slots, and curl (over verified HTTPS) or raw
//! sockets (plain HTTP on loopback) for the transfers.
//!
//! Covered: disco advertisement, tier placement, sending the link and the
//! recipient's download, de-duplication and reference counting, Range
//! and conditional downloads, size limits and quota, signatures (tampered,
//! expired, reused), path traversal, type mismatch, slowloris uploads,
//! the reaper, and split chat/media roles.

use std::io::{BufRead, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use chatd::protocol::{Element, Frame, Framer};
use rand::RngCore;
use sha2::{Digest, Sha256};

const UPLOAD_NS: &str = "urn:xmpp:http:upload:0";
const ALICE: &str = "15550000001";
const BOB: &str = "15550000002";

static SEQ: AtomicU64 = AtomicU64::new(0);

fn unique(name: &str) -> PathBuf {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("chatd-media-{name}-{}-{n}", std::process::id()))
}

/// Aborts the test process if a test runs past its bound.
struct Watchdog(std::sync::mpsc::Sender<()>);

fn watchdog(secs: u64, name: &'static str) -> Watchdog {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(Duration::from_secs(secs)) {
            eprintln!("test {name} exceeded {secs}s");
            std::process::abort();
        }
    });
    Watchdog(tx)
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

struct Node {
    child: Child,
    dir: PathBuf,
    c2s: u16,
    http: u16,
}

impl Node {
    /// Starts `chatd serve` with `config` appended to a fresh file, the
    /// default listeners on loopback port 0, plus `args`.
    fn start(name: &str, config: &str, args: &[&str]) -> Node {
        Node::start_in(unique(name), config, args)
    }

    fn start_in(dir: PathBuf, config: &str, args: &[&str]) -> Node {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("chatd.toml");
        std::fs::write(&cfg, config).unwrap();
        for phone in [ALICE, BOB] {
            let st = Command::new(env!("CARGO_BIN_EXE_chatd"))
                .args(["user", "add", &format!("+{phone}"), "--password", "pw", "--config"])
                .arg(&cfg)
                .arg("--data-dir")
                .arg(dir.join("data"))
                .env("CHATD_LOG", "warn")
                .stdout(Stdio::null())
                .status()
                .unwrap();
            assert!(st.success());
        }
        Node::launch(dir, args)
    }

    /// Runs `chatd serve` on an existing node directory (a restart keeps
    /// its data).
    fn launch(dir: PathBuf, args: &[&str]) -> Node {
        let cfg = dir.join("chatd.toml");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_chatd"));
        cmd.args(["serve", "--config"]).arg(&cfg).arg("--data-dir").arg(dir.join("data"));
        let mut all: Vec<&str> = vec!["--allow-plaintext"];
        for (flag, value) in
            [("--domain", "localhost"), ("--c2s", "127.0.0.1:0"), ("--c2s-tls", ""), ("--http", "127.0.0.1:0")]
        {
            if !args.contains(&flag) {
                all.extend([flag, value]);
            }
        }
        all.extend_from_slice(args);
        let mut child = cmd
            .args(&all)
            .env("CHATD_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start chatd");
        let want_c2s = !args.contains(&"media");
        let want_http = !args.windows(2).any(|w| w == ["--http", ""]);
        let out = child.stdout.take().expect("stdout");
        let mut lines = std::io::BufReader::new(out).lines();
        let (mut c2s, mut http) = (0u16, 0u16);
        let port = |a: &str| -> u16 { a.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port") };
        for line in lines.by_ref() {
            let line = line.expect("stdout");
            if let Some(a) = line.strip_prefix("listening c2s ") {
                c2s = port(a);
            } else if let Some(a) = line.strip_prefix("listening http ") {
                http = port(a);
            }
            if (c2s != 0 || !want_c2s) && (http != 0 || !want_http) {
                break;
            }
        }
        assert!((c2s != 0) == want_c2s && (http != 0) == want_http, "listening lines missing");
        std::thread::spawn(move || for _ in lines {});
        Node { child, dir, c2s, http }
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// kill -9, then start again on the same data.
    fn restart(mut self, args: &[&str]) -> Node {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let dir = std::mem::take(&mut self.dir);
        drop(self);
        Node::launch(dir, args)
    }

    fn cert(&self) -> PathBuf {
        self.data().join("tls").join("cert.pem")
    }

    fn fast(&self) -> PathBuf {
        self.data().join("media").join("fast")
    }

    fn bulk(&self) -> PathBuf {
        self.data().join("media").join("bulk")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Every regular file under `dir` (recursively).
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

fn hex_sha(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// A raw XMPP client over plaintext loopback (PLAIN auth).
struct Xmpp {
    sock: TcpStream,
    framer: Framer,
    ids: u64,
}

impl Xmpp {
    fn login(port: u16, local: &str) -> Xmpp {
        let sock = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut c = Xmpp { sock, framer: Framer::new(1 << 20), ids: 0 };
        let hdr = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>";
        c.send(hdr);
        c.frame();
        c.frame();
        let cred = base64::engine::general_purpose::STANDARD.encode(format!("\0{local}\0pw"));
        c.send(&format!("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{cred}</auth>"));
        match c.frame() {
            Frame::Stanza(e) if e.local_name() == "success" => {}
            other => panic!("auth failed: {other:?}"),
        }
        c.framer.reset();
        c.send(hdr);
        c.frame();
        c.frame();
        let r = c.iq("<iq type='set' id='ID'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>phone</resource></bind></iq>");
        assert_eq!(r.attr("type"), Some("result"));
        c.send("<presence/>");
        c
    }

    fn send(&mut self, s: &str) {
        self.sock.write_all(s.as_bytes()).expect("write");
    }

    fn frame(&mut self) -> Frame {
        loop {
            match self.framer.next_frame() {
                Ok(Some(f)) => return f,
                Ok(None) => {}
                Err(e) => panic!("framing: {e}"),
            }
            let mut buf = [0u8; 16384];
            let n = self.sock.read(&mut buf).expect("read (timed out?)");
            assert!(n > 0, "server closed the stream");
            self.framer.feed(&buf[..n]);
        }
    }

    /// Next stanza for which `pred` holds; others are skipped.
    fn expect(&mut self, pred: impl Fn(&Element) -> bool) -> Element {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Frame::Stanza(e) = self.frame() {
                if pred(&e) {
                    return e;
                }
                if e.local_name() == "iq" && e.attr("type") == Some("get") {
                    let id = e.attr("id").unwrap_or("").to_string();
                    self.send(&format!("<iq type='result' id='{id}' to='localhost'/>"));
                }
            }
        }
        panic!("no matching stanza");
    }

    /// Sends an iq (`ID` in it is replaced by a fresh id) and returns the
    /// reply.
    fn iq(&mut self, xml: &str) -> Element {
        self.ids += 1;
        let id = format!("q{}", self.ids);
        self.send(&xml.replace("'ID'", &format!("'{id}'")));
        self.expect(|e| e.local_name() == "iq" && e.attr("id") == Some(id.as_str()))
    }

    /// Requests an upload slot: `Ok((put, get))` or the error reply.
    fn slot(&mut self, name: &str, size: usize, ctype: &str) -> Result<(String, String), Element> {
        let r = self.iq(&format!(
            "<iq type='get' id='ID' to='localhost'><request xmlns='{UPLOAD_NS}' filename='{}' size='{size}' content-type='{ctype}'/></iq>",
            chatd::protocol::element::escape(name)
        ));
        if r.attr("type") != Some("result") {
            return Err(r);
        }
        let slot = r.child("slot", UPLOAD_NS).expect("slot");
        let url = |n: &str| {
            slot.elements().find(|e| e.local_name() == n).and_then(|e| e.attr("url")).expect("url").to_string()
        };
        Ok((url("put"), url("get")))
    }
}

struct Resp {
    status: u16,
    headers: String,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Runs curl with the node's certificate as the only trusted CA.
fn curl(node: &Node, args: &[&str]) -> Resp {
    let base = unique("curl");
    let (h, b) = (base.with_extension("h"), base.with_extension("b"));
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "30", "--cacert"])
        .arg(node.cert())
        .arg("-D")
        .arg(&h)
        .arg("-o")
        .arg(&b)
        .args(["-w", "%{http_code}"])
        .args(args)
        .output()
        .expect("curl");
    let status = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0);
    let headers = std::fs::read_to_string(&h).unwrap_or_default();
    let body = std::fs::read(&b).unwrap_or_default();
    let _ = std::fs::remove_file(&h);
    let _ = std::fs::remove_file(&b);
    assert!(status != 0, "curl failed: {}", String::from_utf8_lossy(&out.stderr));
    Resp { status, headers, body }
}

fn put(node: &Node, url: &str, data: &[u8], ctype: &str) -> Resp {
    put_with(node, url, data, ctype, "--http1.1")
}

/// PUT with curl; `version` is `--http1.1` or `--http2`.
fn put_with(node: &Node, url: &str, data: &[u8], ctype: &str, version: &str) -> Resp {
    let f = unique("upload");
    std::fs::write(&f, data).unwrap();
    let r = curl(
        node,
        &[
            version,
            "-X",
            "PUT",
            "-H",
            &format!("Content-Type: {ctype}"),
            "--data-binary",
            &format!("@{}", f.display()),
            url,
        ],
    );
    let _ = std::fs::remove_file(&f);
    r
}

fn get(node: &Node, url: &str, extra: &[&str]) -> Resp {
    let mut args = extra.to_vec();
    args.push(url);
    curl(node, &args)
}

/// Plain HTTP on loopback: writes `head`, then `body` pieces with
/// `pause` between them; returns the status and the raw response.
fn raw_http(port: u16, head: &str, body: &[&[u8]], pause: Duration, wait: Duration) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(wait)).unwrap();
    let _ = s.write_all(head.as_bytes());
    for piece in body {
        std::thread::sleep(pause);
        if s.write_all(piece).is_err() {
            break;
        }
    }
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if out.windows(4).any(|w| w == b"\r\n\r\n") && out.len() > 12 {
                    // Enough for the status line and the message.
                    std::thread::sleep(Duration::from_millis(50));
                    if let Ok(n) = s.read(&mut buf) {
                        out.extend_from_slice(&buf[..n]);
                    }
                    break;
                }
            }
        }
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text)
}

/// Path and query of a slot URL, for raw requests.
fn path_of(url: &str) -> String {
    let rest = url.split_once("://").map(|x| x.1).unwrap_or(url);
    rest.find('/').map(|i| rest[i..].to_string()).unwrap_or_default()
}

fn random(prefix: &[u8], len: usize) -> Vec<u8> {
    let mut v = prefix.to_vec();
    let mut tail = vec![0u8; len - prefix.len()];
    rand::thread_rng().fill_bytes(&mut tail);
    v.extend_from_slice(&tail);
    v
}

const JPEG: &[u8] = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00";
const PNG: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x10\0\0\0\x10\x08\x06\0\0\0";
const MP4: &[u8] = b"\0\0\0\x18ftypmp42\0\0\0\0mp42isom\0\0\0\x08free";

fn config(media: &str) -> String {
    format!("[media]\n{media}\n")
}

#[test]
fn photo_and_video_reach_their_tiers_and_the_recipient() {
    let _w = watchdog(120, "photo_and_video");
    let root = unique("tiers");
    let (fast, bulk) = (root.join("ssd"), root.join("sata"));
    let node = Node::start_in(
        root.join("node"),
        &config(&format!("fast_dir = {:?}\nbulk_dir = {:?}\n", fast.display().to_string(), bulk.display().to_string())),
        &[],
    );
    let mut alice = Xmpp::login(node.c2s, ALICE);

    // The server advertises the service with its size limit.
    let info =
        alice.iq("<iq type='get' id='ID' to='localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>");
    let q = info.first_element().expect("query");
    assert!(q.elements().any(|e| e.local_name() == "identity"
        && e.attr("category") == Some("store")
        && e.attr("type") == Some("file")));
    assert!(q.elements().any(|e| e.local_name() == "feature" && e.attr("var") == Some(UPLOAD_NS)));
    let xml = info.to_xml();
    assert!(xml.contains("max-file-size") && xml.contains("104857600"), "{xml}");

    let photo = random(JPEG, 100 * 1024);
    let video = random(MP4, 3 * 1024 * 1024);
    let (put_p, get_p) = alice.slot("holiday photo.jpg", photo.len(), "image/jpeg").expect("photo slot");
    let (put_v, get_v) = alice.slot("clip.mp4", video.len(), "video/mp4").expect("video slot");
    assert!(put_p.starts_with(&format!("https://localhost:{}/media/", node.http)), "{put_p}");
    assert!(get_p.ends_with("/holiday%20photo.jpg") && put_p.starts_with(&get_p));
    assert_ne!(get_p, get_v);

    // Nothing to download before the upload.
    assert_eq!(get(&node, &get_p, &[]).status, 404);
    let r = put(&node, &put_p, &photo, "image/jpeg");
    assert_eq!(r.status, 201, "{}", r.text());
    let r = put_with(&node, &put_v, &video, "video/mp4", "--http2");
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(r.headers.starts_with("HTTP/2"), "{}", r.headers);

    // Each file lands in its tier, named by its SHA-256 in hashed
    // subdirectories; nothing is left in the temporary directories.
    let hp = hex_sha(&photo);
    let hv = hex_sha(&video);
    let fast_blob = fast.join(&hp[0..2]).join(&hp[2..4]).join(&hp);
    let bulk_blob = bulk.join(&hv[0..2]).join(&hv[2..4]).join(&hv);
    assert_eq!(std::fs::read(&fast_blob).expect("photo on the fast tier"), photo);
    assert_eq!(std::fs::read(&bulk_blob).expect("video on the bulk tier"), video);
    assert_eq!(files(&fast), vec![fast_blob]);
    assert_eq!(files(&bulk), vec![bulk_blob]);

    // Alice sends the links; Bob receives them and downloads both.
    alice.send(&format!(
        "<message type='chat' to='{BOB}@localhost' id='m1'><body>{} {}</body><x xmlns='jabber:x:oob'><url>{}</url></x></message>",
        get_p.replace('&', "&amp;"),
        get_v.replace('&', "&amp;"),
        get_p.replace('&', "&amp;")
    ));
    let mut bob = Xmpp::login(node.c2s, BOB);
    let m = bob.expect(|e| e.local_name() == "message" && e.attr("id") == Some("m1"));
    let body = m.elements().find(|e| e.local_name() == "body").map(|b| b.text()).unwrap_or_default();
    let links: Vec<&str> = body.split_whitespace().collect();
    assert_eq!(links, vec![get_p.as_str(), get_v.as_str()]);
    let r = get(&node, links[0], &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.body, photo);
    assert_eq!(r.header("content-type").as_deref(), Some("image/jpeg"));
    assert_eq!(r.header("etag"), Some(format!("\"{hp}\"")));
    assert!(r.header("cache-control").unwrap_or_default().contains("max-age"));
    assert!(r.header("content-disposition").unwrap_or_default().starts_with("inline"));
    let r = get(&node, links[1], &["--http2"]);
    assert_eq!(r.status, 200);
    assert!(r.headers.starts_with("HTTP/2"), "{}", r.headers);
    assert_eq!(r.header("content-type").as_deref(), Some("video/mp4"));
    assert!(r.body == video);
    // Downloads need the exact name, and unknown ids are 404.
    assert_eq!(get(&node, &get_p.replace("photo.jpg", "photo.png"), &[]).status, 404);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn duplicates_are_stored_once_and_reference_counted() {
    let _w = watchdog(90, "dedupe");
    let node = Node::start("dedupe", "", &[]);
    let mut alice = Xmpp::login(node.c2s, ALICE);
    let mut bob = Xmpp::login(node.c2s, BOB);
    let data = random(PNG, 50_000);
    let (put1, get1) = alice.slot("a.png", data.len(), "image/png").unwrap();
    let (put2, get2) = bob.slot("forwarded.png", data.len(), "image/png").unwrap();
    assert_eq!(put(&node, &put1, &data, "image/png").status, 201);
    assert_eq!(put(&node, &put2, &data, "image/png").status, 201);
    let blobs: Vec<PathBuf> =
        files(&node.fast()).into_iter().filter(|p| !p.starts_with(node.fast().join("tmp"))).collect();
    assert_eq!(blobs.len(), 1, "{blobs:?}");
    assert_eq!(get(&node, &get1, &[]).body, data);
    assert_eq!(get(&node, &get2, &[]).body, data);

    // The uploader withdraws one link with its signed URL: the content
    // stays for the other reference, then goes with the last one.
    assert_eq!(curl(&node, &["-X", "DELETE", &put1]).status, 204);
    assert_eq!(get(&node, &get1, &[]).status, 404);
    assert_eq!(get(&node, &get2, &[]).body, data);
    assert!(blobs[0].is_file());
    // Someone else's URL cannot delete: a signature for another account.
    let forged = put2.replace(&format!("acct={BOB}"), &format!("acct={ALICE}"));
    assert_eq!(curl(&node, &["-X", "DELETE", &forged]).status, 403);
    assert_eq!(curl(&node, &["-X", "DELETE", &put2]).status, 204);
    assert_eq!(get(&node, &get2, &[]).status, 404);
    assert!(!blobs[0].exists());
    assert_eq!(curl(&node, &["-X", "DELETE", &put2]).status, 404);
}

#[test]
fn range_and_conditional_downloads() {
    let _w = watchdog(90, "ranges");
    let node = Node::start("ranges", "", &[]);
    let mut alice = Xmpp::login(node.c2s, ALICE);
    let data = random(MP4, 1_000_000);
    let (p, g) = alice.slot("v.mp4", data.len(), "video/mp4").unwrap();
    assert_eq!(put(&node, &p, &data, "video/mp4").status, 201);

    let r = get(&node, &g, &["-r", "100-199"]);
    assert_eq!(r.status, 206);
    assert_eq!(r.body, data[100..200]);
    assert_eq!(r.header("content-range").as_deref(), Some("bytes 100-199/1000000"));
    assert_eq!(r.header("content-length").as_deref(), Some("100"));

    let r = get(&node, &g, &["-H", "Range: bytes=-10"]);
    assert_eq!(r.status, 206);
    assert_eq!(r.body, data[999_990..]);

    let r = get(&node, &g, &["-H", "Range: bytes=999000-"]);
    assert_eq!(r.status, 206);
    assert_eq!(r.body, data[999_000..]);

    let r = get(&node, &g, &["-H", "Range: bytes=0-3,500000-500003"]);
    assert_eq!(r.status, 206);
    let ct = r.header("content-type").unwrap_or_default();
    assert!(ct.starts_with("multipart/byteranges; boundary="), "{ct}");
    let text = String::from_utf8_lossy(&r.body).into_owned();
    assert!(
        text.contains("Content-Range: bytes 0-3/1000000")
            && text.contains("Content-Range: bytes 500000-500003/1000000")
    );

    let r = get(&node, &g, &["-H", "Range: bytes=2000000-"]);
    assert_eq!(r.status, 416);
    assert_eq!(r.header("content-range").as_deref(), Some("bytes */1000000"));

    // A range for a changed file (If-Range mismatch) gets the whole file.
    let r = get(&node, &g, &["-H", "Range: bytes=0-9", "-H", "If-Range: \"other\""]);
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), data.len());

    let etag = format!("\"{}\"", hex_sha(&data));
    let r = get(&node, &g, &["-H", &format!("If-None-Match: {etag}")]);
    assert_eq!(r.status, 304);
    assert!(r.body.is_empty());
    assert_eq!(r.header("etag"), Some(etag));

    let r = get(&node, &g, &["-I"]);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length").as_deref(), Some("1000000"));
    assert_eq!(r.header("accept-ranges").as_deref(), Some("bytes"));
}

#[test]
fn size_limits_and_quota() {
    let _w = watchdog(90, "limits");
    let node = Node::start("limits", &config("max_file_bytes = 200000\nquota_bytes = 300000"), &[]);
    let mut alice = Xmpp::login(node.c2s, ALICE);

    // Over the limit at slot time: XEP-0363 file-too-large with the limit.
    let e = alice.slot("big.mp4", 200_001, "video/mp4").unwrap_err();
    let xml = e.to_xml();
    assert!(
        xml.contains("not-acceptable")
            && xml.contains("file-too-large")
            && xml.contains("<max-file-size>200000</max-file-size>"),
        "{xml}"
    );
    let e = alice.slot("", 10, "image/png").unwrap_err();
    assert!(e.to_xml().contains("bad-request"));
    let e = alice.slot("x.png", 0, "image/png").unwrap_err();
    assert!(e.to_xml().contains("bad-request"));

    // Content-Length above the slot's size: 413 before the body is read.
    let data = random(PNG, 150_000);
    let (p, _) = alice.slot("a.png", 100_000, "image/png").unwrap();
    let r = put(&node, &p, &data, "image/png");
    assert_eq!(r.status, 413, "{}", r.text());
    // Below it: 400.
    let r = put(&node, &p, &data[..50_000], "image/png");
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("does not match the slot's size"));
    // Declared type different from the slot's: 400.
    let r = put(&node, &p, &data[..100_000], "image/jpeg");
    assert_eq!(r.status, 400);
    // No Content-Length (chunked): 411.
    let path = path_of(&p);
    let (st, text) = raw_http(
        node.http,
        &format!("PUT {path} HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"),
        &[b"5\r\nhello\r\n0\r\n\r\n"],
        Duration::from_millis(10),
        Duration::from_secs(5),
    );
    assert_eq!(st, 411, "{text}");

    // Quota: 300000 bytes per account. Two 150000-byte files fit.
    let (p1, _) = alice.slot("1.png", 150_000, "image/png").unwrap();
    let (p2, _) = alice.slot("2.png", 150_000, "image/png").unwrap();
    let (p3, _) = alice.slot("3.png", 150_000, "image/png").unwrap();
    assert_eq!(put(&node, &p1, &random(PNG, 150_000), "image/png").status, 201);
    assert_eq!(put(&node, &p2, &random(PNG, 150_000), "image/png").status, 201);
    let r = put(&node, &p3, &random(PNG, 150_000), "image/png");
    assert_eq!(r.status, 413);
    assert!(r.text().contains("quota"), "{}", r.text());
    // And further slots are refused up front.
    let e = alice.slot("4.png", 10, "image/png").unwrap_err();
    assert!(e.to_xml().contains("resource-constraint"), "{}", e.to_xml());
    // Bob's quota is his own.
    let mut bob = Xmpp::login(node.c2s, BOB);
    assert!(bob.slot("b.png", 150_000, "image/png").is_ok());
    assert!(files(&node.fast().join("tmp")).is_empty());
}

#[test]
fn signatures_expiry_and_reuse() {
    let _w = watchdog(90, "signatures");
    let node = Node::start("sigs", &config("slot_ttl_secs = 2"), &[]);
    let mut alice = Xmpp::login(node.c2s, ALICE);
    let data = random(JPEG, 20_000);
    let (p, g) = alice.slot("s.jpg", data.len(), "image/jpeg").unwrap();

    let sig_at = p.find("sig=").unwrap() + 4;
    let mut bad = p.clone().into_bytes();
    bad[sig_at] = if bad[sig_at] == b'A' { b'B' } else { b'A' };
    let bad = String::from_utf8(bad).unwrap();
    let cases = [
        (bad, "invalid signature"),
        (p.replace(&format!("acct={ALICE}"), &format!("acct={BOB}")), "invalid signature"),
        (p.replace("size=20000", "size=20001"), "invalid signature"),
        (p.replace("s.jpg?", "t.jpg?"), "invalid signature"),
        (g.clone(), "not a valid upload URL"),
    ];
    for (url, why) in cases {
        let r = put(&node, &url, &data, "image/jpeg");
        assert_eq!(r.status, 403, "{url}: {}", r.text());
        assert!(r.text().contains(why), "{}", r.text());
    }
    assert!(files(&node.fast()).is_empty());

    assert_eq!(put(&node, &p, &data, "image/jpeg").status, 201);
    // A slot is used once.
    let r = put(&node, &p, &data, "image/jpeg");
    assert_eq!(r.status, 409, "{}", r.text());

    // Expiry.
    let (p2, _) = alice.slot("late.jpg", data.len(), "image/jpeg").unwrap();
    std::thread::sleep(Duration::from_millis(3200));
    let r = put(&node, &p2, &data, "image/jpeg");
    assert_eq!(r.status, 403);
    assert!(r.text().contains("expired"), "{}", r.text());
}

#[test]
fn path_traversal_is_impossible() {
    let _w = watchdog(60, "traversal");
    let node = Node::start("traversal", "", &[]);
    let secret = node.dir.join("secret.txt");
    std::fs::write(&secret, "top secret").unwrap();
    let mut alice = Xmpp::login(node.c2s, ALICE);
    let base = format!("https://localhost:{}", node.http);
    for path in [
        "/media/../../secret.txt",
        "/media/%2e%2e/%2e%2e%2fsecret.txt",
        "/media/..%2f..%2f..%2fsecret.txt/x",
        "/media/AAAAAAAAAAAAAAAAAAAAAA/..%2f..%2f..%2fsecret.txt",
        "/media/AAAAAAAAAAAAAAAAAAAAAA/%00",
        "/../../../../etc/passwd",
    ] {
        let r = curl(&node, &["--path-as-is", &format!("{base}{path}")]);
        assert!(matches!(r.status, 400 | 404), "{path}: {}", r.status);
        assert!(!r.text().contains("top secret") && !r.text().contains("root:"));
        let r = curl(
            &node,
            &[
                "--http1.1",
                "--path-as-is",
                "-X",
                "PUT",
                "--data-binary",
                "x",
                &format!("{base}{path}?exp=9999999999&size=1&type=text%2Fplain&acct=1&sig=AAAA"),
            ],
        );
        assert!(matches!(r.status, 400 | 403 | 404), "{path}: {}", r.status);
    }
    // A file name with directories is reduced to its last component.
    let data = b"just text".to_vec();
    let (p, g) = alice.slot("../../../../tmp/evil.txt", data.len(), "text/plain").unwrap();
    assert!(g.ends_with("/evil.txt"), "{g}");
    assert_eq!(put(&node, &p, &data, "text/plain").status, 201);
    let r = get(&node, &g, &[]);
    assert_eq!(r.body, data);
    assert!(r.header("content-disposition").unwrap_or_default().starts_with("attachment"));
    assert_eq!(files(&node.bulk()).len(), 1);
}

#[test]
fn declared_type_must_match_the_content() {
    let _w = watchdog(60, "mismatch");
    let node = Node::start("mismatch", "", &[]);
    let mut alice = Xmpp::login(node.c2s, ALICE);
    for (declared, content, name) in [
        ("image/jpeg", random(PNG, 30_000), "a.jpg"),
        ("video/mp4", random(JPEG, 30_000), "b.mp4"),
        ("image/png", b"<svg onload=alert(1)>".to_vec(), "c.png"),
        ("text/plain", random(MP4, 30_000), "d.txt"),
    ] {
        let (p, g) = alice.slot(name, content.len(), declared).unwrap();
        let r = put(&node, &p, &content, declared);
        assert_eq!(r.status, 415, "{declared}: {}", r.text());
        assert!(r.text().contains(&format!("declares {declared}")), "{}", r.text());
        assert_eq!(get(&node, &g, &[]).status, 404);
    }
    assert!(files(&node.fast()).is_empty(), "{:?}", files(&node.fast()));
    assert!(files(&node.bulk()).is_empty(), "{:?}", files(&node.bulk()));
    // Any content may be sent as application/octet-stream.
    let data = random(PNG, 1000);
    let (p, _) = alice.slot("blob.bin", data.len(), "application/octet-stream").unwrap();
    assert_eq!(put(&node, &p, &data, "application/octet-stream").status, 201);
    assert_eq!(files(&node.bulk()).len(), 1);
}

#[test]
fn slow_uploads_are_cut_off_and_cleaned_up() {
    let _w = watchdog(90, "slowloris");
    let node = Node::start(
        "slowloris",
        &format!(
            "{}[http]\nheader_timeout_secs = 2\n",
            config("idle_timeout_secs = 2\nmin_rate_bytes = 2000\nrate_grace_secs = 1")
        ),
        &[],
    );
    let mut alice = Xmpp::login(node.c2s, ALICE);

    // Stalls after the first bytes: 408 after the idle timeout.
    let (p, g) = alice.slot("stall.png", 10_000, "image/png").unwrap();
    let head = format!(
        "PUT {} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10000\r\nContent-Type: image/png\r\n\r\n",
        path_of(&p)
    );
    let t = Instant::now();
    let first = random(PNG, 8192);
    let (st, text) = raw_http(node.http, &head, &[&first], Duration::from_millis(10), Duration::from_secs(10));
    assert_eq!(st, 408, "{text}");
    assert!(text.contains("no data"), "{text}");
    assert!(t.elapsed() < Duration::from_secs(6));

    // Trickles: 20 bytes every 100 ms (200 B/s) is under the minimum rate
    // once the grace second is over.
    let (p, _) = alice.slot("trickle.png", 10_000, "image/png").unwrap();
    let head = format!(
        "PUT {} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10000\r\nContent-Type: image/png\r\n\r\n",
        path_of(&p)
    );
    let mut pieces: Vec<Vec<u8>> = vec![PNG.to_vec()];
    pieces.extend((0..60).map(|_| vec![0u8; 20]));
    let refs: Vec<&[u8]> = pieces.iter().map(|v| v.as_slice()).collect();
    let t = Instant::now();
    let (st, text) = raw_http(node.http, &head, &refs, Duration::from_millis(100), Duration::from_secs(10));
    assert_eq!(st, 408, "{text}");
    assert!(text.contains("too slow"), "{text}");
    assert!(t.elapsed() < Duration::from_secs(8));

    // Nothing of either upload is left, and the slot is still unused.
    std::thread::sleep(Duration::from_millis(200));
    assert!(files(&node.fast()).is_empty(), "{:?}", files(&node.fast()));
    assert_eq!(get(&node, &g, &[]).status, 404);

    // Headers that never finish: the connection is dropped.
    let t = Instant::now();
    let (st, _) =
        raw_http(node.http, "GET /media/x", &[b"/y HTTP/1.1\r\n"], Duration::from_millis(100), Duration::from_secs(8));
    assert!(st == 0 || st == 408, "{st}");
    assert!(t.elapsed() < Duration::from_secs(6));

    // A client that disconnects mid-upload leaves nothing behind.
    let (p, _) = alice.slot("cut.png", 100_000, "image/png").unwrap();
    {
        let mut s = TcpStream::connect(("127.0.0.1", node.http)).unwrap();
        let head = format!("PUT {} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000\r\n\r\n", path_of(&p));
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(&random(PNG, 50_000)).unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(files(&node.fast()).is_empty(), "{:?}", files(&node.fast()));
}

#[test]
fn reaper_deletes_expired_media() {
    let _w = watchdog(90, "reaper");
    // 0.00003 days is about 2.6 seconds.
    let node = Node::start("reaper", &config("expiry_days = 0.00003\nreap_interval_secs = 1"), &[]);
    let mut alice = Xmpp::login(node.c2s, ALICE);
    let data = random(MP4, 100_000);
    let (p, g) = alice.slot("old.mp4", data.len(), "video/mp4").unwrap();
    assert_eq!(put(&node, &p, &data, "video/mp4").status, 201);
    assert_eq!(files(&node.bulk()).len(), 1);
    assert_eq!(get(&node, &g, &[]).status, 200);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !files(&node.bulk()).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(files(&node.bulk()).is_empty(), "expired media still on disk");
    assert_eq!(get(&node, &g, &[]).status, 404);
    // The account's quota is released too: a new upload fits again.
    assert!(alice.slot("new.mp4", 100, "video/mp4").is_ok());
}

#[test]
fn chat_and_media_roles_run_apart() {
    let _w = watchdog(90, "roles");
    let secret = "slot-secret-shared-by-both-nodes";
    let cfg = config(&format!("slot_secret = {secret:?}"));
    let media1 = Node::start("role-media1", &cfg, &["--role", "media"]);
    let media2 = Node::start("role-media2", &cfg, &["--role", "media"]);
    let (pub1, pub2) = (format!("https://localhost:{}", media1.http), format!("https://localhost:{}", media2.http));
    let chat = Node::start(
        "role-chat",
        &config(&format!("slot_secret = {secret:?}\npublic_url = \"{pub1} {pub2}/\"")),
        &["--role", "chat", "--http", ""],
    );
    let mut alice = Xmpp::login(chat.c2s, ALICE);
    let info =
        alice.iq("<iq type='get' id='ID' to='localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>");
    assert!(info.to_xml().contains(UPLOAD_NS));
    // Slots are spread over both media nodes; each stores what it got.
    let mut seen = (0, 0);
    for i in 0..16 {
        let data = random(JPEG, 10_000 + i);
        let (p, g) = alice.slot("x.jpg", data.len(), "image/jpeg").unwrap();
        let node = if p.starts_with(&format!("{pub1}/")) {
            seen.0 += 1;
            &media1
        } else {
            assert!(p.starts_with(&format!("{pub2}/media/")), "{p}");
            seen.1 += 1;
            &media2
        };
        assert_eq!(put(node, &p, &data, "image/jpeg").status, 201);
        assert_eq!(get(node, &g, &[]).body, data);
    }
    assert!(seen.0 > 0 && seen.1 > 0, "{seen:?}");
    assert_eq!(files(&media1.fast()).len() + files(&media2.fast()).len(), 16);
    // The chat node stores no media.
    assert!(!chat.data().join("media").join("fast").exists());
    // A media node speaks no XMPP.
    assert_eq!(media1.c2s, 0);
}

#[test]
fn a_slot_works_once_for_life() {
    let _w = watchdog(90, "once");
    let node = Node::start("once", "", &[]);
    let mut alice = Xmpp::login(node.c2s, ALICE);
    let data = random(JPEG, 20_000);
    let (p, g) = alice.slot("a.jpg", data.len(), "image/jpeg").unwrap();
    assert_eq!(put(&node, &p, &data, "image/jpeg").status, 201);
    assert_eq!(get(&node, &g, &[]).body, data);
    // Stored private to the server's user: the blob 0600, its ab/cd/ 0700.
    {
        use std::os::unix::fs::PermissionsExt;
        let blob = files(&node.fast()).pop().expect("blob");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&blob), 0o600, "{}", blob.display());
        assert_eq!(mode(blob.parent().unwrap()), 0o700);
        assert_eq!(mode(blob.parent().unwrap().parent().unwrap()), 0o700);
    }
    let r = curl(&node, &["-X", "DELETE", &p]);
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(get(&node, &g, &[]).status, 404);
    // The link already shared must not start serving other bytes.
    let other = random(JPEG, 20_000);
    let r = put(&node, &p, &other, "image/jpeg");
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(get(&node, &g, &[]).status, 404);
    // Durably: not even after a kill -9 and restart.
    let old_port = node.http;
    let node = node.restart(&[]);
    let moved = |u: &str| u.replace(&format!(":{old_port}/"), &format!(":{}/", node.http));
    let (p, g) = (moved(&p), moved(&g));
    let r = put(&node, &p, &other, "image/jpeg");
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(get(&node, &g, &[]).status, 404);
    assert!(files(&node.fast()).is_empty(), "{:?}", files(&node.fast()));
}

/// Starts an upload of `total` bytes and sends the first `sent` of them,
/// leaving it in flight; `finish` sends the rest and returns the status.
struct InFlight {
    sock: TcpStream,
    data: Vec<u8>,
    sent: usize,
}

impl InFlight {
    fn start(port: u16, put_url: &str, data: Vec<u8>, sent: usize) -> InFlight {
        let mut sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let head = format!(
            "PUT {} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\nContent-Type: image/png\r\n\r\n",
            path_of(put_url),
            data.len()
        );
        sock.write_all(head.as_bytes()).unwrap();
        sock.write_all(&data[..sent]).unwrap();
        // Let the server read the headers and reserve.
        std::thread::sleep(Duration::from_millis(300));
        InFlight { sock, data, sent }
    }

    fn finish(mut self) -> u16 {
        self.sock.write_all(&self.data[self.sent..]).unwrap();
        self.sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 512];
        let n = self.sock.read(&mut buf).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
    }
}

#[test]
fn uploads_in_flight_count_against_quota_and_temporary_space() {
    let _w = watchdog(90, "inflight");
    let node = Node::start(
        "inflight",
        &config("quota_bytes = 1000000\nmax_temp_bytes = 1500000\nidle_timeout_secs = 20\nmin_rate_bytes = 1"),
        &[],
    );
    let mut alice = Xmpp::login(node.c2s, ALICE);
    let mut bob = Xmpp::login(node.c2s, BOB);
    let (p1, _) = alice.slot("1.png", 600_000, "image/png").unwrap();
    let (p2, _) = alice.slot("2.png", 600_000, "image/png").unwrap();
    let first = InFlight::start(node.http, &p1, random(PNG, 600_000), 100_000);
    // Alice's second upload would pass her quota once the first lands.
    let r = put(&node, &p2, &random(PNG, 600_000), "image/png");
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(r.text().contains("quota"), "{}", r.text());
    // The same slot cannot be uploaded twice at once.
    let r = put(&node, &p1, &random(PNG, 600_000), "image/png");
    assert_eq!(r.status, 409, "{}", r.text());
    // Bob has quota, but 600 KB in flight + 1 MB would pass the global cap.
    let (pb, _) = bob.slot("b.png", 1_000_000, "image/png").unwrap();
    let r = put(&node, &pb, &random(PNG, 1_000_000), "image/png");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("retry-after").as_deref(), Some("5"));
    assert_eq!(first.finish(), 201);
    // Space is released once uploads end.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(put(&node, &pb, &random(PNG, 1_000_000), "image/png").status, 201);
    let r = put(&node, &p2, &random(PNG, 600_000), "image/png");
    assert_eq!(r.status, 413, "stored bytes still count: {}", r.text());
    assert!(files(&node.fast().join("tmp")).is_empty());
}
