//! The NATS side: one thread with its own current-thread tokio runtime,
//! holding the connection, the KV watches and the PubAck tracker.
//!
//! Store calls reach it through [`Engine::submit`] (a write: returns its
//! ticket at once) and [`Engine::call`] (a request that needs an answer:
//! the calling thread waits on a std channel, with a timeout). Commands
//! travel over an unbounded tokio channel, whose `send` needs no runtime
//! and never blocks, so both work from tokio workers and plain threads
//! alike, and the order in which writes are sent is their ticket order.
//!
//! Every operation of a write is handed to the connection in ticket
//! order; its PubAck (or API answer) is awaited in a task of its own, so
//! acks never wait behind one another and the client's in-flight permits
//! are released as they arrive. A `FuturesOrdered` of the tickets yields
//! them in order, and the watermark moves to each ticket whose
//! operations all succeeded. An unacknowledged publish is resent (see
//! [`send`]); one that stays unacknowledged for the ack timeout stops
//! the engine.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use tokio::sync::{mpsc, watch};

use super::mirror::Mirror;
use crate::storage::{Result, StoreError, Ticket};

/// What one write does in NATS.
pub enum Op {
    /// A KV put of `key` in the bucket of mirror `bucket`.
    Put { bucket: usize, key: String, value: Bytes },
    /// A KV delete marker for `key`.
    Del { bucket: usize, key: String },
    /// A JetStream publish (an offline message).
    Publish { subject: String, headers: HeaderMap, payload: Bytes },
    /// Deletes every message of `filter` from `stream`, before any later
    /// operation is sent.
    Purge { stream: String, filter: String },
}

/// What a request running on the NATS thread gets.
#[derive(Clone)]
pub struct Ctx {
    pub js: jetstream::Context,
    /// The durable watermark, to wait until earlier writes are stored.
    pub committed: watch::Receiver<Ticket>,
}

type Job = Box<dyn FnOnce(Ctx) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

enum Cmd {
    Write { ticket: Ticket, ops: Vec<Op> },
    Call(Job),
    Shutdown,
}

/// How long a request to NATS may take before the store reports an error.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for outstanding PubAcks.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The handle store calls use.
pub struct Engine {
    tx: mpsc::UnboundedSender<Cmd>,
    /// Last ticket issued; held while a write is applied to the mirrors
    /// and sent, so send order is ticket order.
    order: Mutex<Ticket>,
    committed: watch::Receiver<Ticket>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The reason the engine stopped, if it did.
    failure: Arc<Mutex<Option<String>>>,
    /// PubAcks received (for tests and metrics).
    pub acks: Arc<AtomicU64>,
}

impl Engine {
    /// Starts the NATS thread: builds its runtime, runs `bootstrap` there
    /// (connect, create buckets and streams, catch the mirrors up, start
    /// the watches) and then serves commands. Returns once `bootstrap`
    /// finished, with its error if it failed. `mirrors` are indexed by
    /// [`Op::Put`]'s `bucket`.
    ///
    /// # Errors
    /// `bootstrap`'s error, or [`StoreError::Engine`] if it took longer
    /// than `open_timeout`.
    pub fn start<F, Fut>(
        bootstrap: F,
        mirrors: Arc<Vec<Mirror>>,
        settings: WireSettings,
        open_timeout: Duration,
    ) -> Result<Engine>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<jetstream::Context>>,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        let (ctx_tx, committed) = watch::channel(0);
        let failure = Arc::new(Mutex::new(None));
        let acks = Arc::new(AtomicU64::new(0));
        let (up_tx, up_rx) = std::sync::mpsc::sync_channel::<Result<()>>(1);
        let thread = {
            let (failure, acks) = (failure.clone(), acks.clone());
            std::thread::Builder::new()
                .name("chatd-nats".into())
                .spawn(move || {
                    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = up_tx.send(Err(StoreError::Engine(format!("NATS runtime: {e}"))));
                            return;
                        }
                    };
                    rt.block_on(async move {
                        let js = match bootstrap().await {
                            Ok(js) => js,
                            Err(e) => {
                                let _ = up_tx.send(Err(e));
                                return;
                            }
                        };
                        if up_tx.send(Ok(())).is_err() {
                            return; // the opener gave up
                        }
                        run(rx, js, ctx_tx, mirrors, settings, failure, acks).await;
                    });
                    // Watches and stray tasks end with the runtime.
                    rt.shutdown_timeout(Duration::from_secs(1));
                })
                .map_err(|e| StoreError::Engine(format!("starting the NATS thread: {e}")))?
        };
        match up_rx.recv_timeout(open_timeout) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                return Err(StoreError::Engine(format!(
                    "connecting to NATS and setting up the cluster store took over {} s",
                    open_timeout.as_secs()
                )));
            }
        }
        Ok(Engine { tx, order: Mutex::new(0), committed, thread: Mutex::new(Some(thread)), failure, acks })
    }

    fn closed(&self) -> StoreError {
        match self.failure.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            Some(why) => StoreError::Engine(format!("cluster store stopped: {why}")),
            None => StoreError::Closed,
        }
    }

    /// Issues the next ticket, lets `build` apply the write to the mirrors
    /// under it and return its operations, and sends them.
    ///
    /// # Errors
    /// [`StoreError::Closed`] (or the failure that stopped the engine).
    pub fn submit(&self, build: impl FnOnce(Ticket) -> Result<Vec<Op>>) -> Result<Ticket> {
        let mut last = self.order.lock().unwrap_or_else(|p| p.into_inner());
        if self.tx.is_closed() {
            return Err(self.closed());
        }
        let ticket = *last + 1;
        let ops = build(ticket)?;
        self.tx.send(Cmd::Write { ticket, ops }).map_err(|_| self.closed())?;
        *last = ticket;
        crate::storage::note_ticket(ticket);
        Ok(ticket)
    }

    /// The last ticket issued.
    pub fn issued(&self) -> Ticket {
        *self.order.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the NATS thread and waits for its answer.
    ///
    /// # Errors
    /// `f`'s error; [`StoreError::Engine`] if no answer came within
    /// [`CALL_TIMEOUT`]; [`StoreError::Closed`] if the engine stopped.
    pub fn call<T, F, Fut>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(Ctx) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T>> + Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let job: Job = Box::new(move |ctx| {
            Box::pin(async move {
                let r = match tokio::time::timeout(CALL_TIMEOUT, f(ctx)).await {
                    Ok(r) => r,
                    Err(_) => Err(StoreError::Engine("NATS did not answer in time".into())),
                };
                let _ = tx.send(r);
            })
        });
        self.tx.send(Cmd::Call(job)).map_err(|_| self.closed())?;
        match rx.recv_timeout(CALL_TIMEOUT + Duration::from_secs(1)) {
            Ok(r) => r,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                Err(StoreError::Engine("NATS did not answer in time".into()))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(self.closed()),
        }
    }

    pub fn committed(&self) -> watch::Receiver<Ticket> {
        self.committed.clone()
    }

    /// Waits (bounded) for outstanding PubAcks, then stops the thread.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Cmd::Shutdown);
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle
            && h.thread().id() != std::thread::current().id()
        {
            let _ = h.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// What one acknowledged operation tells the mirrors.
struct Acked {
    bucket: usize,
    key: String,
    revision: u64,
}

type TicketFuture = Pin<Box<dyn Future<Output = (Ticket, std::result::Result<Vec<Acked>, String>)> + Send>>;

/// Where writes go and how hard they are pushed there.
pub struct WireSettings {
    /// KV subject prefix (`$KV.<bucket>.`) of each mirror, by index.
    pub kv_prefixes: Vec<String>,
    /// Unique to this process: the start of every `Nats-Msg-Id`.
    pub id_prefix: String,
    pub ack_timeout: Duration,
}

async fn run(
    mut rx: mpsc::UnboundedReceiver<Cmd>,
    js: jetstream::Context,
    committed: watch::Sender<Ticket>,
    mirrors: Arc<Vec<Mirror>>,
    settings: WireSettings,
    failure: Arc<Mutex<Option<String>>>,
    acks: Arc<AtomicU64>,
) {
    let WireSettings { kv_prefixes, id_prefix, ack_timeout } = settings;
    let mut pending: FuturesOrdered<TicketFuture> = FuturesOrdered::new();
    let ctx = Ctx { js: js.clone(), committed: committed.subscribe() };
    let wire = Arc::new(Wire { js, kv_prefixes, mirrors: mirrors.clone(), acks, id_prefix, ack_timeout });
    let mut stopping = false;
    let fail = |why: String| {
        tracing::error!(error = %why, "cluster store write failed; the store stops");
        *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    };
    // Records a ticket whose acknowledgements are all in.
    let finish = |ticket: Ticket, res: std::result::Result<Vec<Acked>, String>| {
        let done = res?;
        for a in done {
            if let Some(m) = mirrors.get(a.bucket) {
                m.acked(&a.key, ticket, a.revision);
            }
        }
        committed.send_modify(|c| *c = (*c).max(ticket));
        Ok::<(), String>(())
    };
    loop {
        tokio::select! {
            cmd = rx.recv(), if !stopping => match cmd {
                Some(Cmd::Write { ticket, ops }) => {
                    // JetStream stores publishes and runs API requests on
                    // separate paths: a purge sent after a publish could
                    // run first. So a purge waits for every earlier ack.
                    if ops.iter().any(|o| matches!(o, Op::Purge { .. })) {
                        let mut drained = Ok(());
                        while let Some((t, res)) = pending.next().await {
                            drained = finish(t, res);
                            if drained.is_err() {
                                break;
                            }
                        }
                        if let Err(why) = drained {
                            fail(why);
                            break;
                        }
                    }
                    match send(&wire, ticket, ops).await {
                        Ok(fut) => pending.push_back(fut),
                        Err(why) => { fail(why); break; }
                    }
                }
                Some(Cmd::Call(job)) => { tokio::spawn(job(ctx.clone())); }
                Some(Cmd::Shutdown) | None => {
                    stopping = true;
                    rx.close();
                }
            },
            Some((ticket, res)) = pending.next(), if !pending.is_empty() => {
                if let Err(why) = finish(ticket, res) {
                    fail(why);
                    break;
                }
            }
            _ = tokio::time::sleep(DRAIN_TIMEOUT), if stopping => {
                tracing::warn!(outstanding = pending.len(), "cluster store: PubAcks still missing at shutdown");
                break;
            }
        }
        if stopping && pending.is_empty() {
            break;
        }
    }
    // Later writes fail first, then every waiter learns that nothing
    // more becomes durable: a caller told "stopped" finds the store so.
    rx.close();
    drop(committed);
}

/// What sending needs, shared with the ack tasks.
struct Wire {
    js: jetstream::Context,
    kv_prefixes: Vec<String>,
    mirrors: Arc<Vec<Mirror>>,
    acks: Arc<AtomicU64>,
    /// `<node>.<random>`: with the ticket and the operation's index, the
    /// `Nats-Msg-Id` that lets a resend be dropped as a duplicate.
    id_prefix: String,
    /// How long one operation may keep failing before the store stops.
    ack_timeout: Duration,
}

/// Errors no resend can cure.
fn permanent(e: &async_nats::jetstream::context::PublishError) -> bool {
    use async_nats::jetstream::context::PublishErrorKind as K;
    matches!(e.kind(), K::MaxPayloadExceeded | K::WrongLastSequence | K::WrongLastMessageId)
}

/// Hands `ops` to the connection in order and returns the future of
/// their acknowledgements.
///
/// A publish that fails or is not acknowledged (a server lost, a stream
/// leader being elected) is sent again with the same `Nats-Msg-Id` until
/// `ack_timeout`, so a copy that did land is not stored twice. A resend
/// may land after a later write: harmless for queue messages (a queue is
/// read in `Chatd-Seq` order), and for a KV key a resend is skipped once
/// a later write of this node to the same key exists, which supersedes it.
async fn send(w: &Arc<Wire>, ticket: Ticket, ops: Vec<Op>) -> std::result::Result<TicketFuture, String> {
    let mut waits = Vec::with_capacity(ops.len());
    for (i, op) in ops.into_iter().enumerate() {
        let (subject, mut headers, payload, kv) = match op {
            Op::Put { bucket, key, value } => {
                let prefix = w.kv_prefixes.get(bucket).ok_or("unknown bucket")?;
                (format!("{prefix}{key}"), HeaderMap::new(), value, Some((bucket, key)))
            }
            Op::Del { bucket, key } => {
                let prefix = w.kv_prefixes.get(bucket).ok_or("unknown bucket")?;
                let mut h = HeaderMap::new();
                h.insert("KV-Operation", "DEL");
                (format!("{prefix}{key}"), h, Bytes::new(), Some((bucket, key)))
            }
            Op::Publish { subject, headers, payload } => (subject, headers, payload, None),
            Op::Purge { stream, filter } => {
                // Awaited here, not in a task of its own: a purge must not
                // overtake a later publish to the same subject. Idempotent,
                // so retried as it is.
                let deadline = tokio::time::Instant::now() + w.ack_timeout;
                loop {
                    let r = async {
                        let s = w.js.get_stream_no_info(&stream).await.map_err(|e| format!("stream {stream}: {e}"))?;
                        s.purge().filter(filter.clone()).await.map_err(|e| format!("purging {filter}: {e}"))?;
                        Ok::<(), String>(())
                    }
                    .await;
                    match r {
                        Ok(()) => break,
                        Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                        Err(e) => {
                            tracing::warn!(error = %e, "cluster store: purge failed, retrying");
                            tokio::time::sleep(Duration::from_millis(250)).await;
                        }
                    }
                }
                continue;
            }
        };
        headers.insert("Nats-Msg-Id", format!("{}.{ticket}.{i}", w.id_prefix).as_str());
        // The first attempt goes out here, in ticket order.
        let first = w.js.publish_with_headers(subject.clone(), headers.clone(), payload.clone()).await;
        let w = w.clone();
        waits.push(tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + w.ack_timeout;
            let mut attempt = first;
            loop {
                let err = match attempt {
                    Ok(ack) => match ack.await {
                        Ok(a) => {
                            w.acks.fetch_add(1, Ordering::Relaxed);
                            return Ok(kv.map(|(bucket, key)| Acked { bucket, key, revision: a.sequence }));
                        }
                        Err(e) => e,
                    },
                    Err(e) => e,
                };
                if permanent(&err) || tokio::time::Instant::now() >= deadline {
                    return Err(format!("{subject}: {err}"));
                }
                if let Some((bucket, key)) = &kv
                    && w.mirrors.get(*bucket).is_some_and(|m| m.superseded(key, ticket))
                {
                    return Ok(None);
                }
                tracing::warn!(%subject, error = %err, "cluster store: write not acknowledged, resending");
                tokio::time::sleep(Duration::from_millis(250)).await;
                attempt = w.js.publish_with_headers(subject.clone(), headers.clone(), payload.clone()).await;
            }
        }));
    }
    Ok(Box::pin(async move {
        let mut done = Vec::new();
        for w in waits {
            match w.await {
                Ok(Ok(Some(a))) => done.push(a),
                Ok(Ok(None)) => {}
                Ok(Err(e)) => return (ticket, Err(e)),
                Err(e) => return (ticket, Err(format!("ack task: {e}"))),
            }
        }
        (ticket, Ok(done))
    }))
}
