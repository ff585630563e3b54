//! Media over HTTPS (XEP-0363 HTTP File Upload) with two storage tiers.
//!
//! ## Flow
//! 1. A client asks for an upload slot over XMPP
//!    ([`crate::modules::upload`]); the [`slot::Issuer`] answers with a PUT
//!    URL signed with HMAC-SHA256 (slot id, account, file name, size,
//!    content type, expiry) and the GET URL of the same slot.
//! 2. The client PUTs the file to the HTTP listener ([`routes`]). The
//!    signature, expiry, `Content-Length` and quota are checked before the
//!    body is read. The first bytes are sniffed ([`sniff`]) against the
//!    declared type, which picks the tier: images go to `fast_dir`, audio,
//!    video and everything else to `bulk_dir`. The body streams to a
//!    temporary file in the tier (hashing as it goes) and is renamed into
//!    place under its SHA-256.
//! 3. Anyone holding the GET URL downloads it (Range, ETag, caching).
//!
//! ## Storage
//! Blobs are content-addressed: `TIER/ab/cd/abcd…` (hex SHA-256). Each
//! upload slot is a *reference* to a blob; identical uploads share one
//! blob whose reference count is kept in the [`index::MediaIndex`] (its
//! own fjall database in `DATA_DIR/media/index`, so a media-only node
//! needs no chat store). A reference expires `expiry_days` after its
//! upload, or when its uploader deletes it; a blob is removed as soon as
//! no reference is left ([`reaper`]).
//!
//! Crash safety: a blob file is fsynced and renamed before its index
//! record is written, and its record is removed before the file is
//! unlinked, so a crash can leave at most an unindexed file (overwritten
//! by the next identical upload), never a record without its file.
//!
//! ## Roles
//! `role = "all"` runs slots and storage in one process; `chat` issues
//! slots for `public_url` only; `media` runs only the HTTP side. Nodes
//! share `slot_secret`.

pub mod body;
pub mod index;
pub mod reaper;
pub mod routes;
pub mod slot;
pub mod sniff;
pub mod store;

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

pub use sniff::Tier;
pub use store::Media;

/// `[media]` settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MediaConfig {
    /// Directory for images (fast storage). Empty: `DATA_DIR/media/fast`.
    pub fast_dir: String,
    /// Directory for audio, video and other files (bulk storage). Empty:
    /// `DATA_DIR/media/bulk`.
    pub bulk_dir: String,
    /// Largest file accepted, in bytes (advertised in disco).
    pub max_file_bytes: u64,
    /// Bytes of live uploads one account may hold, uploads in flight
    /// included.
    pub quota_bytes: u64,
    /// Bytes of all uploads in flight together (their temporary files);
    /// more are refused with 503 until some finish.
    pub max_temp_bytes: u64,
    /// Days after its upload a file's link expires (fractions allowed).
    pub expiry_days: f64,
    /// Seconds between runs of the media reaper.
    pub reap_interval_secs: u64,
    /// Key for signing slot URLs, shared by chat and media nodes. Empty:
    /// a random key is generated in `DATA_DIR/media/slot.key`.
    pub slot_secret: String,
    /// Seconds a slot's PUT URL stays valid.
    pub slot_ttl_secs: u64,
    /// Base URL of the media service in slot URLs, e.g.
    /// `https://media.example.com`; several, separated by spaces, spread
    /// slots over several media nodes. Empty: `https://DOMAIN:PORT` with
    /// the bound HTTP port.
    pub public_url: String,
    /// Seconds an upload may go without receiving a byte.
    pub idle_timeout_secs: u64,
    /// Slowest average upload rate accepted, in bytes per second, after
    /// the first `rate_grace_secs`.
    pub min_rate_bytes: u64,
    pub rate_grace_secs: u64,
}

impl Default for MediaConfig {
    fn default() -> Self {
        MediaConfig {
            fast_dir: String::new(),
            bulk_dir: String::new(),
            max_file_bytes: 100 * 1024 * 1024,
            quota_bytes: 2 * 1024 * 1024 * 1024,
            max_temp_bytes: 1024 * 1024 * 1024,
            expiry_days: 30.0,
            reap_interval_secs: 3600,
            slot_secret: String::new(),
            slot_ttl_secs: 300,
            public_url: String::new(),
            idle_timeout_secs: 30,
            min_rate_bytes: 4096,
            rate_grace_secs: 10,
        }
    }
}

impl MediaConfig {
    /// # Errors
    /// The first invalid value.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.max_file_bytes == 0 {
            bail!("media.max_file_bytes must be positive");
        }
        if !(self.expiry_days.is_finite() && self.expiry_days > 0.0) {
            bail!("media.expiry_days must be a positive number");
        }
        if self.slot_ttl_secs == 0 || self.idle_timeout_secs == 0 || self.reap_interval_secs == 0 {
            bail!("media.slot_ttl_secs, idle_timeout_secs and reap_interval_secs must be positive");
        }
        if !self.slot_secret.is_empty() && self.slot_secret.len() < 16 {
            bail!("media.slot_secret must be at least 16 characters");
        }
        for u in self.public_url.split_whitespace() {
            if !(u.starts_with("https://") || u.starts_with("http://"))
                || u.contains(['?', '#'])
                || u.trim_end_matches('/').matches('/').count() < 2
            {
                bail!("media.public_url {u:?} must be an http(s) URL without query or fragment");
            }
        }
        Ok(())
    }

    /// The fast tier directory.
    pub fn fast_dir(&self, data_dir: &Path) -> PathBuf {
        dir_or(&self.fast_dir, data_dir, "fast")
    }

    /// The bulk tier directory.
    pub fn bulk_dir(&self, data_dir: &Path) -> PathBuf {
        dir_or(&self.bulk_dir, data_dir, "bulk")
    }

    /// Link lifetime in milliseconds.
    pub fn expiry_ms(&self) -> u64 {
        (self.expiry_days * 86_400_000.0) as u64
    }
}

fn dir_or(s: &str, data_dir: &Path, leaf: &str) -> PathBuf {
    if s.is_empty() { data_dir.join("media").join(leaf) } else { PathBuf::from(s) }
}

/// The slot signing key: `slot_secret`, or the key in
/// `DATA_DIR/media/slot.key` (created with 32 random bytes, mode 0600).
///
/// # Errors
/// The key file cannot be read or created.
pub fn load_secret(cfg: &MediaConfig, data_dir: &Path) -> anyhow::Result<Vec<u8>> {
    if !cfg.slot_secret.is_empty() {
        return Ok(cfg.slot_secret.as_bytes().to_vec());
    }
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let dir = data_dir.join("media");
    let path = dir.join("slot.key");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let key = b64.decode(text.trim()).with_context(|| format!("{} is not base64", path.display()))?;
        if key.len() < 16 {
            bail!("{} holds a key shorter than 16 bytes", path.display());
        }
        return Ok(key);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut key = vec![0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut key);
    let tmp = dir.join("slot.key.tmp");
    {
        use std::io::Write;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(b64.encode(&key).as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    tracing::info!(path = %path.display(), "generated the media slot signing key");
    Ok(key)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    crate::accounts::now_ms()
}
