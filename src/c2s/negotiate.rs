//! Stream negotiation (RFC 6120 §4–7) as a state machine that does no IO:
//! `header → [STARTTLS → header] → SASL → header → bind | resume`.
//!
//! The connection feeds it stream headers ([`Negotiation::header`]) and
//! top-level elements ([`Negotiation::element`]). It appends what must be
//! written to [`Negotiation::out`] and returns an [`Action`] for what only
//! the connection can do: the TLS handshake, the password check (a
//! throttle delay and, for PLAIN, a hash on the blocking pool), in-band
//! registration, taking over a session to resume. Keeping the protocol
//! decisions here lets every error path be tested by feeding elements,
//! like the framer.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;

use super::sasl::{Bindings, Check, Exchange, Failure, Step};
use crate::hooks::FeaturePhase;
use crate::modules;
use crate::modules::sm::ResumeRequest;
use crate::protocol::element::escape;
use crate::protocol::stanza::stream_header;
use crate::protocol::{Element, Jid, ns};
use crate::router::{OutboundRx, outbound_channel};
use crate::server::Server;
use crate::session::Session;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    /// Before SASL success.
    Connected,
    /// Authenticated, resource not yet bound.
    Authenticated,
    /// Resource bound or session resumed: negotiation is over.
    Bound,
}

/// What the connection must do after feeding an input. In every case
/// [`Negotiation::out`] is written first.
#[derive(Debug)]
pub enum Action {
    /// Nothing more: read on.
    Continue,
    /// `<proceed/>` is in `out`: write it, run the TLS handshake, then
    /// call [`Negotiation::tls_established`] and restart the framer.
    StartTls,
    /// Credentials are ready: wait `delay` (the login throttle), run
    /// `check` (on the blocking pool when [`Check::is_costly`]), then call
    /// [`Negotiation::verified`].
    Verify { check: Arc<Check>, delay: Duration },
    /// SASL succeeded: the client starts a new stream, so restart the
    /// framer; the connection no longer counts as unauthenticated.
    Authenticated,
    /// An in-band registration request (XEP-0077) before authentication:
    /// answer it with `modules::register::pre_auth`.
    Register(Element),
    /// `<resume/>` names a session of this account: take it over and call
    /// [`modules::sm::resume`]; on failure write
    /// [`modules::sm::RESUME_FAILED`] and call nothing else.
    Resume(ResumeRequest),
    /// A resource is bound: the session runs from here.
    Bound(Box<Bound>),
    /// End the stream with this error.
    Close(&'static str, Option<String>),
    /// End the connection without another byte (after `out`): plaintext
    /// injected before the TLS handshake.
    Abort,
}

/// A freshly bound session and its channel from the router.
pub struct Bound {
    pub session: Session,
    pub rx: OutboundRx,
}

impl std::fmt::Debug for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bound").field("jid", &self.session.jid.to_string()).finish_non_exhaustive()
    }
}

/// The negotiation state of one connection.
pub struct Negotiation {
    srv: Arc<Server>,
    c2s: Arc<super::C2s>,
    peer: SocketAddr,
    phase: Phase,
    /// The stream is confidential: TLS, or a transport secure by itself.
    secure: bool,
    /// Channel-binding data of the TLS connection (empty otherwise).
    cb: Bindings,
    sasl: Option<Exchange>,
    /// Wrong passwords on this connection.
    sasl_failures: u32,
    /// SASL exchanges started on this connection.
    sasl_attempts: u32,
    /// The authenticated account.
    local: Option<String>,
    /// The server's stream header for the current stream was written.
    stream_open: bool,
    /// Output to write before acting on the returned [`Action`].
    pub out: String,
}

impl Negotiation {
    /// A connection from `peer`; `secure` when its transport is already
    /// confidential without TLS of ours.
    pub fn new(c2s: Arc<super::C2s>, peer: SocketAddr, secure: bool) -> Negotiation {
        Negotiation {
            srv: c2s.srv.clone(),
            c2s,
            peer,
            phase: Phase::Connected,
            secure,
            cb: Bindings::default(),
            sasl: None,
            sasl_failures: 0,
            sasl_attempts: 0,
            local: None,
            stream_open: false,
            out: String::new(),
        }
    }

    /// Whether our stream header for the current stream was sent (a
    /// stream error needs one before it otherwise).
    pub fn stream_open(&self) -> bool {
        self.stream_open
    }

    /// TLS is up: the client starts a new stream. `exporter` is the TLS
    /// 1.3 exporter channel binding.
    pub fn tls_established(&mut self, exporter: Option<Vec<u8>>) {
        self.cb = self.c2s.sasl.bindings(exporter);
        self.secure = true;
        self.stream_open = false;
    }

    /// A session was resumed on this connection: negotiation is over.
    pub fn resumed(&mut self) {
        self.phase = Phase::Bound;
    }

    /// The channel bindings SASL may use: `None` without TLS.
    fn bindings(&self) -> Option<&Bindings> {
        self.secure.then_some(&self.cb)
    }

    /// Whether SASL may run on this connection now.
    fn sasl_allowed(&self) -> bool {
        self.secure || self.srv.cfg.listen.allow_plaintext
    }

    /// The client's stream header: answer with ours and the features of
    /// this phase.
    pub fn header(&mut self, h: &Element) -> Action {
        let domain = self.srv.domain();
        let id = format!("{:016x}", rand::random::<u64>());
        let to = h.attr("to").map(|t| t.to_lowercase());
        self.out.push_str(&stream_header(domain, &id, h.attr("from")));
        self.stream_open = true;
        if to.as_deref() != Some(domain) {
            return Action::Close("host-unknown", Some(format!("this server serves {domain}")));
        }
        if h.attr("version") != Some("1.0") {
            return Action::Close("unsupported-version", None);
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
                    for name in self.c2s.sasl.offered(self.bindings(), self.srv.cfg.listen.allow_plaintext) {
                        m.push(Element::stanza("mechanism").with_text(name));
                    }
                    f.push(m);
                    for e in self.srv.hooks.stream_features(FeaturePhase::BeforeAuth, &self.srv) {
                        f.push(e);
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
                f.push(Element::new("sm", ns::SM));
                for e in self.srv.hooks.stream_features(FeaturePhase::AfterAuth, &self.srv) {
                    f.push(e);
                }
            }
            Phase::Bound => {}
        }
        self.out.push_str(&f.to_xml());
        Action::Continue
    }

    /// A top-level element before the session runs. `rest` is what the
    /// framer holds after it: after `<starttls/>` only whitespace may
    /// follow before the handshake.
    pub fn element(&mut self, el: Element, rest: &[u8]) -> Action {
        if !self.stream_open {
            return Action::Close("not-well-formed", None);
        }
        match (self.phase, el.local_name(), el.ns.as_str()) {
            (Phase::Connected, "starttls", ns::TLS) if !self.secure => {
                self.out.push_str("<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>");
                // Whitespace between elements is allowed (some clients
                // send `<starttls/>\n`). Anything else after <starttls/>
                // before the handshake is a plaintext injection attempt
                // (RFC 6120 §5.4.3.3).
                if !rest.iter().all(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n')) {
                    tracing::debug!(
                        peer = %self.peer,
                        bytes = rest.len(),
                        "data after <starttls/> before the TLS handshake; closing"
                    );
                    return Action::Abort;
                }
                Action::StartTls
            }
            (Phase::Connected, "auth", ns::SASL) if self.sasl_allowed() => self.sasl_start(&el),
            (Phase::Connected, "iq", ns::CLIENT)
                if self.srv.cfg.registration.in_band
                    && self.sasl_allowed()
                    && el.child("query", modules::register::NS).is_some() =>
            {
                Action::Register(el)
            }
            (Phase::Connected, "response", ns::SASL) => self.sasl_step(&el),
            (Phase::Connected, "abort", ns::SASL) => {
                self.sasl = None;
                self.sasl_fail(Failure {
                    condition: "aborted",
                    text: "aborted by the client".into(),
                    credentials: false,
                })
            }
            (Phase::Authenticated, "iq", ns::CLIENT) => self.bind(&el),
            (Phase::Authenticated, "resume", ns::SM) => {
                let local = self.local.as_deref().unwrap_or("");
                match modules::sm::resume_request(&self.srv, local, &el) {
                    Some(r) => Action::Resume(r),
                    None => {
                        self.out.push_str(modules::sm::RESUME_FAILED);
                        Action::Continue
                    }
                }
            }
            (Phase::Authenticated, "enable", ns::SM) => {
                self.out.push_str(modules::sm::ENABLE_REFUSED);
                Action::Continue
            }
            (Phase::Connected, "starttls", ns::TLS) => {
                Action::Close("policy-violation", Some("TLS already active".into()))
            }
            (Phase::Connected, "auth", ns::SASL) => {
                self.sasl_attempts += 1;
                self.sasl_fail(Failure {
                    condition: "encryption-required",
                    text: "use STARTTLS first".into(),
                    credentials: false,
                })
            }
            (Phase::Bound, ..) => Action::Continue,
            _ => Action::Close("not-authorized", Some("authenticate and bind a resource first".into())),
        }
    }

    fn sasl_start(&mut self, el: &Element) -> Action {
        let mech = el.attr("mechanism").unwrap_or("");
        self.sasl_attempts += 1;
        self.sasl = None;
        match self.c2s.sasl.start(mech, self.bindings(), self.srv.cfg.listen.allow_plaintext) {
            Ok(ex) => self.sasl = Some(ex),
            Err(f) => return self.sasl_fail(f),
        }
        let text = el.text();
        let data = if text.trim() == "=" { Ok(Vec::new()) } else { B64.decode(text.trim()) };
        match data {
            Ok(d) => self.sasl_feed(&d),
            Err(_) => {
                self.sasl = None;
                self.sasl_fail(Failure {
                    condition: "incorrect-encoding",
                    text: "initial response is not base64".into(),
                    credentials: false,
                })
            }
        }
    }

    fn sasl_step(&mut self, el: &Element) -> Action {
        if self.sasl.is_none() {
            return Action::Close("policy-violation", Some("no SASL exchange in progress".into()));
        }
        match B64.decode(el.text().trim()) {
            Ok(d) => self.sasl_feed(&d),
            Err(_) => {
                self.sasl = None;
                self.sasl_fail(Failure {
                    condition: "incorrect-encoding",
                    text: "response is not base64".into(),
                    credentials: false,
                })
            }
        }
    }

    fn sasl_feed(&mut self, data: &[u8]) -> Action {
        let Some(ex) = self.sasl.as_mut() else { return Action::Continue };
        match ex.step(data) {
            Step::Challenge(c) => {
                self.out.push_str("<challenge xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>");
                self.out.push_str(&B64.encode(c));
                self.out.push_str("</challenge>");
                Action::Continue
            }
            Step::Verify(check) => {
                // Progressive delay after failed logins for this account or
                // address, before any password is checked.
                let delay = self.c2s.guards.throttle.wait(&check.local, self.peer.ip());
                if !delay.is_zero() {
                    tracing::debug!(peer = %self.peer, account = %check.local, wait = ?delay, "delaying login after failures");
                }
                Action::Verify { check: Arc::new(check), delay }
            }
            Step::Failure(f) => {
                self.sasl = None;
                self.sasl_fail(f)
            }
        }
    }

    /// The outcome of an [`Action::Verify`]: `None` when the check could
    /// not run (the hashing pool is gone).
    pub fn verified(&mut self, check: &Check, result: Option<Result<Vec<u8>, Failure>>) -> Action {
        let result = result.unwrap_or_else(|| {
            Err(Failure { condition: "temporary-auth-failure", text: "try again".into(), credentials: false })
        });
        let mechanism = self.sasl.take().map(|ex| ex.mechanism()).unwrap_or("");
        let throttle = &self.c2s.guards.throttle;
        match result {
            Ok(additional) => {
                throttle.succeeded(&check.local);
                tracing::debug!(peer = %self.peer, account = %check.local, mechanism, "SASL success");
                self.out.push_str("<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>");
                if !additional.is_empty() {
                    self.out.push_str(&B64.encode(additional));
                }
                self.out.push_str("</success>");
                self.local = Some(check.local.clone());
                self.phase = Phase::Authenticated;
                self.stream_open = false;
                Action::Authenticated
            }
            Err(f) => {
                if f.credentials {
                    throttle.failed(&check.local, self.peer.ip());
                }
                tracing::debug!(peer = %self.peer, account = %check.local, mechanism, "login failed");
                self.sasl_fail(f)
            }
        }
    }

    /// Sends a SASL `<failure/>` with its reason, and closes the stream
    /// after too many wrong passwords or too many attempts. Failures where
    /// no password was checked (an unsupported channel-binding type, a
    /// refused downgrade) count only as attempts, so a client that walks
    /// down its mechanism list still reaches one that works.
    fn sasl_fail(&mut self, f: Failure) -> Action {
        tracing::debug!(peer = %self.peer, condition = f.condition, reason = %f.text, "SASL failure");
        if f.credentials {
            self.sasl_failures += 1;
        }
        self.out.push_str(&format!(
            "<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><{}/><text>{}</text></failure>",
            f.condition,
            escape(&f.text)
        ));
        let auth = &self.srv.cfg.auth;
        if self.sasl_failures >= auth.max_failures_per_connection.max(1) {
            Action::Close("policy-violation", Some("too many authentication failures".into()))
        } else if self.sasl_attempts >= auth.max_attempts_per_connection.max(1) {
            Action::Close("policy-violation", Some("too many authentication attempts".into()))
        } else {
            Action::Continue
        }
    }

    /// Resource binding (RFC 6120 §7). A resource already bound by this
    /// account is taken over: the older session is closed with
    /// `conflict`.
    fn bind(&mut self, iq: &Element) -> Action {
        let id = escape(iq.attr("id").unwrap_or(""));
        let reply_err = |out: &mut String, cond: &str, typ: &str| {
            out.push_str(&format!(
                "<iq type='error' id='{id}'><error type='{typ}'><{cond} xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>"
            ));
        };
        if iq.child("session", ns::SESSION).is_some() {
            reply_err(&mut self.out, "not-allowed", "cancel");
            return Action::Continue;
        }
        let Some(b) = iq.child("bind", ns::BIND).filter(|_| iq.attr("type") == Some("set")) else {
            return Action::Close("not-authorized", Some("bind a resource first".into()));
        };
        let Some(local) = self.local.clone() else { return Action::Continue };
        let resource = b
            .child("resource", ns::BIND)
            .map(|r| r.text().trim().to_string())
            .filter(|r| !r.is_empty())
            .unwrap_or_else(|| format!("chatd-{:08x}", rand::random::<u32>()));
        let Ok(jid) = Jid::parse(&format!("{local}@{}/{resource}", self.srv.domain())) else {
            reply_err(&mut self.out, "bad-request", "modify");
            return Action::Continue;
        };
        let srv = &self.srv;
        let (tx, rx) = outbound_channel(srv.cfg.limits.session_queue.max(16), srv.cfg.delivery.max_outbound_bytes);
        let sid = srv.next_id();
        srv.router.bind(&local, sid, &resource, tx, srv.cfg.limits.max_resources);
        self.out.push_str(&format!(
            "<iq type='result' id='{id}'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><jid>{}</jid></bind></iq>",
            escape(&jid.to_string())
        ));
        tracing::debug!(jid = %jid, peer = %self.peer, "session bound");
        self.phase = Phase::Bound;
        Action::Bound(Box::new(Bound { session: Session::new(srv.clone(), sid, jid), rx }))
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::config::Config;
    use crate::protocol::element::{Scope, parse_element};
    use crate::protocol::{Frame, Framer};
    use crate::router::{CloseReason, Outbound};
    use crate::session::Resumable;
    use crate::storage::Stores;

    const USER: &str = "15550000001";
    const PW: &str = "secret";

    /// A server on the memory stores, its data directory removed on drop.
    struct Srv(Arc<Server>, PathBuf);

    impl Drop for Srv {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.1);
        }
    }

    fn server(configure: impl FnOnce(&mut Config)) -> Srv {
        let dir = std::env::temp_dir().join(format!("chatd-negotiate-{:016x}", rand::random::<u64>()));
        let mut cfg = Config { data_dir: dir.clone(), ..Default::default() };
        configure(&mut cfg);
        let stores = Stores::memory();
        stores.users.put_user(USER, &crate::accounts::make_record(PW, 4096, 0)).unwrap();
        Srv(Server::new(cfg, stores).unwrap(), dir)
    }

    fn neg(srv: &Srv, secure: bool) -> Negotiation {
        Negotiation::new(super::super::C2s::new(srv.0.clone()).unwrap(), "192.0.2.7:4000".parse().unwrap(), secure)
    }

    fn el(x: &str) -> Element {
        parse_element(x.as_bytes(), &Scope::client_stream()).unwrap()
    }

    fn header_to(to: &str, version: &str) -> Element {
        let mut f = Framer::new(4096);
        f.feed(format!("<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='{to}' version='{version}'>").as_bytes());
        match f.next_frame() {
            Ok(Some(Frame::Header(h))) => h,
            other => panic!("no header: {other:?}"),
        }
    }

    /// Feeds the stream header and returns the features written.
    fn open(n: &mut Negotiation) -> String {
        assert!(matches!(n.header(&header_to("localhost", "1.0")), Action::Continue));
        std::mem::take(&mut n.out)
    }

    fn feed(n: &mut Negotiation, x: &str) -> Action {
        n.element(el(x), b"")
    }

    fn plain(user: &str, pw: &str) -> String {
        let cred = B64.encode(format!("\0{user}\0{pw}"));
        format!("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{cred}</auth>")
    }

    /// Runs a Verify action as the connection would (without the delay).
    fn run_verify(n: &mut Negotiation, a: Action) -> Action {
        let Action::Verify { check, .. } = a else { panic!("expected Verify, got {a:?}") };
        let result = check.run();
        n.verified(&check, Some(result))
    }

    fn is_close(a: &Action, condition: &str, text: &str) -> bool {
        matches!(a, Action::Close(c, Some(t)) if *c == condition && t == text)
    }

    /// Logs in with PLAIN on a secure stream and opens the second stream.
    fn authenticated(srv: &Srv) -> Negotiation {
        let mut n = neg(srv, true);
        open(&mut n);
        let a = feed(&mut n, &plain(USER, PW));
        assert!(matches!(run_verify(&mut n, a), Action::Authenticated));
        assert!(n.out.contains("<success"), "{}", n.out);
        assert!(!n.stream_open(), "the client restarts the stream");
        n.out.clear();
        let features = open(&mut n);
        assert!(features.contains("urn:ietf:params:xml:ns:xmpp-bind"), "{features}");
        n
    }

    fn bind(n: &mut Negotiation, resource: &str) -> Action {
        feed(
            n,
            &format!(
                "<iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>{resource}</resource></bind></iq>"
            ),
        )
    }

    #[test]
    fn headers_for_another_host_or_version_are_refused() {
        let srv = server(|_| {});
        let mut n = neg(&srv, false);
        let a = n.header(&header_to("example.org", "1.0"));
        assert!(is_close(&a, "host-unknown", "this server serves localhost"), "{a:?}");
        assert!(n.out.contains("<stream:stream") && n.stream_open(), "our header precedes the error");
        let mut n = neg(&srv, false);
        assert!(matches!(n.header(&header_to("localhost", "0.9")), Action::Close("unsupported-version", None)));
        let mut n = neg(&srv, false);
        let a = feed(&mut n, "<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>");
        assert!(matches!(a, Action::Close("not-well-formed", None)), "an element before the header");
    }

    #[test]
    fn sasl_before_tls_is_refused_when_plaintext_is_disallowed() {
        let srv = server(|_| {});
        let mut n = neg(&srv, false);
        let features = open(&mut n);
        assert!(features.contains("<starttls") && features.contains("<required"), "{features}");
        assert!(!features.contains("<mechanisms"), "no SASL offered before TLS: {features}");
        for _ in 1..8 {
            assert!(matches!(feed(&mut n, &plain(USER, PW)), Action::Continue));
            assert!(n.out.contains("<encryption-required/>"), "{}", n.out);
            n.out.clear();
        }
        let a = feed(&mut n, &plain(USER, PW));
        assert!(is_close(&a, "policy-violation", "too many authentication attempts"), "{a:?}");
    }

    #[test]
    fn plaintext_allowed_offers_sasl_and_starttls() {
        let srv = server(|c| c.listen.allow_plaintext = true);
        let mut n = neg(&srv, false);
        let features = open(&mut n);
        assert!(features.contains("<starttls") && !features.contains("<required"), "{features}");
        assert!(features.contains("<mechanism>PLAIN</mechanism>") && !features.contains("-PLUS"), "{features}");
        assert!(matches!(feed(&mut n, &plain(USER, PW)), Action::Verify { .. }));
    }

    #[test]
    fn starttls_allows_only_whitespace_before_the_handshake() {
        let srv = server(|_| {});
        let starttls = el("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>");
        let mut n = neg(&srv, false);
        open(&mut n);
        assert!(matches!(n.element(starttls.clone(), b"\r\n \t"), Action::StartTls));
        assert_eq!(n.out, "<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>");
        let mut n = neg(&srv, false);
        open(&mut n);
        assert!(matches!(n.element(starttls.clone(), b"\n<auth xmlns="), Action::Abort), "plaintext injection");
        assert!(n.out.contains("<proceed"));

        let mut n = neg(&srv, false);
        open(&mut n);
        assert!(matches!(n.element(starttls.clone(), b""), Action::StartTls));
        n.tls_established(None);
        assert!(!n.stream_open());
        n.out.clear();
        let features = open(&mut n);
        assert!(!features.contains("<starttls") && features.contains("<mechanism>PLAIN</mechanism>"), "{features}");
        let a = n.element(starttls, b"");
        assert!(is_close(&a, "policy-violation", "TLS already active"), "{a:?}");
    }

    #[test]
    fn bad_mechanisms_and_encodings_fail_without_closing() {
        let srv = server(|_| {});
        let mut n = neg(&srv, true);
        open(&mut n);
        let a = feed(&mut n, "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='DIGEST-MD5'/>");
        assert!(matches!(a, Action::Continue));
        assert!(n.out.contains("<invalid-mechanism/>"), "{}", n.out);
        n.out.clear();
        let a = feed(&mut n, "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>!!!</auth>");
        assert!(matches!(a, Action::Continue));
        assert!(n.out.contains("<incorrect-encoding/>"), "{}", n.out);
        n.out.clear();
        assert!(matches!(feed(&mut n, "<abort xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>"), Action::Continue));
        assert!(n.out.contains("<aborted/>"), "{}", n.out);
        let a = feed(&mut n, "<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>AA==</response>");
        assert!(is_close(&a, "policy-violation", "no SASL exchange in progress"), "{a:?}");
    }

    /// Wrong passwords close the stream at the configured count; the
    /// throttle's delay is returned for the connection to wait, not slept
    /// here.
    #[test]
    fn too_many_wrong_passwords_close_the_stream() {
        let srv = server(|_| {});
        let mut n = neg(&srv, true);
        open(&mut n);
        for i in 0..3 {
            let a = feed(&mut n, &plain(USER, "wrong"));
            let Action::Verify { delay, .. } = &a else { panic!("{a:?}") };
            assert_eq!(delay.is_zero(), i < 2, "attempt {i}: {delay:?}");
            let a = run_verify(&mut n, a);
            assert!(n.out.contains("<not-authorized/>"), "{}", n.out);
            n.out.clear();
            if i < 2 {
                assert!(matches!(a, Action::Continue), "{a:?}");
            } else {
                assert!(is_close(&a, "policy-violation", "too many authentication failures"), "{a:?}");
            }
        }
    }

    #[test]
    fn a_check_that_cannot_run_is_a_temporary_failure() {
        let srv = server(|_| {});
        let mut n = neg(&srv, true);
        open(&mut n);
        let Action::Verify { check, .. } = feed(&mut n, &plain(USER, PW)) else { panic!() };
        assert!(matches!(n.verified(&check, None), Action::Continue));
        assert!(n.out.contains("<temporary-auth-failure/>"), "{}", n.out);
    }

    #[test]
    fn stanzas_before_bind_close_the_stream() {
        let srv = server(|_| {});
        let mut n = neg(&srv, true);
        open(&mut n);
        let a = feed(&mut n, "<message to='15550000002@localhost'><body>hi</body></message>");
        assert!(is_close(&a, "not-authorized", "authenticate and bind a resource first"), "{a:?}");
        let mut n = authenticated(&srv);
        let a = feed(&mut n, "<presence/>");
        assert!(is_close(&a, "not-authorized", "authenticate and bind a resource first"), "{a:?}");
        let mut n = authenticated(&srv);
        let a = feed(&mut n, "<iq type='get' id='r'><query xmlns='jabber:iq:roster'/></iq>");
        assert!(is_close(&a, "not-authorized", "bind a resource first"), "{a:?}");
    }

    #[test]
    fn bind_and_what_precedes_it() {
        let srv = server(|_| {});
        let mut n = authenticated(&srv);
        assert!(matches!(feed(&mut n, "<enable xmlns='urn:xmpp:sm:3'/>"), Action::Continue));
        assert_eq!(n.out, modules::sm::ENABLE_REFUSED);
        n.out.clear();
        let a = feed(&mut n, "<iq type='set' id='s'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>");
        assert!(matches!(a, Action::Continue));
        assert!(n.out.contains("<not-allowed "), "{}", n.out);
        n.out.clear();
        let Action::Bound(b) = bind(&mut n, "phone") else { panic!("not bound") };
        assert_eq!(b.session.jid.to_string(), format!("{USER}@localhost/phone"));
        assert!(n.out.contains(&format!("<jid>{USER}@localhost/phone</jid>")), "{}", n.out);
        n.out.clear();
        assert!(matches!(feed(&mut n, "<presence/>"), Action::Continue), "negotiation is over");
        assert!(n.out.is_empty());
    }

    /// Binding a resource already bound replaces the older session: it is
    /// told to close with `conflict`.
    #[test]
    fn bind_conflict_replaces_the_older_session() {
        let srv = server(|_| {});
        let mut first = authenticated(&srv);
        let Action::Bound(old) = bind(&mut first, "phone") else { panic!() };
        let mut old = *old;
        let mut second = authenticated(&srv);
        let Action::Bound(new) = bind(&mut second, "phone") else { panic!() };
        assert!(matches!(old.rx.try_recv(), Some(Outbound::Close(CloseReason::Replaced))));
        assert_ne!(old.session.id, new.session.id);
    }

    #[test]
    fn resume_only_takes_over_sessions_of_the_same_account() {
        let srv = server(|_| {});
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        srv.0
            .resumable
            .lock()
            .unwrap()
            .insert("theirs".into(), Resumable { local: "15550000009".into(), takeover: tx });
        let (tx, _rx2) = tokio::sync::mpsc::channel(1);
        srv.0.resumable.lock().unwrap().insert("mine".into(), Resumable { local: USER.into(), takeover: tx });
        let mut n = authenticated(&srv);
        for x in [
            "<resume xmlns='urn:xmpp:sm:3' previd='unknown' h='0'/>",
            "<resume xmlns='urn:xmpp:sm:3' previd='theirs' h='0'/>",
            "<resume xmlns='urn:xmpp:sm:3' previd='mine' h='x'/>",
        ] {
            assert!(matches!(feed(&mut n, x), Action::Continue), "{x}");
            assert_eq!(n.out, modules::sm::RESUME_FAILED, "{x}");
            n.out.clear();
        }
        let Action::Resume(r) = feed(&mut n, "<resume xmlns='urn:xmpp:sm:3' previd='mine' h='7'/>") else { panic!() };
        assert_eq!((r.previd.as_str(), r.h), ("mine", 7));
        assert!(n.out.is_empty());
    }
}
