//! [`LocalRouter`]: the single-node router over the in-process session
//! registry and the local store.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::error::TrySendError;

use super::registry::{AccountEntry, SessionHandle, SessionRegistry, TokenBucket};
use super::*;
use crate::protocol::element::xep82_datetime;
use crate::storage::{OfflineStore, QueueUsage, QueuedMeta, StoredMessage, UserStore};

/// Single-node router over the local registry and store.
pub struct LocalRouter {
    domain: String,
    registry: SessionRegistry,
    offline: Arc<dyn OfflineStore>,
    users: Arc<dyn UserStore>,
    limits: Limits,
}

impl LocalRouter {
    pub fn new(domain: &str, offline: Arc<dyn OfflineStore>, users: Arc<dyn UserStore>, limits: Limits) -> LocalRouter {
        LocalRouter { domain: domain.to_string(), registry: SessionRegistry::default(), offline, users, limits }
    }

    /// The account's queue usage, loaded on first use.
    fn usage<'e>(&self, local: &str, e: &'e mut AccountEntry) -> Result<&'e mut QueueUsage, StanzaError> {
        if e.queue.is_none() {
            e.queue = Some(self.offline.usage(local).map_err(|_| StanzaError::InternalServerError)?);
        }
        e.queue.as_mut().ok_or(StanzaError::InternalServerError)
    }

    /// The account's highest assigned sequence number, loaded on first use.
    fn last_seq(&self, local: &str, e: &mut AccountEntry) -> Result<u64, StanzaError> {
        if let Some(s) = e.last_seq {
            return Ok(s);
        }
        let s = self.offline.last_seq(local).map_err(|_| StanzaError::InternalServerError)?;
        e.last_seq = Some(s);
        Ok(s)
    }
}

/// Sends to the account's sessions: `item` renders what each gets, or
/// skips it. This is the router's one overload policy: a session whose
/// channel is full (in items or bytes) loses its registry handle, so its
/// connection drains what it has and closes as a slow consumer; a stored
/// message stays stored. Returns how many sessions took an item.
fn send_each(local: &str, e: &mut AccountEntry, mut item: impl FnMut(&SessionHandle) -> Option<Outbound>) -> usize {
    let mut slow = Vec::new();
    let mut n = 0;
    for s in &e.sessions {
        let Some(o) = item(s) else { continue };
        match s.tx.try_send(o) {
            Ok(()) => n += 1,
            Err(TrySendError::Full(_)) => slow.push(s.id),
            Err(TrySendError::Closed(_)) => {}
        }
    }
    if !slow.is_empty() {
        tracing::warn!(account = local, sessions = slow.len(), "disconnecting slow consumer");
        e.sessions.retain(|s| !slow.contains(&s.id));
    }
    n
}

/// Pushes a stored message to the account's sessions `wanted` selects.
fn push_live(local: &str, e: &mut AccountEntry, seq: u64, xml: &Arc<str>, wanted: impl Fn(&SessionHandle) -> bool) {
    send_each(local, e, |s| wanted(s).then(|| Outbound::Stored { seq, xml: xml.clone() }));
}

fn view(s: &SessionHandle) -> SessionView {
    SessionView {
        id: s.id,
        resource: s.resource.clone(),
        available: s.available,
        priority: s.priority,
        presence: s.presence.clone(),
        roster: s.interested,
        carbons: s.carbons,
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
    fn bind(&self, local: &str, id: u64, resource: &str, tx: OutboundTx, max_resources: usize) {
        for old in self.registry.bind(local, SessionHandle::new(id, resource, tx), max_resources) {
            let _ = old.tx.try_send(Outbound::Close(CloseReason::Replaced));
        }
    }

    fn unbind(&self, local: &str, id: u64) -> bool {
        self.registry.unbind(local, id)
    }

    fn update_session(&self, local: &str, id: u64, update: SessionUpdate) {
        self.registry.with(local, |e| {
            let Some(h) = e.session_mut(id) else { return };
            match update {
                SessionUpdate::Presence { stanza, priority } => {
                    h.priority = priority;
                    if stanza.is_none() {
                        h.available = false;
                    }
                    h.presence = stanza;
                }
                SessionUpdate::RosterRequested => h.interested = true,
                SessionUpdate::Carbons(on) => h.carbons = on,
            }
        });
    }

    fn sessions(&self, local: &str) -> Vec<SessionView> {
        self.registry.peek(local, |e| e.sessions.iter().map(view).collect()).unwrap_or_default()
    }

    fn push(&self, local: &str, audience: Audience<'_>, render: &dyn Fn(&SessionView) -> Option<Arc<str>>) -> usize {
        // Most pushes go to offline contacts: an account without an entry
        // gets none, and one lock serves the rest.
        self.registry
            .peek_mut(local, |e| {
                send_each(local, e, |h| {
                    let v = view(h);
                    if !audience.includes(&v) {
                        return None;
                    }
                    render(&v).map(Outbound::Stanza)
                })
            })
            .unwrap_or(0)
    }

    fn close_sessions(&self, local: &str, reason: CloseReason, except: Option<u64>) {
        for h in self.registry.sessions(local) {
            if Some(h.id) != except {
                let _ = h.tx.try_send(Outbound::Close(reason));
            }
        }
    }

    fn close_all(&self, reason: CloseReason) {
        for h in self.registry.all() {
            let _ = h.tx.try_send(Outbound::Close(reason));
        }
    }

    fn queue_changed(&self, local: Option<&str>) {
        match local {
            Some(l) => {
                self.registry.peek_mut(l, |e| e.queue = None);
            }
            None => self.registry.invalidate_queue_counts(),
        }
    }

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
            let seq = self.last_seq(local, e)? + 1;
            // XEP-0359: a server-assigned id lets devices drop duplicates.
            stanza.remove_children("stanza-id", ns::STANZA_ID);
            stanza.push(
                Element::new("stanza-id", ns::STANZA_ID)
                    .with_attr("id", seq.to_string())
                    .with_attr("by", bare.as_str()),
            );
            let rec = StoredMessage { ts_ms: crate::accounts::now_ms(), xml: stanza.to_xml() };
            let meta = QueuedMeta::of(&rec);
            self.limits.admits(self.usage(local, e)?, &meta.sender, meta.bytes)?;
            let ticket = self.offline.push(&[(local, seq, &rec)]).map_err(|_| StanzaError::InternalServerError)?;
            e.last_seq = Some(seq);
            self.usage(local, e)?.add(&meta.sender, meta.bytes);
            let xml: Arc<str> = rec.xml.into();
            let full_target = to.resource.as_deref().and_then(|r| e.by_resource(r)).map(|s| s.id);
            push_live(local, e, seq, &xml, |s| match full_target {
                Some(id) => s.id == id,
                None => s.available && s.priority >= 0,
            });
            Ok(Delivery::Durable(ticket))
        })
    }

    fn transient(&self, to: &Jid, xml: Arc<str>) -> usize {
        let Some(local) = to.local.as_deref() else { return 0 };
        let audience = match to.resource.as_deref() {
            Some(r) => Audience::resource(r),
            None => Audience::available(),
        };
        self.push(local, audience, &|_| Some(xml.clone()))
    }

    fn confirm(&self, local: &str, seqs: &[u64]) {
        if seqs.is_empty() {
            return;
        }
        self.registry.with(local, |e| match self.offline.remove(local, seqs) {
            Ok((_, gone)) => {
                if let Some(q) = e.queue.as_mut() {
                    for m in &gone {
                        q.sub(m);
                    }
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
            match self.last_seq(local, e) {
                Ok(s) => s,
                Err(_) => {
                    tracing::error!(account = local, "reading the sequence mark failed; backlog read in full");
                    u64::MAX
                }
            }
        })
    }

    fn pending<'a>(&'a self, local: &'a str, after: u64, upto: u64, limit: usize, max_bytes: usize) -> Pending<'a> {
        // The embedded store answers at once, from its memtable or page
        // cache.
        let batch = match self.offline.list(local, after, upto, limit, max_bytes) {
            Ok(v) => v
                .into_iter()
                .map(|(seq, m)| (seq, with_delay(&repair_stored(local, seq, &m.xml), &self.domain, m.ts_ms).into()))
                .collect(),
            Err(err) => {
                tracing::error!(account = local, error = %err, "reading offline queue failed");
                Vec::new()
            }
        };
        Box::pin(std::future::ready(batch))
    }

    fn fanout(
        &self,
        recipients: &[String],
        build: &dyn Fn(&str, u64) -> String,
    ) -> Result<(Ticket, Vec<String>), StanzaError> {
        let mut g = self.registry.lock_many(recipients);
        let now = crate::accounts::now_ms();
        let mut items: Vec<(&str, u64, StoredMessage, QueuedMeta)> = Vec::with_capacity(recipients.len());
        let mut refused = Vec::new();
        for r in recipients {
            let Some(e) = g.entry(r) else { continue };
            let seq = self.last_seq(r, e)? + 1;
            let m = StoredMessage { ts_ms: now, xml: build(r, seq) };
            let meta = QueuedMeta::of(&m);
            if self.limits.admits(self.usage(r, e)?, &meta.sender, meta.bytes).is_err() {
                refused.push(r.clone());
                continue;
            }
            items.push((r.as_str(), seq, m, meta));
        }
        if items.is_empty() {
            return Ok((0, refused));
        }
        let refs: Vec<(&str, u64, &StoredMessage)> = items.iter().map(|(l, s, m, _)| (*l, *s, m)).collect();
        let ticket = self.offline.push(&refs).map_err(|_| StanzaError::InternalServerError)?;
        for (local, seq, m, meta) in items {
            let Some(e) = g.entry(local) else { continue };
            e.last_seq = Some(seq);
            if let Some(q) = e.queue.as_mut() {
                q.add(&meta.sender, meta.bytes);
            }
            let xml: Arc<str> = m.xml.into();
            push_live(local, e, seq, &xml, |s| s.available && s.priority >= 0);
        }
        Ok((ticket, refused))
    }

    fn account_exists(&self, local: &str) -> bool {
        let live = self.registry.peek(local, |e| !e.sessions.is_empty()).unwrap_or(false);
        live || matches!(self.users.has_user(local), Ok(true))
    }

    fn admit_message(&self, local: &str, cost: f64) -> bool {
        let (rate, burst) = (self.limits.rate_per_sec, self.limits.rate_burst);
        self.registry.with(local, |e| {
            e.send_budget.get_or_insert_with(|| TokenBucket::full(burst)).take_n(cost, rate, burst, Instant::now())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Element;
    use crate::storage::Stores;

    /// The result of a future that must be ready at once (the embedded
    /// store never waits).
    trait Now: std::future::Future + Sized {
        fn now(self) -> Self::Output {
            let mut f = std::pin::pin!(self);
            match f.as_mut().poll(&mut std::task::Context::from_waker(std::task::Waker::noop())) {
                std::task::Poll::Ready(v) => v,
                std::task::Poll::Pending => panic!("the embedded store answers at once"),
            }
        }
    }
    impl<F: std::future::Future> Now for F {}

    fn limits(max_queue: usize) -> Limits {
        Limits { max_queue, max_queue_bytes: 1 << 20, sender_share_percent: 100, rate_per_sec: 10.0, rate_burst: 3.0 }
    }

    fn router_with(l: Limits) -> (LocalRouter, Stores) {
        let stores = Stores::memory();
        stores.users.put_user("15550000001", &crate::accounts::make_record("pw", 4096, 0)).unwrap();
        let r = LocalRouter::new("localhost", stores.offline.clone(), stores.users.clone(), l);
        (r, stores)
    }

    fn router(max_queue: usize) -> (LocalRouter, Stores) {
        router_with(limits(max_queue))
    }

    fn msg_from(from: &str, body: &str) -> Element {
        Element::stanza("message")
            .with_attr("to", "15550000001@localhost")
            .with_attr("from", from)
            .with_attr("type", "chat")
            .with_child(Element::stanza("body").with_text(body))
    }

    fn msg(body: &str) -> Element {
        msg_from("15550000002@localhost/a", body)
    }

    #[test]
    fn offline_then_attach_reads_in_order_and_confirm_deletes() {
        let (r, stores) = router(10);
        let to = Jid::parse("15550000001@localhost").unwrap();
        for i in 0..3 {
            assert!(matches!(r.message(&to, msg(&i.to_string()), MessageClass::Durable), Ok(Delivery::Durable(_))));
        }
        let (tx, mut rx) = outbound_channel(8, 1 << 20);
        r.bind("15550000001", 9, "r", tx, 5);
        let upto = r.attach("15550000001", 9);
        r.message(&to, msg("live"), MessageClass::Durable).unwrap();
        let stored = r.pending("15550000001", 0, upto, 100, usize::MAX).now();
        assert_eq!(stored.len(), 3);
        assert!(stored[0].1.contains("<body>0</body>") && stored[0].1.contains("urn:xmpp:delay"));
        assert!(stored[2].1.contains("<body>2</body>"));
        match rx.try_recv() {
            Some(Outbound::Stored { xml, .. }) => assert!(xml.contains("live") && !xml.contains("urn:xmpp:delay")),
            other => panic!("{other:?}"),
        }
        let seqs: Vec<u64> = stored.iter().map(|(s, _)| *s).collect();
        r.confirm("15550000001", &seqs);
        r.confirm("15550000001", &seqs);
        assert_eq!(stores.offline.count("15550000001").unwrap(), 1);
        assert_eq!(r.registry.peek("15550000001", |e| e.queue.as_ref().map(|q| q.count)), Some(Some(1)));
    }

    #[test]
    fn one_sender_gets_only_its_share_and_others_still_get_through() {
        let (r, stores) = router_with(Limits { sender_share_percent: 25, ..limits(8) });
        let to = Jid::parse("15550000001@localhost").unwrap();
        let flood = "15550000002@localhost/a";
        for i in 0..2 {
            r.message(&to, msg_from(flood, &i.to_string()), MessageClass::Durable).unwrap();
        }
        assert_eq!(r.message(&to, msg_from(flood, "x"), MessageClass::Durable), Err(StanzaError::ResourceConstraint));
        r.message(&to, msg_from("15550000003@localhost/b", "hi"), MessageClass::Durable).unwrap();
        assert_eq!(stores.offline.count("15550000001").unwrap(), 3);
        // Bytes count as well: one large message uses up a sender's share.
        let (r, _s) = router_with(Limits { sender_share_percent: 25, max_queue_bytes: 4000, ..limits(100) });
        r.message(&to, msg_from(flood, &"x".repeat(700)), MessageClass::Durable).unwrap();
        assert_eq!(
            r.message(&to, msg_from(flood, &"y".repeat(700)), MessageClass::Durable),
            Err(StanzaError::ResourceConstraint)
        );
        r.message(&to, msg_from("15550000003@localhost/b", &"z".repeat(700)), MessageClass::Durable).unwrap();
        // And the queue as a whole has a byte limit.
        let (r, _s) = router_with(Limits { max_queue_bytes: 2000, ..limits(100) });
        r.message(&to, msg(&"x".repeat(900)), MessageClass::Durable).unwrap();
        assert_eq!(r.message(&to, msg(&"x".repeat(900)), MessageClass::Durable), Err(StanzaError::ResourceConstraint));
    }

    #[test]
    fn sequence_numbers_are_per_account_and_survive_an_empty_queue() {
        let (r, stores) = router(10);
        stores.users.put_user("15550000009", &crate::accounts::make_record("pw", 4096, 0)).unwrap();
        let to = Jid::parse("15550000001@localhost").unwrap();
        let other = Jid::parse("15550000009@localhost").unwrap();
        r.message(&to, msg("a"), MessageClass::Durable).unwrap();
        r.message(&other, msg("b"), MessageClass::Durable).unwrap();
        r.message(&to, msg("c"), MessageClass::Durable).unwrap();
        let seqs: Vec<u64> =
            r.pending("15550000001", 0, u64::MAX, 10, usize::MAX).now().iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, vec![1, 2]);
        assert_eq!(r.pending("15550000009", 0, u64::MAX, 10, usize::MAX).now()[0].0, 1);
        r.confirm("15550000001", &seqs);
        // Forget the cached mark, as after the entry was dropped.
        r.registry.with("15550000001", |e| e.last_seq = None);
        r.message(&to, msg("d"), MessageClass::Durable).unwrap();
        assert_eq!(r.pending("15550000001", 0, u64::MAX, 10, usize::MAX).now()[0].0, 3);
    }

    /// Concurrent batches for many accounts, a restart, then more
    /// messages: no sequence number is reused, so nothing stored is
    /// overwritten and every queue stays in arrival order.
    #[test]
    fn no_sequence_number_is_reused_after_restart() {
        const ACCOUNTS: usize = 16;
        const PER_THREAD: usize = 300;
        let dir = std::env::temp_dir().join(format!("chatd-seq-reuse-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let locals: Vec<String> = (0..ACCOUNTS).map(|i| format!("1555000{i:04}")).collect();
        let open = || {
            let stores = Stores::open_fjall(&dir).unwrap();
            let r = LocalRouter::new("localhost", stores.offline.clone(), stores.users.clone(), limits(1 << 20));
            (Arc::new(r), stores)
        };
        {
            let (r, stores) = open();
            for l in &locals {
                stores.users.put_user(l, &crate::accounts::make_record("pw", 4096, 0)).unwrap();
            }
            std::thread::scope(|sc| {
                for t in 0..4 {
                    let (r, locals) = (r.clone(), &locals);
                    sc.spawn(move || {
                        for i in 0..PER_THREAD {
                            // Single messages and group-style batches.
                            let a = &locals[(i * 7 + t * 3) % ACCOUNTS];
                            let body = format!("t{t}-{i}");
                            if i % 3 == 0 {
                                let many: Vec<String> = locals.iter().skip(t).step_by(4).cloned().collect();
                                let build = |l: &str, seq: u64| {
                                    format!("<message from='g@groups.localhost' to='{l}@localhost' id='{seq}'><body>{body}</body></message>")
                                };
                                r.fanout(&many, &build).unwrap();
                            } else {
                                let to = Jid::parse(&format!("{a}@localhost")).unwrap();
                                r.message(&to, msg(&body), MessageClass::Durable).unwrap();
                            }
                        }
                    });
                }
            });
            stores.durability.shutdown();
        }
        let (r, stores) = open();
        let before: Vec<Vec<u64>> = locals
            .iter()
            .map(|l| {
                stores
                    .offline
                    .list(l, 0, u64::MAX, usize::MAX, usize::MAX)
                    .unwrap()
                    .into_iter()
                    .map(|(s, _)| s)
                    .collect()
            })
            .collect();
        for l in &locals {
            let to = Jid::parse(&format!("{l}@localhost")).unwrap();
            r.message(&to, msg("after restart"), MessageClass::Durable).unwrap();
        }
        for (l, old) in locals.iter().zip(before) {
            let q = stores.offline.list(l, 0, u64::MAX, usize::MAX, usize::MAX).unwrap();
            assert_eq!(q.len(), old.len() + 1, "{l}: a stored message was overwritten");
            assert!(q.windows(2).all(|w| w[0].0 < w[1].0));
            assert!(q.last().unwrap().1.xml.contains("after restart"), "{l}: new message sorts before old ones");
        }
        drop(r);
        stores.durability.shutdown();
        drop(stores);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn rate_limit_per_account() {
        let (r, _s) = router(10);
        assert!((0..3).all(|_| r.admit_message("15550000002", 1.0)));
        assert!(!r.admit_message("15550000002", 1.0));
        assert!(r.admit_message("15550000003", 1.0));
    }

    #[test]
    fn queue_limit_and_unknown_account() {
        let (r, _s) = router(2);
        let to = Jid::parse("15550000001@localhost").unwrap();
        r.message(&to, msg("a"), MessageClass::Durable).unwrap();
        r.message(&to, msg("b"), MessageClass::Durable).unwrap();
        assert_eq!(r.message(&to, msg("c"), MessageClass::Durable), Err(StanzaError::ResourceConstraint));
        let nobody = Jid::parse("15559999999@localhost").unwrap();
        assert_eq!(r.message(&nobody, msg("x"), MessageClass::Durable), Err(StanzaError::ServiceUnavailable));
    }
}
