//! The offline queue on JetStream streams.
//!
//! An account's queue is the subject `q.<pp>.<hex(local)>` of stream
//! `Q<pp>` (see [`super::partition`]). Each message carries the caller's
//! sequence number and timestamp in headers (`Chatd-Seq`, `Chatd-Ts`) and
//! the stanza as payload; the per-account mark ([`OfflineStore::last_seq`])
//! is the KV bucket `queue_marks`, mirrored like the other buckets.
//!
//! This is the trait as it stands, on streams, and it passes every
//! conformance case; what it costs, and what the cluster router changes:
//! - **Reads walk the subject.** `list`, `count`, `usage` and `remove`
//!   read the account's messages from the stream leader one
//!   `STREAM.MSG.GET next_by_subj` at a time (leader reads are
//!   read-after-write; direct gets from replicas are not), after waiting
//!   until this node's earlier writes are acknowledged. That is one round
//!   trip per queued message: fine for the mostly empty queues of a
//!   messaging server, not for a large backlog. A batch direct get
//!   (ADR-31) is the fix.
//! - **Caller-assigned numbers are per node.** The trait lets the caller
//!   assign each account's sequence numbers under its delivery lock. On
//!   one node that lock is global for the account; across nodes it is
//!   not, so two nodes could give one account the same number, and the
//!   `queue_marks` write is not a cross-node compare-and-set. The cluster
//!   router must instead name messages by what the stream assigns: the
//!   stream sequence, returned in the PubAck (and in the republished
//!   `Nats-Sequence` header), becomes the delivery id; `remove` deletes
//!   by stream sequence (no lookup walk), `list` pages by stream sequence
//!   with the subject filter, and `last_seq` becomes the subject's last
//!   stream sequence. `Chatd-Seq` then goes away.
//! - **Expiry is a scan here.** `expire(cutoff)` walks every partition
//!   (as the single-node reaper does); in the cluster the streams'
//!   `max_age` does it and the reaper is off.
//! - **Deletes are requests, not publishes.** `remove` and `expire`
//!   delete by stream sequence and count a message only when the leader
//!   answers that it deleted it, so two acknowledgements of the same
//!   message, on one node or two, report it once between them, with no
//!   lock held across the round trips. `clear` is a subject purge,
//!   ordered before any later write of this node.

use async_nats::HeaderMap;
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::stream::{DeleteMessageErrorKind, RawMessageErrorKind, Stream};
use bytes::Bytes;

use super::engine::{Ctx, Op};
use super::stores::{ClusterStore, MARKS};
use super::{hex, partition};
use crate::storage::{OfflineStore, QueueUsage, QueuedMeta, Result, StoreError, StoredMessage, Ticket};

const SEQ: &str = "Chatd-Seq";
const TS: &str = "Chatd-Ts";

/// One queued message as read from its stream.
struct Queued {
    stream_seq: u64,
    seq: u64,
    msg: StoredMessage,
}

impl ClusterStore {
    fn stream_of(&self, local: &str) -> (String, String) {
        let p = partition(local, self.partitions);
        (format!("Q{p:02}"), format!("q.{p:02}.{}", hex(local)))
    }

    /// Every message of `filter` in `stream`, in stream order, read from
    /// the leader once this node's writes issued so far are acknowledged.
    fn read_queue(&self, stream: String, filter: String) -> Result<Vec<Queued>> {
        let upto = self.engine.issued();
        self.engine.call(move |ctx| async move {
            settle(&ctx, upto).await?;
            let s = ctx.js.get_stream_no_info(&stream).await.map_err(|e| err(&stream, e))?;
            walk(&s, &filter).await
        })
    }

    /// Deletes the given stream sequences; returns those the leader
    /// deleted (not those already gone).
    fn delete_seqs(&self, stream: String, seqs: Vec<u64>) -> Result<Vec<u64>> {
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        self.engine.call(move |ctx| async move {
            let s = ctx.js.get_stream_no_info(&stream).await.map_err(|e| err(&stream, e))?;
            let mut gone = Vec::new();
            for seq in seqs {
                match s.delete_message(seq).await {
                    Ok(true) => gone.push(seq),
                    Ok(false) => {}
                    // "no message found": another device's ack got there first.
                    Err(e) if already_gone(&e.kind()) => {}
                    Err(e) => return Err(err(&stream, e)),
                }
            }
            Ok(gone)
        })
    }
}

fn err(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Engine(format!("{what}: {e}"))
}

/// The leader answered that the message does not exist (another
/// device's acknowledgement, or another node, deleted it first).
fn already_gone(kind: &DeleteMessageErrorKind) -> bool {
    match kind {
        DeleteMessageErrorKind::JetStream(e) => {
            // 10057 with "no message found" is what nats-server 2.15.1
            // answers for a deleted sequence; 10043 "sequence not found".
            e.error_code() == ErrorCode::NO_MESSAGE_FOUND
                || e.error_code() == ErrorCode(10043)
                || (e.error_code() == ErrorCode(10057) && e.to_string().contains("no message found"))
        }
        _ => false,
    }
}

/// Waits until the watermark reaches `upto`.
async fn settle(ctx: &Ctx, upto: Ticket) -> Result<()> {
    let mut rx = ctx.committed.clone();
    rx.wait_for(|c| *c >= upto).await.map(|_| ()).map_err(|_| StoreError::Closed)
}

async fn walk(s: &Stream<()>, filter: &str) -> Result<Vec<Queued>> {
    let mut out = Vec::new();
    let mut next = 1;
    loop {
        match s.raw_message_builder().sequence(next).next_by_subject(filter.to_string()).send().await {
            Ok(m) => {
                next = m.sequence + 1;
                let header = |name: &str| {
                    m.headers
                        .get(name)
                        .and_then(|v| v.as_str().parse::<u64>().ok())
                        .ok_or_else(|| StoreError::Corrupt(format!("{} #{}: no valid {name}", m.subject, m.sequence)))
                };
                let (seq, ts_ms) = (header(SEQ)?, header(TS)?);
                let xml = String::from_utf8(m.payload.to_vec())
                    .map_err(|_| StoreError::Corrupt(format!("{} #{}: not UTF-8", m.subject, m.sequence)))?;
                out.push(Queued { stream_seq: m.sequence, seq, msg: StoredMessage { ts_ms, xml } });
            }
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => return Ok(out),
            Err(e) => return Err(err(filter, e)),
        }
    }
}

impl OfflineStore for ClusterStore {
    fn push(&self, items: &[(&str, u64, &StoredMessage)]) -> Result<Ticket> {
        let mut marks: std::collections::BTreeMap<&str, u64> = Default::default();
        let mut ops = Vec::with_capacity(items.len() + 1);
        for (local, seq, m) in items {
            let (_, subject) = self.stream_of(local);
            let mut headers = HeaderMap::new();
            headers.insert(SEQ, seq.to_string().as_str());
            headers.insert(TS, m.ts_ms.to_string().as_str());
            ops.push(Op::Publish { subject, headers, payload: Bytes::copy_from_slice(m.xml.as_bytes()) });
            let mark = marks.entry(local).or_default();
            *mark = (*mark).max(*seq);
        }
        self.engine.submit(|t| {
            let m = self.mirror(MARKS);
            for (local, seq) in marks {
                let key = hex(local);
                if self.last_seq(local)? < seq {
                    let value = Bytes::from(seq.to_string());
                    m.own_write(&key, Some(value.clone()), t);
                    ops.push(Op::Put { bucket: MARKS, key, value });
                }
            }
            Ok(ops)
        })
    }

    fn remove(&self, local: &str, seqs: &[u64]) -> Result<(Ticket, Vec<QueuedMeta>)> {
        let (stream, filter) = self.stream_of(local);
        let mut found = Vec::new();
        if !seqs.is_empty() {
            let wanted: std::collections::HashSet<u64> = seqs.iter().copied().collect();
            found = self.read_queue(stream.clone(), filter)?.into_iter().filter(|q| wanted.contains(&q.seq)).collect();
        }
        let gone = self.delete_seqs(stream, found.iter().map(|q| q.stream_seq).collect())?;
        let metas = found.iter().filter(|q| gone.contains(&q.stream_seq)).map(|q| QueuedMeta::of(&q.msg)).collect();
        // The deletes are answered, so committed; the ticket keeps the
        // caller's view of write order.
        Ok((self.engine.submit(|_| Ok(Vec::new()))?, metas))
    }

    fn list(
        &self,
        local: &str,
        after: u64,
        upto: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, StoredMessage)>> {
        if after >= upto || limit == 0 {
            return Ok(Vec::new());
        }
        let (stream, filter) = self.stream_of(local);
        let mut q: Vec<Queued> =
            self.read_queue(stream, filter)?.into_iter().filter(|q| q.seq > after && q.seq <= upto).collect();
        q.sort_by_key(|q| q.seq);
        let mut out = Vec::new();
        let mut bytes = 0;
        for m in q {
            bytes += m.msg.xml.len();
            out.push((m.seq, m.msg));
            if out.len() >= limit || bytes >= max_bytes {
                break;
            }
        }
        Ok(out)
    }

    fn count(&self, local: &str) -> Result<usize> {
        let (stream, filter) = self.stream_of(local);
        Ok(self.read_queue(stream, filter)?.len())
    }

    fn usage(&self, local: &str) -> Result<QueueUsage> {
        let (stream, filter) = self.stream_of(local);
        let mut u = QueueUsage::default();
        for q in self.read_queue(stream, filter)? {
            let m = QueuedMeta::of(&q.msg);
            u.add(&m.sender, m.bytes);
        }
        Ok(u)
    }

    fn clear(&self, local: &str) -> Result<Ticket> {
        let (stream, filter) = self.stream_of(local);
        self.engine.submit(|_| Ok(vec![Op::Purge { stream, filter }]))
    }

    fn expire(&self, cutoff_ms: u64) -> Result<usize> {
        let mut n = 0;
        for p in 0..self.partitions {
            let stream = format!("Q{p:02}");
            let old: Vec<u64> = self
                .read_queue(stream.clone(), format!("q.{p:02}.*"))?
                .into_iter()
                .filter(|q| q.msg.ts_ms < cutoff_ms)
                .map(|q| q.stream_seq)
                .collect();
            n += self.delete_seqs(stream, old)?.len();
        }
        Ok(n)
    }

    fn last_seq(&self, local: &str) -> Result<u64> {
        match self.mirror(MARKS).get(&hex(local)) {
            None => Ok(0),
            Some(v) => std::str::from_utf8(&v)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| StoreError::Corrupt(format!("queue_marks/{}: not a number", hex(local)))),
        }
    }
}
