//! XEP-0198 Stream Management: acknowledgements in both directions,
//! resumption, and the confirmation rule for clients without it.
//!
//! - **Client → server.** `<a h='n'/>` is only sent once every stanza
//!   counted in `n` is durable: the `<r/>` is recorded with the highest
//!   store ticket seen so far and answered when the group commit has
//!   passed it. That is the sender's "one tick" guarantee.
//! - **Server → client.** Every stanza sent is kept in the unacknowledged
//!   buffer; when the client acknowledges, stored messages among them are
//!   deleted from the offline queue. The server asks with `<r/>` after
//!   each batch it writes.
//! - **Resumption.** A session that enabled it is parked when its
//!   transport fails; `<resume/>` takes it over and re-sends exactly the
//!   stanzas after the client's `h`.
//! - **Without XEP-0198**, after writing stored messages the server sends
//!   an XEP-0199 ping; XML streams are processed in order, so the
//!   client's answer proves it processed everything before it, and those
//!   messages are deleted then.
//!
//! Everything here is state and decisions, no IO: functions append what
//! must be written to the session's output and return what the
//! connection must wait for (a durability ticket, a takeover); the
//! connection task does the waiting and the writing.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::protocol::element::escape;
use crate::protocol::{Element, ns};
use crate::server::Server;
use crate::session::{Resumable, Session, Takeover};
use crate::storage::Ticket;

/// `<failed/>` for an `<enable/>` that is not allowed now (before bind,
/// or a second one).
pub const ENABLE_REFUSED: &str =
    "<failed xmlns='urn:xmpp:sm:3'><unexpected-request xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></failed>";

/// `<failed/>` for a `<resume/>` that names no session this account may
/// take over.
pub const RESUME_FAILED: &str =
    "<failed xmlns='urn:xmpp:sm:3'><item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></failed>";

/// XEP-0198 state of one stream, from `<enable/>` on; it moves with the
/// session when the session is resumed on another connection.
#[derive(Debug)]
pub struct Sm {
    /// Stanzas received from the client (the `h` we report).
    inbound: u32,
    /// Stanzas sent to the client.
    outbound: u32,
    /// Last `h` the client acknowledged.
    acked: u32,
    /// Sent and not yet acknowledged, oldest first: the offline sequence
    /// number (for stored messages) and the bytes.
    unacked: VecDeque<(Option<u64>, Arc<str>)>,
    /// Bytes held in `unacked`.
    unacked_bytes: usize,
    /// `delivery.max_unacked_bytes`: past it the session is closed, so a
    /// client that never acknowledges cannot make the server hold
    /// unbounded memory for it.
    max_unacked_bytes: usize,
    /// An `<r/>` is outstanding.
    requested: bool,
    /// `<r/>`s not yet answered, oldest first: the `h` to report and the
    /// store ticket that must be durable before it may be.
    pending_acks: VecDeque<(u32, Ticket)>,
    /// Resumption id when the client enabled resumption.
    resume_id: Option<String>,
    /// Takeover requests from a connection resuming this session.
    pub takeover: Option<mpsc::Receiver<Takeover>>,
}

/// The client acknowledged more stanzas than were sent.
#[derive(Debug, PartialEq, Eq)]
pub struct HandledTooHigh {
    pub h: u32,
    pub sent: u32,
}

impl Sm {
    pub fn new(max_unacked_bytes: usize) -> Sm {
        Sm {
            inbound: 0,
            outbound: 0,
            acked: 0,
            unacked: VecDeque::new(),
            unacked_bytes: 0,
            max_unacked_bytes,
            requested: false,
            pending_acks: VecDeque::new(),
            resume_id: None,
            takeover: None,
        }
    }

    /// Counts a stanza received from the client.
    pub fn received(&mut self) {
        self.inbound = self.inbound.wrapping_add(1);
    }

    /// Counts a stanza written to the client and keeps it until it is
    /// acknowledged. `Err(bytes held)` when that passes the byte limit.
    pub fn sent(&mut self, seq: Option<u64>, xml: Arc<str>) -> Result<(), usize> {
        self.outbound = self.outbound.wrapping_add(1);
        self.unacked_bytes += xml.len();
        self.unacked.push_back((seq, xml));
        if self.unacked_bytes > self.max_unacked_bytes { Err(self.unacked_bytes) } else { Ok(()) }
    }

    /// Bytes sent and not yet acknowledged.
    pub fn unacked_bytes(&self) -> usize {
        self.unacked_bytes
    }

    /// Stanzas sent and not yet acknowledged.
    pub fn unacked_len(&self) -> usize {
        self.unacked.len()
    }

    /// Whether the client enabled resumption.
    pub fn resumable(&self) -> bool {
        self.resume_id.is_some()
    }

    /// Applies the client's `<a h/>`: drops what it covers and returns the
    /// offline sequence numbers among them, now safe to delete.
    ///
    /// # Errors
    /// `h` covers stanzas that were never sent.
    pub fn ack(&mut self, h: u32) -> Result<Vec<u64>, HandledTooHigh> {
        let delta = h.wrapping_sub(self.acked) as usize;
        if delta > self.unacked.len() {
            return Err(HandledTooHigh { h, sent: self.outbound });
        }
        let mut seqs = Vec::new();
        for (seq, xml) in self.unacked.drain(..delta) {
            self.unacked_bytes = self.unacked_bytes.saturating_sub(xml.len());
            seqs.extend(seq);
        }
        self.acked = h;
        self.requested = false;
        Ok(seqs)
    }

    /// Whether to send an `<r/>` now: something is unacknowledged and no
    /// request is outstanding. Marks the request as sent.
    pub fn should_request(&mut self) -> bool {
        if self.unacked.is_empty() || self.requested {
            return false;
        }
        self.requested = true;
        true
    }

    /// Records the client's `<r/>`: it is answered with the current `h`
    /// once `ticket` (covering every stanza counted) is durable.
    pub fn ack_requested(&mut self, ticket: Ticket) {
        self.pending_acks.push_back((self.inbound, ticket));
    }

    /// The ticket the oldest unanswered `<r/>` waits for.
    pub fn ack_due(&self) -> Option<Ticket> {
        self.pending_acks.front().map(|&(_, t)| t)
    }

    /// Writes, in order, the `<a h/>` of every `<r/>` whose ticket is at
    /// or below `committed`.
    pub fn release_acks(&mut self, committed: Ticket, out: &mut String) {
        while let Some(&(h, t)) = self.pending_acks.front() {
            if t > committed {
                break;
            }
            self.pending_acks.pop_front();
            out.push_str(&format!("<a xmlns='urn:xmpp:sm:3' h='{h}'/>"));
        }
    }

    /// Applies the `h` a resuming client reports. Returns the stanzas to
    /// re-send (everything it did not acknowledge), to be counted again as
    /// they are written on the new stream, and the offline sequence
    /// numbers `h` acknowledged. `<r/>`s of the old stream are dropped:
    /// `<resumed h/>` answers them.
    ///
    /// # Errors
    /// `h` covers stanzas that were never sent; nothing is changed.
    pub fn resume(&mut self, h: u32) -> Result<Resend, HandledTooHigh> {
        let acked = self.ack(h)?;
        let resend = self.unacked.drain(..).collect();
        self.unacked_bytes = 0;
        self.outbound = self.acked;
        self.requested = false;
        self.pending_acks.clear();
        Ok(Resend { stanzas: resend, acked })
    }
}

/// What resuming a stream re-sends and deletes.
#[derive(Debug)]
pub struct Resend {
    /// Unacknowledged stanzas, oldest first, with their offline sequence
    /// numbers.
    pub stanzas: Vec<(Option<u64>, Arc<str>)>,
    /// Offline sequence numbers the client's `h` acknowledged.
    pub acked: Vec<u64>,
}

/// Handles a top-level element in the XEP-0198 namespace on a bound
/// stream.
pub fn handle_nonza(s: &mut Session, el: &Element) {
    match el.local_name() {
        "enable" => enable(s, el),
        "r" => {
            let ticket = s.max_ticket;
            if let Some(sm) = s.sm.as_mut() {
                sm.ack_requested(ticket);
            }
        }
        "a" => {
            let Some(h) = el.attr("h").and_then(|h| h.parse::<u32>().ok()) else {
                s.close("invalid-xml", Some("<a/> without a valid h".into()));
                return;
            };
            ack_received(s, h);
        }
        _ => s.close("unsupported-stanza-type", Some(format!("<{}/>", el.local_name()))),
    }
}

/// `<enable/>`: starts counting, and with `resume='true'` registers the
/// session in the resumable table under a fresh random id.
fn enable(s: &mut Session, el: &Element) {
    if s.sm.is_some() {
        s.send_nonza(ENABLE_REFUSED);
        return;
    }
    let mut sm = Sm::new(s.srv.cfg.delivery.max_unacked_bytes);
    if matches!(el.attr("resume"), Some("true") | Some("1")) {
        let id = format!("{:016x}{:016x}", rand::random::<u64>(), rand::random::<u64>());
        let (tx, rx) = mpsc::channel(1);
        if let Ok(mut t) = s.srv.resumable.lock() {
            t.insert(id.clone(), Resumable { local: s.local.clone(), takeover: tx });
        }
        sm.takeover = Some(rx);
        let max = s.srv.cfg.limits.resume_timeout_secs;
        s.send_nonza(&format!("<enabled xmlns='urn:xmpp:sm:3' id='{id}' resume='true' max='{max}'/>"));
        sm.resume_id = Some(id);
    } else {
        s.send_nonza("<enabled xmlns='urn:xmpp:sm:3'/>");
    }
    s.sm = Some(sm);
}

/// Processes the client's acknowledgement of `h` stanzas.
fn ack_received(s: &mut Session, h: u32) {
    let Some(sm) = s.sm.as_mut() else { return };
    match sm.ack(h) {
        Ok(seqs) => confirm(s, &seqs),
        Err(HandledTooHigh { h, sent }) => s.close(
            "undefined-condition",
            Some(format!("handled-count-too-high: h={h} but only {sent} stanzas were sent")),
        ),
    }
}

fn confirm(s: &Session, seqs: &[u64]) {
    if !seqs.is_empty() {
        s.srv.router.confirm(&s.local, seqs);
    }
}

/// Asks the client to confirm what was just written.
pub fn request_acks(s: &mut Session) {
    if let Some(sm) = s.sm.as_mut() {
        if sm.should_request() {
            s.send_nonza("<r xmlns='urn:xmpp:sm:3'/>");
        }
        return;
    }
    if !s.unconfirmed.is_empty() && s.ack_ping.is_none() {
        s.ping_counter += 1;
        let id = format!("confirm{}", s.ping_counter);
        let ping = Element::stanza("iq")
            .with_attr("type", "get")
            .with_attr("id", id.as_str())
            .with_attr("from", s.domain().to_string())
            .with_attr("to", s.jid.to_string())
            .with_child(Element::new("ping", ns::PING));
        s.ack_ping = Some((id, s.unconfirmed.len()));
        s.send(&ping);
    }
}

/// An iq result/error addressed to the server: maybe the answer to a
/// confirmation ping.
pub fn iq_response(s: &mut Session, iq: &Element) {
    let Some((id, n)) = s.ack_ping.clone() else { return };
    if iq.attr("id") != Some(id.as_str()) {
        return;
    }
    s.ack_ping = None;
    let seqs: Vec<u64> = s.unconfirmed.drain(..n.min(s.unconfirmed.len())).collect();
    let local = s.local.clone();
    s.srv.router.confirm(&local, &seqs);
    request_acks(s);
}

/// The ticket the connection must wait for before the next `<a h/>`.
pub fn ack_due(s: &Session) -> Option<Ticket> {
    s.sm.as_ref().and_then(Sm::ack_due)
}

/// Writes the `<a h/>` answers that `committed` makes durable.
pub fn release_acks(s: &mut Session, committed: Ticket) {
    if let Some(sm) = s.sm.as_mut() {
        sm.release_acks(committed, &mut s.out);
    }
}

/// Removes the session from the resumable table: it can no longer be
/// resumed.
pub fn forget(s: &mut Session) {
    if let Some(id) = s.sm.as_mut().and_then(|m| m.resume_id.take())
        && let Ok(mut t) = s.srv.resumable.lock()
    {
        t.remove(&id);
    }
}

/// A `<resume/>` that names a session this account may take over.
#[derive(Debug)]
pub struct ResumeRequest {
    pub previd: String,
    /// The client's `h`.
    pub h: u32,
    /// Where to ask the session's holder (its live connection or its
    /// parking task) to hand it over.
    pub takeover: mpsc::Sender<Takeover>,
}

/// Looks up the session a `<resume/>` names. `None` when it is
/// malformed or names no session of `local`: answer [`RESUME_FAILED`].
pub fn resume_request(srv: &Server, local: &str, el: &Element) -> Option<ResumeRequest> {
    let previd = el.attr("previd").unwrap_or("").to_string();
    let h = el.attr("h").and_then(|h| h.parse::<u32>().ok())?;
    let takeover = srv
        .resumable
        .lock()
        .ok()
        .and_then(|t| t.get(&previd).filter(|r| r.local == local).map(|r| r.takeover.clone()))?;
    Some(ResumeRequest { previd, h, takeover })
}

/// Resumes a session handed over for `previd` with the client's `h`:
/// writes `<resumed/>`, the stanzas the client did not acknowledge and an
/// `<r/>` to the session's output. Returns the ticket that must be
/// durable before that output is written, since `<resumed h/>` counts
/// every stanza received on the old stream.
///
/// # Errors
/// `h` covers stanzas that were never sent: the session cannot be
/// resumed and must end.
pub fn resume(s: &mut Session, previd: &str, h: u32) -> Result<Ticket, HandledTooHigh> {
    let Some(sm) = s.sm.as_mut() else { return Err(HandledTooHigh { h, sent: 0 }) };
    let Resend { stanzas, acked } = sm.resume(h)?;
    let inbound = sm.inbound;
    confirm(s, &acked);
    s.send_nonza(&format!("<resumed xmlns='urn:xmpp:sm:3' previd='{}' h='{inbound}'/>", escape(previd)));
    for (seq, xml) in stanzas {
        s.send_xml(xml, seq);
    }
    request_acks(s);
    Ok(s.max_ticket)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xml(s: &str) -> Arc<str> {
        s.into()
    }

    #[test]
    fn acks_drop_what_they_cover_and_return_stored_seqs() {
        let mut sm = Sm::new(1000);
        sm.sent(Some(7), xml("<message/>")).unwrap();
        sm.sent(None, xml("<presence/>")).unwrap();
        sm.sent(Some(9), xml("<message/>")).unwrap();
        assert_eq!(sm.unacked_bytes(), 31);
        assert!(sm.should_request());
        assert!(!sm.should_request(), "one <r/> outstanding at a time");
        assert_eq!(sm.ack(2), Ok(vec![7]));
        assert_eq!((sm.unacked_len(), sm.unacked_bytes()), (1, 10));
        assert!(sm.should_request(), "an <a/> answers the outstanding <r/>");
        assert_eq!(sm.ack(2), Ok(vec![]), "a repeated h is harmless");
        assert_eq!(sm.ack(4), Err(HandledTooHigh { h: 4, sent: 3 }));
        assert_eq!(sm.unacked_len(), 1, "an impossible h changes nothing");
        assert_eq!(sm.ack(3), Ok(vec![9]));
        assert!(!sm.should_request(), "nothing left to confirm");
    }

    #[test]
    fn counters_wrap() {
        let mut sm = Sm::new(1000);
        sm.acked = u32::MAX;
        sm.outbound = u32::MAX;
        sm.sent(Some(1), xml("<a/>")).unwrap();
        sm.sent(Some(2), xml("<b/>")).unwrap();
        assert_eq!(sm.ack(1), Ok(vec![1, 2]));
        sm.inbound = u32::MAX;
        sm.received();
        sm.ack_requested(0);
        let mut out = String::new();
        sm.release_acks(0, &mut out);
        assert_eq!(out, "<a xmlns='urn:xmpp:sm:3' h='0'/>");
    }

    #[test]
    fn unacked_bytes_are_bounded() {
        let mut sm = Sm::new(10);
        assert_eq!(sm.sent(None, xml("<message/>")), Ok(()));
        assert_eq!(sm.sent(None, xml("<x/>")), Err(14));
    }

    /// `<a h/>` goes out only once the ticket of its `<r/>` is durable,
    /// in request order, each with the `h` counted when it was asked.
    #[test]
    fn acks_wait_for_their_ticket() {
        let mut sm = Sm::new(1000);
        sm.received();
        sm.ack_requested(5);
        sm.received();
        sm.received();
        sm.ack_requested(8);
        assert_eq!(sm.ack_due(), Some(5));
        let mut out = String::new();
        sm.release_acks(4, &mut out);
        assert!(out.is_empty());
        sm.release_acks(7, &mut out);
        assert_eq!(out, "<a xmlns='urn:xmpp:sm:3' h='1'/>");
        assert_eq!(sm.ack_due(), Some(8));
        out.clear();
        sm.release_acks(100, &mut out);
        assert_eq!(out, "<a xmlns='urn:xmpp:sm:3' h='3'/>");
        assert_eq!(sm.ack_due(), None);
    }

    /// Resumption re-sends exactly what the client's `h` leaves out, and
    /// counts it again from that `h`.
    #[test]
    fn resume_resends_after_h() {
        let mut sm = Sm::new(1000);
        for (i, x) in ["<m1/>", "<m2/>", "<m3/>"].into_iter().enumerate() {
            sm.sent(Some(i as u64 + 1), xml(x)).unwrap();
        }
        sm.ack_requested(3);
        assert!(sm.should_request());
        assert!(matches!(sm.resume(4), Err(HandledTooHigh { h: 4, sent: 3 })));
        assert_eq!(sm.unacked_len(), 3);
        let r = sm.resume(1).unwrap();
        assert_eq!(r.acked, vec![1]);
        let resent: Vec<_> = r.stanzas.iter().map(|(q, x)| (*q, x.to_string())).collect();
        assert_eq!(resent, vec![(Some(2), "<m2/>".to_string()), (Some(3), "<m3/>".to_string())]);
        assert_eq!((sm.unacked_len(), sm.unacked_bytes(), sm.ack_due()), (0, 0, None));
        for (q, x) in r.stanzas {
            sm.sent(q, x).unwrap();
        }
        assert!(sm.should_request());
        assert_eq!(sm.ack(3), Ok(vec![2, 3]));
    }
}
