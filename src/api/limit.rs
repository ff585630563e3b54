//! Rate limits keyed by strangers' identifiers (client addresses, phone
//! numbers), with O(1) amortised cost per request and bounded memory.
//!
//! [`Windows`] counts events per key in fixed windows. Instead of scanning
//! the map for stale entries (O(n) under the lock, as often as it grows),
//! it keeps two generations: when a window ends, the current map becomes
//! the previous one and the old previous map is handed back to the caller
//! to be dropped *outside* the lock. Each entry is inserted once and freed
//! once, so the cost per request is O(1) amortised. A map never holds more
//! than `max_keys` entries: past that, unknown keys are refused until the
//! window ends (the memory an address-rotating client can make the server
//! hold is bounded).
//!
//! Client addresses are keyed by [`client_key`]: IPv4 addresses as they
//! are, IPv6 addresses by their /64 (one subscriber's prefix), so rotating
//! through the 2^64 addresses of one prefix buys nothing.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Default bound on the keys a limiter tracks per window.
pub const DEFAULT_MAX_KEYS: usize = 1 << 20;

/// One key's record in a window.
#[derive(Clone, Copy, Debug, Default)]
pub struct Slot {
    pub count: usize,
    /// When the last event counted for this key happened (kept across a
    /// window change, for "wait N seconds between requests" rules).
    pub last: Option<Instant>,
}

struct Gens<K> {
    start: Instant,
    current: HashMap<K, Slot>,
    previous: HashMap<K, Slot>,
}

/// Why [`Windows::take`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// Seconds until the request could succeed.
    pub retry_after: u64,
}

/// Per-key event counts in fixed windows of `window` length.
pub struct Windows<K> {
    window: Duration,
    max_keys: usize,
    gens: Mutex<Gens<K>>,
}

impl<K: Hash + Eq + Clone> Windows<K> {
    pub fn new(window: Duration, max_keys: usize) -> Windows<K> {
        Windows {
            window: window.max(Duration::from_millis(1)),
            max_keys: max_keys.max(1),
            gens: Mutex::new(Gens { start: Instant::now(), current: HashMap::new(), previous: HashMap::new() }),
        }
    }

    /// Hourly windows with the default key bound.
    pub fn hourly() -> Windows<K> {
        Windows::new(Duration::from_secs(3600), DEFAULT_MAX_KEYS)
    }

    /// Counts one event for `key` if `check` accepts the key's record
    /// (its count so far in this window and its last event), refusing
    /// otherwise. `check` returns `Err(seconds)` to refuse.
    pub fn take_with(
        &self,
        key: &K,
        now: Instant,
        check: impl FnOnce(&Slot, Duration) -> Result<(), u64>,
    ) -> Result<(), Refused> {
        let mut stale = None;
        let r = {
            let Ok(mut g) = self.gens.lock() else { return Err(Refused { retry_after: 1 }) };
            let elapsed = now.saturating_duration_since(g.start);
            if elapsed >= self.window {
                // Windows are aligned to the first start: a long quiet
                // spell drops both generations.
                let skipped = elapsed.as_nanos() / self.window.as_nanos();
                let cur = std::mem::take(&mut g.current);
                stale = Some(if skipped == 1 {
                    (std::mem::replace(&mut g.previous, cur), HashMap::new())
                } else {
                    (std::mem::take(&mut g.previous), cur)
                });
                let step = self.window.as_nanos().saturating_mul(skipped);
                g.start += Duration::from_nanos(u64::try_from(step).unwrap_or(u64::MAX));
            }
            let left = self.window.saturating_sub(now.saturating_duration_since(g.start));
            let retry_all = left.as_secs().max(1);
            let gens = &mut *g;
            let slot = match gens.current.get_mut(key) {
                Some(s) => s,
                None => {
                    if gens.current.len() >= self.max_keys {
                        return Err(Refused { retry_after: retry_all });
                    }
                    let last = gens.previous.get(key).and_then(|s| s.last);
                    gens.current.entry(key.clone()).or_insert(Slot { count: 0, last })
                }
            };
            match check(slot, left) {
                Ok(()) => {
                    slot.count += 1;
                    slot.last = Some(now);
                    Ok(())
                }
                Err(secs) => Err(Refused { retry_after: secs.max(1) }),
            }
        };
        // Freed outside the lock.
        drop(stale);
        r
    }

    /// Counts one event for `key` unless it already had `max` in this
    /// window.
    pub fn take(&self, key: &K, max: usize, now: Instant) -> Result<(), Refused> {
        self.take_with(key, now, |s, left| if s.count >= max { Err(left.as_secs().max(1)) } else { Ok(()) })
    }

    /// Keys tracked in the current and previous windows (for tests and
    /// metrics).
    pub fn tracked(&self) -> usize {
        self.gens.lock().map(|g| g.current.len() + g.previous.len()).unwrap_or(0)
    }
}

/// The rate-limiting identity of a client address: IPv4 as is (IPv4
/// mapped into IPv6 too), IPv6 by its /64.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Hourly per-client-address limit, shared by every way of creating an
/// account.
pub struct IpLimit {
    windows: Windows<IpAddr>,
}

impl Default for IpLimit {
    fn default() -> Self {
        IpLimit { windows: Windows::hourly() }
    }
}

impl IpLimit {
    /// Counts one event for `ip` (its /64 for IPv6) unless `max` were
    /// already counted this hour.
    pub fn take(&self, ip: IpAddr, max: usize) -> bool {
        self.windows.take(&client_key(ip), max, Instant::now()).is_ok()
    }
}

/// A network `ADDR` or `ADDR/BITS`, as in `api.trusted_proxies`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    bits: u8,
}

impl Cidr {
    /// Parses `ADDR` (a single host) or `ADDR/BITS`.
    ///
    /// # Errors
    /// A malformed address or prefix length.
    pub fn parse(s: &str) -> anyhow::Result<Cidr> {
        let (a, bits) = match s.split_once('/') {
            Some((a, b)) => (a, Some(b.parse::<u8>().map_err(|_| anyhow::anyhow!("bad prefix length in {s:?}"))?)),
            None => (s, None),
        };
        let net: IpAddr = a.trim().parse().map_err(|_| anyhow::anyhow!("bad address {s:?}"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let bits = bits.unwrap_or(max);
        if bits > max {
            anyhow::bail!("prefix length too long in {s:?}");
        }
        Ok(Cidr { net, bits })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) if self.net.is_ipv4() => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => return false,
            },
            other => other,
        };
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = if self.bits == 0 { 0 } else { u32::MAX << (32 - u32::from(self.bits)) };
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = if self.bits == 0 { 0 } else { u128::MAX << (128 - u32::from(self.bits)) };
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// The address a request came from. Only when the TCP peer is a trusted
/// proxy is `X-Forwarded-For` believed, and then its rightmost address
/// that is not itself a trusted proxy is the client (addresses further
/// left were written by the client and prove nothing).
pub fn client_ip(peer: IpAddr, forwarded_for: Option<&str>, trusted: &[Cidr]) -> IpAddr {
    let trusted_addr = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !trusted_addr(peer) {
        return peer;
    }
    let Some(xff) = forwarded_for else { return peer };
    let mut client = peer;
    for part in xff.rsplit(',') {
        let Ok(ip) = part.trim().parse::<IpAddr>() else { break };
        client = ip;
        if !trusted_addr(ip) {
            break;
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_roll_without_scanning_and_cap_keys() {
        let w: Windows<u32> = Windows::new(Duration::from_millis(100), 3);
        let t0 = Instant::now();
        assert!(w.take(&1, 2, t0).is_ok());
        assert!(w.take(&1, 2, t0).is_ok());
        assert!(w.take(&1, 2, t0).is_err());
        assert!(w.take(&2, 2, t0).is_ok());
        assert!(w.take(&3, 2, t0).is_ok());
        assert!(w.take(&4, 2, t0).is_err(), "key cap");
        let t1 = t0 + Duration::from_millis(150);
        assert!(w.take(&1, 2, t1).is_ok(), "new window");
        assert!(w.take(&4, 2, t1).is_ok());
        assert_eq!(w.tracked(), 5, "current 2 + previous 3");
        let t2 = t0 + Duration::from_millis(450);
        assert!(w.take(&9, 2, t2).is_ok());
        assert_eq!(w.tracked(), 1, "a quiet spell drops both generations");
    }

    #[test]
    fn cost_per_request_does_not_grow_with_the_map() {
        // The old maps were swept in full once they held 100,000 keys, on
        // every request after that. Here the last 100,000 of 300,000
        // distinct keys cost about what the first 100,000 did.
        let w: Windows<u64> = Windows::new(Duration::from_secs(3600), 1 << 20);
        let now = Instant::now();
        let time = |range: std::ops::Range<u64>| {
            let t = Instant::now();
            for k in range {
                let _ = w.take(&k, 5, now);
            }
            t.elapsed()
        };
        let first = time(0..100_000);
        let _ = time(100_000..200_000);
        let last = time(200_000..300_000);
        assert!(last < first * 5 + Duration::from_millis(50), "first {first:?}, last {last:?}");
    }

    #[test]
    fn last_event_survives_one_roll() {
        let w: Windows<u32> = Windows::new(Duration::from_millis(100), 10);
        let t0 = Instant::now();
        w.take(&1, 5, t0).unwrap();
        let t1 = t0 + Duration::from_millis(110);
        let r = w.take_with(&1, t1, |s, _| if s.last.is_some() { Err(7) } else { Ok(()) });
        assert_eq!(r, Err(Refused { retry_after: 7 }));
    }

    #[test]
    fn ipv6_by_64_and_forwarded_for_only_from_trusted_proxies() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        assert_ne!(client_key(a), client_key("2001:db8:1:3::1".parse().unwrap()));
        assert_eq!(client_key("::ffff:10.0.0.1".parse().unwrap()), "10.0.0.1".parse::<IpAddr>().unwrap());
        let trusted = [Cidr::parse("10.0.0.0/8").unwrap(), Cidr::parse("::1").unwrap()];
        let proxy: IpAddr = "10.1.2.3".parse().unwrap();
        let stranger: IpAddr = "203.0.113.5".parse().unwrap();
        assert_eq!(client_ip(stranger, Some("1.2.3.4"), &trusted), stranger);
        assert_eq!(
            client_ip(proxy, Some("6.6.6.6, 198.51.100.7"), &trusted),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            client_ip(proxy, Some("198.51.100.7, 10.9.9.9"), &trusted),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(client_ip(proxy, Some("garbage"), &trusted), proxy);
        assert_eq!(client_ip(proxy, None, &trusted), proxy);
        assert!(Cidr::parse("10.0.0.0/33").is_err());
    }
}
