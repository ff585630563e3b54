//! An authenticated session after the handshake: a writer task draining a
//! shared output buffer in batches, and a reader task that scans events
//! without building trees (message bodies, pings, stream-management acks).

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use quick_xml::events::{BytesStart, Event};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;

use crate::metrics::Metrics;
use crate::xml::XmlReader;

const SM_NS: &[u8] = b"urn:xmpp:sm:3";
const R: &str = "<r xmlns='urn:xmpp:sm:3'/>";

/// Minimum time between two ack requests of a session.
pub static ACK_EVERY_NS: AtomicU64 = AtomicU64::new(1_000_000_000);

/// Nanoseconds on a process-wide monotonic clock.
pub fn mono_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// One logged-in connection, shared by its reader, writer and the drivers.
pub struct Session {
    pub idx: usize,
    /// Bare JID, `localpart@domain`.
    pub jid: String,
    out: Mutex<Out>,
    wake: Notify,
    closing: AtomicBool,
    pub alive: AtomicBool,
    /// Set once the server answered `<enable/>` with `<enabled/>`.
    pub sm_on: AtomicBool,
    pub sm_failed: AtomicBool,
    /// Stanzas sent since `<enable/>` (what the server's `h` counts).
    pub out_count: AtomicU64,
    /// Last `h` acknowledged by the server.
    pub acked: AtomicU64,
    last_r_ns: AtomicU64,
    /// Stanzas received since `<enabled/>`.
    pub in_count: AtomicU64,
    /// Highest `sN` id among ping results received.
    pub pong: AtomicU64,
    next_ping: AtomicU64,
    events: Notify,
    pub disconnect_reason: Mutex<Option<String>>,
}

impl Session {
    pub fn new(idx: usize, jid: String) -> Arc<Session> {
        Arc::new(Session {
            idx,
            jid,
            out: Mutex::new(Out { buf: Vec::with_capacity(256), writing: false, socket: None }),
            wake: Notify::new(),
            closing: AtomicBool::new(false),
            alive: AtomicBool::new(true),
            sm_on: AtomicBool::new(false),
            sm_failed: AtomicBool::new(false),
            out_count: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            last_r_ns: AtomicU64::new(0),
            in_count: AtomicU64::new(0),
            pong: AtomicU64::new(0),
            next_ping: AtomicU64::new(1),
            events: Notify::new(),
            disconnect_reason: Mutex::new(None),
        })
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Relaxed)
    }

    /// Appends raw bytes to the output buffer; `stanzas` is how many
    /// stanzas they hold (for stream-management counting).
    pub fn send_raw(&self, data: &[u8], stanzas: u64) {
        self.with_buf(stanzas, |b| b.extend_from_slice(data));
    }

    /// Appends to the output through `f`. When nothing is queued and the
    /// writer task is idle, the bytes go straight to the socket from the
    /// calling thread; what the socket does not take is left to the writer.
    pub fn with_buf(&self, stanzas: u64, f: impl FnOnce(&mut Vec<u8>)) {
        let mut o = self.out.lock().expect("outbox lock");
        let was_empty = o.buf.is_empty();
        f(&mut o.buf);
        if stanzas > 0 {
            self.out_count.fetch_add(stanzas, Relaxed);
        }
        if was_empty && !o.writing {
            let Out { buf, socket, .. } = &mut *o;
            if let Some(w) = socket {
                match w.try_write(buf) {
                    Ok(n) if n == buf.len() => {
                        buf.clear();
                        return;
                    }
                    Ok(n) => {
                        buf.drain(..n);
                    }
                    Err(_) => {}
                }
            }
        }
        drop(o);
        self.wake.notify_one();
    }

    /// Appends one chat message carrying `TIMESTAMP_NS SEQ`.
    /// With stream management on, an ack request rides along when the last
    /// one is older than the ack interval.
    pub fn send_chat(&self, to: &str, ts_ns: u64, seq: u64) {
        let now = mono_ns();
        let ask =
            self.sm_on.load(Relaxed) && now.saturating_sub(self.last_r_ns.load(Relaxed)) >= ACK_EVERY_NS.load(Relaxed);
        if ask {
            self.last_r_ns.store(now, Relaxed);
        }
        self.with_buf(1, |b| {
            let mut s = String::with_capacity(128 + to.len());
            let _ = write!(s, "<message type='chat' to='{to}'><body>{ts_ns} {seq}</body></message>");
            if ask {
                s.push_str(R);
            }
            b.extend_from_slice(s.as_bytes());
        });
    }

    /// Requests an ack if stanzas are unacknowledged and the last request
    /// is older than the ack interval.
    pub fn maybe_request_ack(&self) {
        let now = mono_ns();
        if self.is_alive()
            && self.sm_on.load(Relaxed)
            && self.unacked() > 0
            && now.saturating_sub(self.last_r_ns.load(Relaxed)) >= ACK_EVERY_NS.load(Relaxed)
        {
            self.last_r_ns.store(now, Relaxed);
            self.request_ack();
        }
    }

    /// Sends an iq ping to the server; returns its number, see `wait_pong`.
    pub fn ping(&self, domain: &str) -> u64 {
        let n = self.next_ping.fetch_add(1, Relaxed);
        let s = format!("<iq type='get' id='s{n}' to='{domain}'><ping xmlns='urn:xmpp:ping'/></iq>");
        self.send_raw(s.as_bytes(), 1);
        n
    }

    pub fn request_ack(&self) {
        self.send_raw(R.as_bytes(), 0);
    }

    pub fn unacked(&self) -> u64 {
        self.out_count.load(Relaxed).saturating_sub(self.acked.load(Relaxed))
    }

    /// Waits until `cond` holds, the session dies, or `timeout` passes.
    pub async fn wait_for(&self, timeout: Duration, cond: impl Fn(&Session) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.events.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if cond(self) {
                return true;
            }
            if !self.is_alive() {
                return false;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return cond(self);
            }
        }
    }

    pub async fn wait_pong(&self, n: u64, timeout: Duration) -> bool {
        self.wait_for(timeout, |s| s.pong.load(Relaxed) >= n).await
    }

    /// Waits until the server acknowledged every stanza sent so far.
    pub async fn wait_acked(&self, timeout: Duration) -> bool {
        let target = self.out_count.load(Relaxed);
        self.wait_for(timeout, |s| s.acked.load(Relaxed) >= target).await
    }

    /// Sends a final ack (if stream management is on) and closes the stream.
    pub fn close(&self) {
        if self.closing.swap(true, Relaxed) {
            return;
        }
        let mut tail = String::new();
        if self.sm_on.load(Relaxed) {
            let _ = write!(tail, "<a xmlns='urn:xmpp:sm:3' h='{}'/>", self.in_count.load(Relaxed));
        }
        tail.push_str("</stream:stream>");
        self.send_raw(tail.as_bytes(), 0);
        self.wake.notify_one();
    }

    fn mark_dead(&self, why: String) {
        if self.alive.swap(false, Relaxed) {
            *self.disconnect_reason.lock().expect("reason lock") = Some(why);
        }
        self.events.notify_waiters();
    }
}

/// Output state of a session, under one lock.
struct Out {
    /// Bytes not yet handed to the socket.
    buf: Vec<u8>,
    /// The writer task holds bytes taken from `buf`: others must queue.
    writing: bool,
    /// Shared with the writer task; dropped (shutting the socket down for
    /// writing) when the stream is closed.
    socket: Option<Arc<OwnedWriteHalf>>,
}

/// Starts the reader and writer tasks of a logged-in session.
pub fn spawn(session: Arc<Session>, reader: XmlReader, writer: OwnedWriteHalf, metrics: Arc<Metrics>) {
    let w = Arc::new(writer);
    session.out.lock().expect("outbox lock").socket = Some(w.clone());
    let s = session.clone();
    tokio::spawn(async move { write_loop(s, w).await });
    tokio::spawn(async move { read_loop(session, reader, metrics).await });
}

async fn write_all(w: &OwnedWriteHalf, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        match w.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => w.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

async fn write_loop(s: Arc<Session>, w: Arc<OwnedWriteHalf>) {
    let mut local: Vec<u8> = Vec::new();
    loop {
        s.wake.notified().await;
        loop {
            {
                let mut o = s.out.lock().expect("outbox lock");
                if o.buf.is_empty() {
                    o.writing = false;
                    break;
                }
                std::mem::swap(&mut o.buf, &mut local);
                o.writing = true;
            }
            if let Err(e) = write_all(&w, &local).await {
                s.out.lock().expect("outbox lock").socket = None;
                s.mark_dead(format!("write: {e}"));
                return;
            }
            local.clear();
            if local.capacity() > 1 << 20 {
                local = Vec::new();
            }
        }
        if s.closing.load(Relaxed) {
            let mut o = s.out.lock().expect("outbox lock");
            if o.buf.is_empty() {
                // Dropping the last handle shuts the socket down for writing.
                o.socket = None;
                return;
            }
        }
        if !s.is_alive() {
            s.out.lock().expect("outbox lock").socket = None;
            return;
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Top {
    None,
    Message,
    Presence,
    Iq,
    StreamError,
    Other,
}

fn attr<'a>(e: &'a BytesStart<'_>, key: &[u8]) -> Option<std::borrow::Cow<'a, [u8]>> {
    e.attributes().with_checks(false).flatten().find(|a| a.key.as_ref() == key).map(|a| a.value)
}

fn parse_u64(v: &[u8]) -> Option<u64> {
    std::str::from_utf8(v).ok()?.parse().ok()
}

struct IqState {
    kind: Vec<u8>,
    id: Vec<u8>,
    from: Vec<u8>,
    ping: bool,
}

async fn read_loop(s: Arc<Session>, mut r: XmlReader, metrics: Arc<Metrics>) {
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut depth = 0usize;
    let mut top = Top::None;
    let mut msg_error = false;
    let mut in_body = false;
    let mut body: Vec<u8> = Vec::with_capacity(64);
    let mut iq = IqState { kind: Vec::new(), id: Vec::new(), from: Vec::new(), ping: false };
    let mut err_cond = String::new();
    let why = loop {
        buf.clear();
        let ev = match r.read_event_into_async(&mut buf).await {
            Ok(ev) => ev,
            Err(e) => break format!("read: {e}"),
        };
        match ev {
            Event::Start(e) => {
                depth += 1;
                if depth == 1 {
                    top = start_top(&s, &e, &mut iq, &mut msg_error, &mut body);
                } else if depth == 2 {
                    let local = e.local_name();
                    match top {
                        Top::Message if local.as_ref() == b"body" => in_body = true,
                        Top::Iq if local.as_ref() == b"ping" => iq.ping = true,
                        Top::StreamError if err_cond.is_empty() => {
                            err_cond = String::from_utf8_lossy(local.as_ref()).into_owned()
                        }
                        _ => {}
                    }
                }
            }
            Event::Empty(e) => {
                if depth == 0 {
                    let t = start_top(&s, &e, &mut iq, &mut msg_error, &mut body);
                    end_top(&s, t, &iq, msg_error, &body, &metrics);
                } else if depth == 1 {
                    let local = e.local_name();
                    match top {
                        Top::Iq if local.as_ref() == b"ping" => iq.ping = true,
                        Top::StreamError if err_cond.is_empty() => {
                            err_cond = String::from_utf8_lossy(local.as_ref()).into_owned()
                        }
                        _ => {}
                    }
                }
            }
            Event::Text(t) if in_body => body.extend_from_slice(&t),
            Event::End(_) => {
                if depth == 0 {
                    break "server closed the stream".to_string();
                }
                depth -= 1;
                if depth == 1 {
                    in_body = false;
                } else if depth == 0 {
                    if top == Top::StreamError {
                        break format!("stream error: {err_cond}");
                    }
                    end_top(&s, top, &iq, msg_error, &body, &metrics);
                    top = Top::None;
                }
            }
            Event::Eof => break "connection closed".to_string(),
            _ => {}
        }
    };
    s.mark_dead(why);
}

fn start_top(s: &Session, e: &BytesStart<'_>, iq: &mut IqState, msg_error: &mut bool, body: &mut Vec<u8>) -> Top {
    match e.local_name().as_ref() {
        b"message" => {
            *msg_error = attr(e, b"type").as_deref() == Some(b"error");
            body.clear();
            Top::Message
        }
        b"presence" => Top::Presence,
        b"iq" => {
            iq.kind = attr(e, b"type").map(|v| v.into_owned()).unwrap_or_default();
            iq.id = attr(e, b"id").map(|v| v.into_owned()).unwrap_or_default();
            iq.from = attr(e, b"from").map(|v| v.into_owned()).unwrap_or_default();
            iq.ping = false;
            Top::Iq
        }
        b"r" if attr(e, b"xmlns").as_deref() == Some(SM_NS) => {
            let h = s.in_count.load(Relaxed);
            s.send_raw(format!("<a xmlns='urn:xmpp:sm:3' h='{h}'/>").as_bytes(), 0);
            Top::Other
        }
        b"a" if attr(e, b"xmlns").as_deref() == Some(SM_NS) => {
            if let Some(h) = attr(e, b"h").and_then(|v| parse_u64(&v)) {
                s.acked.fetch_max(h, Relaxed);
                s.events.notify_waiters();
            }
            Top::Other
        }
        b"enabled" => {
            s.sm_on.store(true, Relaxed);
            s.events.notify_waiters();
            Top::Other
        }
        b"failed" => {
            s.sm_failed.store(true, Relaxed);
            s.events.notify_waiters();
            Top::Other
        }
        b"error" => Top::StreamError,
        _ => Top::Other,
    }
}

fn end_top(s: &Session, top: Top, iq: &IqState, msg_error: bool, body: &[u8], metrics: &Metrics) {
    match top {
        Top::Message | Top::Presence | Top::Iq => {
            if s.sm_on.load(Relaxed) {
                s.in_count.fetch_add(1, Relaxed);
            }
        }
        _ => return,
    }
    match top {
        Top::Message => {
            if msg_error {
                metrics.errors.fetch_add(1, Relaxed);
            } else if !body.is_empty() {
                metrics.record_body(body);
            }
        }
        Top::Iq => match iq.kind.as_slice() {
            b"result" | b"error" => {
                if let Some(n) = iq.id.strip_prefix(b"s").and_then(parse_u64) {
                    s.pong.fetch_max(n, Relaxed);
                    s.events.notify_waiters();
                }
            }
            b"get" | b"set" => {
                let id = String::from_utf8_lossy(&iq.id);
                let to = if iq.from.is_empty() {
                    String::new()
                } else {
                    format!(" to='{}'", String::from_utf8_lossy(&iq.from))
                };
                let reply = if iq.ping {
                    format!("<iq type='result' id='{id}'{to}/>")
                } else {
                    format!(
                        "<iq type='error' id='{id}'{to}><error type='cancel'><service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>"
                    )
                };
                s.send_raw(reply.as_bytes(), 1);
            }
            _ => {}
        },
        _ => {}
    }
}
