//! The offline backlog of a session coming online: read from the store in
//! bounded batches between the connection's writes (delivery rule 6).

use crate::modules;
use crate::session::Session;

/// Writes the next batch of the offline backlog. Stored messages that
/// arrive live meanwhile only extend the backlog (see
/// [`Session::outbound`]), so each is written after every stored
/// message before it. With XEP-0198 the backlog waits while half of
/// `delivery.max_unacked_bytes` is unacknowledged: a client that acks
/// as it reads drains any backlog; one that does not holds bounded
/// memory.
pub async fn pump(s: &mut Session) {
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
    let srv = s.srv.clone();
    let batch = srv.router.pending(&s.local, after, upto, 200, OUT_BUDGET.min(unacked_max / 4)).await;
    match batch.last() {
        Some((last, _)) => s.backlog = Some((*last, upto)),
        None => s.backlog = None,
    }
    for (seq, xml) in batch {
        s.send_xml(xml, Some(seq));
    }
    modules::sm::request_acks(s);
}
