//! The session registry: which devices of which account are connected.
//!
//! Maps an account localpart to its [`AccountEntry`]: the live sessions
//! (one per bound resource) and the cached length of its offline queue.
//! The registry is sharded so that lookups for different accounts do not
//! contend. An entry's lock is also the account's *delivery lock*: the
//! router assigns sequence numbers, writes the queue and pushes to live
//! sessions while holding it, and a session coming online takes it to
//! draw the line between "read from the store" and "arrives live". That
//! is what keeps per-recipient order without a per-message lookup.
//!
//! Lock order: a shard lock is never held while taking another shard's
//! lock or any storage lock other than the engine's internal ones.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use crate::storage::QueueUsage;

/// Why the server closes a session from the outside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// Another login bound the same resource.
    Replaced,
    /// The account was deleted or its password changed.
    AccountGone,
    /// The server is shutting down.
    Shutdown,
}

/// What the rest of the server sends to a session's connection task.
#[derive(Clone, Debug)]
pub enum Outbound {
    /// A stanza that needs no acknowledgement tracking.
    Stanza(Arc<str>),
    /// A message that sits in the recipient's offline queue under `seq`
    /// until a device acknowledges it.
    Stored { seq: u64, xml: Arc<str> },
    /// Close the stream.
    Close(CloseReason),
}

impl Outbound {
    /// Bytes this item holds while queued.
    fn bytes(&self) -> usize {
        match self {
            Outbound::Stanza(x) | Outbound::Stored { xml: x, .. } => x.len(),
            Outbound::Close(_) => 0,
        }
    }
}

/// Bytes queued in one session's outbound channel, and their limit.
#[derive(Debug)]
struct Gauge {
    used: AtomicUsize,
    limit: usize,
}

/// Sending side of a session's outbound channel: bounded in items and in
/// bytes. Over either bound `try_send` fails with `Full`, and the router
/// treats the session as a slow consumer.
#[derive(Clone, Debug)]
pub struct OutboundTx {
    tx: mpsc::Sender<Outbound>,
    gauge: Arc<Gauge>,
}

/// Receiving side of a session's outbound channel.
#[derive(Debug)]
pub struct OutboundRx {
    rx: mpsc::Receiver<Outbound>,
    gauge: Arc<Gauge>,
}

/// A session's outbound channel holding at most `items` items and
/// `bytes` bytes of stanzas (a close request always fits when there is
/// room for an item).
pub fn outbound_channel(items: usize, bytes: usize) -> (OutboundTx, OutboundRx) {
    let (tx, rx) = mpsc::channel(items.max(1));
    let gauge = Arc::new(Gauge { used: AtomicUsize::new(0), limit: bytes });
    (OutboundTx { tx, gauge: gauge.clone() }, OutboundRx { rx, gauge })
}

impl OutboundTx {
    /// Queues `o` without waiting.
    ///
    /// # Errors
    /// `Full` when the channel has no room for its item or its bytes,
    /// `Closed` when the session is gone.
    pub fn try_send(&self, o: Outbound) -> Result<(), TrySendError<Outbound>> {
        let n = o.bytes();
        let before = self.gauge.used.fetch_add(n, Ordering::AcqRel);
        if n > 0 && before + n > self.gauge.limit {
            self.gauge.used.fetch_sub(n, Ordering::AcqRel);
            return Err(TrySendError::Full(o));
        }
        self.tx.try_send(o).inspect_err(|_| {
            self.gauge.used.fetch_sub(n, Ordering::AcqRel);
        })
    }
}

impl OutboundRx {
    fn took(&self, o: &Outbound) {
        self.gauge.used.fetch_sub(o.bytes(), Ordering::AcqRel);
    }

    pub async fn recv(&mut self) -> Option<Outbound> {
        let o = self.rx.recv().await?;
        self.took(&o);
        Some(o)
    }

    pub fn try_recv(&mut self) -> Option<Outbound> {
        let o = self.rx.try_recv().ok()?;
        self.took(&o);
        Some(o)
    }

    /// Bytes waiting in the channel.
    pub fn queued_bytes(&self) -> usize {
        self.gauge.used.load(Ordering::Acquire)
    }
}

/// A token bucket: `rate` tokens per second, at most `burst` saved up.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn full(burst: f64) -> TokenBucket {
        TokenBucket { tokens: burst, last: Instant::now() }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, rate: f64, burst: f64, now: Instant) -> bool {
        self.take_n(1.0, rate, burst, now)
    }

    /// Takes `cost` tokens if there are that many.
    pub fn take_n(&mut self, cost: f64, rate: f64, burst: f64, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * rate).min(burst);
        if self.tokens >= cost {
            self.tokens -= cost;
            true
        } else {
            false
        }
    }
}

/// The registry's view of one live session.
#[derive(Clone, Debug)]
pub struct SessionHandle {
    pub id: u64,
    pub resource: String,
    pub tx: OutboundTx,
    /// Sent initial presence and not yet unavailable.
    pub available: bool,
    pub priority: i8,
    /// Last broadcast available presence (serialised, `from` stamped),
    /// answered to probes.
    pub presence: Option<Arc<str>>,
    /// Requested the roster, so it receives roster pushes.
    pub interested: bool,
    /// Enabled XEP-0280 carbons.
    pub carbons: bool,
}

impl SessionHandle {
    /// A freshly bound session: not yet available, priority 0.
    pub fn new(id: u64, resource: impl Into<String>, tx: OutboundTx) -> SessionHandle {
        SessionHandle {
            id,
            resource: resource.into(),
            tx,
            available: false,
            priority: 0,
            presence: None,
            interested: false,
            carbons: false,
        }
    }
}

/// One account's live state.
#[derive(Debug, Default)]
pub struct AccountEntry {
    pub sessions: Vec<SessionHandle>,
    /// What the offline queue holds (per sender too), loaded lazily from
    /// the store and kept up to date under this lock.
    pub queue: Option<QueueUsage>,
    /// Highest sequence number assigned to this account, loaded lazily
    /// from the store's durable mark.
    pub last_seq: Option<u64>,
    /// Messages this account may still send now (rate limit).
    pub send_budget: Option<TokenBucket>,
    /// Last time the account had no session left (unix ms), for
    /// "last seen".
    pub last_seen_ms: u64,
    /// Cached block list and visibility setting.
    pub policy: Option<Arc<crate::modules::privacy::Policy>>,
}

impl AccountEntry {
    pub fn session(&self, id: u64) -> Option<&SessionHandle> {
        self.sessions.iter().find(|s| s.id == id)
    }
    pub fn session_mut(&mut self, id: u64) -> Option<&mut SessionHandle> {
        self.sessions.iter_mut().find(|s| s.id == id)
    }
    pub fn by_resource(&self, resource: &str) -> Option<&SessionHandle> {
        self.sessions.iter().find(|s| s.resource == resource)
    }
    /// Available sessions eligible for bare-JID messages (priority ≥ 0).
    pub fn message_targets(&self) -> impl Iterator<Item = &SessionHandle> {
        self.sessions.iter().filter(|s| s.available && s.priority >= 0)
    }
}

const SHARDS: usize = 64;

/// Sharded map from account localpart to [`AccountEntry`].
pub struct SessionRegistry {
    shards: Vec<Mutex<HashMap<String, AccountEntry>>>,
    hasher: std::collections::hash_map::RandomState,
}

impl Default for SessionRegistry {
    fn default() -> Self {
        SessionRegistry {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: Default::default(),
        }
    }
}

/// Several shards locked at once; see [`SessionRegistry::lock_many`].
pub struct ManyLocked<'a> {
    reg: &'a SessionRegistry,
    guards: Vec<(usize, std::sync::MutexGuard<'a, HashMap<String, AccountEntry>>)>,
}

impl ManyLocked<'_> {
    /// The entry of `local`, which must be one of the locked accounts.
    pub fn entry(&mut self, local: &str) -> Option<&mut AccountEntry> {
        let i = self.reg.shard_index(local);
        let (_, g) = self.guards.iter_mut().find(|(j, _)| *j == i)?;
        if !g.contains_key(local) {
            g.insert(local.to_string(), AccountEntry::default());
        }
        g.get_mut(local)
    }
}

impl SessionRegistry {
    fn shard(&self, local: &str) -> &Mutex<HashMap<String, AccountEntry>> {
        &self.shards[self.shard_index(local)]
    }

    /// Runs `f` on the account's entry (created if missing) under its lock.
    pub fn with<R>(&self, local: &str, f: impl FnOnce(&mut AccountEntry) -> R) -> R {
        let mut g = match self.shard(local).lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let e = match g.get_mut(local) {
            Some(e) => e,
            None => g.entry(local.to_string()).or_default(),
        };
        f(e)
    }

    /// Runs `f` only if the account has an entry.
    pub fn peek<R>(&self, local: &str, f: impl FnOnce(&AccountEntry) -> R) -> Option<R> {
        let g = match self.shard(local).lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        g.get(local).map(f)
    }

    /// Registers a bound session. Returns the handle it replaces (same
    /// resource) and, if the account is over `max_resources`, the oldest.
    pub fn bind(&self, local: &str, handle: SessionHandle, max_resources: usize) -> Vec<SessionHandle> {
        self.with(local, |e| {
            let mut evicted = Vec::new();
            if let Some(i) = e.sessions.iter().position(|s| s.resource == handle.resource) {
                evicted.push(e.sessions.remove(i));
            }
            while e.sessions.len() >= max_resources.max(1) {
                evicted.push(e.sessions.remove(0));
            }
            e.sessions.push(handle);
            evicted
        })
    }

    /// Removes a session; drops the entry when nothing remains cached.
    /// Returns whether the session was still registered.
    pub fn unbind(&self, local: &str, id: u64, now_ms: u64) -> bool {
        let mut g = match self.shard(local).lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let Some(e) = g.get_mut(local) else { return false };
        let before = e.sessions.len();
        e.sessions.retain(|s| s.id != id);
        let removed = e.sessions.len() != before;
        if e.sessions.is_empty() {
            e.last_seen_ms = now_ms;
            if e.queue.as_ref().is_none_or(|q| q.count == 0) {
                g.remove(local);
            }
        }
        removed
    }

    /// Handles of every session of an account.
    pub fn sessions(&self, local: &str) -> Vec<SessionHandle> {
        self.peek(local, |e| e.sessions.clone()).unwrap_or_default()
    }

    /// Number of live sessions across all accounts.
    pub fn count(&self) -> usize {
        self.shards
            .iter()
            .map(|s| match s.lock() {
                Ok(g) => g.values().map(|e| e.sessions.len()).sum::<usize>(),
                Err(_) => 0,
            })
            .sum()
    }

    /// Locks the shards holding `locals`, in ascending shard order (the
    /// only place that holds several shard locks, so no deadlock), for a
    /// batched delivery to many accounts.
    pub fn lock_many(&self, locals: &[String]) -> ManyLocked<'_> {
        let mut idx: Vec<usize> = locals.iter().map(|l| self.shard_index(l)).collect();
        idx.sort_unstable();
        idx.dedup();
        let guards = idx
            .into_iter()
            .map(|i| {
                let g = match self.shards[i].lock() {
                    Ok(g) => g,
                    Err(p) => p.into_inner(),
                };
                (i, g)
            })
            .collect();
        ManyLocked { reg: self, guards }
    }

    fn shard_index(&self, local: &str) -> usize {
        (self.hasher.hash_one(local) as usize) % SHARDS
    }

    /// Forgets cached queue lengths (after expiry deleted messages).
    pub fn invalidate_queue_counts(&self) {
        for s in &self.shards {
            if let Ok(mut g) = s.lock() {
                for e in g.values_mut() {
                    e.queue = None;
                }
            }
        }
    }

    /// Every session handle (for shutdown).
    pub fn all(&self) -> Vec<SessionHandle> {
        let mut v = Vec::new();
        for s in &self.shards {
            if let Ok(g) = s.lock() {
                v.extend(g.values().flat_map(|e| e.sessions.iter().cloned()));
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(id: u64, res: &str) -> (SessionHandle, OutboundRx) {
        let (tx, rx) = outbound_channel(4, 1 << 20);
        (SessionHandle::new(id, res, tx), rx)
    }

    #[test]
    fn bind_replaces_same_resource_and_caps() {
        let r = SessionRegistry::default();
        let (a, _ra) = handle(1, "phone");
        let (b, _rb) = handle(2, "phone");
        let (c, _rc) = handle(3, "desk");
        assert!(r.bind("1555", a, 2).is_empty());
        let ev = r.bind("1555", b, 2);
        assert_eq!(ev.iter().map(|h| h.id).collect::<Vec<_>>(), vec![1]);
        assert!(r.bind("1555", c, 2).is_empty());
        let (d, _rd) = handle(4, "tab");
        assert_eq!(r.bind("1555", d, 2).iter().map(|h| h.id).collect::<Vec<_>>(), vec![2]);
        assert_eq!(r.count(), 2);
        assert!(r.unbind("1555", 3, 0));
        assert!(!r.unbind("1555", 3, 0));
        assert!(r.unbind("1555", 4, 0));
        assert!(r.peek("1555", |_| ()).is_none());
    }

    #[test]
    fn outbound_channel_counts_bytes() {
        let (tx, mut rx) = outbound_channel(16, 10);
        tx.try_send(Outbound::Stanza("123456".into())).unwrap();
        assert!(matches!(tx.try_send(Outbound::Stanza("12345".into())), Err(TrySendError::Full(_))));
        tx.try_send(Outbound::Stanza("1234".into())).unwrap();
        assert_eq!(rx.queued_bytes(), 10);
        assert!(rx.try_recv().is_some());
        assert_eq!(rx.queued_bytes(), 4);
        tx.try_send(Outbound::Stanza("12345".into())).unwrap();
        tx.try_send(Outbound::Close(CloseReason::Shutdown)).unwrap();
    }

    #[test]
    fn token_bucket_refills_at_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::full(3.0);
        assert!((0..3).all(|_| b.take(10.0, 3.0, t0)));
        assert!(!b.take(10.0, 3.0, t0));
        assert!(b.take(10.0, 3.0, t0 + std::time::Duration::from_millis(110)));
        assert!(!b.take(10.0, 3.0, t0 + std::time::Duration::from_millis(110)));
    }
}
