//! The embedded engine: fjall (an LSM tree) with group commit.
//!
//! ## Group commit
//! Callers apply their write batch directly (journal append + memtable,
//! microseconds, ordered by fjall's journal lock), so reads see it at once,
//! and then take a [`Ticket`] from a counter. One syncer thread loops:
//! read the highest issued ticket `T`, push fjall's journal buffer to the
//! OS (a `write`, under fjall's lock), then `fdatasync` the active journal
//! file through its own file handle — *outside* fjall's lock, so writers
//! never wait for the disk — and publish `T` as committed. Every batch
//! whose ticket was issued before the read was appended before it, so one
//! sync covers the whole group. A journal that fjall rotates away is
//! fully synced by fjall itself before the new one is used. Under load a
//! single fsync covers thousands of messages; when idle, a message waits
//! for exactly one fsync.
//!
//! A failed fsync poisons fjall; the server then cannot promise
//! durability any more and exits so that it restarts from the journal.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use tokio::sync::watch;

use super::codec::{self, decode_message, encode_message, offline_key, owner_key, owner_prefix, seq_mark_key};
use super::erasure::{MessageKeys, Opened};
use super::{
    Durability, Group, GroupStore, OfflineStore, QueueUsage, QueuedMeta, Result, RosterItem, RosterStore,
    SettingsStore, StoreError, StoredMessage, Ticket, UserRecord, UserStore,
};

fn eng(e: fjall::Error) -> StoreError {
    match e {
        fjall::Error::Locked => StoreError::Locked,
        e => StoreError::Engine(e.to_string()),
    }
}

struct SyncState {
    issued: AtomicU64,
    stop: AtomicBool,
    /// The syncer is waiting for work: writers wake it (a futex call)
    /// only then, not on every write.
    idle: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

/// fjall-backed implementation of every store trait.
pub struct FjallStore {
    db: Database,
    users: Keyspace,
    offline: Keyspace,
    roster: Keyspace,
    settings: Keyspace,
    groups: Keyspace,
    group_index: Keyspace,
    meta: Keyspace,
    /// Per-message keys of the offline queue (see [`super::erasure`]).
    keys: Arc<MessageKeys>,
    sync: Arc<SyncState>,
    committed: watch::Receiver<Ticket>,
    /// Serialises "commit batch, then issue ticket" so tickets follow
    /// journal order.
    order: Mutex<()>,
    syncer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The store-wide mark of a data directory written before sequence
    /// numbers were per account: every account's numbers continue above
    /// it, so none collides with a message stored back then.
    legacy_seq: u64,
}

/// Store-wide sequence mark of older data directories (read, never written).
const LEGACY_SEQ_HWM: &[u8] = b"offline_seq_hwm";

impl FjallStore {
    /// Opens (or creates) the database in `dir` and starts the syncer.
    ///
    /// # Errors
    /// [`StoreError::Locked`] if another process has it open.
    pub fn open(dir: &Path) -> Result<FjallStore> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Engine(e.to_string()))?;
        let db = Database::builder(dir.join("db"))
            .cache_size(16 << 20)
            .worker_threads(1)
            .max_journaling_size(128 << 20)
            .manual_journal_persist(true)
            .open()
            .map_err(eng)?;
        let opts = || KeyspaceCreateOptions::default().max_memtable_size(16 << 20).manual_journal_persist(true);
        let users = db.keyspace("users", opts).map_err(eng)?;
        let offline = db.keyspace("offline", opts).map_err(eng)?;
        let roster = db.keyspace("roster", opts).map_err(eng)?;
        let meta = db.keyspace("meta", opts).map_err(eng)?;
        let settings = db.keyspace("settings", opts).map_err(eng)?;
        let groups = db.keyspace("groups", opts).map_err(eng)?;
        let group_index = db.keyspace("group_index", opts).map_err(eng)?;
        let keys = Arc::new(open_message_keys(dir, &offline)?);
        let sync = Arc::new(SyncState {
            issued: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            idle: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let legacy_seq = match meta.get(LEGACY_SEQ_HWM).map_err(eng)? {
            Some(v) => codec::seq_of(&v)?,
            None => 0,
        };
        let (tx, committed) = watch::channel(0);
        let handle = {
            let db = db.clone();
            let sync = sync.clone();
            let jdir = dir.join("db");
            let keys = keys.clone();
            std::thread::Builder::new()
                .name("chatd-syncer".into())
                .spawn(move || syncer(db, jdir, keys, sync, tx))
                .map_err(|e| StoreError::Engine(e.to_string()))?
        };
        Ok(FjallStore {
            db,
            users,
            offline,
            roster,
            settings,
            groups,
            group_index,
            meta,
            keys,
            sync,
            committed,
            order: Mutex::new(()),
            syncer: Mutex::new(Some(handle)),
            legacy_seq,
        })
    }

    /// Applies a batch and returns its ticket.
    fn write(&self, build: impl FnOnce(&mut fjall::OwnedWriteBatch)) -> Result<Ticket> {
        let mut b = self.db.batch();
        build(&mut b);
        let _g = self.order.lock().map_err(|_| StoreError::Closed)?;
        b.commit().map_err(eng)?;
        let t = self.sync.issued.fetch_add(1, Ordering::AcqRel) + 1;
        drop(_g);
        super::note_ticket(t);
        if self.sync.idle.swap(false, Ordering::AcqRel) {
            // Take the lock so the wake cannot fall between the syncer's
            // check and its wait.
            let _l = self.sync.lock.lock();
            self.sync.wake.notify_one();
        }
        Ok(t)
    }

    /// Encrypts each message under a key of its own (see
    /// [`super::erasure`]); on failure, keys already written are erased.
    fn seal_all<'a>(&self, msgs: impl Iterator<Item = &'a StoredMessage>) -> Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        for m in msgs {
            match self.keys.seal(&encode_message(m)) {
                Ok(v) => out.push(v),
                Err(e) => {
                    self.erase_all(&out);
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    /// Erases the keys of values whose records were just deleted (their
    /// tombstones are committed). A failure leaves a key behind until the
    /// next start, which zeroes every unreferenced slot; it is logged.
    fn erase_all<V: AsRef<[u8]>>(&self, values: &[V]) {
        for v in values {
            if let Err(e) = self.keys.erase(v.as_ref()) {
                tracing::error!(error = %e, "erasing a message key failed");
            }
        }
    }

    fn keys_with_prefix(ks: &Keyspace, prefix: &[u8]) -> Result<Vec<fjall::Slice>> {
        ks.prefix(prefix).map(|g| g.key().map_err(eng)).collect()
    }
}

/// Opens the message-key file next to the database: slots referenced by
/// stored records are kept, every other one is zeroed; records whose key
/// is gone (deleted before a crash lost their tombstone) are removed.
fn open_message_keys(dir: &Path, offline: &Keyspace) -> Result<MessageKeys> {
    let mut used = Vec::new();
    for g in offline.iter() {
        let (_, v) = g.into_inner().map_err(eng)?;
        used.extend(super::erasure::slot_of(&v));
    }
    let keys = MessageKeys::open(&dir.join("message-keys"), used)?;
    let mut dead = Vec::new();
    let mut live = std::collections::HashSet::new();
    for g in offline.iter() {
        let (k, v) = g.into_inner().map_err(eng)?;
        let slot = super::erasure::slot_of(&v);
        if matches!(keys.open_value(&v)?, Opened::Erased) {
            dead.push((k, slot));
        } else {
            live.extend(slot);
        }
    }
    if !dead.is_empty() {
        tracing::info!(records = dead.len(), "dropping stored messages whose keys were erased before a restart");
        for (k, slot) in dead {
            offline.remove(k).map_err(eng)?;
            // A slot only dead records point at may hold the stale key of
            // an erased message whose tombstone outlived its key's erasure.
            if let Some(s) = slot.filter(|s| !live.contains(s)) {
                keys.reclaim(s)?;
            }
        }
        keys.sync().map_err(|e| StoreError::Engine(format!("message keys: {e}")))?;
    }
    Ok(keys)
}

/// The active journal: the highest-numbered `N.jnl` in the database
/// directory.
fn active_journal(dir: &Path) -> Option<(u64, std::path::PathBuf)> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let id = name.strip_suffix(".jnl")?.parse::<u64>().ok()?;
            Some((id, e.path()))
        })
        .max_by_key(|(id, _)| *id)
}

/// Makes everything appended to the journal so far durable without
/// holding fjall's journal lock during the disk flush.
fn sync_journal(db: &Database, dir: &Path, file: &mut Option<(u64, std::fs::File)>) -> fjall::Result<()> {
    db.persist(PersistMode::Buffer)?;
    if let Some((id, path)) = active_journal(dir) {
        if file.as_ref().is_none_or(|(fid, _)| *fid != id) {
            match std::fs::File::open(&path) {
                Ok(f) => *file = Some((id, f)),
                Err(_) => return db.persist(PersistMode::SyncData),
            }
        }
        if let Some((_, f)) = file.as_ref() {
            f.sync_data()?;
            return Ok(());
        }
    }
    db.persist(PersistMode::SyncData)
}

fn syncer(
    db: Database,
    dir: std::path::PathBuf,
    keys: Arc<MessageKeys>,
    sync: Arc<SyncState>,
    tx: watch::Sender<Ticket>,
) {
    let mut synced = 0;
    let mut file = None;
    loop {
        {
            let Ok(mut g) = sync.lock.lock() else { return };
            loop {
                sync.idle.store(true, Ordering::Release);
                if sync.issued.load(Ordering::Acquire) != synced || sync.stop.load(Ordering::Acquire) {
                    break;
                }
                g = match sync.wake.wait_timeout(g, std::time::Duration::from_millis(200)) {
                    Ok((g, _)) => g,
                    Err(_) => return,
                };
            }
            sync.idle.store(false, Ordering::Release);
        }
        let target = sync.issued.load(Ordering::Acquire);
        if target != synced {
            // The message keys and the journal are flushed side by side
            // (two disks' worth of latency would otherwise add up), and
            // `target` is published only once both are durable: every
            // record up to it then finds its key on disk. A record the
            // journal made durable without its key was never acked; it
            // cannot be decrypted and is dropped at the next open.
            let keys_synced = std::thread::scope(|sc| {
                let k = keys.needs_sync().then(|| sc.spawn(|| keys.sync()));
                let j = sync_journal(&db, &dir, &mut file);
                (k.map(|h| h.join().unwrap_or_else(|_| Err(std::io::Error::other("key sync panicked")))), j)
            });
            if let (Some(Err(e)), _) = &keys_synced {
                tracing::error!(error = %e, "message key fsync failed; exiting so the journal is replayed on restart");
                std::process::exit(70);
            }
            if let Err(e) = keys_synced.1 {
                tracing::error!(error = %e, "journal fsync failed; exiting so the journal is replayed on restart");
                std::process::exit(70);
            }
            synced = target;
            tx.send_replace(target);
        }
        if sync.stop.load(Ordering::Acquire) && sync.issued.load(Ordering::Acquire) == synced {
            return;
        }
    }
}

impl Durability for FjallStore {
    fn committed(&self) -> watch::Receiver<Ticket> {
        self.committed.clone()
    }

    fn shutdown(&self) {
        self.sync.stop.store(true, Ordering::Release);
        self.sync.wake.notify_all();
        if let Ok(mut h) = self.syncer.lock()
            && let Some(h) = h.take()
        {
            let _ = h.join();
        }
        let _ = self.keys.sync();
        let _ = self.db.persist(PersistMode::SyncAll);
    }
}

impl Drop for FjallStore {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl UserStore for FjallStore {
    fn get_user(&self, local: &str) -> Result<Option<UserRecord>> {
        match self.users.get(local).map_err(eng)? {
            Some(v) => Ok(Some(codec::from_json(&v)?)),
            None => Ok(None),
        }
    }

    fn has_user(&self, local: &str) -> Result<bool> {
        self.users.contains_key(local).map_err(eng)
    }

    fn put_user(&self, local: &str, rec: &UserRecord) -> Result<Ticket> {
        let v = codec::json(rec);
        self.write(|b| b.insert(&self.users, local, v))
    }

    fn put_users(&self, recs: &[(String, UserRecord)]) -> Result<Ticket> {
        self.write(|b| {
            for (l, r) in recs {
                b.insert(&self.users, l.as_str(), codec::json(r));
            }
        })
    }

    fn delete_user(&self, local: &str) -> Result<Ticket> {
        self.write(|b| b.remove(&self.users, local))
    }

    fn list_users(&self) -> Result<Vec<String>> {
        self.users
            .iter()
            .map(|g| {
                let k = g.key().map_err(eng)?;
                String::from_utf8(k.to_vec()).map_err(|_| StoreError::Corrupt("user key".into()))
            })
            .collect()
    }
}

impl OfflineStore for FjallStore {
    fn push(&self, items: &[(&str, u64, &StoredMessage)]) -> Result<Ticket> {
        // Each account's mark goes in the same batch as its messages. The
        // caller holds the account's delivery lock, so one account's
        // batches commit in its sequence order and its mark only rises.
        let mut marks: Vec<(&str, u64)> = Vec::new();
        for (local, seq, _) in items {
            match marks.iter_mut().find(|(l, _)| l == local) {
                Some(m) => m.1 = m.1.max(*seq),
                None => marks.push((local, *seq)),
            }
        }
        let sealed = self.seal_all(items.iter().map(|(_, _, m)| *m))?;
        let r = self.write(|b| {
            for ((local, seq, _), v) in items.iter().zip(&sealed) {
                b.insert(&self.offline, offline_key(local, *seq), v.as_slice());
            }
            for (local, seq) in marks {
                b.insert(&self.meta, seq_mark_key(local), seq.to_be_bytes());
            }
        });
        if r.is_err() {
            self.erase_all(&sealed);
        }
        r
    }

    fn remove(&self, local: &str, seqs: &[u64]) -> Result<(Ticket, Vec<QueuedMeta>)> {
        let mut keys = Vec::with_capacity(seqs.len());
        let mut gone = Vec::with_capacity(seqs.len());
        let mut values = Vec::with_capacity(seqs.len());
        // A number named twice is one message: reporting it twice would
        // make the caller's queue usage count it out twice.
        let mut seqs = seqs.to_vec();
        seqs.sort_unstable();
        seqs.dedup();
        for s in &seqs {
            let k = offline_key(local, *s);
            if let Some(v) = self.offline.get(&k).map_err(eng)? {
                // The queue usage counted the plaintext stanza when it was
                // pushed; a record whose key is already gone was never
                // counted (it is dropped at open).
                if let Ok(Opened::Plain(p)) = self.keys.open_value(&v) {
                    gone.push(match decode_message(&p) {
                        Ok(m) => QueuedMeta::of(&m),
                        Err(_) => QueuedMeta { sender: String::new(), bytes: p.len() },
                    });
                }
                keys.push(k);
                values.push(v);
            }
        }
        if keys.is_empty() {
            return Ok((self.sync.issued.load(Ordering::Acquire), gone));
        }
        let t = self.write(|b| {
            for k in keys {
                b.remove(&self.offline, k);
            }
        })?;
        self.erase_all(&values);
        Ok((t, gone))
    }

    fn list(
        &self,
        local: &str,
        after: u64,
        upto: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, StoredMessage)>> {
        if after >= upto {
            return Ok(Vec::new());
        }
        let from = offline_key(local, after.saturating_add(1));
        let to = offline_key(local, upto);
        let mut out = Vec::new();
        let mut bytes = 0;
        for g in self.offline.range(from..=to) {
            let (k, v) = g.into_inner().map_err(eng)?;
            let Opened::Plain(v) = self.keys.open_value(&v)? else { continue };
            let m = decode_message(&v)?;
            bytes += m.xml.len();
            out.push((codec::seq_of(&k)?, m));
            if out.len() >= limit || bytes >= max_bytes {
                break;
            }
        }
        Ok(out)
    }

    fn count(&self, local: &str) -> Result<usize> {
        let mut n = 0;
        for g in self.offline.prefix(owner_prefix(local)) {
            g.key().map_err(eng)?;
            n += 1;
        }
        Ok(n)
    }

    fn usage(&self, local: &str) -> Result<QueueUsage> {
        let mut u = QueueUsage::default();
        for g in self.offline.prefix(owner_prefix(local)) {
            let v = g.value().map_err(eng)?;
            let Opened::Plain(v) = self.keys.open_value(&v)? else { continue };
            let m = QueuedMeta::of(&decode_message(&v)?);
            u.add(&m.sender, m.bytes);
        }
        Ok(u)
    }

    fn clear(&self, local: &str) -> Result<Ticket> {
        let mut keys = Vec::new();
        let mut values = Vec::new();
        for g in self.offline.prefix(owner_prefix(local)) {
            let (k, v) = g.into_inner().map_err(eng)?;
            keys.push(k);
            values.push(v);
        }
        let t = self.write(|b| {
            for k in keys {
                b.remove(&self.offline, k);
            }
        })?;
        self.erase_all(&values);
        Ok(t)
    }

    fn expire(&self, cutoff_ms: u64) -> Result<usize> {
        let mut doomed = Vec::new();
        for g in self.offline.iter() {
            let (k, v) = g.into_inner().map_err(eng)?;
            let old = match self.keys.open_value(&v)? {
                Opened::Plain(p) => decode_message(&p).map(|m| m.ts_ms < cutoff_ms).unwrap_or(true),
                Opened::Erased => true,
            };
            if old {
                doomed.push((k, v));
            }
        }
        let n = doomed.len();
        for chunk in doomed.chunks(1000) {
            self.write(|b| {
                for (k, _) in chunk {
                    b.remove(&self.offline, k.clone());
                }
            })?;
            for (_, v) in chunk {
                let _ = self.keys.erase(v);
            }
        }
        Ok(n)
    }

    fn last_seq(&self, local: &str) -> Result<u64> {
        let mark = match self.meta.get(seq_mark_key(local)).map_err(eng)? {
            Some(v) => codec::seq_of(&v)?,
            None => 0,
        };
        // The queue's last key as well, for data written before marks
        // existed.
        let last = match self.offline.prefix(owner_prefix(local)).next_back() {
            Some(g) => codec::seq_of(&g.key().map_err(eng)?)?,
            None => 0,
        };
        Ok(mark.max(last).max(self.legacy_seq))
    }
}

impl RosterStore for FjallStore {
    fn roster(&self, owner: &str) -> Result<Vec<RosterItem>> {
        self.roster.prefix(owner_prefix(owner)).map(|g| codec::from_json(&g.value().map_err(eng)?)).collect()
    }

    fn roster_item(&self, owner: &str, contact: &str) -> Result<Option<RosterItem>> {
        match self.roster.get(owner_key(owner, contact)).map_err(eng)? {
            Some(v) => Ok(Some(codec::from_json(&v)?)),
            None => Ok(None),
        }
    }

    fn put_roster_item(&self, owner: &str, item: &RosterItem) -> Result<Ticket> {
        let v = codec::json(item);
        self.write(|b| b.insert(&self.roster, owner_key(owner, &item.jid), v))
    }

    fn remove_roster_item(&self, owner: &str, contact: &str) -> Result<Ticket> {
        self.write(|b| b.remove(&self.roster, owner_key(owner, contact)))
    }

    fn clear_roster(&self, owner: &str) -> Result<Ticket> {
        let keys = Self::keys_with_prefix(&self.roster, &owner_prefix(owner))?;
        self.write(|b| {
            for k in keys {
                b.remove(&self.roster, k);
            }
        })
    }
}

impl GroupStore for FjallStore {
    fn get_group(&self, id: &str) -> Result<Option<Group>> {
        match self.groups.get(id).map_err(eng)? {
            Some(v) => Ok(Some(codec::from_json(&v)?)),
            None => Ok(None),
        }
    }

    fn put_group(&self, group: &Group, previous: Option<&Group>) -> Result<Ticket> {
        let v = codec::json(group);
        self.write(|b| {
            b.insert(&self.groups, group.id.as_str(), v);
            if let Some(p) = previous {
                for m in &p.members {
                    if group.member(&m.local).is_none() {
                        b.remove(&self.group_index, owner_key(&m.local, &group.id));
                    }
                }
            }
            for m in &group.members {
                b.insert(&self.group_index, owner_key(&m.local, &group.id), b"");
            }
        })
    }

    fn delete_group(&self, group: &Group) -> Result<Ticket> {
        self.write(|b| {
            b.remove(&self.groups, group.id.as_str());
            for m in &group.members {
                b.remove(&self.group_index, owner_key(&m.local, &group.id));
            }
        })
    }

    fn groups_of(&self, local: &str) -> Result<Vec<String>> {
        let p = owner_prefix(local);
        self.group_index
            .prefix(&p)
            .map(|g| {
                let k = g.key().map_err(eng)?;
                String::from_utf8(k[p.len()..].to_vec()).map_err(|_| StoreError::Corrupt("group index".into()))
            })
            .collect()
    }
}

impl SettingsStore for FjallStore {
    fn get_setting(&self, owner: &str, name: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.settings.get(owner_key(owner, name)).map_err(eng)?.map(|v| v.to_vec()))
    }

    fn put_setting(&self, owner: &str, name: &str, value: &[u8]) -> Result<Ticket> {
        self.write(|b| b.insert(&self.settings, owner_key(owner, name), value))
    }

    fn clear_settings(&self, owner: &str) -> Result<Ticket> {
        let keys = Self::keys_with_prefix(&self.settings, &owner_prefix(owner))?;
        self.write(|b| {
            for k in keys {
                b.remove(&self.settings, k);
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::Stores;

    #[tokio::test]
    async fn queue_survives_reopen_in_order() {
        let dir = std::env::temp_dir().join(format!("chatd-fjall-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        {
            let s = Stores::open_fjall(&dir).unwrap();
            let m = |i: u64| StoredMessage { ts_ms: i, xml: format!("<message id='{i}'/>") };
            let (a, b, c) = (m(1), m(2), m(3));
            let t = s.offline.push(&[("100", 1, &a), ("100", 2, &b), ("200", 3, &c)]).unwrap();
            let mut rx = s.durability.committed();
            crate::storage::wait_durable(&mut rx, t).await.unwrap();
            assert_eq!(s.offline.remove("100", &[1, 99]).unwrap().1.len(), 1);
            assert!(matches!(Stores::open_fjall(&dir), Err(StoreError::Locked)));
            s.durability.shutdown();
        }
        let s = Stores::open_fjall(&dir).unwrap();
        let q = s.offline.list("100", 0, u64::MAX, 10, usize::MAX).unwrap();
        assert_eq!(q.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![2]);
        assert_eq!(s.offline.count("200").unwrap(), 1);
        assert_eq!(s.offline.last_seq("100").unwrap(), 2);
        assert_eq!(s.offline.last_seq("200").unwrap(), 3);
        assert_eq!(s.offline.expire(3).unwrap(), 1);
        assert_eq!(s.offline.count("100").unwrap(), 0);
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
