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
//! The registry is private to [`super::LocalRouter`]: everything else
//! reaches sessions through the [`super::Router`] trait, so a cluster
//! backend can put its own view of remote sessions behind the same calls.
//!
//! Lock order: a shard lock is never held while taking another shard's
//! lock or any storage lock other than the engine's internal ones, except
//! in [`SessionRegistry::lock_many`], which takes several shard locks in
//! ascending shard order.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::outbound::OutboundTx;
use crate::storage::QueueUsage;

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
}

impl AccountEntry {
    pub fn session_mut(&mut self, id: u64) -> Option<&mut SessionHandle> {
        self.sessions.iter_mut().find(|s| s.id == id)
    }
    pub fn by_resource(&self, resource: &str) -> Option<&SessionHandle> {
        self.sessions.iter().find(|s| s.resource == resource)
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

    /// Runs `f` on the account's entry under its lock, if it has one.
    pub fn peek_mut<R>(&self, local: &str, f: impl FnOnce(&mut AccountEntry) -> R) -> Option<R> {
        let mut g = match self.shard(local).lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        g.get_mut(local).map(f)
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
    pub fn unbind(&self, local: &str, id: u64) -> bool {
        let mut g = match self.shard(local).lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let Some(e) = g.get_mut(local) else { return false };
        let before = e.sessions.len();
        e.sessions.retain(|s| s.id != id);
        let removed = e.sessions.len() != before;
        if e.sessions.is_empty() && e.queue.as_ref().is_none_or(|q| q.count == 0) {
            g.remove(local);
        }
        removed
    }

    /// Handles of every session of an account.
    pub fn sessions(&self, local: &str) -> Vec<SessionHandle> {
        self.peek(local, |e| e.sessions.clone()).unwrap_or_default()
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
    use super::super::outbound::{OutboundRx, outbound_channel};
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
        assert_eq!(r.sessions("1555").len(), 2);
        assert!(r.unbind("1555", 3));
        assert!(!r.unbind("1555", 3));
        assert!(r.unbind("1555", 4));
        assert!(r.peek("1555", |_| ()).is_none());
    }

    #[test]
    fn token_bucket_refills_at_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::full(3.0);
        assert!((0..3).all(|_| b.take_n(1.0, 10.0, 3.0, t0)));
        assert!(!b.take_n(1.0, 10.0, 3.0, t0));
        assert!(b.take_n(1.0, 10.0, 3.0, t0 + std::time::Duration::from_millis(110)));
        assert!(!b.take_n(1.0, 10.0, 3.0, t0 + std::time::Duration::from_millis(110)));
    }
}
