//! Waiting for durability without a thundering herd.
//!
//! Thousands of sessions may each wait for "my ticket is durable" to
//! answer a client's `<r/>`. Giving each its own receiver of the
//! committed watermark would wake all of them on every group commit.
//! Instead each waiter registers a one-shot for its ticket here, and a
//! single task, woken by the watermark, fires exactly the waiters whose
//! ticket is now covered.
//!
//! This is the one way the server waits for durability (a session's
//! `<a h/>`, the registration API's answer): a backend only has to move
//! the [`super::Durability`] watermark, however it learns that writes are
//! safe (a local fsync, a JetStream quorum acknowledgement).

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

    /// Waits until `t` is durable.
    ///
    /// # Errors
    /// [`super::StoreError::Closed`] if the engine stopped first.
    pub async fn until(&self, t: Ticket) -> super::Result<()> {
        match self.wait(t) {
            None => Ok(()),
            Some(rx) => rx.await.map_err(|_| super::StoreError::Closed),
        }
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
                // The engine stopped: nothing more becomes durable, and
                // dropping the senders tells every waiter so.
                let rest = std::mem::take(&mut *self.map.lock().unwrap_or_else(|p| p.into_inner()));
                drop(rest);
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

    #[tokio::test]
    async fn waiters_learn_when_the_engine_stops() {
        let w = std::sync::Arc::new(Waiters::default());
        let (tx, rx) = watch::channel(1);
        let run = tokio::spawn({
            let w = w.clone();
            async move { w.run(rx).await }
        });
        w.until(1).await.unwrap();
        let pending = tokio::spawn({
            let w = w.clone();
            async move { w.until(9).await }
        });
        tokio::task::yield_now().await;
        drop(tx);
        run.await.unwrap();
        assert!(pending.await.unwrap().is_err(), "a waiter for a ticket that never commits is told");
    }
}
