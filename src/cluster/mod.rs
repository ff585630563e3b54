//! Cluster storage: every store trait on NATS JetStream, so that several
//! chatd nodes share accounts, rosters, settings, groups and offline
//! queues.
//!
//! # Layout
//! - KV buckets `accounts`, `roster`, `settings`, `groups` and
//!   `queue_marks` (streams `KV_<bucket>`, history 1, file storage,
//!   `replicas` copies). KV keys must match `[-/_=.a-zA-Z0-9]+`, so every
//!   name in a key is lowercase hex of its UTF-8 bytes ([`hex`]), which
//!   keeps byte order: a range scan of `<hex(owner)>.` is one owner's
//!   entries in name order, and no owner's prefix can reach another's
//!   (hex has no `.`).
//!   - `accounts`: `<hex(local)>` → the [`crate::storage::UserRecord`] as JSON;
//!   - `roster`: `<hex(owner)>.<hex(contact)>` → one item as JSON, so two
//!     nodes changing different contacts of one roster never overwrite
//!     each other;
//!   - `settings`: `<hex(owner)>.<hex(name)>` → the raw document;
//!   - `groups`: `<hex(id)>` → the group as JSON. The member → groups
//!     index is derived in RAM from the mirrored groups, so a group change
//!     is one key, atomic without multi-key batches;
//!   - `queue_marks`: `<hex(local)>` → the highest queue sequence number
//!     ever pushed, in decimal.
//! - Offline queues: streams `Q00`…`Q<partitions-1>`, subject
//!   `q.<pp>.<hex(local)>` with `pp` = FNV-1a(local) mod `partitions`
//!   ([`partition`]); see [`offline`].
//!
//! # Reads and writes
//! Each node mirrors the KV buckets in RAM ([`mirror`]), fed by one KV
//! watch per bucket and caught up before [`open`] returns, so reads are
//! local and synchronous, as the traits require. A write is applied to
//! the mirror at once (a node reads its own writes, before they are
//! durable, as with fjall) and published to NATS; a watch update older
//! than the node's own pending write of a key never hides it.
//!
//! # Durability
//! Tickets are a local counter in write order. A write is durable when
//! every PubAck (or JetStream API answer) of its operations and of every
//! earlier ticket has arrived; [`engine`] then advances the
//! [`crate::storage::Durability`] watermark, and `storage::waiters`
//! releases the XEP-0198 acks it covers. On an R3 stream a PubAck is a
//! quorum commit; it is an fsync on those servers only when they run
//! with `sync_interval: always` (the default syncs every two minutes, and
//! acknowledged writes can then be lost in a power failure), so that
//! setting is required.
//!
//! Every publish carries a `Nats-Msg-Id` unique to this process, ticket
//! and operation; one not acknowledged (a server lost, a stream leader
//! being elected) is resent with the same id, so a copy that did land is
//! dropped as a duplicate. Killing the stream leader of three servers
//! stalls writes for about 6 s and loses none. A write still not
//! acknowledged after [`stores::ACK_TIMEOUT`], or refused for good,
//! stops the engine (fail-stop): the watermark never passes it, waiters
//! learn that the store closed, later writes fail.
//!
//! # The sync/async bridge
//! The storage traits are synchronous and are called from tokio workers
//! (stanza handling) and from plain threads (the CLI). The NATS client is
//! async, so it runs on its own thread with its own current-thread tokio
//! runtime ([`engine`]). Callers hand it commands over an unbounded tokio
//! channel (sending never blocks and needs no runtime); writes return at
//! once with their ticket, and the few calls that need an answer from
//! NATS (offline-queue reads, opening) wait on a std channel with a
//! timeout. No caller ever runs `Handle::block_on`, which panics on a
//! tokio worker; a worker that makes a NATS round trip blocks only for
//! that round trip, as it would on a disk read with fjall.

//! # Consistency between nodes
//! Each key is last-writer-wins in NATS order; the mirrors converge on it
//! within a watch hop (about a millisecond). A read-modify-write from two
//! nodes at once (two devices of one account changing one roster item on
//! different nodes) keeps one of them, where the single node serialises
//! them. A `clear_*` deletes the keys this node's mirror knows, so a key
//! another node wrote a moment earlier can survive it. A miss in the
//! mirror is an answer, not a reason to ask NATS: `has_user` for unknown
//! numbers must not cost a round trip.
//!
//! # What the cluster router will need
//! - Delivery ids from the stream (see [`offline`]): caller-assigned queue
//!   numbers are safe only under one node's delivery lock.
//! - Per-account queue usage and limits from the stream
//!   (`max_msgs_per_subject`, error 10077), not from a node's cache.
//! - Password changes and account deletions reach sessions on other nodes
//!   (today `chatd user` on a cluster ends no session; `key_generation` in
//!   the record tells stale sessions apart).
//! - A policy for a store that stopped (NATS unreachable for
//!   [`stores::ACK_TIMEOUT`]): close the node's streams so clients move
//!   to another node, and open the store again.

pub mod engine;
pub mod mirror;
pub mod offline;
pub mod stores;
pub mod testing;

use std::sync::Arc;

use crate::config::Cluster;
use crate::storage::{StoreError, Stores};

/// Lowercase hex of `s`'s bytes: valid in any KV key or subject token and
/// ordered as `s` is.
pub fn hex(s: &str) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(s.len() * 2);
    for b in s.bytes() {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Inverse of [`hex`].
///
/// # Errors
/// [`StoreError::Corrupt`] for anything [`hex`] cannot have written.
pub fn unhex(h: &str) -> crate::storage::Result<String> {
    let bad = || StoreError::Corrupt(format!("key part {h:?} is not hex"));
    if !h.len().is_multiple_of(2) {
        return Err(bad());
    }
    let bytes = (0..h.len())
        .step_by(2)
        .map(|i| h.get(i..i + 2).and_then(|p| u8::from_str_radix(p, 16).ok()).ok_or_else(bad))
        .collect::<crate::storage::Result<Vec<u8>>>()?;
    String::from_utf8(bytes).map_err(|_| bad())
}

/// The offline-queue partition of `local`: FNV-1a 64 of its bytes modulo
/// `partitions`. Stable across versions and platforms (the std hasher is
/// not), since it decides which stream holds a queue.
pub fn partition(local: &str, partitions: u32) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in local.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % u64::from(partitions.max(1))) as u32
}

/// Connects to the cluster, creates missing buckets and streams, catches
/// the mirrors up, and returns the stores. Synchronous: it blocks the
/// calling thread (call it from a plain thread or `spawn_blocking`).
///
/// # Errors
/// [`StoreError::Engine`] naming the servers when NATS is unreachable or
/// refuses the bootstrap (e.g. JetStream off, too few servers for
/// `replicas`).
pub fn open(cfg: &Cluster) -> crate::storage::Result<Stores> {
    open_with_ack_timeout(cfg, stores::ACK_TIMEOUT)
}

/// [`open`] with another PubAck timeout than
/// [`stores::ACK_TIMEOUT`].
///
/// # Errors
/// See [`open`].
pub fn open_with_ack_timeout(cfg: &Cluster, ack_timeout: std::time::Duration) -> crate::storage::Result<Stores> {
    let s = Arc::new(stores::ClusterStore::open_with(cfg, ack_timeout)?);
    Ok(Stores {
        users: s.clone(),
        offline: s.clone(),
        roster: s.clone(),
        settings: s.clone(),
        groups: s.clone(),
        durability: s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_keeps_order() {
        for s in ["", "1555", "urn:xmpp:avatar:data", "a@b/c d", "ünï"] {
            assert_eq!(unhex(&hex(s)).unwrap(), s);
        }
        let mut names = ["b@localhost", "a@localhost", "1555", "15551", "155"];
        let mut hexed: Vec<String> = names.iter().map(|n| hex(n)).collect();
        names.sort();
        hexed.sort();
        assert_eq!(hexed, names.iter().map(|n| hex(n)).collect::<Vec<_>>());
        assert!(unhex("abc").is_err());
        assert!(unhex("zz").is_err());
        assert!(unhex("ff").is_err(), "not UTF-8");
    }

    #[test]
    fn partitions_are_stable_and_in_range() {
        assert_eq!(partition("15551234567", 32), partition("15551234567", 32));
        assert!((0..1000).all(|i| partition(&i.to_string(), 32) < 32));
        let used: std::collections::HashSet<u32> = (0..1000).map(|i| partition(&i.to_string(), 32)).collect();
        assert_eq!(used.len(), 32, "accounts spread over every partition");
        assert_eq!(partition("x", 0), 0);
    }
}
