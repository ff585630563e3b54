//! The media service's state: tier directories, the index, the slot key;
//! committing uploads, releasing references, expiry.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;

use super::index::{BlobRecord, FjallIndex, MediaIndex, Op, RefRecord};
use super::slot::Slot;
use super::{MediaConfig, Tier};
use crate::config::Config;
use crate::storage::StoreError;

const STRIPES: usize = 64;

fn stripe_of(sha256: &str) -> usize {
    sha256.get(0..2).and_then(|h| usize::from_str_radix(h, 16).ok()).unwrap_or(0) % STRIPES
}

/// Why an upload could not be committed.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("this slot has already been used")]
    AlreadyUsed,
    #[error("the account's media quota is exhausted")]
    Quota,
    #[error("temporary space for uploads is exhausted")]
    TempFull,
    #[error("this slot is being uploaded")]
    Busy,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// A committed upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    pub tier: Tier,
    /// The content was already stored; only a reference was added.
    pub deduplicated: bool,
}

/// The media service.
pub struct Media {
    pub cfg: MediaConfig,
    fast: PathBuf,
    bulk: PathBuf,
    pub index: Arc<dyn MediaIndex>,
    /// Serialises creating and deleting the blob files of one stripe of
    /// hashes (and their records).
    stripes: Vec<Mutex<()>>,
    /// Serialises read-modify-write of the index; held only for index
    /// reads and in-memory batch commits, never across an fsync.
    lock: Mutex<()>,
    /// Batches applied to the index, and how many of them are durable.
    applied: AtomicU64,
    synced: Mutex<u64>,
    /// Slot signing key.
    pub key: Vec<u8>,
    /// Uploads in flight (see [`Media::reserve`]).
    inflight: Mutex<InFlight>,
}

/// Bytes of uploads not yet committed: per account (they count against
/// its quota), in total (bounded by `media.max_temp_bytes`), and the slot
/// ids being uploaded (one upload per slot at a time).
#[derive(Default)]
struct InFlight {
    by_account: HashMap<String, u64>,
    slots: std::collections::HashSet<String>,
    total: u64,
}

/// An upload's claim on quota and temporary space; released when dropped
/// (after the commit, or when the upload fails or is cut off).
pub struct Reservation {
    media: Arc<Media>,
    account: String,
    id: String,
    size: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Ok(mut f) = self.media.inflight.lock() {
            f.total = f.total.saturating_sub(self.size);
            f.slots.remove(&self.id);
            if let Some(a) = f.by_account.get_mut(&self.account) {
                *a = a.saturating_sub(self.size);
                if *a == 0 {
                    f.by_account.remove(&self.account);
                }
            }
        }
    }
}

impl Media {
    /// Opens the service for `cfg`: the index in `DATA_DIR/media/index`,
    /// the tier directories (created if missing, stale temporary files
    /// removed) and the slot key.
    ///
    /// # Errors
    /// Unusable directories, a locked index, an unreadable key.
    pub fn open(cfg: &Config) -> anyhow::Result<Arc<Media>> {
        let m = &cfg.media;
        let dir = cfg.data_dir.join("media").join("index");
        let index = FjallIndex::open(&dir).with_context(|| format!("opening media index in {}", dir.display()))?;
        let key = super::load_secret(m, &cfg.data_dir)?;
        let media = Media::new(m.clone(), m.fast_dir(&cfg.data_dir), m.bulk_dir(&cfg.data_dir), Arc::new(index), key)?;
        tracing::info!(fast = %media.fast.display(), bulk = %media.bulk.display(), "media tiers");
        Ok(Arc::new(media))
    }

    /// Builds the service over an index (tests use a memory index).
    ///
    /// # Errors
    /// The directories cannot be created.
    pub fn new(
        cfg: MediaConfig,
        fast: PathBuf,
        bulk: PathBuf,
        index: Arc<dyn MediaIndex>,
        key: Vec<u8>,
    ) -> anyhow::Result<Media> {
        for d in [&fast, &bulk] {
            let tmp = d.join("tmp");
            std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
            // Partial uploads of a previous run.
            if let Ok(rd) = std::fs::read_dir(&tmp) {
                for e in rd.flatten() {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(Media {
            cfg,
            fast,
            bulk,
            index,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            lock: Mutex::new(()),
            applied: AtomicU64::new(0),
            synced: Mutex::new(0),
            key,
            inflight: Mutex::default(),
        })
    }

    pub fn dir(&self, tier: Tier) -> &Path {
        match tier {
            Tier::Fast => &self.fast,
            Tier::Bulk => &self.bulk,
        }
    }

    /// Where a blob lives: `TIER/ab/cd/abcd…`. `sha256` is lower-case
    /// hex produced by the server, never a client string.
    pub fn blob_path(&self, tier: Tier, sha256: &str) -> PathBuf {
        let a = sha256.get(0..2).unwrap_or("00");
        let b = sha256.get(2..4).unwrap_or("00");
        self.dir(tier).join(a).join(b).join(sha256)
    }

    /// A fresh temporary file name in the tier (same file system as the
    /// blobs, so the final rename is atomic).
    pub fn temp_path(&self, tier: Tier) -> PathBuf {
        self.dir(tier).join("tmp").join(format!("{}.part", super::slot::new_id()))
    }

    fn guard(&self) -> Result<std::sync::MutexGuard<'_, ()>, StoreError> {
        self.lock.lock().map_err(|_| StoreError::Closed)
    }

    /// Group commit: makes every change applied so far durable; one
    /// fsync covers the changes of all callers waiting meanwhile.
    fn sync_index(&self) -> Result<(), StoreError> {
        let mine = self.applied.load(Ordering::Acquire);
        let mut synced = self.synced.lock().map_err(|_| StoreError::Closed)?;
        if *synced >= mine {
            return Ok(());
        }
        let upto = self.applied.load(Ordering::Acquire);
        self.index.sync()?;
        *synced = upto;
        Ok(())
    }

    fn stripe(&self, i: usize) -> Result<std::sync::MutexGuard<'_, ()>, StoreError> {
        self.stripes[i % STRIPES].lock().map_err(|_| StoreError::Closed)
    }

    /// Whether `size` more bytes would take `account` over its quota,
    /// counting its uploads in flight.
    ///
    /// # Errors
    /// Index read failure.
    pub fn would_exceed_quota(&self, account: &str, size: u64) -> Result<bool, StoreError> {
        let pending =
            self.inflight.lock().map_err(|_| StoreError::Closed)?.by_account.get(account).copied().unwrap_or(0);
        Ok(self.index.usage(account)?.saturating_add(pending).saturating_add(size) > self.cfg.quota_bytes)
    }

    /// Whether the slot was ever used: uploaded (even if deleted since) or
    /// recorded as used until its URL expires.
    ///
    /// # Errors
    /// Index read failure.
    pub fn slot_taken(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.index.get_ref(id)?.is_some() || self.index.is_used(id)?)
    }

    /// Claims quota and temporary space for an upload about to be read:
    /// refused when the account's stored plus in-flight bytes would pass
    /// its quota, when all uploads in flight would pass
    /// `media.max_temp_bytes`, or when the same slot is already being
    /// uploaded.
    ///
    /// # Errors
    /// [`CommitError::Quota`], [`CommitError::TempFull`],
    /// [`CommitError::Busy`], or an index failure.
    pub fn reserve(self: &Arc<Self>, slot: &Slot) -> Result<Reservation, CommitError> {
        let usage = self.index.usage(&slot.account)?;
        let mut f = self.inflight.lock().map_err(|_| StoreError::Closed)?;
        if f.slots.contains(&slot.id) {
            return Err(CommitError::Busy);
        }
        let mine = f.by_account.get(&slot.account).copied().unwrap_or(0);
        if usage.saturating_add(mine).saturating_add(slot.size) > self.cfg.quota_bytes {
            return Err(CommitError::Quota);
        }
        if f.total.saturating_add(slot.size) > self.cfg.max_temp_bytes {
            return Err(CommitError::TempFull);
        }
        f.total += slot.size;
        *f.by_account.entry(slot.account.clone()).or_default() += slot.size;
        f.slots.insert(slot.id.clone());
        Ok(Reservation { media: self.clone(), account: slot.account.clone(), id: slot.id.clone(), size: slot.size })
    }

    /// The reference `id` and the file holding its content.
    ///
    /// # Errors
    /// Index read failure.
    pub fn locate(&self, id: &str) -> Result<Option<(RefRecord, PathBuf)>, StoreError> {
        let Some(r) = self.index.get_ref(id)? else {
            return Ok(None);
        };
        let Some(b) = self.index.get_blob(&r.sha256)? else {
            return Ok(None);
        };
        let p = self.blob_path(b.tier, &r.sha256);
        Ok(Some((r, p)))
    }

    /// Records a finished upload whose content is in `temp` (fsynced):
    /// moves it into place unless identical content is already stored,
    /// and adds the slot's reference. The caller removes `temp` if it is
    /// still there afterwards. Blocking.
    ///
    /// # Errors
    /// The slot was used already, the quota is exhausted, IO or index
    /// failure.
    pub fn commit(&self, slot: &Slot, tier: Tier, sha256: &str, temp: &Path) -> Result<Committed, CommitError> {
        let _s = self.stripe(stripe_of(sha256))?;
        let quick = {
            let _g = self.guard()?;
            if self.slot_taken(&slot.id)? {
                Some(CommitError::AlreadyUsed)
            } else if self.index.usage(&slot.account)?.saturating_add(slot.size) > self.cfg.quota_bytes {
                Some(CommitError::Quota)
            } else {
                None
            }
        };
        if let Some(e) = quick {
            return Err(e);
        }
        // Only this stripe creates or deletes this hash's file and record,
        // so what is read here holds until the stripe is released.
        let record = self.index.get_blob(sha256)?;
        let existing = record.clone().filter(|b| self.blob_path(b.tier, sha256).is_file());
        let mut created = None;
        if existing.is_none() {
            let dest = self.blob_path(tier, sha256);
            let parent = dest.parent().unwrap_or(self.dir(tier)).to_path_buf();
            create_dirs_durably(self.dir(tier), &parent)?;
            std::fs::rename(temp, &dest)?;
            // The rename is durable before any record names the file.
            sync_dir(&parent);
            created = Some(dest);
        }
        let now = super::now_ms();
        let outcome = {
            let _g = self.guard()?;
            let usage = self.index.usage(&slot.account)?;
            if self.slot_taken(&slot.id)? {
                Err(CommitError::AlreadyUsed)
            } else if usage.saturating_add(slot.size) > self.cfg.quota_bytes {
                Err(CommitError::Quota)
            } else {
                let (blob, deduplicated) = match existing {
                    Some(mut b) => {
                        b.refs += 1;
                        (b, true)
                    }
                    // A record whose file had gone keeps its count.
                    None => {
                        let refs = record.map_or(1, |b| b.refs + 1);
                        (BlobRecord { tier, size: slot.size, refs, created_ms: now }, false)
                    }
                };
                let tier = blob.tier;
                let r = RefRecord {
                    sha256: sha256.to_string(),
                    account: slot.account.clone(),
                    filename: slot.filename.clone(),
                    content_type: slot.content_type.clone(),
                    size: slot.size,
                    uploaded_ms: now,
                };
                self.index
                    .apply(&[
                        Op::MarkUsed(slot.id.clone(), slot.expires),
                        Op::PutRef(slot.id.clone(), r),
                        Op::PutBlob(sha256.to_string(), blob),
                        Op::SetUsage(slot.account.clone(), usage.saturating_add(slot.size)),
                    ])
                    .map(|_| {
                        self.applied.fetch_add(1, Ordering::AcqRel);
                        Committed { tier, deduplicated }
                    })
                    .map_err(CommitError::from)
            }
        };
        match outcome {
            Ok(c) => {
                drop(_s);
                self.sync_index()?;
                Ok(c)
            }
            Err(e) => {
                if let Some(p) = created {
                    let _ = std::fs::remove_file(p);
                }
                Err(e)
            }
        }
    }

    /// Drops references; blobs left without any are deleted. Returns how
    /// many references existed. Blocking.
    ///
    /// # Errors
    /// Index failure (nothing is deleted then).
    pub fn release(&self, ids: &[String]) -> Result<usize, StoreError> {
        // The stripes of every blob involved, in order (no deadlock).
        let mut stripes: Vec<usize> = {
            let _g = self.guard()?;
            let mut v = Vec::new();
            for id in ids {
                if let Some(r) = self.index.get_ref(id)? {
                    v.push(stripe_of(&r.sha256));
                }
            }
            v
        };
        stripes.sort_unstable();
        stripes.dedup();
        let mut held = Vec::with_capacity(stripes.len());
        for i in stripes {
            held.push(self.stripe(i)?);
        }
        let mut doomed = Vec::new();
        let n = {
            let _g = self.guard()?;
            let mut ops = Vec::new();
            let mut blobs: HashMap<String, Option<BlobRecord>> = HashMap::new();
            let mut usage: HashMap<String, u64> = HashMap::new();
            let mut n = 0;
            for id in ids {
                let Some(r) = self.index.get_ref(id)? else {
                    continue;
                };
                n += 1;
                ops.push(Op::DelRef(id.clone(), r.uploaded_ms));
                if !blobs.contains_key(&r.sha256) {
                    let b = self.index.get_blob(&r.sha256)?;
                    blobs.insert(r.sha256.clone(), b);
                }
                if let Some(Some(b)) = blobs.get_mut(&r.sha256) {
                    b.refs = b.refs.saturating_sub(1);
                }
                if !usage.contains_key(&r.account) {
                    let u = self.index.usage(&r.account)?;
                    usage.insert(r.account.clone(), u);
                }
                if let Some(u) = usage.get_mut(&r.account) {
                    *u = u.saturating_sub(r.size);
                }
            }
            for (h, b) in blobs {
                match b {
                    Some(b) if b.refs == 0 => {
                        doomed.push(self.blob_path(b.tier, &h));
                        ops.push(Op::DelBlob(h));
                    }
                    Some(b) => ops.push(Op::PutBlob(h, b)),
                    None => {}
                }
            }
            ops.extend(usage.into_iter().map(|(a, u)| Op::SetUsage(a, u)));
            if n > 0 {
                self.index.apply(&ops)?;
                self.applied.fetch_add(1, Ordering::AcqRel);
            }
            n
        };
        if n == 0 {
            return Ok(0);
        }
        // Records first, files second (the stripes are still held): a
        // crash in between leaves an unindexed file, never a record
        // without its file.
        self.sync_index()?;
        for p in doomed {
            if let Err(e) = std::fs::remove_file(&p)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(path = %p.display(), error = %e, "could not delete media file");
            }
        }
        drop(held);
        Ok(n)
    }

    /// Releases every reference uploaded before `cutoff_ms`; returns how
    /// many. Blocking.
    ///
    /// # Errors
    /// Index failure.
    pub fn expire(&self, cutoff_ms: u64) -> Result<usize, StoreError> {
        // Used slots whose URLs have expired are refused by their
        // signature; their records can go.
        let now_secs = super::now_ms() / 1000;
        while self.index.forget_used(now_secs, 1000)? > 0 {}
        let mut total = 0;
        loop {
            let batch: Vec<String> =
                self.index.uploaded_before(cutoff_ms, 500)?.into_iter().map(|(id, _)| id).collect();
            if batch.is_empty() {
                return Ok(total);
            }
            total += self.release(&batch)?;
        }
    }
}

/// Creates `dir` and any missing parents below `root` (which exists),
/// fsyncing each new directory's parent so the new entry survives a
/// crash, as the rename of a blob into it does. Returns the directories
/// it synced.
fn create_dirs_durably(root: &Path, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut missing = Vec::new();
    let mut d = dir;
    while d != root && !d.is_dir() {
        missing.push(d.to_path_buf());
        match d.parent() {
            Some(p) => d = p,
            None => break,
        }
    }
    let mut synced = Vec::new();
    for m in missing.iter().rev() {
        match std::fs::create_dir(m) {
            Ok(()) => {}
            // Another upload created it meanwhile; it syncs the parent.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
        if let Some(p) = m.parent() {
            std::fs::File::open(p)?.sync_all()?;
            synced.push(p.to_path_buf());
        }
    }
    Ok(synced)
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::super::index::MemoryIndex;
    use super::*;

    fn media(quota: u64) -> (Media, PathBuf) {
        let root = std::env::temp_dir().join(format!("chatd-media-store-{}-{quota}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let cfg = MediaConfig { quota_bytes: quota, ..Default::default() };
        let m =
            Media::new(cfg, root.join("fast"), root.join("bulk"), Arc::new(MemoryIndex::default()), b"k".repeat(16))
                .unwrap();
        (m, root)
    }

    fn slot(id: &str, size: u64) -> Slot {
        Slot {
            id: id.into(),
            account: "1555".into(),
            filename: "a.png".into(),
            size,
            content_type: "image/png".into(),
            expires: 0,
        }
    }

    fn temp(m: &Media, tier: Tier, data: &[u8]) -> PathBuf {
        let p = m.temp_path(tier);
        std::fs::write(&p, data).unwrap();
        p
    }

    #[test]
    fn new_blob_directories_are_synced_into_their_parents() {
        let root = std::env::temp_dir().join(format!("chatd-media-dirs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let leaf = root.join("ab").join("cd");
        let synced = create_dirs_durably(&root, &leaf).unwrap();
        assert!(leaf.is_dir());
        assert_eq!(synced, vec![root.clone(), root.join("ab")], "each new entry's directory is fsynced");
        assert!(create_dirs_durably(&root, &leaf).unwrap().is_empty(), "nothing new, nothing to sync");
        let synced = create_dirs_durably(&root, &root.join("ab").join("ef")).unwrap();
        assert_eq!(synced, vec![root.join("ab")]);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn dedupe_refcount_and_release() {
        let (m, root) = media(1000);
        let h = "ab".repeat(32);
        let t1 = temp(&m, Tier::Fast, b"abc");
        let c = m.commit(&slot("one", 3), Tier::Fast, &h, &t1).unwrap();
        assert_eq!(c, Committed { tier: Tier::Fast, deduplicated: false });
        let path = m.blob_path(Tier::Fast, &h);
        assert!(path.is_file());
        assert!(path.starts_with(root.join("fast").join("ab").join("ab")));
        let t2 = temp(&m, Tier::Fast, b"abc");
        assert!(m.commit(&slot("two", 3), Tier::Fast, &h, &t2).unwrap().deduplicated);
        assert!(t2.exists(), "the caller removes an unused temporary file");
        assert!(matches!(m.commit(&slot("two", 3), Tier::Fast, &h, &t2), Err(CommitError::AlreadyUsed)));
        assert_eq!(m.index.get_blob(&h).unwrap().unwrap().refs, 2);
        assert_eq!(m.index.usage("1555").unwrap(), 6);
        assert_eq!(m.release(&["one".into()]).unwrap(), 1);
        assert!(path.is_file());
        assert_eq!(m.release(&["two".into(), "nope".into()]).unwrap(), 1);
        assert!(!path.exists());
        assert_eq!(m.index.get_blob(&h).unwrap(), None);
        assert_eq!(m.index.usage("1555").unwrap(), 0);
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn quota_and_expiry() {
        let (m, root) = media(5);
        let t = temp(&m, Tier::Bulk, b"abc");
        m.commit(&slot("one", 3), Tier::Bulk, &"cd".repeat(32), &t).unwrap();
        assert!(m.would_exceed_quota("1555", 3).unwrap());
        let t = temp(&m, Tier::Bulk, b"xyz");
        assert!(matches!(m.commit(&slot("two", 3), Tier::Bulk, &"ef".repeat(32), &t), Err(CommitError::Quota)));
        assert_eq!(m.expire(1).unwrap(), 0);
        assert_eq!(m.expire(u64::MAX).unwrap(), 1);
        assert!(!m.blob_path(Tier::Bulk, &"cd".repeat(32)).exists());
        let _ = std::fs::remove_dir_all(root);
    }
}
