//! Waiting for durability without a thundering herd.
//!
//! Thousands of sessions may each wait for "my ticket is durable" to
//! answer a client's `<r/>`. Giving each its own receiver of the
//! committed watermark would wake all of them on every group commit.
//! Instead each waiter registers a one-shot for its ticket here, and a
//! single task, woken by the watermark, fires exactly the waiters whose
//! ticket is now covered.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{oneshot, watch};

use super::Ticket;

#[derive(Default)]
pub struct Waiters {
    committed: AtomicU64,
    map: Mutex<BTreeMap<Ticket, Vec<oneshot::Sender<()>>>>,
}

impl Waiters {
    /// The highest durable ticket seen.
    pub fn committed(&self) -> Ticket {
        self.committed.load(Ordering::Acquire)
    }

    /// A receiver that fires once `t` is durable, or `None` if it already is.
    pub fn wait(&self, t: Ticket) -> Option<oneshot::Receiver<()>> {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if self.committed.load(Ordering::Acquire) >= t {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        m.entry(t).or_default().push(tx);
        Some(rx)
    }

    /// Records `c` as durable and fires every waiter it covers.
    pub fn fire(&self, c: Ticket) {
        let ready = {
            let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
            self.committed.fetch_max(c, Ordering::AcqRel);
            let later = m.split_off(&(c + 1));
            std::mem::replace(&mut *m, later)
        };
        for (_, txs) in ready {
            for tx in txs {
                let _ = tx.send(());
            }
        }
    }

    /// Follows the engine's watermark until it closes.
    pub async fn run(&self, mut rx: watch::Receiver<Ticket>) {
        loop {
            let c = *rx.borrow_and_update();
            self.fire(c);
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fires_only_covered_waiters() {
        let w = Waiters::default();
        let a = w.wait(3).unwrap();
        let mut b = w.wait(7).unwrap();
        w.fire(5);
        assert!(a.await.is_ok());
        assert!(b.try_recv().is_err());
        assert!(w.wait(4).is_none());
        w.fire(7);
        assert!(b.await.is_ok());
    }
}
