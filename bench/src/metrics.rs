//! Lock-free latency histogram and delivery counters shared by all sessions.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Instant;

const LINEAR: u64 = 128;
const SUB: u64 = 64;
const BUCKETS: usize = (LINEAR + 40 * SUB) as usize;

/// Log-linear histogram of microsecond values (under 1 % relative error).
pub struct Histogram {
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    max_ns: AtomicU64,
}

fn bucket_of(us: u64) -> usize {
    if us < LINEAR {
        return us as usize;
    }
    let msb = 63 - u64::from(us.leading_zeros());
    let shift = msb - 6;
    let top = us >> shift;
    let idx = LINEAR + (shift - 1) * SUB + (top - SUB);
    (idx as usize).min(BUCKETS - 1)
}

/// Largest microsecond value that falls in bucket `idx`.
fn bucket_upper(idx: usize) -> u64 {
    let idx = idx as u64;
    if idx < LINEAR {
        return idx;
    }
    let shift = (idx - LINEAR) / SUB + 1;
    let top = (idx - LINEAR) % SUB + SUB;
    ((top + 1) << shift) - 1
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            max_ns: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn record_ns(&self, ns: u64) {
        self.buckets[bucket_of(ns / 1000)].fetch_add(1, Relaxed);
        self.count.fetch_add(1, Relaxed);
        self.max_ns.fetch_max(ns, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    pub fn max_ms(&self) -> f64 {
        self.max_ns.load(Relaxed) as f64 / 1e6
    }

    /// Value at quantile `q` (0..=1) in milliseconds (bucket upper bound).
    pub fn quantile_ms(&self, q: f64) -> f64 {
        let total = self.count();
        if total == 0 {
            return 0.0;
        }
        let want = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b.load(Relaxed);
            if seen >= want {
                let us = bucket_upper(i) as f64;
                return (us / 1000.0).min(self.max_ms());
            }
        }
        self.max_ms()
    }

    pub fn reset(&self) {
        for b in &self.buckets {
            b.store(0, Relaxed);
        }
        self.count.store(0, Relaxed);
        self.max_ns.store(0, Relaxed);
    }
}

/// Counters for messages carrying `TIMESTAMP_NS SEQ` bodies.
pub struct Metrics {
    epoch: Instant,
    pub hist: Histogram,
    next_seq: AtomicU64,
    /// Messages with a sequence number below this belong to an earlier
    /// window and are counted as stale.
    window_first_seq: AtomicU64,
    window_open: AtomicBool,
    /// Messages of the current window received.
    pub received: AtomicU64,
    /// Messages (of any window) received while the window was open.
    pub received_while_open: AtomicU64,
    /// Messages from earlier windows, received after their deadline.
    pub stale: AtomicU64,
    pub late: AtomicU64,
    late_threshold_ns: AtomicU64,
    pub dups: AtomicU64,
    pub errors: AtomicU64,
    pub last_recv_ns: AtomicU64,
    seen: Vec<AtomicU64>,
}

impl Metrics {
    /// `capacity`: highest sequence number tracked for duplicates.
    pub fn new(capacity: u64, late_threshold_ms: u64) -> Self {
        let words = capacity.div_ceil(64) as usize;
        Metrics {
            epoch: Instant::now(),
            hist: Histogram::default(),
            next_seq: AtomicU64::new(0),
            window_first_seq: AtomicU64::new(0),
            window_open: AtomicBool::new(false),
            received: AtomicU64::new(0),
            received_while_open: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            late: AtomicU64::new(0),
            late_threshold_ns: AtomicU64::new(late_threshold_ms * 1_000_000),
            dups: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            last_recv_ns: AtomicU64::new(0),
            seen: (0..words).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Nanoseconds on the process's monotonic clock.
    #[inline]
    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    #[inline]
    pub fn next_seq(&self) -> u64 {
        self.next_seq.fetch_add(1, Relaxed)
    }

    pub fn seq_issued(&self) -> u64 {
        self.next_seq.load(Relaxed)
    }

    pub fn seq_capacity(&self) -> u64 {
        self.seen.len() as u64 * 64
    }

    /// Starts a new accounting window: counters and histogram start at zero,
    /// earlier messages count as stale from now on.
    pub fn begin_window(&self) {
        self.window_first_seq.store(self.next_seq.load(Relaxed), Relaxed);
        self.hist.reset();
        for c in [&self.received, &self.received_while_open, &self.stale, &self.late, &self.dups, &self.errors] {
            c.store(0, Relaxed);
        }
        self.window_open.store(true, Relaxed);
    }

    pub fn close_window(&self) {
        self.window_open.store(false, Relaxed);
    }

    /// Records one received body `TIMESTAMP_NS SEQ`.
    pub fn record_body(&self, body: &[u8]) {
        let Some((ts, seq)) = parse_body(body) else {
            return;
        };
        let now = self.now_ns();
        if self.window_open.load(Relaxed) {
            self.received_while_open.fetch_add(1, Relaxed);
        }
        let word = (seq / 64) as usize;
        if let Some(w) = self.seen.get(word) {
            let bit = 1u64 << (seq % 64);
            if w.fetch_or(bit, Relaxed) & bit != 0 {
                self.dups.fetch_add(1, Relaxed);
                return;
            }
        }
        if seq < self.window_first_seq.load(Relaxed) {
            self.stale.fetch_add(1, Relaxed);
            return;
        }
        let lat = now.saturating_sub(ts);
        self.hist.record_ns(lat);
        if lat > self.late_threshold_ns.load(Relaxed) {
            self.late.fetch_add(1, Relaxed);
        }
        self.received.fetch_add(1, Relaxed);
        self.last_recv_ns.fetch_max(now, Relaxed);
    }
}

fn parse_body(body: &[u8]) -> Option<(u64, u64)> {
    let mut it = body.split(|&b| b == b' ').filter(|s| !s.is_empty());
    let ts = parse_u64(it.next()?)?;
    let seq = parse_u64(it.next()?)?;
    Some((ts, seq))
}

fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    let mut v: u64 = 0;
    for &b in s {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_tight() {
        let mut last = 0;
        for us in [0u64, 1, 127, 128, 129, 200, 1000, 5000, 12345, 1_000_000, 60_000_000] {
            let b = bucket_of(us);
            assert!(b >= last);
            last = b;
            let up = bucket_upper(b);
            assert!(up >= us, "{us} -> {up}");
            assert!((up - us) as f64 <= us as f64 * 0.02 + 1.0, "{us} -> {up}");
        }
    }

    #[test]
    fn quantiles() {
        let h = Histogram::default();
        for i in 1..=1000u64 {
            h.record_ns(i * 1000);
        }
        assert!((h.quantile_ms(0.5) - 0.5).abs() < 0.01);
        assert!((h.quantile_ms(0.99) - 0.99).abs() < 0.02);
        assert!((h.max_ms() - 1.0).abs() < 1e-9);
    }

    #[test]
    fn windows_dups_and_stale() {
        let m = Metrics::new(1024, 1000);
        m.begin_window();
        let s0 = m.next_seq();
        let now = m.now_ns();
        m.record_body(format!("{now} {s0}").as_bytes());
        m.record_body(format!("{now} {s0}").as_bytes());
        assert_eq!(m.received.load(Relaxed), 1);
        assert_eq!(m.dups.load(Relaxed), 1);
        let s1 = m.next_seq();
        m.begin_window();
        m.record_body(format!("{now} {s1}").as_bytes());
        assert_eq!(m.stale.load(Relaxed), 1);
        assert_eq!(m.received.load(Relaxed), 0);
        m.record_body(b"garbage");
        assert_eq!(parse_body(b"12 34"), Some((12, 34)));
    }
}
