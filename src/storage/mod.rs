//! Storage traits and their implementations.
//!
//! Feature code sees only the traits in this module ([`UserStore`],
//! [`OfflineStore`], [`RosterStore`]) plus the [`Durability`] watermark.
//! Two engines implement them:
//! - [`fjall_store::FjallStore`]: the embedded, durable default, with a
//!   group-commit writer thread;
//! - [`memory::MemoryStore`]: in-process maps for unit tests;
//! - [`crate::cluster`]: NATS JetStream, shared by the nodes of a cluster.
//!
//! ## Write tickets
//! Every mutating call returns a [`Ticket`]: a position in the store's
//! single write order. A write is *durable* once
//! [`Durability::committed`] has reached its ticket. Reads see writes
//! as soon as the call returns (before they are durable); the server only
//! promises anything to a client (a XEP-0198 ack) once the ticket is
//! durable.

pub mod codec;
pub mod erasure;
pub mod fjall_store;
pub mod memory;
pub mod waiters;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// Position of a write in the store's commit order.
pub type Ticket = u64;

thread_local! {
    /// Highest ticket issued on this thread since [`track_tickets`] began.
    static TRACKED: std::cell::Cell<Option<Ticket>> = const { std::cell::Cell::new(None) };
}

/// Called by engines for every ticket they issue, on the writing thread.
pub fn note_ticket(t: Ticket) {
    TRACKED.with(|c| {
        if let Some(prev) = c.get() {
            c.set(Some(prev.max(t)));
        }
    });
}

/// Runs `f` and returns, with its result, the highest ticket of any store
/// write it made on this thread (0 if none).
///
/// A session wraps the handling of every client stanza in this, so the
/// XEP-0198 `<a h/>` covering a stanza waits for every write that stanza
/// caused — roster, privacy, profile, group or queue — without each
/// feature having to remember to hand its ticket over. Stanza handling is
/// synchronous, so every such write happens on the calling thread.
pub fn track_tickets<R>(f: impl FnOnce() -> R) -> (R, Ticket) {
    let outer = TRACKED.with(|c| c.replace(Some(0)));
    let r = f();
    let mine = TRACKED.with(|c| c.replace(outer)).unwrap_or(0);
    // A nested scope's writes also belong to the enclosing one.
    note_ticket(mine);
    (r, mine)
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage engine: {0}")]
    Engine(String),
    #[error("corrupt record: {0}")]
    Corrupt(String),
    #[error("the data directory is in use by another chatd process")]
    Locked,
    #[error("store is shut down")]
    Closed,
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// SCRAM credentials for one hash function (RFC 5802 §3).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ScramKeys {
    pub salt: Vec<u8>,
    pub iterations: u32,
    pub stored_key: Vec<u8>,
    pub server_key: Vec<u8>,
}

/// An account. The password itself is never stored.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct UserRecord {
    pub sha1: ScramKeys,
    pub sha256: ScramKeys,
    pub created_ms: u64,
    /// Bumped when the password changes, so live sessions authenticated
    /// with an older key can be told apart.
    #[serde(default)]
    pub key_generation: u32,
}

/// A message waiting for its recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMessage {
    /// When the server accepted it (unix ms): the XEP-0203 stamp and the
    /// expiry clock.
    pub ts_ms: u64,
    /// The serialised stanza, `from`/`to` already stamped.
    pub xml: String,
}

/// RFC 6121 subscription state of a roster item.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Subscription {
    #[default]
    None,
    To,
    From,
    Both,
}

impl Subscription {
    pub fn as_str(self) -> &'static str {
        match self {
            Subscription::None => "none",
            Subscription::To => "to",
            Subscription::From => "from",
            Subscription::Both => "both",
        }
    }
    /// The contact receives the owner's presence.
    pub fn has_from(self) -> bool {
        matches!(self, Subscription::From | Subscription::Both)
    }
    /// The owner receives the contact's presence.
    pub fn has_to(self) -> bool {
        matches!(self, Subscription::To | Subscription::Both)
    }
    pub fn with_to(self, on: bool) -> Subscription {
        Subscription::from_bits(on, self.has_from())
    }
    pub fn with_from(self, on: bool) -> Subscription {
        Subscription::from_bits(self.has_to(), on)
    }
    fn from_bits(to: bool, from: bool) -> Subscription {
        match (to, from) {
            (false, false) => Subscription::None,
            (true, false) => Subscription::To,
            (false, true) => Subscription::From,
            (true, true) => Subscription::Both,
        }
    }
}

/// One contact in an owner's roster.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct RosterItem {
    /// Bare JID of the contact.
    pub jid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default)]
    pub subscription: Subscription,
    /// The owner asked to subscribe and awaits an answer.
    #[serde(default)]
    pub ask: bool,
    /// The contact asked to subscribe to the owner and awaits an answer.
    #[serde(default)]
    pub pending_in: bool,
    /// The owner pre-approved a subscription from the contact.
    #[serde(default)]
    pub approved: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// Hidden items exist only to carry subscription state and are not
    /// returned by roster get (RFC 6121 §3.1.3 "none" without ask).
    #[serde(default)]
    pub hidden: bool,
}

/// Accounts and their credentials, keyed by localpart.
pub trait UserStore: Send + Sync {
    fn get_user(&self, local: &str) -> Result<Option<UserRecord>>;
    /// Whether the account exists, without decoding its record (checked
    /// for every message to an account with no live session).
    fn has_user(&self, local: &str) -> Result<bool> {
        Ok(self.get_user(local)?.is_some())
    }
    fn put_user(&self, local: &str, rec: &UserRecord) -> Result<Ticket>;
    /// Writes many accounts as one batch (bulk import).
    fn put_users(&self, recs: &[(String, UserRecord)]) -> Result<Ticket>;
    fn delete_user(&self, local: &str) -> Result<Ticket>;
    fn list_users(&self) -> Result<Vec<String>>;
}

/// Size and sender of one queued message, known without its body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueuedMeta {
    /// Bare JID in the stored stanza's `from` (a group for group traffic).
    pub sender: String,
    /// Length of the stored stanza in bytes.
    pub bytes: usize,
}

impl QueuedMeta {
    pub fn of(m: &StoredMessage) -> QueuedMeta {
        QueuedMeta { sender: codec::sender_of(&m.xml).to_string(), bytes: m.xml.len() }
    }
}

/// What one account's queue holds: messages and bytes, in total and per
/// sender. The router keeps it per account (loaded once from
/// [`OfflineStore::usage`], then updated with every push and delete) to
/// enforce the queue limits and each sender's share of them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueUsage {
    pub count: usize,
    pub bytes: usize,
    /// Sender bare JID → (messages, bytes).
    pub by_sender: std::collections::HashMap<String, (usize, usize)>,
}

impl QueueUsage {
    pub fn add(&mut self, sender: &str, bytes: usize) {
        self.count += 1;
        self.bytes += bytes;
        let e = self.by_sender.entry(sender.to_string()).or_default();
        e.0 += 1;
        e.1 += bytes;
    }

    pub fn sub(&mut self, m: &QueuedMeta) {
        self.count = self.count.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(m.bytes);
        if let Some(e) = self.by_sender.get_mut(&m.sender) {
            e.0 = e.0.saturating_sub(1);
            e.1 = e.1.saturating_sub(m.bytes);
            if e.0 == 0 {
                self.by_sender.remove(&m.sender);
            }
        }
    }

    /// Messages and bytes `sender` holds in this queue.
    pub fn of_sender(&self, sender: &str) -> (usize, usize) {
        self.by_sender.get(sender).copied().unwrap_or_default()
    }
}

/// Per-recipient queues of messages not yet acknowledged by any device.
///
/// Sequence numbers are per account: the caller assigns them under the
/// account's delivery lock, strictly increasing, so one queue read in key
/// order is in arrival order. The store keeps a durable per-account mark
/// of the highest number ever pushed ([`OfflineStore::last_seq`]), written
/// in the same batch as the messages, so a number is never reused, even
/// after the queue was emptied or the process was killed.
pub trait OfflineStore: Send + Sync {
    /// Appends messages (possibly to several recipients) in one write and
    /// raises each recipient's sequence mark to its highest number in it.
    fn push(&self, items: &[(&str, u64, &StoredMessage)]) -> Result<Ticket>;
    /// Deletes the given sequence numbers of one recipient; returns what
    /// the deleted messages were (those that existed), each once however
    /// often `seqs` names it, in no particular order.
    fn remove(&self, local: &str, seqs: &[u64]) -> Result<(Ticket, Vec<QueuedMeta>)>;
    /// Messages of `local` with `after < seq <= upto`, in order: at most
    /// `limit`, and no more once `max_bytes` of stanzas are read (the
    /// first one always is).
    fn list(
        &self,
        local: &str,
        after: u64,
        upto: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, StoredMessage)>>;
    fn count(&self, local: &str) -> Result<usize>;
    /// Messages and bytes queued for `local`, per sender. Reads the whole
    /// queue (bounded by the queue limits); callers cache it.
    fn usage(&self, local: &str) -> Result<QueueUsage>;
    /// Deletes the whole queue of `local` (its sequence mark stays).
    fn clear(&self, local: &str) -> Result<Ticket>;
    /// Deletes messages accepted before `cutoff_ms`; returns how many.
    fn expire(&self, cutoff_ms: u64) -> Result<usize>;
    /// Highest sequence number ever pushed for `local` (0 if none).
    fn last_seq(&self, local: &str) -> Result<u64>;
}

/// Rosters (RFC 6121), keyed by owner localpart and contact bare JID.
pub trait RosterStore: Send + Sync {
    fn roster(&self, owner: &str) -> Result<Vec<RosterItem>>;
    fn roster_item(&self, owner: &str, contact: &str) -> Result<Option<RosterItem>>;
    fn put_roster_item(&self, owner: &str, item: &RosterItem) -> Result<Ticket>;
    fn remove_roster_item(&self, owner: &str, contact: &str) -> Result<Ticket>;
    fn clear_roster(&self, owner: &str) -> Result<Ticket>;
}

/// Small per-account documents (block list, privacy settings, profile
/// items, last seen), keyed by owner localpart and a name.
pub trait SettingsStore: Send + Sync {
    fn get_setting(&self, owner: &str, name: &str) -> Result<Option<Vec<u8>>>;
    fn put_setting(&self, owner: &str, name: &str, value: &[u8]) -> Result<Ticket>;
    /// Deletes every setting of `owner` (account deletion).
    fn clear_settings(&self, owner: &str) -> Result<Ticket>;
}

/// A member's role in a group.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum GroupRole {
    Admin,
    Member,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct GroupMember {
    pub local: String,
    pub role: GroupRole,
}

/// A group: defined by its membership, not by who is online.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Group {
    pub id: String,
    pub subject: String,
    #[serde(default)]
    pub description: String,
    pub created_ms: u64,
    /// In join order; the creator first.
    pub members: Vec<GroupMember>,
    /// Accounts invited (XEP-0249) because they may not be added
    /// directly; an invitation becomes membership when accepted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub invited: Vec<String>,
}

impl Group {
    pub fn member(&self, local: &str) -> Option<&GroupMember> {
        self.members.iter().find(|m| m.local == local)
    }
    pub fn is_admin(&self, local: &str) -> bool {
        self.member(local).is_some_and(|m| m.role == GroupRole::Admin)
    }
}

/// Groups and the member → groups index.
pub trait GroupStore: Send + Sync {
    fn get_group(&self, id: &str) -> Result<Option<Group>>;
    /// Writes the group and updates the index for members added or
    /// removed relative to `previous`.
    fn put_group(&self, group: &Group, previous: Option<&Group>) -> Result<Ticket>;
    fn delete_group(&self, group: &Group) -> Result<Ticket>;
    /// Ids of the groups `local` belongs to.
    fn groups_of(&self, local: &str) -> Result<Vec<String>>;
}

/// The durable-commit watermark shared by every store of one engine.
pub trait Durability: Send + Sync {
    /// A receiver whose value is the highest durable ticket.
    fn committed(&self) -> watch::Receiver<Ticket>;
    /// Flushes everything and stops background work.
    fn shutdown(&self);
}

/// Waits until `ticket` is durable.
///
/// # Errors
/// [`StoreError::Closed`] if the engine stopped first.
pub async fn wait_durable(rx: &mut watch::Receiver<Ticket>, ticket: Ticket) -> Result<()> {
    rx.wait_for(|c| *c >= ticket).await.map(|_| ()).map_err(|_| StoreError::Closed)
}

/// All stores of one engine.
#[derive(Clone)]
pub struct Stores {
    pub users: Arc<dyn UserStore>,
    pub offline: Arc<dyn OfflineStore>,
    pub roster: Arc<dyn RosterStore>,
    pub settings: Arc<dyn SettingsStore>,
    pub groups: Arc<dyn GroupStore>,
    pub durability: Arc<dyn Durability>,
}

impl Stores {
    /// In-memory stores for tests.
    pub fn memory() -> Stores {
        let m = Arc::new(memory::MemoryStore::default());
        Stores {
            users: m.clone(),
            offline: m.clone(),
            roster: m.clone(),
            settings: m.clone(),
            groups: m.clone(),
            durability: m,
        }
    }

    /// Connects to the NATS JetStream cluster of `[cluster]` (see
    /// [`crate::cluster::open`]: synchronous, creates what is missing,
    /// loads the mirrors before it returns).
    ///
    /// # Errors
    /// [`StoreError::Engine`] naming the servers when NATS is unreachable.
    pub fn open_nats(cfg: &crate::config::Cluster) -> Result<Stores> {
        crate::cluster::open(cfg)
    }

    /// Opens the embedded engine in `dir`.
    ///
    /// # Errors
    /// [`StoreError::Locked`] when a running server holds the directory.
    pub fn open_fjall(dir: &std::path::Path) -> Result<Stores> {
        let f = Arc::new(fjall_store::FjallStore::open(dir)?);
        Ok(Stores {
            users: f.clone(),
            offline: f.clone(),
            roster: f.clone(),
            settings: f.clone(),
            groups: f.clone(),
            durability: f,
        })
    }
}
