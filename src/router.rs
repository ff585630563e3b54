//! The router: where a stanza for a local account goes.
//!
//! [`Router`] is the seam a multi-node backend plugs into: feature code
//! and connections never look at the session registry or the offline
//! store to deliver; they call the router. [`LocalRouter`] is the
//! single-node implementation.
//!
//! ## The delivery rule (see ARCHITECTURE.md)
//! Every message that must survive (chat/normal with content, receipts,
//! markers) is appended to the recipient account's queue *before* it is
//! pushed to any live session, under the account's delivery lock. It
//! stays there until a device of the account acknowledges it (XEP-0198
//! `<a/>`, or for clients without stream management the answer to a
//! server ping sent after it). So the store is a write-back cache of
//! unacknowledged messages, never an archive.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc::error::TrySendError;

use crate::protocol::element::xep82_datetime;
use crate::protocol::stanza::StanzaError;
use crate::protocol::{Element, Jid, ns};
use crate::session::{Outbound, SessionRegistry};
use crate::storage::{OfflineStore, StoredMessage, Ticket, UserStore};

/// Outcome of routing a message.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Stored under this ticket (and pushed to live sessions, if any).
    Durable(Ticket),
    /// Pushed live to this many sessions, not stored.
    Transient(usize),
}

/// How a message is to be treated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageClass {
    /// Stored until acknowledged.
    Durable,
    /// Delivered only to sessions online now (chat states, headlines,
    /// errors).
    LiveOnly,
}

/// Routing interface between features and the delivery machinery.
pub trait Router: Send + Sync {
    /// Delivers a message (with `from` stamped) to the local account named
    /// by `to`.
    ///
    /// # Errors
    /// `service-unavailable` for unknown accounts, `resource-constraint`
    /// when the recipient's queue is full, `internal-server-error` when
    /// the store fails.
    fn message(&self, to: &Jid, stanza: Element, class: MessageClass) -> Result<Delivery, StanzaError>;

    /// Pushes a non-stored stanza to one full JID, or to every available
    /// session of a bare JID. Returns how many sessions it reached.
    fn transient(&self, to: &Jid, xml: Arc<str>) -> usize;

    /// A device acknowledged these stored messages: delete them.
    fn confirm(&self, local: &str, seqs: &[u64]);

    /// Marks a session available and returns the sequence number up to
    /// which the session must read the store; later messages arrive live.
    fn attach(&self, local: &str, session_id: u64) -> u64;

    /// Stored messages of `local` in `(after, upto]`, oldest first, with
    /// a XEP-0203 delay stamp added.
    fn pending(&self, local: &str, after: u64, upto: u64, limit: usize) -> Vec<(u64, Arc<str>)>;

    /// Whether the account exists.
    fn account_exists(&self, local: &str) -> bool;

    /// Delivers one message to many accounts (group fan-out) with one
    /// batched durable write. `build(local, seq)` renders the stanza for
    /// each recipient. Returns the ticket and the recipients whose queue
    /// was full (they do not get it).
    ///
    /// # Errors
    /// `internal-server-error` when the store fails.
    fn fanout(
        &self,
        recipients: &[String],
        build: &dyn Fn(&str, u64) -> String,
    ) -> Result<(Ticket, Vec<String>), StanzaError>;
}

/// Single-node router over the local registry and store.
pub struct LocalRouter {
    domain: String,
    registry: Arc<SessionRegistry>,
    offline: Arc<dyn OfflineStore>,
    users: Arc<dyn UserStore>,
    seq: AtomicU64,
    max_queue: usize,
}

impl LocalRouter {
    /// # Errors
    /// When the store cannot report its highest sequence number.
    pub fn new(
        domain: &str,
        registry: Arc<SessionRegistry>,
        offline: Arc<dyn OfflineStore>,
        users: Arc<dyn UserStore>,
        max_queue: usize,
    ) -> crate::storage::Result<LocalRouter> {
        let start = offline.max_seq()?;
        Ok(LocalRouter { domain: domain.to_string(), registry, offline, users, seq: AtomicU64::new(start), max_queue })
    }
}

/// A stored stanza as it may be sent. Stanzas stored before input was
/// checked against the XML `Char` production can hold characters a
/// recipient's parser rejects, which would make it drop the stream and
/// never acknowledge the message; such characters are replaced (the
/// structure the serialiser wrote is unchanged) and the repair logged.
fn repair_stored<'a>(local: &str, seq: u64, xml: &'a str) -> std::borrow::Cow<'a, str> {
    let fixed = crate::protocol::element::repair_xml_chars(xml);
    if let std::borrow::Cow::Owned(_) = fixed {
        tracing::warn!(account = local, seq, "stored stanza had characters XML forbids; replaced before delivery");
    }
    fixed
}

/// Inserts `<delay/>` before the root's closing tag. Stored messages
/// always have children (at least the stanza-id), so the root is never
/// self-closing.
fn with_delay(xml: &str, domain: &str, ts_ms: u64) -> String {
    let delay = format!(
        "<delay xmlns='urn:xmpp:delay' from='{}' stamp='{}'/>",
        crate::protocol::element::escape(domain),
        xep82_datetime(ts_ms)
    );
    match xml.rfind("</") {
        Some(i) => {
            let mut s = String::with_capacity(xml.len() + delay.len());
            s.push_str(&xml[..i]);
            s.push_str(&delay);
            s.push_str(&xml[i..]);
            s
        }
        None => xml.to_string(),
    }
}

impl Router for LocalRouter {
    fn message(&self, to: &Jid, mut stanza: Element, class: MessageClass) -> Result<Delivery, StanzaError> {
        let Some(local) = to.local.as_deref() else {
            return Err(StanzaError::ServiceUnavailable);
        };
        if !self.account_exists(local) {
            return Err(StanzaError::ServiceUnavailable);
        }
        if class == MessageClass::LiveOnly {
            let xml: Arc<str> = stanza.to_xml().into();
            return Ok(Delivery::Transient(self.transient(to, xml)));
        }
        let bare = to.bare_string();
        self.registry.with(local, |e| {
            let queued = match e.queued {
                Some(n) => n,
                None => self.offline.count(local).map_err(|_| StanzaError::InternalServerError)?,
            };
            if queued >= self.max_queue {
                e.queued = Some(queued);
                return Err(StanzaError::ResourceConstraint);
            }
            let seq = self.seq.fetch_add(1, Ordering::AcqRel) + 1;
            // XEP-0359: a server-assigned id lets devices drop duplicates.
            stanza.remove_children("stanza-id", ns::STANZA_ID);
            stanza.push(
                Element::new("stanza-id", ns::STANZA_ID)
                    .with_attr("id", seq.to_string())
                    .with_attr("by", bare.as_str()),
            );
            let xml = stanza.to_xml();
            let rec = StoredMessage { ts_ms: crate::accounts::now_ms(), xml };
            let ticket = self.offline.push(&[(local, seq, &rec)]).map_err(|_| StanzaError::InternalServerError)?;
            e.queued = Some(queued + 1);
            let xml: Arc<str> = rec.xml.into();
            let full_target = to.resource.as_deref().and_then(|r| e.by_resource(r)).map(|s| s.id);
            let mut slow = Vec::new();
            for s in e.sessions.iter() {
                let wanted = match full_target {
                    Some(id) => s.id == id,
                    None => s.available && s.priority >= 0,
                };
                if !wanted {
                    continue;
                }
                if let Err(TrySendError::Full(_)) = s.tx.try_send(Outbound::Stored { seq, xml: xml.clone() }) {
                    slow.push(s.id);
                }
            }
            // A slow consumer loses its registry handle; its connection
            // drains what it has and closes. The message stays stored.
            if !slow.is_empty() {
                tracing::warn!(account = local, sessions = slow.len(), "disconnecting slow consumer");
                e.sessions.retain(|s| !slow.contains(&s.id));
            }
            Ok(Delivery::Durable(ticket))
        })
    }

    fn transient(&self, to: &Jid, xml: Arc<str>) -> usize {
        let Some(local) = to.local.as_deref() else { return 0 };
        self.registry
            .peek(local, |e| {
                let mut n = 0;
                for s in &e.sessions {
                    let wanted = match to.resource.as_deref() {
                        Some(r) => s.resource == r,
                        None => s.available,
                    };
                    if wanted && s.tx.try_send(Outbound::Stanza(xml.clone())).is_ok() {
                        n += 1;
                    }
                }
                n
            })
            .unwrap_or(0)
    }

    fn confirm(&self, local: &str, seqs: &[u64]) {
        if seqs.is_empty() {
            return;
        }
        self.registry.with(local, |e| match self.offline.remove(local, seqs) {
            Ok((_, n)) => {
                if let Some(q) = e.queued.as_mut() {
                    *q = q.saturating_sub(n);
                }
            }
            Err(err) => tracing::error!(account = local, error = %err, "deleting acknowledged messages failed"),
        });
    }

    fn attach(&self, local: &str, session_id: u64) -> u64 {
        self.registry.with(local, |e| {
            if let Some(s) = e.session_mut(session_id) {
                s.available = true;
            }
            self.seq.load(Ordering::Acquire)
        })
    }

    fn pending(&self, local: &str, after: u64, upto: u64, limit: usize) -> Vec<(u64, Arc<str>)> {
        match self.offline.list(local, after, upto, limit) {
            Ok(v) => v
                .into_iter()
                .map(|(seq, m)| (seq, with_delay(&repair_stored(local, seq, &m.xml), &self.domain, m.ts_ms).into()))
                .collect(),
            Err(err) => {
                tracing::error!(account = local, error = %err, "reading offline queue failed");
                Vec::new()
            }
        }
    }

    fn fanout(
        &self,
        recipients: &[String],
        build: &dyn Fn(&str, u64) -> String,
    ) -> Result<(Ticket, Vec<String>), StanzaError> {
        let mut g = self.registry.lock_many(recipients);
        let now = crate::accounts::now_ms();
        let mut items: Vec<(&str, u64, StoredMessage)> = Vec::with_capacity(recipients.len());
        let mut full = Vec::new();
        for r in recipients {
            let Some(e) = g.entry(r) else { continue };
            let queued = match e.queued {
                Some(n) => n,
                None => self.offline.count(r).map_err(|_| StanzaError::InternalServerError)?,
            };
            e.queued = Some(queued);
            if queued >= self.max_queue {
                full.push(r.clone());
                continue;
            }
            let seq = self.seq.fetch_add(1, Ordering::AcqRel) + 1;
            items.push((r.as_str(), seq, StoredMessage { ts_ms: now, xml: build(r, seq) }));
        }
        if items.is_empty() {
            return Ok((0, full));
        }
        let refs: Vec<(&str, u64, &StoredMessage)> = items.iter().map(|(l, s, m)| (*l, *s, m)).collect();
        let ticket = self.offline.push(&refs).map_err(|_| StanzaError::InternalServerError)?;
        for (local, seq, m) in items {
            let Some(e) = g.entry(local) else { continue };
            e.queued = Some(e.queued.unwrap_or(0) + 1);
            let xml: Arc<str> = m.xml.into();
            let mut slow = Vec::new();
            for s in e.sessions.iter().filter(|s| s.available && s.priority >= 0) {
                if let Err(TrySendError::Full(_)) = s.tx.try_send(Outbound::Stored { seq, xml: xml.clone() }) {
                    slow.push(s.id);
                }
            }
            if !slow.is_empty() {
                e.sessions.retain(|s| !slow.contains(&s.id));
            }
        }
        Ok((ticket, full))
    }

    fn account_exists(&self, local: &str) -> bool {
        let live = self.registry.peek(local, |e| !e.sessions.is_empty()).unwrap_or(false);
        live || matches!(self.users.has_user(local), Ok(true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::SessionHandle;
    use crate::storage::Stores;
    use tokio::sync::mpsc;

    fn router(max_queue: usize) -> (LocalRouter, Arc<SessionRegistry>, Stores) {
        let stores = Stores::memory();
        stores.users.put_user("15550000001", &crate::accounts::make_record("pw", 4096, 0)).unwrap();
        let reg = Arc::new(SessionRegistry::default());
        let r = LocalRouter::new("localhost", reg.clone(), stores.offline.clone(), stores.users.clone(), max_queue)
            .unwrap();
        (r, reg, stores)
    }

    fn msg(body: &str) -> Element {
        Element::stanza("message")
            .with_attr("to", "15550000001@localhost")
            .with_attr("from", "15550000002@localhost/a")
            .with_attr("type", "chat")
            .with_child(Element::stanza("body").with_text(body))
    }

    #[test]
    fn offline_then_attach_reads_in_order_and_confirm_deletes() {
        let (r, reg, stores) = router(10);
        let to = Jid::parse("15550000001@localhost").unwrap();
        for i in 0..3 {
            assert!(matches!(r.message(&to, msg(&i.to_string()), MessageClass::Durable), Ok(Delivery::Durable(_))));
        }
        let (tx, mut rx) = mpsc::channel(8);
        reg.bind("15550000001", SessionHandle::new(9, "r", tx), 5);
        let upto = r.attach("15550000001", 9);
        r.message(&to, msg("live"), MessageClass::Durable).unwrap();
        let stored = r.pending("15550000001", 0, upto, 100);
        assert_eq!(stored.len(), 3);
        assert!(stored[0].1.contains("<body>0</body>") && stored[0].1.contains("urn:xmpp:delay"));
        assert!(stored[2].1.contains("<body>2</body>"));
        match rx.try_recv() {
            Ok(Outbound::Stored { xml, .. }) => assert!(xml.contains("live") && !xml.contains("urn:xmpp:delay")),
            other => panic!("{other:?}"),
        }
        let seqs: Vec<u64> = stored.iter().map(|(s, _)| *s).collect();
        r.confirm("15550000001", &seqs);
        r.confirm("15550000001", &seqs);
        assert_eq!(stores.offline.count("15550000001").unwrap(), 1);
        assert_eq!(reg.peek("15550000001", |e| e.queued), Some(Some(1)));
    }

    #[test]
    fn queue_limit_and_unknown_account() {
        let (r, _reg, _s) = router(2);
        let to = Jid::parse("15550000001@localhost").unwrap();
        r.message(&to, msg("a"), MessageClass::Durable).unwrap();
        r.message(&to, msg("b"), MessageClass::Durable).unwrap();
        assert_eq!(r.message(&to, msg("c"), MessageClass::Durable), Err(StanzaError::ResourceConstraint));
        let nobody = Jid::parse("15559999999@localhost").unwrap();
        assert_eq!(r.message(&nobody, msg("x"), MessageClass::Durable), Err(StanzaError::ServiceUnavailable));
    }
}
