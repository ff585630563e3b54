//! The media index: references (uploaded slots), blobs with their
//! reference counts, bytes held per account, and the slots ever used
//! (until their PUT URL expires: a slot works once for life, even after
//! its upload is deleted).
//!
//! Feature code sees the [`MediaIndex`] trait; [`FjallIndex`] keeps it
//! durably in its own fjall database, [`MemoryIndex`] in maps for tests.
//! Read-modify-write sequences are serialised by the caller
//! ([`super::Media`]); [`MediaIndex::apply`] writes a group of changes
//! atomically, [`MediaIndex::sync`] makes them durable.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use serde::{Deserialize, Serialize};

use super::Tier;
use crate::storage::{Result, StoreError};

/// One uploaded slot: what its GET URL serves.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RefRecord {
    /// Hex SHA-256 of the content.
    pub sha256: String,
    /// Account charged for it.
    pub account: String,
    pub filename: String,
    pub content_type: String,
    pub size: u64,
    pub uploaded_ms: u64,
}

/// One stored file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BlobRecord {
    pub tier: Tier,
    pub size: u64,
    /// References pointing at it; the blob is deleted when none is left.
    pub refs: u64,
    pub created_ms: u64,
}

/// A change applied by [`MediaIndex::apply`].
#[derive(Clone, Debug)]
pub enum Op {
    PutRef(String, RefRecord),
    /// Slot id and its upload time (for the expiry order).
    DelRef(String, u64),
    PutBlob(String, BlobRecord),
    DelBlob(String),
    /// Bytes held by an account (0 deletes the entry).
    SetUsage(String, u64),
    /// A slot id was used; remember it until its PUT URL expires (unix
    /// seconds), so the URL never accepts bytes again.
    MarkUsed(String, u64),
}

pub trait MediaIndex: Send + Sync {
    fn get_ref(&self, id: &str) -> Result<Option<RefRecord>>;
    fn get_blob(&self, sha256: &str) -> Result<Option<BlobRecord>>;
    fn usage(&self, account: &str) -> Result<u64>;
    /// Applies `ops` atomically; visible to reads when it returns.
    fn apply(&self, ops: &[Op]) -> Result<()>;
    /// Makes every applied change durable.
    fn sync(&self) -> Result<()>;
    /// Ids and records of references uploaded before `cutoff_ms`, oldest
    /// first, at most `limit`.
    fn uploaded_before(&self, cutoff_ms: u64, limit: usize) -> Result<Vec<(String, RefRecord)>>;
    /// Whether the slot id was ever used (and its URL has not expired).
    fn is_used(&self, id: &str) -> Result<bool>;
    /// Forgets used slots whose URLs expired before `cutoff_secs` (they
    /// are refused by their signature from then on), at most `limit`;
    /// returns how many.
    fn forget_used(&self, cutoff_secs: u64, limit: usize) -> Result<usize>;
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    crate::storage::codec::json(v)
}

fn from_json<T: serde::de::DeserializeOwned>(v: &[u8]) -> Result<T> {
    crate::storage::codec::from_json(v)
}

/// `uploaded_ms_be id`: references in upload order.
fn time_key(ms: u64, id: &str) -> Vec<u8> {
    let mut k = ms.to_be_bytes().to_vec();
    k.extend_from_slice(id.as_bytes());
    k
}

fn eng(e: fjall::Error) -> StoreError {
    match e {
        fjall::Error::Locked => StoreError::Locked,
        e => StoreError::Engine(e.to_string()),
    }
}

/// The durable index.
pub struct FjallIndex {
    db: Database,
    refs: Keyspace,
    blobs: Keyspace,
    usage: Keyspace,
    by_time: Keyspace,
    used: Keyspace,
    used_by_expiry: Keyspace,
}

impl FjallIndex {
    /// Opens (or creates) the index database in `dir`.
    ///
    /// # Errors
    /// [`StoreError::Locked`] if another process has it open.
    pub fn open(dir: &Path) -> Result<FjallIndex> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Engine(e.to_string()))?;
        let db = Database::builder(dir)
            .cache_size(8 << 20)
            .worker_threads(1)
            .max_journaling_size(64 << 20)
            .manual_journal_persist(true)
            .open()
            .map_err(eng)?;
        let opts = || KeyspaceCreateOptions::default().max_memtable_size(8 << 20).manual_journal_persist(true);
        Ok(FjallIndex {
            refs: db.keyspace("refs", opts).map_err(eng)?,
            blobs: db.keyspace("blobs", opts).map_err(eng)?,
            usage: db.keyspace("usage", opts).map_err(eng)?,
            by_time: db.keyspace("by_time", opts).map_err(eng)?,
            used: db.keyspace("used", opts).map_err(eng)?,
            used_by_expiry: db.keyspace("used_by_expiry", opts).map_err(eng)?,
            db,
        })
    }
}

impl MediaIndex for FjallIndex {
    fn get_ref(&self, id: &str) -> Result<Option<RefRecord>> {
        self.refs.get(id).map_err(eng)?.map(|v| from_json(&v)).transpose()
    }

    fn get_blob(&self, sha256: &str) -> Result<Option<BlobRecord>> {
        self.blobs.get(sha256).map_err(eng)?.map(|v| from_json(&v)).transpose()
    }

    fn usage(&self, account: &str) -> Result<u64> {
        match self.usage.get(account).map_err(eng)? {
            None => Ok(0),
            Some(v) => {
                let b: [u8; 8] = v.as_ref().try_into().map_err(|_| StoreError::Corrupt("usage".into()))?;
                Ok(u64::from_be_bytes(b))
            }
        }
    }

    fn apply(&self, ops: &[Op]) -> Result<()> {
        let mut b = self.db.batch();
        for op in ops {
            match op {
                Op::PutRef(id, r) => {
                    b.insert(&self.refs, id.as_str(), json(r));
                    b.insert(&self.by_time, time_key(r.uploaded_ms, id), b"");
                }
                Op::DelRef(id, ms) => {
                    b.remove(&self.refs, id.as_str());
                    b.remove(&self.by_time, time_key(*ms, id));
                }
                Op::PutBlob(h, r) => b.insert(&self.blobs, h.as_str(), json(r)),
                Op::DelBlob(h) => b.remove(&self.blobs, h.as_str()),
                Op::SetUsage(a, 0) => b.remove(&self.usage, a.as_str()),
                Op::SetUsage(a, n) => b.insert(&self.usage, a.as_str(), n.to_be_bytes()),
                Op::MarkUsed(id, exp) => {
                    b.insert(&self.used, id.as_str(), exp.to_be_bytes());
                    b.insert(&self.used_by_expiry, time_key(*exp, id), b"");
                }
            }
        }
        b.commit().map_err(eng)
    }

    fn sync(&self) -> Result<()> {
        self.db.persist(PersistMode::SyncData).map_err(eng)
    }

    fn uploaded_before(&self, cutoff_ms: u64, limit: usize) -> Result<Vec<(String, RefRecord)>> {
        let mut out = Vec::new();
        for g in self.by_time.range(..cutoff_ms.to_be_bytes().to_vec()) {
            let k = g.key().map_err(eng)?;
            let id = k
                .get(8..)
                .and_then(|b| std::str::from_utf8(b).ok())
                .ok_or_else(|| StoreError::Corrupt("media time key".into()))?
                .to_string();
            if let Some(r) = self.get_ref(&id)? {
                out.push((id, r));
            }
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    fn is_used(&self, id: &str) -> Result<bool> {
        self.used.contains_key(id).map_err(eng)
    }

    fn forget_used(&self, cutoff_secs: u64, limit: usize) -> Result<usize> {
        let mut keys = Vec::new();
        for g in self.used_by_expiry.range(..cutoff_secs.to_be_bytes().to_vec()).take(limit) {
            keys.push(g.key().map_err(eng)?);
        }
        if keys.is_empty() {
            return Ok(0);
        }
        let mut b = self.db.batch();
        for k in &keys {
            if let Some(id) = k.get(8..) {
                b.remove(&self.used, id.to_vec());
            }
            b.remove(&self.used_by_expiry, k.clone());
        }
        b.commit().map_err(eng)?;
        Ok(keys.len())
    }
}

/// In-memory index for tests.
#[derive(Default)]
pub struct MemoryIndex {
    inner: Mutex<Maps>,
}

#[derive(Default)]
struct Maps {
    refs: HashMap<String, RefRecord>,
    blobs: HashMap<String, BlobRecord>,
    usage: HashMap<String, u64>,
    by_time: BTreeMap<(u64, String), ()>,
    used: HashMap<String, u64>,
    used_by_expiry: BTreeMap<(u64, String), ()>,
}

impl MemoryIndex {
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Maps>> {
        self.inner.lock().map_err(|_| StoreError::Closed)
    }
}

impl MediaIndex for MemoryIndex {
    fn get_ref(&self, id: &str) -> Result<Option<RefRecord>> {
        Ok(self.lock()?.refs.get(id).cloned())
    }

    fn get_blob(&self, sha256: &str) -> Result<Option<BlobRecord>> {
        Ok(self.lock()?.blobs.get(sha256).cloned())
    }

    fn usage(&self, account: &str) -> Result<u64> {
        Ok(self.lock()?.usage.get(account).copied().unwrap_or(0))
    }

    fn apply(&self, ops: &[Op]) -> Result<()> {
        let mut m = self.lock()?;
        for op in ops {
            match op.clone() {
                Op::PutRef(id, r) => {
                    m.by_time.insert((r.uploaded_ms, id.clone()), ());
                    m.refs.insert(id, r);
                }
                Op::DelRef(id, ms) => {
                    m.by_time.remove(&(ms, id.clone()));
                    m.refs.remove(&id);
                }
                Op::PutBlob(h, r) => {
                    m.blobs.insert(h, r);
                }
                Op::DelBlob(h) => {
                    m.blobs.remove(&h);
                }
                Op::SetUsage(a, 0) => {
                    m.usage.remove(&a);
                }
                Op::SetUsage(a, n) => {
                    m.usage.insert(a, n);
                }
                Op::MarkUsed(id, exp) => {
                    m.used_by_expiry.insert((exp, id.clone()), ());
                    m.used.insert(id, exp);
                }
            }
        }
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn uploaded_before(&self, cutoff_ms: u64, limit: usize) -> Result<Vec<(String, RefRecord)>> {
        let m = self.lock()?;
        Ok(m.by_time
            .keys()
            .take_while(|(ms, _)| *ms < cutoff_ms)
            .filter_map(|(_, id)| m.refs.get(id).map(|r| (id.clone(), r.clone())))
            .take(limit)
            .collect())
    }

    fn is_used(&self, id: &str) -> Result<bool> {
        Ok(self.lock()?.used.contains_key(id))
    }

    fn forget_used(&self, cutoff_secs: u64, limit: usize) -> Result<usize> {
        let mut m = self.lock()?;
        let doomed: Vec<(u64, String)> =
            m.used_by_expiry.keys().take_while(|(e, _)| *e < cutoff_secs).take(limit).cloned().collect();
        for k in &doomed {
            m.used_by_expiry.remove(k);
            m.used.remove(&k.1);
        }
        Ok(doomed.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exercise(ix: &dyn MediaIndex) {
        let r = |ms| RefRecord {
            sha256: "ab".into(),
            account: "1555".into(),
            filename: "a.png".into(),
            content_type: "image/png".into(),
            size: 3,
            uploaded_ms: ms,
        };
        let blob = BlobRecord { tier: Tier::Fast, size: 3, refs: 2, created_ms: 1 };
        ix.apply(&[
            Op::PutRef("x".into(), r(10)),
            Op::PutRef("y".into(), r(20)),
            Op::PutBlob("ab".into(), blob.clone()),
            Op::SetUsage("1555".into(), 6),
        ])
        .unwrap();
        assert_eq!(ix.get_ref("x").unwrap(), Some(r(10)));
        assert_eq!(ix.get_blob("ab").unwrap(), Some(blob));
        assert_eq!(ix.usage("1555").unwrap(), 6);
        let old: Vec<_> = ix.uploaded_before(15, 10).unwrap().into_iter().map(|(id, _)| id).collect();
        assert_eq!(old, vec!["x".to_string()]);
        ix.apply(&[Op::DelRef("x".into(), 10), Op::SetUsage("1555".into(), 0), Op::DelBlob("ab".into())]).unwrap();
        assert_eq!(ix.get_ref("x").unwrap(), None);
        assert_eq!(ix.usage("1555").unwrap(), 0);
        assert_eq!(ix.uploaded_before(u64::MAX, 10).unwrap().len(), 1);
        ix.apply(&[Op::MarkUsed("x".into(), 100), Op::MarkUsed("z".into(), 200)]).unwrap();
        assert!(ix.is_used("x").unwrap() && ix.is_used("z").unwrap() && !ix.is_used("y").unwrap());
        assert_eq!(ix.forget_used(150, 10).unwrap(), 1);
        assert!(!ix.is_used("x").unwrap() && ix.is_used("z").unwrap());
    }

    #[test]
    fn memory_index() {
        exercise(&MemoryIndex::default());
    }

    #[test]
    fn fjall_index_persists() {
        let dir = std::env::temp_dir().join(format!("chatd-media-index-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        {
            let ix = FjallIndex::open(&dir).unwrap();
            exercise(&ix);
        }
        let ix = FjallIndex::open(&dir).unwrap();
        assert!(ix.get_ref("y").unwrap().is_some());
        drop(ix);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
