//! One client connection: its IO and the event loop that multiplexes
//! transport reads, outbound stanzas from the router, durability
//! notifications and timers.
//!
//! The decisions live elsewhere and do no IO: stream negotiation in
//! [`super::negotiate`], XEP-0198 in [`crate::modules::sm`], stanza
//! handling in [`Session`]. This task writes what they produce and waits
//! for what they name: a TLS handshake, a password hash, a durable
//! ticket, a session handed over for resumption.
//!
//! Memory: an idle plaintext TCP connection holds no read buffer — the
//! loop waits for readability and only then reserves one, and releases it
//! when every byte was consumed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::C2s;
use super::close::Close;
use super::guard::IpSlot;
use super::negotiate::{Action, Bound, Negotiation};
use super::sasl::Check;
use super::transport::{Stream, Transport};
use crate::modules;
use crate::modules::sm::ResumeRequest;
use crate::protocol::element::ParseLimits;
use crate::protocol::{Element, Frame, Framer, ns};
use crate::router::{Outbound, OutboundRx};
use crate::server::Server;
use crate::session::Session;

struct Conn {
    srv: Arc<Server>,
    c2s: Arc<C2s>,
    io: Transport,
    framer: Framer,
    peer: SocketAddr,
    neg: Negotiation,
    /// Counts this connection against its address's cap on
    /// unauthenticated connections until SASL succeeds.
    unauthenticated: Option<IpSlot>,
    session: Option<Session>,
    rx: Option<OutboundRx>,
    state: Close,
    live_ping: Option<Instant>,
    /// Fires when the oldest pending `<a/>` may be sent.
    ack_wait: Option<oneshot::Receiver<()>>,
}

/// Runs one accepted TCP connection to completion; `direct_tls` starts
/// it with the TLS handshake (XEP-0368). Never panics on peer input.
pub async fn run(c2s: Arc<C2s>, sock: TcpStream, peer: SocketAddr, direct_tls: bool) {
    serve(c2s, Transport::Tcp(sock), peer, direct_tls, false).await;
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
pub async fn serve_stream<S>(c2s: Arc<C2s>, stream: S, peer: SocketAddr, secure: bool)
where
    S: Stream,
{
    serve(c2s, Transport::Other(Box::new(stream)), peer, false, secure).await;
}

async fn serve(c2s: Arc<C2s>, io: Transport, peer: SocketAddr, direct_tls: bool, secure: bool) {
    let srv = c2s.srv.clone();
    let l = &srv.cfg.limits;
    let parse_limits = ParseLimits { max_elements: l.max_stanza_elements, max_attributes: l.max_element_attributes };
    let framer = Framer::with_limits(l.max_stanza_bytes_before_bind.min(l.max_stanza_bytes), parse_limits);
    let unauthenticated = c2s.guards.unauthenticated.acquire(peer.ip());
    let neg = Negotiation::new(c2s.clone(), peer, secure);
    let mut c = Conn {
        srv,
        c2s,
        io,
        framer,
        peer,
        neg,
        unauthenticated,
        session: None,
        rx: None,
        state: Close::Open,
        live_ping: None,
        ack_wait: None,
    };
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
        self.state.error(condition, text);
    }

    async fn upgrade_tls(&mut self) -> bool {
        let Some(_handshake) = self.c2s.guards.handshakes.acquire(self.peer.ip()) else {
            tracing::debug!(peer = %self.peer, "too many TLS handshakes in flight from this address; refused");
            return false;
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(self.srv.tls.clone());
        let hs = Duration::from_secs(self.srv.cfg.limits.handshake_timeout_secs);
        match self.io.accept_tls(acceptor, hs).await {
            Ok(exporter) => {
                self.neg.tls_established(exporter);
                self.framer.reset();
                true
            }
            Err(e) => {
                tracing::debug!(peer = %self.peer, "{e}");
                false
            }
        }
    }

    async fn run(&mut self) {
        let limits = self.srv.cfg.limits.clone();
        let handshake_deadline = Instant::now() + Duration::from_secs(limits.handshake_timeout_secs);
        let ping_interval = Duration::from_secs(limits.ping_interval_secs.max(1));
        let ping_timeout = Duration::from_secs(limits.ping_timeout_secs.max(1));
        let mut shutdown = self.srv.shutdown.subscribe();
        loop {
            // Read the offline backlog in bounded batches between writes.
            if let Some(s) = self.session.as_mut() {
                super::backlog::pump(s).await;
            }
            if !self.flush().await {
                self.state.transport_failed();
                return;
            }
            if !self.state.is_open() {
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
            let takeover = self.session.as_mut().and_then(|s| s.sm.as_mut()).and_then(|m| m.takeover.as_mut());
            tokio::select! {
                r = self.io.read_into(&mut self.framer) => match r {
                    Ok(0) | Err(_) => {
                        self.state.transport_failed();
                        return;
                    }
                    Ok(_) => {
                        if let Some(s) = self.session.as_mut() { s.last_rx = Instant::now(); }
                        self.live_ping = None;
                        if self.process_input().await.is_err() { return; }
                        self.framer.shrink_if_idle();
                    }
                },
                m = or_pending(self.rx.as_mut().map(|r| r.recv())), if has_rx => match m {
                    Some(o) => self.outbound(o),
                    None => {
                        // Registry dropped our handle: slow consumer.
                        self.rx = None;
                        self.close("policy-violation", Some("too slow to receive".into()));
                    }
                },
                _ = or_pending(self.ack_wait.as_mut()), if waiting_acks => {
                    self.ack_wait = None;
                    self.release_acks();
                }
                _ = tokio::time::sleep_until(deadline) => self.timer(),
                t = or_pending(takeover.map(|t| t.recv())) => {
                    // The client resumed this session on a new connection
                    // while this one looked alive (half-open).
                    if let (Some(reply), Some(s), Some(rx)) = (t, self.session.take(), self.rx.take()) {
                        if let Err((s, _)) = reply.send((s, rx)) {
                            self.session = Some(s);
                        }
                        self.close("conflict", Some("session resumed on another connection".into()));
                    }
                }
                _ = shutdown.recv() => self.close("system-shutdown", None),
            }
        }
    }

    /// Negotiation timeout, or the session's idle ping and its timeout.
    fn timer(&mut self) {
        let Some(s) = self.session.as_mut() else {
            return self.close("connection-timeout", Some("negotiation took too long".into()));
        };
        if self.live_ping.is_some() {
            // A dead peer: its session may still be resumed.
            self.state.transport_failed();
            return self.close("connection-timeout", Some("no answer to ping".into()));
        }
        s.ping_counter += 1;
        let ping = Element::stanza("iq")
            .with_attr("type", "get")
            .with_attr("id", format!("live{}", s.ping_counter))
            .with_attr("from", s.domain().to_string())
            .with_attr("to", s.jid.to_string())
            .with_child(Element::new("ping", ns::PING));
        s.send(&ping);
        self.live_ping = Some(Instant::now());
    }

    /// Applies an item from the router and whatever else is already
    /// queued, so they go out in one write.
    fn outbound(&mut self, first: Outbound) {
        let (Some(s), Some(rx)) = (self.session.as_mut(), self.rx.as_mut()) else { return };
        s.outbound(first);
        for _ in 0..256 {
            if s.closing.is_some() {
                break;
            }
            match rx.try_recv() {
                Some(o) => s.outbound(o),
                None => break,
            }
        }
        modules::sm::request_acks(s);
    }

    /// Writes the `<a h/>` answers the commit watermark now covers.
    fn release_acks(&mut self) {
        if let Some(s) = self.session.as_mut() {
            modules::sm::release_acks(s, self.srv.durable.committed());
        }
    }

    /// Writes pending output. Returns false when the transport is gone.
    async fn flush(&mut self) -> bool {
        let limit = Duration::from_secs(self.srv.cfg.limits.ping_timeout_secs.max(1));
        if let Some(s) = self.session.as_mut() {
            if let Some(c) = s.closing.take() {
                self.state.error(c.condition, c.text);
            }
            if modules::sm::ack_due(s).is_some() {
                modules::sm::release_acks(s, self.srv.durable.committed());
            }
        }
        if !self.neg.out.is_empty() {
            // Negotiation output: not needed once the session runs.
            let out = std::mem::take(&mut self.neg.out);
            if !write_timed(&mut self.io, out.as_bytes(), limit).await {
                return false;
            }
        }
        let Some(s) = self.session.as_mut().filter(|s| !s.out.is_empty()) else { return true };
        let ok = write_timed(&mut self.io, s.out.as_bytes(), limit).await;
        s.out.clear();
        // Idle sessions keep at most a small buffer.
        if s.out.capacity() > 4096 {
            s.out = String::new();
        }
        ok
    }

    /// Parses and handles every complete frame in the buffer. `Err` ends
    /// the connection at once.
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
                Frame::Header(h) => {
                    let a = self.neg.header(&h);
                    self.act(a).await?;
                }
                Frame::Close => {
                    self.state.peer_closed();
                    return Ok(());
                }
                Frame::Stanza(el) => match self.session.as_mut() {
                    Some(s) if el.ns == ns::SM => modules::sm::handle_nonza(s, &el),
                    Some(s) => s.handle_stanza(el),
                    None => {
                        let a = self.neg.element(el, self.framer.pending());
                        self.act(a).await?;
                    }
                },
            }
            if !self.state.is_open() || self.session.as_ref().is_some_and(|s| s.closing.is_some()) {
                return Ok(());
            }
        }
    }

    /// Carries out what negotiation asked for.
    async fn act(&mut self, action: Action) -> Result<(), ()> {
        let action = match action {
            Action::Verify { check, delay } => self.verify(check, delay).await,
            a => a,
        };
        match action {
            Action::Continue | Action::Verify { .. } => {}
            Action::Close(condition, text) => self.close(condition, text),
            Action::StartTls => {
                if !self.flush().await || !self.upgrade_tls().await {
                    self.state.transport_failed();
                    return Err(());
                }
            }
            Action::Abort => {
                let _ = self.flush().await;
                self.state.transport_failed();
                return Err(());
            }
            Action::Authenticated => {
                self.unauthenticated = None;
                self.framer.reset();
            }
            Action::Register(el) => {
                if let Some(q) = el.child("query", modules::register::NS) {
                    let reply = modules::register::pre_auth(&self.srv, &el, q, self.peer.ip()).await;
                    self.neg.out.push_str(&reply);
                }
            }
            Action::Resume(req) => self.resume(req).await,
            Action::Bound(b) => {
                let Bound { session, rx } = *b;
                self.session = Some(session);
                self.rx = Some(rx);
                self.framer.set_max_stanza(self.srv.cfg.limits.max_stanza_bytes);
            }
        }
        Ok(())
    }

    /// Checks SASL credentials after the login throttle's delay; PLAIN's
    /// hash runs on the blocking pool.
    async fn verify(&mut self, check: Arc<Check>, delay: Duration) -> Action {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let result = if check.is_costly() {
            let c = check.clone();
            self.c2s.guards.hash(move || c.run()).await
        } else {
            Some(check.run())
        };
        self.neg.verified(&check, result)
    }

    /// XEP-0198 §5: takes over the parked (or half-open) session the
    /// client names and resumes it here.
    async fn resume(&mut self, req: ResumeRequest) {
        let Some((mut s, srx)) = super::resume::take_over(&req).await else {
            self.neg.out.push_str(modules::sm::RESUME_FAILED);
            return;
        };
        let Ok(ticket) = modules::sm::resume(&mut s, &req.previd, req.h) else {
            // h acknowledged more than was sent: a broken client.
            s.end();
            self.close("undefined-condition", Some("handled-count-too-high".into()));
            return;
        };
        // The h we report must only cover durable stanzas.
        let _ = self.srv.durable.until(ticket).await;
        s.last_rx = Instant::now();
        s.closing = None;
        tracing::debug!(jid = %s.jid, resent = s.sm.as_ref().map(|m| m.unacked_len()).unwrap_or(0), "session resumed");
        self.session = Some(s);
        self.rx = Some(srx);
        self.neg.resumed();
        self.framer.set_max_stanza(self.srv.cfg.limits.max_stanza_bytes);
    }

    /// Ends the connection: the last bytes (a stream error or the closing
    /// tag), then the session is parked for resumption or ended (presence
    /// unavailable, unbind).
    async fn finish(&mut self) {
        if let Some(s) = self.session.as_mut()
            && let Some(c) = s.closing.take()
        {
            self.state.error(c.condition, c.text);
        }
        let tail = self.state.tail(self.srv.domain(), self.neg.stream_open());
        if let Some(t) = tail {
            let _ = self.flush().await;
            let _ = tokio::time::timeout(Duration::from_secs(2), self.io.write_all(t.as_bytes())).await;
            let _ = tokio::time::timeout(Duration::from_secs(1), self.io.shutdown()).await;
        }
        let dropped = self.state.parks();
        if let Some(s) = self.session.take() {
            match self.rx.take() {
                Some(rx) if dropped && s.sm.as_ref().is_some_and(modules::sm::Sm::resumable) && !s.replaced => {
                    let timeout = Duration::from_secs(self.srv.cfg.limits.resume_timeout_secs);
                    let limit = self.srv.cfg.limits.session_queue;
                    tokio::spawn(super::resume::park(s, rx, timeout, limit));
                }
                _ => s.end(),
            }
        }
    }
}

/// Writes `data`. A peer that does not read for `limit` while we have
/// data for it is treated as gone, so a stalled client cannot pin a task
/// forever.
async fn write_timed(io: &mut Transport, data: &[u8], limit: Duration) -> bool {
    matches!(tokio::time::timeout(limit, io.write_all(data)).await, Ok(Ok(())))
}

/// Awaits `f`, or forever when there is nothing to await.
async fn or_pending<F: std::future::Future>(f: Option<F>) -> F::Output {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}
