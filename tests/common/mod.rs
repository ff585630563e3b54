//! Test support: start the real `chatd` binary on port 0 and speak raw
//! XMPP to it (PLAIN over loopback with `--allow-plaintext`), for the
//! cases a full client library hides. The same [`Client`] speaks over any
//! byte stream, so the in-process tests (`tests/inproc`) use it too.

#![allow(dead_code)]

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use chatd::protocol::{Element, Frame, Framer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

pub struct TestServer {
    pub child: Child,
    pub port: u16,
    pub http_port: u16,
    pub dir: PathBuf,
    pub cfg: PathBuf,
}

impl TestServer {
    /// Starts a server with `config` (TOML) in a fresh directory and creates
    /// the accounts `+PHONE,password` given.
    pub fn start(name: &str, config: &str, users: &[(&str, &str)]) -> TestServer {
        let dir = std::env::temp_dir().join(format!("chatd-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("chatd.toml");
        std::fs::write(&cfg, config).unwrap();
        for (phone, pw) in users {
            let st = Command::new(env!("CARGO_BIN_EXE_chatd"))
                .args(["user", "add", phone, "--password", pw, "--config"])
                .arg(&cfg)
                .arg("--data-dir")
                .arg(dir.join("data"))
                .env("CHATD_LOG", "warn")
                .status()
                .unwrap();
            assert!(st.success());
        }
        let (child, port, http_port) = spawn(&dir.join("data"), &cfg);
        TestServer { child, port, http_port, dir, cfg }
    }

    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Runs `chatd user ARGS` against this server's data directory.
    pub fn user_cmd(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_chatd"))
            .arg("user")
            .args(args)
            .arg("--config")
            .arg(&self.cfg)
            .arg("--data-dir")
            .arg(self.data())
            .env("CHATD_LOG", "warn")
            .output()
            .unwrap()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts the server with c2s and plain-or-TLS HTTP on loopback port 0;
/// returns the child and the c2s and HTTP ports.
pub fn spawn(data: &Path, cfg: &Path) -> (Child, u16, u16) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_chatd"))
        .args(["serve", "--config"])
        .arg(cfg)
        .arg("--data-dir")
        .arg(data)
        .args([
            "--domain",
            "localhost",
            "--c2s",
            "127.0.0.1:0",
            "--c2s-tls",
            "",
            "--http",
            "127.0.0.1:0",
            "--allow-plaintext",
        ])
        .env("CHATD_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start chatd");
    let out = child.stdout.take().expect("stdout");
    let mut lines = std::io::BufReader::new(out).lines();
    let (mut port, mut http) = (0, 0);
    let parse = |a: &str| -> u16 { a.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port") };
    for line in lines.by_ref() {
        let line = line.expect("stdout");
        if let Some(a) = line.strip_prefix("listening c2s ") {
            port = parse(a);
        } else if let Some(a) = line.strip_prefix("listening http ") {
            http = parse(a);
        }
        if port != 0 && http != 0 {
            break;
        }
    }
    assert!(port != 0 && http != 0, "no listening lines");
    std::thread::spawn(move || for _ in lines {});
    let _ = std::io::stdout().flush();
    (child, port, http)
}

pub const HEADER: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>";

/// How long one negotiation step may take before a login gives up.
const STEP: Duration = Duration::from_secs(10);

/// A byte stream a test client speaks over: TCP to a spawned server, or
/// an in-memory duplex into a server running in the test process.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Transport for T {}

/// What one read attempt produced.
#[derive(Debug)]
pub enum Read {
    Frame(Frame),
    /// Nothing arrived before the deadline.
    Idle,
    /// The stream ended or broke.
    Closed,
}

/// A raw XMPP client.
///
/// Deadlines use tokio's clock, so a test that pauses time waits in
/// virtual time.
pub struct Client {
    pub sock: Box<dyn Transport>,
    pub framer: Framer,
    pub jid: String,
}

impl Client {
    pub async fn connect(port: u16) -> Client {
        Client::try_connect(port).await.expect("connect")
    }

    pub async fn try_connect(port: u16) -> Option<Client> {
        let sock = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        Some(Client::over(sock))
    }

    /// A client on an already connected stream.
    pub fn over(stream: impl Transport + 'static) -> Client {
        Client { sock: Box::new(stream), framer: Framer::new(1 << 20), jid: String::new() }
    }

    pub async fn send(&mut self, xml: &str) {
        assert!(self.try_send(xml).await, "write failed");
    }

    /// Writes `xml`; false when the stream is gone.
    pub async fn try_send(&mut self, xml: &str) -> bool {
        self.sock.write_all(xml.as_bytes()).await.is_ok() && self.sock.flush().await.is_ok()
    }

    /// The next frame, unless `deadline` passes or the stream ends first.
    pub async fn read_until(&mut self, deadline: Instant) -> Read {
        loop {
            match self.framer.next_frame() {
                Ok(Some(f)) => return Read::Frame(f),
                Ok(None) => {}
                Err(_) => return Read::Closed,
            }
            let mut buf = [0u8; 16384];
            match tokio::time::timeout_at(deadline, self.sock.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => self.framer.feed(&buf[..n]),
                Ok(_) => return Read::Closed,
                Err(_) => return Read::Idle,
            }
        }
    }

    /// Next frame before `deadline`, or None on timeout/close/error.
    pub async fn next_until(&mut self, deadline: Instant) -> Option<Frame> {
        match self.read_until(deadline).await {
            Read::Frame(f) => Some(f),
            Read::Idle | Read::Closed => None,
        }
    }

    /// Next frame within `secs`, or None on timeout/close/error.
    pub async fn next(&mut self, secs: u64) -> Option<Frame> {
        self.next_until(Instant::now() + Duration::from_secs(secs)).await
    }

    /// Next stanza matching `pred` within `secs` (others are skipped).
    pub async fn expect(&mut self, secs: u64, pred: impl Fn(&Element) -> bool) -> Option<Element> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            match self.next_until(deadline).await? {
                Frame::Stanza(e) if pred(&e) => return Some(e),
                Frame::Stanza(e) if e.local_name() == "iq" && e.attr("type") == Some("get") => {
                    // Answer server pings so the session stays healthy.
                    let id = e.attr("id").unwrap_or("").to_string();
                    self.send(&format!("<iq type='result' id='{id}' to='localhost'/>")).await;
                }
                Frame::Stanza(_) | Frame::Header(_) => {}
                Frame::Close => return None,
            }
        }
    }

    /// Collects every stanza arriving within `secs`.
    pub async fn drain(&mut self, secs: u64) -> Vec<Element> {
        let mut v = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            match self.read_until(deadline).await {
                Read::Frame(Frame::Stanza(e)) => v.push(e),
                Read::Frame(_) => {}
                Read::Idle | Read::Closed => return v,
            }
        }
    }

    /// Opens the stream (or restarts it after SASL): sends the header and
    /// returns the server's features.
    pub async fn open(&mut self) -> Option<Element> {
        self.framer.reset();
        if !self.try_send(HEADER).await {
            return None;
        }
        let deadline = Instant::now() + STEP;
        match self.next_until(deadline).await? {
            Frame::Header(_) => {}
            _ => return None,
        }
        match self.next_until(deadline).await? {
            Frame::Stanza(f) if f.local_name() == "features" => Some(f),
            _ => None,
        }
    }

    /// SASL PLAIN; on success the stream is restarted and its features
    /// returned. None on failure.
    pub async fn plain(&mut self, local: &str, password: &str) -> Option<Element> {
        let cred = base64::engine::general_purpose::STANDARD.encode(format!("\0{local}\0{password}"));
        let auth = format!("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{cred}</auth>");
        if !self.try_send(&auth).await {
            return None;
        }
        match self.next_until(Instant::now() + STEP).await? {
            Frame::Stanza(e) if e.local_name() == "success" => {}
            _ => return None,
        }
        self.open().await
    }

    /// Binds `resource`; returns the bound full JID.
    pub async fn bind(&mut self, local: &str, resource: &str) -> Option<String> {
        let bind = format!(
            "<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>{resource}</resource></bind></iq>"
        );
        if !self.try_send(&bind).await {
            return None;
        }
        match self.next_until(Instant::now() + STEP).await? {
            Frame::Stanza(e) if e.attr("id") == Some("bind") && e.attr("type") == Some("result") => {}
            _ => return None,
        }
        self.jid = format!("{local}@localhost/{resource}");
        Some(self.jid.clone())
    }

    /// Enables XEP-0198 (with resumption when `resume`); returns the
    /// `<enabled/>` element.
    pub async fn enable_sm(&mut self, resume: bool) -> Option<Element> {
        let enable =
            if resume { "<enable xmlns='urn:xmpp:sm:3' resume='true'/>" } else { "<enable xmlns='urn:xmpp:sm:3'/>" };
        if !self.try_send(enable).await {
            return None;
        }
        match self.next_until(Instant::now() + STEP).await? {
            Frame::Stanza(e) if e.local_name() == "enabled" => Some(e),
            _ => None,
        }
    }

    /// Asks to resume session `previd` having handled `h` stanzas (after
    /// [`Client::plain`]); returns the `<resumed/>` or `<failed/>` answer.
    pub async fn resume(&mut self, previd: &str, h: u32) -> Option<Element> {
        if !self.try_send(&format!("<resume xmlns='urn:xmpp:sm:3' previd='{previd}' h='{h}'/>")).await {
            return None;
        }
        match self.next_until(Instant::now() + STEP).await? {
            Frame::Stanza(e) if matches!(e.local_name(), "resumed" | "failed") => Some(e),
            _ => None,
        }
    }

    /// Authenticates with PLAIN and binds `resource`; sends initial
    /// presence when `presence` is set.
    pub async fn login(port: u16, local: &str, password: &str, resource: &str, presence: bool) -> Client {
        Client::login_over(Client::connect(port).await, local, password, resource, presence).await
    }

    /// [`Client::login`] on a client that is connected but has not opened
    /// its stream yet.
    pub async fn login_over(mut c: Client, local: &str, password: &str, resource: &str, presence: bool) -> Client {
        c.open().await.unwrap_or_else(|| panic!("{local}: no stream features"));
        c.plain(local, password).await.unwrap_or_else(|| panic!("auth failed for {local}"));
        c.bind(local, resource).await.unwrap_or_else(|| panic!("{local}: bind failed"));
        if presence {
            c.send("<presence/>").await;
        }
        c
    }

    /// Sends an iq and waits for its response.
    pub async fn iq(&mut self, id: &str, xml: &str) -> Element {
        self.send(xml).await;
        self.expect(5, |e| e.local_name() == "iq" && e.attr("id") == Some(id))
            .await
            .unwrap_or_else(|| panic!("no response to iq {id}"))
    }
}

/// The stanza error condition of an error stanza, if any.
pub fn error_condition(e: &Element) -> Option<String> {
    let err = e.child("error", chatd::protocol::ns::CLIENT)?;
    err.elements()
        .find(|c| c.ns == chatd::protocol::ns::STANZA_ERRORS && c.local_name() != "text")
        .map(|c| c.local_name().to_string())
}

/// A minimal HTTP/1.1 exchange over plain TCP: returns status, headers
/// (lowercased names) and body.
pub async fn http(port: u16, method: &str, path: &str, body: &str) -> (u16, Vec<(String, String)>, String) {
    let mut sock = TcpStream::connect(("127.0.0.1", port)).await.expect("connect http");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(req.as_bytes()).await.expect("write");
    let mut resp = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), sock.read_to_end(&mut resp))
        .await
        .expect("http timeout")
        .expect("read");
    let text = String::from_utf8_lossy(&resp).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|c| c.parse().ok()).unwrap_or(0);
    let headers =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_string())).collect();
    (status, headers, body.to_string())
}
