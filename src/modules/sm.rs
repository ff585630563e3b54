//! XEP-0198 Stream Management: acknowledgements in both directions, and
//! the confirmation rule for clients without it.
//!
//! - **Client → server.** `<a h='n'/>` is only sent once every stanza
//!   counted in `n` is durable: the `<r/>` is recorded with the highest
//!   store ticket seen so far and answered when the group commit has
//!   passed it. That is the sender's "one tick" guarantee.
//! - **Server → client.** Every stanza sent is kept in `unacked`; when
//!   the client acknowledges, stored messages among them are deleted
//!   from the offline queue. The server asks with `<r/>` after each
//!   batch it writes.
//! - **Without XEP-0198**, after writing stored messages the server sends
//!   an XEP-0199 ping; XML streams are processed in order, so the
//!   client's answer proves it processed everything before it, and those
//!   messages are deleted then.

use std::sync::Arc;

use crate::c2s::session::{Resumable, Session, SmState};
use crate::protocol::{Element, ns};
use crate::storage::Ticket;

pub fn handle_nonza(s: &mut Session, el: &Element) {
    match el.local_name() {
        "enable" => {
            if s.sm.is_some() {
                s.send_nonza("<failed xmlns='urn:xmpp:sm:3'><unexpected-request xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></failed>");
                return;
            }
            s.sm = Some(SmState::default());
            let wants_resume = matches!(el.attr("resume"), Some("true") | Some("1"));
            if wants_resume {
                let id = format!("{:016x}{:016x}", rand::random::<u64>(), rand::random::<u64>());
                let (tx, rx) = tokio::sync::mpsc::channel(1);
                if let Ok(mut t) = s.srv.resumable.lock() {
                    t.insert(id.clone(), Resumable { local: s.local.clone(), takeover: tx });
                }
                s.takeover = Some(rx);
                let max = s.srv.cfg.limits.resume_timeout_secs;
                s.send_nonza(&format!("<enabled xmlns='urn:xmpp:sm:3' id='{id}' resume='true' max='{max}'/>"));
                s.resume_id = Some(id);
            } else {
                s.send_nonza("<enabled xmlns='urn:xmpp:sm:3'/>");
            }
        }
        "r" => {
            if let Some(sm) = s.sm.as_ref() {
                let h = sm.inbound;
                s.ack_requests.push((h, s.max_ticket));
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

/// Processes the client's acknowledgement of `h` stanzas.
fn ack_received(s: &mut Session, h: u32) {
    let Some(sm) = s.sm.as_mut() else { return };
    let delta = h.wrapping_sub(sm.acked) as usize;
    if delta > sm.unacked.len() {
        let sent = sm.outbound;
        s.close(
            "undefined-condition",
            Some(format!("handled-count-too-high: h={h} but only {sent} stanzas were sent")),
        );
        return;
    }
    let mut seqs = Vec::new();
    for _ in 0..delta {
        let Some((seq, xml)) = sm.unacked.pop_front() else { break };
        sm.unacked_bytes = sm.unacked_bytes.saturating_sub(xml.len());
        if let Some(seq) = seq {
            seqs.push(seq);
        }
    }
    sm.acked = h;
    sm.requested = false;
    if !seqs.is_empty() {
        let local = s.local.clone();
        s.srv.router.confirm(&local, &seqs);
    }
}

/// Asks the client to confirm what was just written.
pub fn request_acks(s: &mut Session) {
    if let Some(sm) = s.sm.as_mut() {
        if !sm.unacked.is_empty() && !sm.requested {
            sm.requested = true;
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

/// Takes the `<r/>` requests recorded since the last call.
pub fn take_ack_requests(s: &mut Session) -> Vec<(u32, Ticket)> {
    std::mem::take(&mut s.ack_requests)
}

/// Applies the `h` a resuming client reports and returns the stanzas to
/// re-send (everything it did not acknowledge), or `None` if `h` is
/// impossible.
pub fn resume(s: &mut Session, h: u32) -> Option<Vec<(Option<u64>, Arc<str>)>> {
    let sm = s.sm.as_ref()?;
    if h.wrapping_sub(sm.acked) as usize > sm.unacked.len() {
        return None;
    }
    ack_received(s, h);
    let sm = s.sm.as_mut()?;
    let resend: Vec<_> = sm.unacked.drain(..).collect();
    sm.unacked_bytes = 0;
    sm.outbound = sm.acked;
    sm.requested = false;
    s.ack_requests.clear();
    Some(resend)
}
