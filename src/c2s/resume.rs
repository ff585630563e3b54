//! Handing sessions over for resumption (XEP-0198 §5). A session that
//! enabled resumption is held by its connection while that lives, then by
//! a parking task for the resumption window; a new connection of the same
//! account asks whichever holds it to hand it over.

use std::time::Duration;

use tokio::sync::oneshot;

use crate::modules::sm::ResumeRequest;
use crate::router::OutboundRx;
use crate::session::{Handover, Session};

/// Asks the holder of the session `req` names to hand it over. `None`
/// when the session is gone or its holder does not answer in time.
pub async fn take_over(req: &ResumeRequest) -> Option<Handover> {
    let (tx, rx) = oneshot::channel();
    req.takeover.send(tx).await.ok()?;
    tokio::time::timeout(Duration::from_secs(5), rx).await.ok()?.ok()
}

/// Holds a session whose connection dropped, for the resumption window.
/// Stanzas routed to it meanwhile join its unacknowledged queue and are
/// re-sent on resumption; stored messages among them stay in the store.
///
/// Memory stays bounded: the unacknowledged queue is limited in bytes
/// (`delivery.max_unacked_bytes`, enforced by `Session::send_xml`) and in
/// stanzas (`limits.session_queue`); past either the session ends.
pub async fn park(mut s: Session, mut rx: OutboundRx, timeout: Duration, limit: usize) {
    let Some(mut takeover) = s.sm.as_mut().and_then(|m| m.takeover.take()) else {
        s.end();
        return;
    };
    tracing::debug!(jid = %s.jid, "connection lost; session parked for resumption");
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            // Messages first: what was routed to the session before the
            // client came back counts against its limits before it may be
            // resumed. The limits bound this drain, so a takeover waits
            // for at most that many messages.
            biased;
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
