//! Limits on what a stranger can make the login path cost:
//! - [`PerIp`]: unauthenticated connections, and TLS handshakes in flight,
//!   per client address (IPv6 per /64, which one subscriber usually holds);
//! - [`Throttle`]: failed logins delay the next attempt progressively, per
//!   account and per address;
//! - [`Guards::hash`]: password hashing (PBKDF2) runs on the blocking pool,
//!   a few at a time, never on the async workers that carry everyone's
//!   stanzas.
//!
//! Every map here is bounded: [`PerIp`] holds only addresses with a live
//! connection, and [`Throttle`] keeps two generations of at most
//! `capacity` entries each, dropping the older one whole (O(1) amortised,
//! no scans under the lock).

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::config::Auth;

/// The address a limit applies to: IPv4 as is, IPv6 by /64.
pub fn ip_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

/// Counts something per client address, up to a cap.
pub struct PerIp {
    max: usize,
    map: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One counted unit; released on drop.
pub struct IpSlot {
    ip: IpAddr,
    map: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl PerIp {
    /// `max` 0 means no limit.
    pub fn new(max: usize) -> PerIp {
        PerIp { max, map: Default::default() }
    }

    /// Takes a slot for `ip`, or `None` when it already holds `max`.
    pub fn acquire(&self, ip: IpAddr) -> Option<IpSlot> {
        let ip = ip_key(ip);
        let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(ip).or_insert(0);
        if self.max > 0 && *n >= self.max {
            if *n == 0 {
                m.remove(&ip);
            }
            return None;
        }
        *n += 1;
        Some(IpSlot { ip, map: self.map.clone() })
    }

    /// Slots held by `ip` (tests and diagnostics).
    pub fn held(&self, ip: IpAddr) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).get(&ip_key(ip)).copied().unwrap_or(0)
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

#[derive(Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
}

/// A map that forgets: two generations of at most `capacity` entries;
/// when the current one fills up, or `ttl` has passed since the last
/// rotation, the previous one is dropped and the current one takes its
/// place. An entry therefore lives at least `min(ttl, time to fill)`.
struct Generations<K> {
    cur: HashMap<K, Failures>,
    prev: HashMap<K, Failures>,
    rotated: Instant,
    capacity: usize,
    ttl: Duration,
}

impl<K: Hash + Eq + Clone> Generations<K> {
    fn new(capacity: usize, ttl: Duration) -> Self {
        Generations { cur: HashMap::new(), prev: HashMap::new(), rotated: Instant::now(), capacity, ttl }
    }

    fn maybe_rotate(&mut self, now: Instant) {
        if self.cur.len() >= self.capacity || now.duration_since(self.rotated) >= self.ttl {
            self.prev = std::mem::take(&mut self.cur);
            self.rotated = now;
        }
    }

    fn get(&self, k: &K, now: Instant) -> Option<Failures> {
        self.cur.get(k).or_else(|| self.prev.get(k)).copied().filter(|f| now.duration_since(f.last) < self.ttl)
    }

    fn bump(&mut self, k: &K, now: Instant) {
        let count = self.get(k, now).map(|f| f.count).unwrap_or(0).saturating_add(1);
        self.maybe_rotate(now);
        self.prev.remove(k);
        self.cur.insert(k.clone(), Failures { count, last: now });
    }

    fn clear(&mut self, k: &K) {
        self.cur.remove(k);
        self.prev.remove(k);
    }

    fn len(&self) -> usize {
        self.cur.len() + self.prev.len()
    }
}

/// Progressive delay after failed logins. After `free` failures, each
/// further one doubles the wait before the next attempt for the same
/// account or address is checked, from `base` up to `max`. Failures are
/// forgotten `ttl` after the last one; a success clears the account's.
pub struct Throttle {
    accounts: Mutex<Generations<String>>,
    ips: Mutex<Generations<IpAddr>>,
    free: u32,
    base: Duration,
    max: Duration,
}

impl Throttle {
    pub fn new(free: u32, base: Duration, max: Duration, capacity: usize) -> Throttle {
        let ttl = Duration::from_secs(15 * 60).max(max * 4);
        Throttle {
            accounts: Mutex::new(Generations::new(capacity.max(1), ttl)),
            ips: Mutex::new(Generations::new(capacity.max(1), ttl)),
            free,
            base,
            max,
        }
    }

    fn delay_for(&self, f: Option<Failures>, now: Instant) -> Duration {
        let Some(f) = f else { return Duration::ZERO };
        if f.count < self.free.max(1) {
            return Duration::ZERO;
        }
        let exp = (f.count - self.free.max(1)).min(20);
        let d = self.base.saturating_mul(1 << exp).min(self.max);
        (f.last + d).saturating_duration_since(now)
    }

    /// How long to wait before checking credentials for `account` from `ip`.
    pub fn wait(&self, account: &str, ip: IpAddr) -> Duration {
        let now = Instant::now();
        let a = self.accounts.lock().unwrap_or_else(|e| e.into_inner()).get(&account.to_string(), now);
        let i = self.ips.lock().unwrap_or_else(|e| e.into_inner()).get(&ip_key(ip), now);
        self.delay_for(a, now).max(self.delay_for(i, now))
    }

    /// Records a failed credential check.
    pub fn failed(&self, account: &str, ip: IpAddr) {
        let now = Instant::now();
        self.accounts.lock().unwrap_or_else(|e| e.into_inner()).bump(&account.to_string(), now);
        self.ips.lock().unwrap_or_else(|e| e.into_inner()).bump(&ip_key(ip), now);
    }

    /// A successful login clears the account's failures (not the
    /// address's: one right password must not reset a guessing run from
    /// the same address against other accounts).
    pub fn succeeded(&self, account: &str) {
        self.accounts.lock().unwrap_or_else(|e| e.into_inner()).clear(&account.to_string());
    }

    /// Entries held (both maps, both generations).
    pub fn len(&self) -> usize {
        self.accounts.lock().unwrap_or_else(|e| e.into_inner()).len()
            + self.ips.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The login-path limits of one server.
pub struct Guards {
    /// Connections that have not authenticated yet, per address.
    pub unauthenticated: PerIp,
    /// TLS handshakes in flight, per address.
    pub handshakes: PerIp,
    pub throttle: Throttle,
    /// Password hashes computing at once.
    hashing: Semaphore,
}

impl Guards {
    pub fn new(auth: &Auth) -> Guards {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        Guards {
            unauthenticated: PerIp::new(auth.max_unauthenticated_per_ip),
            handshakes: PerIp::new(auth.max_tls_handshakes_per_ip),
            throttle: Throttle::new(
                auth.failures_before_delay,
                Duration::from_millis(auth.failure_delay_ms),
                Duration::from_secs(auth.max_failure_delay_secs),
                100_000,
            ),
            hashing: Semaphore::new(if auth.hash_threads == 0 { cores.div_ceil(2) } else { auth.hash_threads }.max(1)),
        }
    }

    /// Runs a password hash (or anything CPU-heavy of the login path) on
    /// the blocking pool, at most `hash_threads` at a time.
    pub async fn hash<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let _permit = self.hashing.acquire().await.ok()?;
        tokio::task::spawn_blocking(f).await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_ip_caps_and_releases() {
        let p = PerIp::new(2);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let a = p.acquire(ip).unwrap();
        let _b = p.acquire(ip).unwrap();
        assert!(p.acquire(ip).is_none());
        assert!(p.acquire("10.0.0.2".parse().unwrap()).is_some());
        drop(a);
        assert!(p.acquire(ip).is_some());
        // Same /64 shares a budget.
        let v6a: IpAddr = "2001:db8::1".parse().unwrap();
        let v6b: IpAddr = "2001:db8::ffff:2".parse().unwrap();
        let _x = p.acquire(v6a).unwrap();
        let _y = p.acquire(v6b).unwrap();
        assert!(p.acquire("2001:db8::3".parse().unwrap()).is_none());
        assert!(p.acquire("2001:db8:0:1::3".parse().unwrap()).is_some());
    }

    #[test]
    fn per_ip_forgets_idle_addresses() {
        let p = PerIp::new(2);
        for i in 0..1000u32 {
            drop(p.acquire(IpAddr::V4(i.into())));
        }
        assert!(p.map.lock().unwrap().is_empty());
    }

    #[test]
    fn throttle_grows_and_is_per_key() {
        let t = Throttle::new(2, Duration::from_millis(100), Duration::from_secs(2), 1000);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.9".parse().unwrap();
        t.failed("a", ip);
        assert_eq!(t.wait("a", ip), Duration::ZERO, "first failure is free");
        t.failed("a", ip);
        let w2 = t.wait("a", ip);
        assert!(w2 > Duration::from_millis(50) && w2 <= Duration::from_millis(100), "{w2:?}");
        t.failed("a", ip);
        let w3 = t.wait("a", ip);
        assert!(w3 > Duration::from_millis(150), "{w3:?}");
        for _ in 0..30 {
            t.failed("a", ip);
        }
        assert!(t.wait("a", ip) <= Duration::from_secs(2), "capped");
        // Per account from anywhere, per address for any account.
        assert!(t.wait("a", other) > Duration::ZERO);
        assert!(t.wait("b", ip) > Duration::ZERO);
        assert_eq!(t.wait("b", other), Duration::ZERO);
        t.succeeded("a");
        assert_eq!(t.wait("a", other), Duration::ZERO);
    }

    #[test]
    fn throttle_map_is_bounded() {
        let t = Throttle::new(2, Duration::from_millis(100), Duration::from_secs(2), 1000);
        for i in 0..100_000u32 {
            t.failed(&format!("acct{i}"), IpAddr::V4(i.into()));
        }
        assert!(t.len() <= 4 * 1000, "{}", t.len());
    }
}
