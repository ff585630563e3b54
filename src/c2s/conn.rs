//! One client connection: socket IO, stream negotiation and the event
//! loop that multiplexes socket reads, outbound stanzas from the router,
//! durability notifications and timers.
//!
//! Negotiation (RFC 6120 §4–7):
//! `header → [STARTTLS → header] → SASL → header → bind → session`.
//! Direct-TLS connections (XEP-0368) start with the TLS handshake.
//!
//! Memory: an idle plaintext connection holds no read buffer — the loop
//! waits for readability and only then reserves one, and releases it when
//! every byte was consumed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::guard::IpSlot;
use super::sasl::{Bindings, Exchange, Failure, Step};
use super::session::{Session, Takeover};
use super::transport::{Stream, Transport};
use crate::modules;
use crate::protocol::element::ParseLimits;
use crate::protocol::stanza::{stream_error, stream_header};
use crate::protocol::{Element, Frame, Framer, Jid, ns};
use crate::server::Server;
use crate::session::{CloseReason, Outbound, OutboundRx, SessionHandle, outbound_channel};
use crate::storage::wait_durable;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    /// Before SASL success.
    Connected,
    /// Authenticated, resource not yet bound.
    Authenticated,
    /// Resource bound: stanzas flow.
    Bound,
}

struct Conn {
    srv: Arc<Server>,
    io: Transport,
    framer: Framer,
    peer: SocketAddr,
    phase: Phase,
    secure: bool,
    /// Channel-binding data of the TLS connection (empty on plaintext).
    cb: Bindings,
    sasl: Option<Exchange>,
    /// Wrong passwords on this connection.
    sasl_failures: u32,
    /// SASL exchanges started on this connection.
    sasl_attempts: u32,
    /// Counts this connection against its address's cap on
    /// unauthenticated connections until SASL succeeds.
    unauthenticated: Option<IpSlot>,
    local: Option<String>,
    /// Pre-bind output.
    out: String,
    session: Option<Session>,
    rx: Option<OutboundRx>,
    stream_open: bool,
    closing: Option<(&'static str, Option<String>)>,
    /// Peer closed its stream: reply and stop.
    peer_closed: bool,
    live_ping: Option<Instant>,
    /// Fires when the oldest pending `<a/>` may be sent.
    ack_wait: Option<tokio::sync::oneshot::Receiver<()>>,
    /// The connection ended because the transport failed (EOF, reset,
    /// write error) rather than by a stream error or clean close.
    closing_was_transport: bool,
}

/// Runs one accepted TCP connection to completion; `direct_tls` starts
/// it with the TLS handshake (XEP-0368). Never panics on peer input.
pub async fn run(srv: Arc<Server>, sock: TcpStream, peer: SocketAddr, direct_tls: bool) {
    serve(srv, Transport::Tcp(sock), peer, direct_tls, false).await;
}

/// Serves one client connection over any byte stream, exactly as over a
/// TCP socket: negotiation, the session, resumption, limits. This is how
/// transports other than the TCP listeners (an in-process pipe such as
/// [`tokio::io::duplex`], a WebSocket adapter) reach the same session
/// code.
///
/// `peer` is the client's address, which per-address limits and the
/// login throttle key on. `secure` says the stream is already
/// confidential (it runs inside TLS terminated elsewhere, or never leaves
/// the process): STARTTLS is then not offered and SASL, including PLAIN,
/// is allowed; channel binding (`-PLUS`) is not, as there is no TLS
/// session here to bind to. With `secure == false` the stream is treated
/// as plaintext and STARTTLS upgrades it in place.
///
/// Returns when the connection has ended; a session that may be resumed
/// is parked in a task of its own.
pub async fn serve_stream<S>(srv: Arc<Server>, stream: S, peer: SocketAddr, secure: bool)
where
    S: Stream,
{
    serve(srv, Transport::Other(Box::new(stream)), peer, false, secure).await;
}

async fn serve(srv: Arc<Server>, io: Transport, peer: SocketAddr, direct_tls: bool, secure: bool) {
    let l = &srv.cfg.limits;
    let parse_limits = ParseLimits { max_elements: l.max_stanza_elements, max_attributes: l.max_element_attributes };
    let framer = Framer::with_limits(l.max_stanza_bytes_before_bind.min(l.max_stanza_bytes), parse_limits);
    let mut c = Conn {
        srv,
        io,
        framer,
        peer,
        phase: Phase::Connected,
        secure,
        cb: Bindings::default(),
        sasl: None,
        sasl_failures: 0,
        sasl_attempts: 0,
        unauthenticated: None,
        local: None,
        out: String::new(),
        session: None,
        rx: None,
        stream_open: false,
        closing: None,
        peer_closed: false,
        live_ping: None,
        ack_wait: None,
        closing_was_transport: false,
    };
    c.unauthenticated = c.srv.guards.unauthenticated.acquire(peer.ip());
    if c.unauthenticated.is_none() {
        tracing::debug!(peer = %peer, "too many unauthenticated connections from this address; refused");
        if !direct_tls {
            c.close("policy-violation", Some("too many unauthenticated connections from your address".into()));
            c.finish().await;
        }
        return;
    }
    if direct_tls && !c.upgrade_tls().await {
        return;
    }
    c.run().await;
    c.finish().await;
}

impl Conn {
    fn close(&mut self, condition: &'static str, text: Option<String>) {
        if self.closing.is_none() {
            self.closing = Some((condition, text));
        }
    }

    async fn upgrade_tls(&mut self) -> bool {
        let Some(_handshake) = self.srv.guards.handshakes.acquire(self.peer.ip()) else {
            tracing::debug!(peer = %self.peer, "too many TLS handshakes in flight from this address; refused");
            return false;
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(self.srv.tls.clone());
        let hs = Duration::from_secs(self.srv.cfg.limits.handshake_timeout_secs);
        match self.io.accept_tls(acceptor, hs).await {
            Ok(exporter) => {
                self.cb = self.srv.sasl.bindings(exporter);
                self.secure = true;
                self.framer.reset();
                self.stream_open = false;
                true
            }
            Err(e) => {
                tracing::debug!(peer = %self.peer, "{e}");
                false
            }
        }
    }

    /// The channel bindings SASL may use: `None` on plaintext.
    fn bindings(&self) -> Option<&Bindings> {
        self.secure.then_some(&self.cb)
    }

    /// Whether SASL may run on this connection now.
    fn sasl_allowed(&self) -> bool {
        self.secure || self.srv.cfg.listen.allow_plaintext
    }

    async fn run(&mut self) {
        let limits = self.srv.cfg.limits.clone();
        let handshake_deadline = Instant::now() + Duration::from_secs(limits.handshake_timeout_secs);
        let ping_interval = Duration::from_secs(limits.ping_interval_secs.max(1));
        let ping_timeout = Duration::from_secs(limits.ping_timeout_secs.max(1));
        let mut shutdown = self.srv.shutdown.subscribe();
        loop {
            // Read the offline backlog in bounded batches between writes.
            self.pump_backlog();
            if !self.flush().await {
                self.closing_was_transport = true;
                return;
            }
            if self.closing.is_some() || self.peer_closed {
                return;
            }
            let deadline = match (&self.session, self.live_ping) {
                (None, _) => handshake_deadline,
                (Some(_), Some(sent)) => sent + ping_timeout,
                (Some(s), None) => s.last_rx + ping_interval,
            };
            let has_rx = self.rx.is_some();
            // Register for the oldest pending <a/>'s ticket, once.
            if self.ack_wait.is_none()
                && let Some(t) = self.session.as_ref().and_then(modules::sm::ack_due)
            {
                self.ack_wait = self.srv.durable.wait(t);
                if self.ack_wait.is_none() {
                    self.release_acks();
                    continue;
                }
            }
            let waiting_acks = self.ack_wait.is_some();
            tokio::select! {
                r = self.io.read_into(&mut self.framer) => {
                    match r {
                        Ok(0) | Err(_) => {
                            self.closing_was_transport = true;
                            return;
                        }
                        Ok(_) => {
                            if let Some(s) = self.session.as_mut() { s.last_rx = Instant::now(); }
                            self.live_ping = None;
                            if self.process_input().await.is_err() { return; }
                            self.framer.shrink_if_idle();
                        }
                    }
                }
                m = recv_opt(&mut self.rx), if has_rx => {
                    match m {
                        Some(o) => {
                            self.outbound(o);
                            // Drain what is already queued into one write.
                            for _ in 0..256 {
                                if self.session.as_ref().is_some_and(|s| s.closing.is_some()) {
                                    break;
                                }
                                let Some(rx) = self.rx.as_mut() else { break };
                                match rx.try_recv() { Some(o) => self.outbound(o), None => break }
                            }
                            self.after_outbound();
                        }
                        None => {
                            // Registry dropped our handle: slow consumer.
                            self.rx = None;
                            self.close("policy-violation", Some("too slow to receive".into()));
                        }
                    }
                }
                _ = wait_ack(&mut self.ack_wait), if waiting_acks => {
                    self.ack_wait = None;
                    self.release_acks();
                }
                _ = tokio::time::sleep_until(deadline.into()) => {
                    match &mut self.session {
                        None => self.close("connection-timeout", Some("negotiation took too long".into())),
                        Some(s) => {
                            if self.live_ping.is_some() {
                                // A dead peer: its session may still be resumed.
                                self.closing_was_transport = true;
                                self.close("connection-timeout", Some("no answer to ping".into()));
                            } else {
                                s.ping_counter += 1;
                                let id = format!("live{}", s.ping_counter);
                                let ping = Element::stanza("iq").with_attr("type", "get").with_attr("id", id)
                                    .with_attr("from", s.domain().to_string()).with_attr("to", s.jid.to_string())
                                    .with_child(Element::new("ping", ns::PING));
                                s.send(&ping);
                                self.live_ping = Some(Instant::now());
                            }
                        }
                    }
                }
                t = recv_takeover(self.session.as_mut().and_then(|s| s.sm.as_mut()).and_then(|m| m.takeover.as_mut())) => {
                    // The client resumed this session on a new connection
                    // while this one looked alive (half-open).
                    if let (Some(reply), Some(s), Some(rx)) = (t, self.session.take(), self.rx.take()) {
                        if let Err((s, _)) = reply.send((s, rx)) {
                            self.session = Some(s);
                        }
                        self.close("conflict", Some("session resumed on another connection".into()));
                    }
                }
                _ = shutdown.recv() => {
                    self.close("system-shutdown", None);
                }
            }
        }
    }

    /// Writes the next batch of the offline backlog. Stored messages that
    /// arrive live meanwhile only extend the backlog (see
    /// [`Session::outbound`]), so each is written after every stored
    /// message before it. With XEP-0198 the backlog waits while half of
    /// `delivery.max_unacked_bytes` is unacknowledged: a client that acks
    /// as it reads drains any backlog; one that does not holds bounded
    /// memory.
    fn pump_backlog(&mut self) {
        let Some(s) = self.session.as_mut() else { return };
        let Some((after, upto)) = s.backlog else { return };
        const OUT_BUDGET: usize = 256 * 1024;
        if s.out.len() > OUT_BUDGET {
            return;
        }
        let unacked_max = s.srv.cfg.delivery.max_unacked_bytes;
        if s.sm.as_ref().is_some_and(|m| m.unacked_bytes() >= unacked_max / 2) {
            return;
        }
        // At most a quarter of the unacked budget per batch (plus one
        // stanza): waiting at half of it, a batch cannot overrun it.
        let batch = s.srv.router.pending(&s.local, after, upto, 200, OUT_BUDGET.min(unacked_max / 4));
        match batch.last() {
            Some((last, _)) => s.backlog = Some((*last, upto)),
            None => s.backlog = None,
        }
        for (seq, xml) in batch {
            s.send_xml(xml, Some(seq));
        }
        modules::sm::request_acks(s);
    }

    fn outbound(&mut self, o: Outbound) {
        if let Some(s) = self.session.as_mut() {
            s.outbound(o);
        }
    }

    fn after_outbound(&mut self) {
        if let Some(s) = self.session.as_mut() {
            modules::sm::request_acks(s);
        }
    }

    /// Writes the `<a h/>` answers the commit watermark now covers.
    fn release_acks(&mut self) {
        if let Some(s) = self.session.as_mut() {
            modules::sm::release_acks(s, self.srv.durable.committed());
        }
    }

    /// Writes pending output. Returns false when the socket is gone.
    async fn flush(&mut self) -> bool {
        if let Some(s) = self.session.as_mut() {
            if let Some(c) = s.closing.take() {
                self.closing.get_or_insert((c.condition, c.text));
            }
            if modules::sm::ack_due(s).is_some() {
                modules::sm::release_acks(s, self.srv.durable.committed());
            }
        }
        if !self.out.is_empty() {
            let ok = self.write_timed(false).await;
            // Negotiation output: not needed once the session runs.
            self.out = String::new();
            if !ok {
                return false;
            }
        }
        if let Some(s) = self.session.as_mut()
            && !s.out.is_empty()
        {
            let ok = self.write_timed(true).await;
            if let Some(s) = self.session.as_mut() {
                s.out.clear();
                // Idle sessions keep at most a small buffer.
                if s.out.capacity() > 4096 {
                    s.out = String::new();
                }
            }
            return ok;
        }
        true
    }

    /// Writes the connection's (or the session's) pending output. A peer
    /// that does not read for `ping_timeout_secs` while we have data for it
    /// is treated as gone, so a stalled client cannot pin a task forever.
    async fn write_timed(&mut self, session: bool) -> bool {
        let limit = Duration::from_secs(self.srv.cfg.limits.ping_timeout_secs.max(1));
        let data = if session {
            match self.session.as_ref() {
                Some(s) => s.out.as_bytes(),
                None => return true,
            }
        } else {
            self.out.as_bytes()
        };
        matches!(tokio::time::timeout(limit, self.io.write_all(data)).await, Ok(Ok(())))
    }

    /// Parses and handles every complete frame in the buffer.
    async fn process_input(&mut self) -> Result<(), ()> {
        loop {
            let frame = match self.framer.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => return Ok(()),
                Err(e) => {
                    tracing::debug!(peer = %self.peer, error = %e, "stream error");
                    self.close(e.condition(), Some(e.to_string()));
                    return Ok(());
                }
            };
            match frame {
                Frame::Header(h) => self.on_header(&h),
                Frame::Close => {
                    self.peer_closed = true;
                    return Ok(());
                }
                Frame::Stanza(el) => {
                    if self.phase == Phase::Bound {
                        if let Some(s) = self.session.as_mut() {
                            if el.ns == ns::SM {
                                modules::sm::handle_nonza(s, &el);
                            } else {
                                s.handle_stanza(el);
                            }
                        }
                    } else if self.negotiate(el).await.is_err() {
                        return Err(());
                    }
                }
            }
            if self.closing.is_some() || self.session.as_ref().is_some_and(|s| s.closing.is_some()) {
                return Ok(());
            }
        }
    }

    fn on_header(&mut self, h: &Element) {
        let id = format!("{:016x}", rand::random::<u64>());
        let to = h.attr("to").map(|t| t.to_lowercase());
        self.out.push_str(&stream_header(self.srv.domain(), &id, h.attr("from")));
        self.stream_open = true;
        if to.as_deref() != Some(self.srv.domain()) {
            self.close("host-unknown", Some(format!("this server serves {}", self.srv.domain())));
            return;
        }
        if h.attr("version") != Some("1.0") {
            self.close("unsupported-version", None);
            return;
        }
        let mut f = Element::new("stream:features", ns::STREAM);
        f.attrs.clear();
        match self.phase {
            Phase::Connected => {
                if !self.secure {
                    let mut st = Element::new("starttls", ns::TLS);
                    if !self.srv.cfg.listen.allow_plaintext {
                        st.push(Element::stanza("required"));
                    }
                    f.push(st);
                }
                if self.sasl_allowed() {
                    let mut m = Element::new("mechanisms", ns::SASL);
                    for name in self.srv.sasl.offered(self.bindings(), self.srv.cfg.listen.allow_plaintext) {
                        m.push(Element::stanza("mechanism").with_text(name));
                    }
                    f.push(m);
                    if self.srv.cfg.registration.in_band {
                        f.push(Element::new("register", modules::register::FEATURE));
                    }
                    // XEP-0440: the binding types -PLUS accepts here.
                    let names = self.bindings().map(Bindings::names).unwrap_or_default();
                    if !names.is_empty() {
                        let mut cb = Element::new("sasl-channel-binding", ns::SASL_CB);
                        for n in names {
                            cb.push(Element::stanza("channel-binding").with_attr("type", n));
                        }
                        f.push(cb);
                    }
                }
            }
            Phase::Authenticated => {
                f.push(Element::new("bind", ns::BIND));
                f.push(Element::new("session", ns::SESSION).with_child(Element::stanza("optional")));
                f.push(Element::new("sm", ns::SM));
                f.push(Element::new("csi", modules::csi::NS));
            }
            Phase::Bound => {}
        }
        self.out.push_str(&f.to_xml());
    }

    /// Handles a top-level element before the resource is bound.
    async fn negotiate(&mut self, el: Element) -> Result<(), ()> {
        if !self.stream_open {
            self.close("not-well-formed", None);
            return Ok(());
        }
        match (self.phase, el.local_name(), el.ns.as_str()) {
            (Phase::Connected, "starttls", ns::TLS) if !self.secure => {
                self.out.push_str("<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>");
                if !self.flush().await {
                    return Err(());
                }
                // Whitespace between elements is allowed (some clients
                // send `<starttls/>\n`). Anything else after <starttls/>
                // before the handshake is a plaintext injection attempt
                // (RFC 6120 §5.4.3.3).
                let pending = self.framer.pending();
                if !pending.iter().all(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n')) {
                    tracing::debug!(
                        peer = %self.peer,
                        bytes = pending.len(),
                        "data after <starttls/> before the TLS handshake; closing"
                    );
                    return Err(());
                }
                if !self.upgrade_tls().await {
                    return Err(());
                }
            }
            (Phase::Connected, "auth", ns::SASL) if self.sasl_allowed() => self.sasl_start(&el).await,
            (Phase::Connected, "iq", ns::CLIENT)
                if self.srv.cfg.registration.in_band
                    && self.sasl_allowed()
                    && el.child("query", modules::register::NS).is_some() =>
            {
                if let Some(q) = el.child("query", modules::register::NS) {
                    let reply = modules::register::pre_auth(&self.srv, &el, q, self.peer.ip()).await;
                    self.out.push_str(&reply);
                }
            }
            (Phase::Connected, "response", ns::SASL) => self.sasl_step(&el).await,
            (Phase::Connected, "abort", ns::SASL) => {
                self.sasl = None;
                self.sasl_fail(Failure {
                    condition: "aborted",
                    text: "aborted by the client".into(),
                    credentials: false,
                });
            }
            (Phase::Authenticated, "iq", ns::CLIENT) => self.bind(&el),
            (Phase::Authenticated, "resume", ns::SM) => self.resume(&el).await,
            (Phase::Authenticated, "enable", ns::SM) => self.out.push_str(modules::sm::ENABLE_REFUSED),
            (Phase::Connected, "starttls", ns::TLS) => {
                self.close("policy-violation", Some("TLS already active".into()))
            }
            (Phase::Connected, "auth", ns::SASL) => {
                self.sasl_attempts += 1;
                self.sasl_fail(Failure {
                    condition: "encryption-required",
                    text: "use STARTTLS first".into(),
                    credentials: false,
                });
            }
            _ => self.close("not-authorized", Some("authenticate and bind a resource first".into())),
        }
        Ok(())
    }

    async fn sasl_start(&mut self, el: &Element) {
        let mech = el.attr("mechanism").unwrap_or("");
        self.sasl_attempts += 1;
        self.sasl = None;
        match self.srv.sasl.start(mech, self.bindings(), self.srv.cfg.listen.allow_plaintext) {
            Ok(ex) => self.sasl = Some(ex),
            Err(f) => return self.sasl_fail(f),
        }
        let text = el.text();
        let data = if text.trim() == "=" { Ok(Vec::new()) } else { B64.decode(text.trim()) };
        match data {
            Ok(d) => self.sasl_feed(&d).await,
            Err(_) => {
                self.sasl = None;
                self.sasl_fail(Failure {
                    condition: "incorrect-encoding",
                    text: "initial response is not base64".into(),
                    credentials: false,
                });
            }
        }
    }

    async fn sasl_step(&mut self, el: &Element) {
        if self.sasl.is_none() {
            self.close("policy-violation", Some("no SASL exchange in progress".into()));
            return;
        }
        match B64.decode(el.text().trim()) {
            Ok(d) => self.sasl_feed(&d).await,
            Err(_) => {
                self.sasl = None;
                self.sasl_fail(Failure {
                    condition: "incorrect-encoding",
                    text: "response is not base64".into(),
                    credentials: false,
                });
            }
        }
    }

    async fn sasl_feed(&mut self, data: &[u8]) {
        let Some(ex) = self.sasl.as_mut() else { return };
        let mechanism = ex.mechanism();
        match ex.step(data) {
            Step::Challenge(c) => {
                self.out.push_str("<challenge xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>");
                self.out.push_str(&B64.encode(c));
                self.out.push_str("</challenge>");
            }
            Step::Verify(check) => {
                // Progressive delay after failed logins for this account or
                // address, before any password is checked.
                let guards = &self.srv.guards;
                let wait = guards.throttle.wait(&check.local, self.peer.ip());
                if !wait.is_zero() {
                    tracing::debug!(peer = %self.peer, account = %check.local, ?wait, "delaying login after failures");
                    tokio::time::sleep(wait).await;
                }
                let check = Arc::new(check);
                let result = if check.is_costly() {
                    let c = check.clone();
                    guards.hash(move || c.run()).await.unwrap_or_else(|| {
                        Err(Failure {
                            condition: "temporary-auth-failure",
                            text: "try again".into(),
                            credentials: false,
                        })
                    })
                } else {
                    check.run()
                };
                self.sasl = None;
                match result {
                    Ok(additional) => {
                        guards.throttle.succeeded(&check.local);
                        tracing::debug!(peer = %self.peer, account = %check.local, mechanism, "SASL success");
                        self.out.push_str("<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>");
                        if !additional.is_empty() {
                            self.out.push_str(&B64.encode(additional));
                        }
                        self.out.push_str("</success>");
                        self.local = Some(check.local.clone());
                        self.unauthenticated = None;
                        self.phase = Phase::Authenticated;
                        self.framer.reset();
                        self.stream_open = false;
                    }
                    Err(f) => {
                        if f.credentials {
                            guards.throttle.failed(&check.local, self.peer.ip());
                        }
                        tracing::debug!(peer = %self.peer, account = %check.local, mechanism, "login failed");
                        self.sasl_fail(f);
                    }
                }
            }
            Step::Failure(f) => {
                self.sasl = None;
                self.sasl_fail(f);
            }
        }
    }

    /// Sends a SASL `<failure/>` with its reason, and closes the stream
    /// after too many wrong passwords or too many attempts. Failures where
    /// no password was checked (an unsupported channel-binding type, a
    /// refused downgrade) count only as attempts, so a client that walks
    /// down its mechanism list still reaches one that works.
    fn sasl_fail(&mut self, f: Failure) {
        tracing::debug!(peer = %self.peer, condition = f.condition, reason = %f.text, "SASL failure");
        if f.credentials {
            self.sasl_failures += 1;
        }
        self.out.push_str(&format!(
            "<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><{}/><text>{}</text></failure>",
            f.condition,
            crate::protocol::element::escape(&f.text)
        ));
        let auth = &self.srv.cfg.auth;
        if self.sasl_failures >= auth.max_failures_per_connection.max(1) {
            self.close("policy-violation", Some("too many authentication failures".into()));
        } else if self.sasl_attempts >= auth.max_attempts_per_connection.max(1) {
            self.close("policy-violation", Some("too many authentication attempts".into()));
        }
    }

    fn bind(&mut self, iq: &Element) {
        let id = iq.attr("id").unwrap_or("").to_string();
        let reply_err = |out: &mut String, cond: &str, typ: &str| {
            out.push_str(&format!(
                "<iq type='error' id='{}'><error type='{typ}'><{cond} xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>",
                crate::protocol::element::escape(&id)
            ));
        };
        if let Some(s) = iq.child("session", ns::SESSION) {
            let _ = s;
            reply_err(&mut self.out, "not-allowed", "cancel");
            return;
        }
        let Some(b) = iq.child("bind", ns::BIND).filter(|_| iq.attr("type") == Some("set")) else {
            self.close("not-authorized", Some("bind a resource first".into()));
            return;
        };
        let Some(local) = self.local.clone() else { return };
        let resource = b
            .child("resource", ns::BIND)
            .map(|r| r.text().trim().to_string())
            .filter(|r| !r.is_empty())
            .unwrap_or_else(|| format!("chatd-{:08x}", rand::random::<u32>()));
        let jid = match Jid::parse(&format!("{local}@{}/{resource}", self.srv.domain())) {
            Ok(j) => j,
            Err(_) => {
                reply_err(&mut self.out, "bad-request", "modify");
                return;
            }
        };
        let (tx, rx) =
            outbound_channel(self.srv.cfg.limits.session_queue.max(16), self.srv.cfg.delivery.max_outbound_bytes);
        let sid = self.srv.next_id();
        let handle = SessionHandle::new(sid, resource.clone(), tx);
        for old in self.srv.registry.bind(&local, handle, self.srv.cfg.limits.max_resources) {
            let _ = old.tx.try_send(Outbound::Close(CloseReason::Replaced));
        }
        self.out.push_str(&format!(
            "<iq type='result' id='{}'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><jid>{}</jid></bind></iq>",
            crate::protocol::element::escape(&id),
            crate::protocol::element::escape(&jid.to_string())
        ));
        tracing::debug!(jid = %jid, peer = %self.peer, "session bound");
        self.session = Some(Session::new(self.srv.clone(), sid, jid));
        self.rx = Some(rx);
        self.phase = Phase::Bound;
        self.framer.set_max_stanza(self.srv.cfg.limits.max_stanza_bytes);
    }

    /// Ends the connection: stream error or closing tag, then session
    /// cleanup (presence unavailable, unbind).
    async fn finish(&mut self) {
        if let Some(s) = self.session.as_mut()
            && let Some(c) = s.closing.take()
        {
            self.closing.get_or_insert((c.condition, c.text));
        }
        let tail = match self.closing.take() {
            Some((cond, text)) => {
                let mut t = String::new();
                if !self.stream_open {
                    t.push_str(&stream_header(self.srv.domain(), "0", None));
                }
                t.push_str(&stream_error(cond, text.as_deref()));
                Some(t)
            }
            None if self.peer_closed => Some("</stream:stream>".to_string()),
            None => None,
        };
        if let Some(t) = tail {
            let _ = self.flush().await;
            let _ = tokio::time::timeout(Duration::from_secs(2), self.io.write_all(t.as_bytes())).await;
            let _ = tokio::time::timeout(Duration::from_secs(1), self.io.shutdown()).await;
        }
        let dropped = !self.peer_closed && self.closing_was_transport;
        if let Some(s) = self.session.take() {
            match self.rx.take() {
                Some(rx) if dropped && s.sm.as_ref().is_some_and(modules::sm::Sm::resumable) && !s.replaced => {
                    let timeout = Duration::from_secs(self.srv.cfg.limits.resume_timeout_secs);
                    let limit = self.srv.cfg.limits.session_queue;
                    tokio::spawn(park(s, rx, timeout, limit));
                }
                _ => s.end(),
            }
        }
    }

    /// XEP-0198 §5: resume a parked (or half-open) session.
    async fn resume(&mut self, el: &Element) {
        let local = self.local.as_deref().unwrap_or("");
        let Some(req) = modules::sm::resume_request(&self.srv, local, el) else {
            self.out.push_str(modules::sm::RESUME_FAILED);
            return;
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        if req.takeover.send(tx).await.is_err() {
            self.out.push_str(modules::sm::RESUME_FAILED);
            return;
        }
        let Ok(Ok((mut s, srx))) = tokio::time::timeout(Duration::from_secs(5), rx).await else {
            self.out.push_str(modules::sm::RESUME_FAILED);
            return;
        };
        let Ok(ticket) = modules::sm::resume(&mut s, &req.previd, req.h) else {
            // h acknowledged more than was sent: a broken client.
            s.end();
            self.close("undefined-condition", Some("handled-count-too-high".into()));
            return;
        };
        // The h we report must only cover durable stanzas.
        let mut committed = self.srv.stores.durability.committed();
        let _ = wait_durable(&mut committed, ticket).await;
        s.last_rx = Instant::now();
        s.closing = None;
        tracing::debug!(jid = %s.jid, resent = s.sm.as_ref().map(|m| m.unacked_len()).unwrap_or(0), "session resumed");
        self.session = Some(s);
        self.rx = Some(srx);
        self.phase = Phase::Bound;
        self.framer.set_max_stanza(self.srv.cfg.limits.max_stanza_bytes);
    }
}

/// Holds a session whose connection dropped, for the resumption window.
/// Stanzas routed to it meanwhile join its unacknowledged queue and are
/// re-sent on resumption; stored messages among them stay in the store.
///
/// Memory stays bounded: the unacknowledged queue is limited in bytes
/// (`delivery.max_unacked_bytes`, enforced by `Session::send_xml`) and in
/// stanzas (`limits.session_queue`); past either the session ends.
async fn park(mut s: Session, mut rx: OutboundRx, timeout: Duration, limit: usize) {
    let Some(mut takeover) = s.sm.as_mut().and_then(|m| m.takeover.take()) else {
        s.end();
        return;
    };
    tracing::debug!(jid = %s.jid, "connection lost; session parked for resumption");
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            m = rx.recv() => match m {
                Some(o) => {
                    s.outbound(o);
                    s.out.clear();
                    let backlog = s.sm.as_ref().map(|m| m.unacked_len()).unwrap_or(0);
                    if s.closing.is_some() || backlog > limit {
                        break;
                    }
                }
                None => break,
            },
            t = takeover.recv() => match t {
                Some(reply) => {
                    if let Some(m) = s.sm.as_mut() {
                        m.takeover = Some(takeover);
                    }
                    match reply.send((s, rx)) {
                        Ok(()) => return,
                        Err((s2, rx2)) => {
                            s = s2;
                            rx = rx2;
                            let Some(t) = s.sm.as_mut().and_then(|m| m.takeover.take()) else { break };
                            takeover = t;
                        }
                    }
                }
                None => break,
            },
            _ = &mut deadline => break,
        }
    }
    tracing::debug!(jid = %s.jid, "resumption window over; session ended");
    s.end();
}

async fn wait_ack(w: &mut Option<tokio::sync::oneshot::Receiver<()>>) {
    match w {
        Some(rx) => {
            let _ = rx.await;
        }
        None => std::future::pending().await,
    }
}

async fn recv_takeover(rx: Option<&mut mpsc::Receiver<Takeover>>) -> Option<Takeover> {
    match rx {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

async fn recv_opt(rx: &mut Option<OutboundRx>) -> Option<Outbound> {
    match rx {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}
