//! Erasure of delivered messages: every stored message is encrypted with a
//! key of its own, and deleting the message overwrites that key.
//!
//! ## Why not rely on the LSM tree deleting the bytes
//! fjall writes every value to its journal and later to table files. A
//! delete only appends a tombstone; the value stays readable in the
//! journal until 64 MB more journal has been written (fjall rotates it at
//! that size, and offers no call to rotate it earlier), and in tables until
//! compaction reaches them. On a quiet server that is never.
//!
//! ## What is done instead
//! The offline keyspace holds `MAGIC | slot | check | ChaCha20-Poly1305(body)`.
//! The 256-bit key lives in slot `slot` of `DATA_DIR/message-keys`, a flat
//! file of 32-byte slots overwritten in place. Erasing a message writes
//! zeros over its slot: from then on the ciphertext left in the journal or
//! in tables is noise, and the key's bytes are gone from the data
//! directory at once (the next group commit makes the overwrite durable).
//! The cost is one 32-byte `pwrite` per stored and per deleted message and
//! one `fdatasync` per group commit, beside the journal's; nothing is ever rewritten in
//! bulk, however large the queues are.
//!
//! ## Crash rules
//! - A key is written before the record that uses it is committed, and the
//!   syncer publishes a ticket only after both this file and the journal
//!   are synced, so a record whose ticket is durable always has its key on
//!   disk. (A record the journal made durable before its key was never
//!   acked; it fails to decrypt and is dropped at the next open.)
//! - A slot is zeroed only after the record's tombstone is committed, and
//!   reused only after that. If a crash loses the tombstone, the record
//!   comes back with a zeroed or foreign key: it cannot be decrypted, which
//!   is what it is — a message already delivered — and it is dropped.
//! - On open, slots that no record references (a crash between writing a
//!   key and committing its record) are zeroed.
//!
//! `check` (a hash prefix of the key) tells whether a slot still holds this
//! record's key, so erasing a record twice (two devices acknowledging the
//! same message) can never wipe the key of the record that reused the slot.
//!
//! Each key encrypts exactly one value once, so a fixed nonce is safe.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

use super::{Result, StoreError};

/// First byte of an encrypted record. Records written before encryption
/// start with a big-endian millisecond timestamp, whose first byte is 0.
const MAGIC: u8 = 0xE1;
const SLOT: u64 = 32;
/// `MAGIC`, the slot (u64 BE) and the key's check value (8 bytes).
const HEADER: usize = 17;

fn io(e: std::io::Error) -> StoreError {
    StoreError::Engine(format!("message keys: {e}"))
}

struct Slots {
    /// Zeroed slots available for reuse.
    free: Vec<u64>,
    /// Slots in the file.
    len: u64,
}

/// The key file and its free list.
pub struct MessageKeys {
    file: File,
    slots: Mutex<Slots>,
    dirty: AtomicBool,
    rng: SystemRandom,
}

/// What opening a stored value gave.
pub enum Opened {
    /// The plaintext (or a record from before encryption, as it was).
    Plain(Vec<u8>),
    /// Its key was erased: the message was deleted.
    Erased,
}

impl MessageKeys {
    /// Opens (or creates) the key file. `used` are the slots referenced by
    /// stored records; every other slot is zeroed and made free.
    ///
    /// # Errors
    /// IO errors on the key file.
    pub fn open(path: &Path, used: impl IntoIterator<Item = u64>) -> Result<MessageKeys> {
        let file =
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len() / SLOT;
        let mut in_use = vec![false; usize::try_from(len).unwrap_or(usize::MAX)];
        for s in used {
            if let Some(u) = usize::try_from(s).ok().and_then(|i| in_use.get_mut(i)) {
                *u = true;
            }
        }
        let zero = [0u8; SLOT as usize];
        let mut buf = [0u8; SLOT as usize];
        let mut free = Vec::new();
        let mut zeroed = 0u64;
        for (i, used) in in_use.iter().enumerate() {
            if *used {
                continue;
            }
            let off = i as u64 * SLOT;
            file.read_exact_at(&mut buf, off).map_err(io)?;
            if buf != zero {
                file.write_all_at(&zero, off).map_err(io)?;
                zeroed += 1;
            }
            free.push(i as u64);
        }
        if zeroed > 0 {
            file.sync_data().map_err(io)?;
            tracing::info!(zeroed, "erased message keys left by an interrupted write");
        }
        // Lowest slots first, so the file stays dense.
        free.reverse();
        Ok(MessageKeys {
            file,
            slots: Mutex::new(Slots { free, len }),
            dirty: AtomicBool::new(false),
            rng: SystemRandom::new(),
        })
    }

    /// Encrypts `plain` under a fresh key in a fresh slot.
    ///
    /// # Errors
    /// IO errors writing the key.
    pub fn seal(&self, plain: &[u8]) -> Result<Vec<u8>> {
        let mut key = [0u8; SLOT as usize];
        self.rng.fill(&mut key).map_err(|_| StoreError::Engine("no randomness".into()))?;
        let slot = {
            let mut s = self.slots.lock().map_err(|_| StoreError::Closed)?;
            match s.free.pop() {
                Some(x) => x,
                None => {
                    s.len += 1;
                    s.len - 1
                }
            }
        };
        if let Err(e) = self.file.write_all_at(&key, slot * SLOT) {
            self.release(slot);
            return Err(io(e));
        }
        self.dirty.store(true, Ordering::Release);
        let mut out = Vec::with_capacity(HEADER + plain.len() + CHACHA20_POLY1305.tag_len());
        out.push(MAGIC);
        out.extend_from_slice(&slot.to_be_bytes());
        out.extend_from_slice(&check(&key));
        out.extend_from_slice(plain);
        let mut body = out.split_off(HEADER);
        let k =
            LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &key).map_err(|_| StoreError::Engine("key".into()))?);
        k.seal_in_place_append_tag(Nonce::assume_unique_for_key([0; 12]), Aad::from(&out[..]), &mut body)
            .map_err(|_| StoreError::Engine("seal".into()))?;
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Decrypts a stored value.
    ///
    /// # Errors
    /// IO errors reading the key.
    pub fn open_value(&self, v: &[u8]) -> Result<Opened> {
        let Some(slot) = slot_of(v) else {
            return Ok(Opened::Plain(v.to_vec()));
        };
        let mut key = [0u8; SLOT as usize];
        match self.file.read_exact_at(&mut key, slot * SLOT) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(Opened::Erased),
            Err(e) => return Err(io(e)),
        }
        if key == [0u8; SLOT as usize] {
            return Ok(Opened::Erased);
        }
        let Ok(k) = UnboundKey::new(&CHACHA20_POLY1305, &key).map(LessSafeKey::new) else {
            return Ok(Opened::Erased);
        };
        let mut body = v[HEADER..].to_vec();
        match k.open_in_place(Nonce::assume_unique_for_key([0; 12]), Aad::from(&v[..HEADER]), &mut body) {
            Ok(p) => {
                let n = p.len();
                body.truncate(n);
                Ok(Opened::Plain(body))
            }
            // The slot was erased and reused: this record was deleted.
            Err(_) => Ok(Opened::Erased),
        }
    }

    /// Overwrites the key of a stored value (call after its tombstone is
    /// committed); the slot becomes reusable.
    ///
    /// # Errors
    /// IO errors writing the zeros.
    pub fn erase(&self, v: &[u8]) -> Result<()> {
        let Some(slot) = slot_of(v) else { return Ok(()) };
        let mut s = self.slots.lock().map_err(|_| StoreError::Closed)?;
        let mut key = [0u8; SLOT as usize];
        match self.file.read_exact_at(&mut key, slot * SLOT) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(io(e)),
        }
        // Already erased, or the slot now holds another record's key.
        if key == [0u8; SLOT as usize] || check(&key)[..] != v[9..HEADER] {
            return Ok(());
        }
        self.file.write_all_at(&[0u8; SLOT as usize], slot * SLOT).map_err(io)?;
        self.dirty.store(true, Ordering::Release);
        s.free.push(slot);
        Ok(())
    }

    /// Zeroes and frees a slot whose records were all found undecryptable
    /// at open (a crash left a stale key in it). Only for use before the
    /// store serves anyone.
    ///
    /// # Errors
    /// IO errors writing the zeros.
    pub fn reclaim(&self, slot: u64) -> Result<()> {
        let mut s = self.slots.lock().map_err(|_| StoreError::Closed)?;
        if slot >= s.len || s.free.contains(&slot) {
            return Ok(());
        }
        self.file.write_all_at(&[0u8; SLOT as usize], slot * SLOT).map_err(io)?;
        self.dirty.store(true, Ordering::Release);
        s.free.push(slot);
        Ok(())
    }

    fn release(&self, slot: u64) {
        if let Ok(mut s) = self.slots.lock() {
            s.free.push(slot);
        }
    }

    /// Whether keys were written or erased since the last sync.
    pub fn needs_sync(&self) -> bool {
        self.dirty.load(Ordering::Acquire)
    }

    /// Makes every key written or erased so far durable (no-op when
    /// nothing changed). Called by the syncer before each journal sync.
    ///
    /// # Errors
    /// The fsync failed.
    pub fn sync(&self) -> std::io::Result<()> {
        if self.dirty.swap(false, Ordering::AcqRel)
            && let Err(e) = self.file.sync_data()
        {
            self.dirty.store(true, Ordering::Release);
            return Err(e);
        }
        Ok(())
    }
}

/// Identifies a key without revealing it: the first 8 bytes of its SHA-256.
fn check(key: &[u8]) -> [u8; 8] {
    use sha2::Digest;
    let d = sha2::Sha256::digest(key);
    let mut c = [0u8; 8];
    c.copy_from_slice(&d[..8]);
    c
}

/// The key slot of an encrypted value; `None` for a record from before
/// encryption.
pub fn slot_of(v: &[u8]) -> Option<u64> {
    if v.len() < HEADER || v[0] != MAGIC {
        return None;
    }
    let mut b = [0u8; 8];
    b.copy_from_slice(&v[1..9]);
    Some(u64::from_be_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erased_keys_make_values_unreadable_and_slots_are_reused() {
        let dir = std::env::temp_dir().join(format!("chatd-keys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("message-keys");
        let k = MessageKeys::open(&path, []).unwrap();
        let a = k.seal(b"hello secret").unwrap();
        let b = k.seal(b"other").unwrap();
        assert!(!a.windows(6).any(|w| w == b"secret"));
        assert!(matches!(k.open_value(&a).unwrap(), Opened::Plain(p) if p == b"hello secret"));
        k.erase(&a).unwrap();
        assert!(matches!(k.open_value(&a).unwrap(), Opened::Erased));
        let c = k.seal(b"third").unwrap();
        assert_eq!(slot_of(&c), slot_of(&a), "the erased slot is reused");
        assert!(matches!(k.open_value(&a).unwrap(), Opened::Erased), "a foreign key does not open it");
        k.erase(&a).unwrap();
        assert!(matches!(k.open_value(&c).unwrap(), Opened::Plain(p) if p == b"third"), "a second erase of a spares c");
        assert!(matches!(k.open_value(&b"\0\0legacy"[..]).unwrap(), Opened::Plain(p) if p == b"\0\0legacy"));
        k.sync().unwrap();
        drop(k);
        // Reopen knowing only `b` is referenced: `c`'s orphaned key is zeroed.
        let k = MessageKeys::open(&path, slot_of(&b)).unwrap();
        assert!(matches!(k.open_value(&b).unwrap(), Opened::Plain(p) if p == b"other"));
        assert!(matches!(k.open_value(&c).unwrap(), Opened::Erased));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
