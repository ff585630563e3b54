//! A session's outbound channel: what the router sends to a connection
//! task, bounded in items and in bytes.
//!
//! A full channel is the router's one overload signal: whoever pushes to
//! a session through the router and finds its channel full makes the
//! router drop the session's handle, and the connection closes as a slow
//! consumer (the nats-server policy). Nothing is dropped silently, and a
//! stored message stays stored.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

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
    pub(crate) fn bytes(&self) -> usize {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
