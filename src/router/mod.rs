//! The router: where a stanza for a local account goes.
//!
//! [`Router`] is the seam a multi-node backend plugs into: feature code
//! and connections never look at the session registry or the offline
//! store to deliver; they call the router. [`LocalRouter`] is the
//! single-node implementation.
//!
//! ## The delivery rule (see ARCHITECTURE.md)
//! Every message that must survive (chat/normal with content, receipts,
//! markers) is appended to the recipient account's queue *before* it is
//! pushed to any live session, under the account's delivery lock. It
//! stays there until a device of the account acknowledges it (XEP-0198
//! `<a/>`, or for clients without stream management the answer to a
//! server ping sent after it). So the store is a write-back cache of
//! unacknowledged messages, never an archive.

mod local;
pub mod outbound;
mod registry;

use std::sync::Arc;

pub use local::LocalRouter;
pub use outbound::{CloseReason, Outbound, OutboundRx, OutboundTx, outbound_channel};

use crate::protocol::stanza::StanzaError;
use crate::protocol::{Element, Jid, ns};
use crate::storage::{QueueUsage, Ticket};

/// A batch of stored messages being read: `(sequence number, stanza)`.
pub type Pending<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Vec<(u64, Arc<str>)>> + Send + 'a>>;

/// What the router knows about one live session of an account, without
/// its channel: enough for presence, carbons and roster pushes to decide
/// who gets what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionView {
    pub id: u64,
    pub resource: String,
    /// Sent initial presence and not yet unavailable.
    pub available: bool,
    pub priority: i8,
    /// Last broadcast available presence (serialised, `from` stamped),
    /// answered to probes.
    pub presence: Option<Arc<str>>,
    /// Requested the roster, so it receives roster pushes.
    pub roster: bool,
    /// Enabled XEP-0280 carbons.
    pub carbons: bool,
}

/// A change a session announces about itself.
#[derive(Clone, Debug)]
pub enum SessionUpdate {
    /// Broadcast presence: available with `stanza` (answered to later
    /// probes) and `priority`, or unavailable (`stanza` is `None`).
    Presence { stanza: Option<Arc<str>>, priority: i8 },
    /// Requested the roster (RFC 6121 §2.1.6): roster pushes follow.
    RosterRequested,
    /// Enabled or disabled carbons (XEP-0280).
    Carbons(bool),
}

/// Which sessions of one account a [`Router::push`] reaches.
#[derive(Clone, Copy, Debug, Default)]
pub struct Audience<'a> {
    /// Only this resource (a full JID).
    pub resource: Option<&'a str>,
    /// Only sessions that sent available presence.
    pub available: bool,
    /// Only sessions that requested the roster.
    pub roster: bool,
    /// Only sessions with carbons enabled.
    pub carbons: bool,
    /// Not this session (the sender's own).
    pub except: Option<u64>,
    /// Not this resource.
    pub except_resource: Option<&'a str>,
}

impl<'a> Audience<'a> {
    /// Every bound session.
    pub fn all() -> Audience<'a> {
        Audience::default()
    }
    /// Sessions that are available (sent initial presence).
    pub fn available() -> Audience<'a> {
        Audience { available: true, ..Default::default() }
    }
    /// The session bound to `resource`, whatever its presence.
    pub fn resource(resource: &'a str) -> Audience<'a> {
        Audience { resource: Some(resource), ..Default::default() }
    }
    /// Sessions that asked for the roster.
    pub fn roster() -> Audience<'a> {
        Audience { roster: true, ..Default::default() }
    }
    /// Sessions that enabled carbons.
    pub fn carbons() -> Audience<'a> {
        Audience { carbons: true, ..Default::default() }
    }
    pub fn except(self, id: u64) -> Audience<'a> {
        Audience { except: Some(id), ..self }
    }
    pub fn except_resource(self, resource: &'a str) -> Audience<'a> {
        Audience { except_resource: Some(resource), ..self }
    }
    pub fn and_available(self) -> Audience<'a> {
        Audience { available: true, ..self }
    }
    /// Whether a session is in the audience.
    pub fn includes(&self, s: &SessionView) -> bool {
        self.resource.is_none_or(|r| r == s.resource)
            && (!self.available || s.available)
            && (!self.roster || s.roster)
            && (!self.carbons || s.carbons)
            && self.except != Some(s.id)
            && self.except_resource.is_none_or(|r| r != s.resource)
    }
}

/// Outcome of routing a message.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Stored under this ticket (and pushed to live sessions, if any).
    Durable(Ticket),
    /// Pushed live to this many sessions, not stored.
    Transient(usize),
}

/// How a message is to be treated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageClass {
    /// Stored until acknowledged.
    Durable,
    /// Delivered only to sessions online now (chat states, headlines,
    /// errors).
    LiveOnly,
}

/// Routing interface between features and the delivery machinery: the
/// only way to other sessions and other accounts' queues.
///
/// Overload has one policy: a session whose outbound channel is full (in
/// stanzas or bytes) when anything is pushed to it is dropped from the
/// router and its connection closes as a slow consumer; stored messages
/// stay stored.
///
/// Only [`Router::pending`] may wait: writes return a [`Ticket`] that
/// [`crate::storage::Durability`] resolves later (the caller awaits it
/// through `storage::waiters` before it acknowledges anything), and a
/// networked backend answers the other reads from state it keeps current
/// locally.
pub trait Router: Send + Sync {
    /// Registers a bound session with its outbound channel. Sessions it
    /// displaces (the same resource, or the oldest over
    /// `max_resources`) are told to close with [`CloseReason::Replaced`].
    fn bind(&self, local: &str, id: u64, resource: &str, tx: OutboundTx, max_resources: usize);

    /// Removes a session. Returns whether it was still registered.
    fn unbind(&self, local: &str, id: u64) -> bool;

    /// Records what a session announced about itself.
    fn update_session(&self, local: &str, id: u64, update: SessionUpdate);

    /// The live sessions of an account.
    fn sessions(&self, local: &str) -> Vec<SessionView>;

    /// Pushes a live-only stanza to the sessions of `local` in
    /// `audience`; `render` builds it for each (it gets the session, for
    /// per-resource addressing) or skips it (`None`). Returns how many
    /// sessions it reached.
    fn push(&self, local: &str, audience: Audience<'_>, render: &dyn Fn(&SessionView) -> Option<Arc<str>>) -> usize;

    /// Tells the sessions of `local` (but `except`) to close.
    fn close_sessions(&self, local: &str, reason: CloseReason, except: Option<u64>);

    /// Tells every session on this node to close (shutdown).
    fn close_all(&self, reason: CloseReason);

    /// The queue of `local` changed behind the router's back (expiry,
    /// account removal): cached usage is reloaded from the store on next
    /// use. `None` means every account.
    fn queue_changed(&self, local: Option<&str>);

    /// Delivers a message (with `from` stamped) to the local account named
    /// by `to`.
    ///
    /// # Errors
    /// `service-unavailable` for unknown accounts, `resource-constraint`
    /// when the recipient's queue is full or the sender holds its whole
    /// share of it, `internal-server-error` when the store fails.
    fn message(&self, to: &Jid, stanza: Element, class: MessageClass) -> Result<Delivery, StanzaError>;

    /// Pushes a non-stored stanza to one full JID, or to every available
    /// session of a bare JID. Returns how many sessions it reached.
    fn transient(&self, to: &Jid, xml: Arc<str>) -> usize;

    /// A device acknowledged these stored messages: delete them.
    fn confirm(&self, local: &str, seqs: &[u64]);

    /// Marks a session available and returns the sequence number up to
    /// which the session must read the store; later messages arrive live.
    fn attach(&self, local: &str, session_id: u64) -> u64;

    /// Stored messages of `local` in `(after, upto]`, oldest first, with
    /// a XEP-0203 delay stamp added: at most `limit`, and no more once
    /// `max_bytes` are read (at least one).
    ///
    /// A future, because reading a queue is the one thing a networked
    /// backend cannot answer from local state: the connection awaits it
    /// between writes.
    fn pending<'a>(&'a self, local: &'a str, after: u64, upto: u64, limit: usize, max_bytes: usize) -> Pending<'a>;

    /// Whether the account exists.
    fn account_exists(&self, local: &str) -> bool;

    /// Takes `cost` messages from `local`'s sending budget (the
    /// per-account rate limit); false when it is used up.
    fn admit_message(&self, local: &str, cost: f64) -> bool;

    /// Delivers one message to many accounts (group fan-out) with one
    /// batched durable write. `build(local, seq)` renders the stanza for
    /// each recipient. Returns the ticket and the recipients that do not
    /// get it. The reason is always `resource-constraint`: the member's
    /// queue is full (in messages or bytes), or the sender (the group)
    /// holds its whole share of it.
    ///
    /// # Errors
    /// `internal-server-error` when the store fails.
    fn fanout(
        &self,
        recipients: &[String],
        build: &dyn Fn(&str, u64) -> String,
    ) -> Result<(Ticket, Vec<String>), StanzaError>;
}

/// Limits on what a recipient's queue holds and on how fast an account
/// sends.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Messages per queue.
    pub max_queue: usize,
    /// Bytes per queue.
    pub max_queue_bytes: usize,
    /// Percentage of both that one sender may hold.
    pub sender_share_percent: u8,
    /// Messages per second one account may send, sustained.
    pub rate_per_sec: f64,
    /// Messages one account may send at once after a pause.
    pub rate_burst: f64,
}

impl Limits {
    pub fn from_config(cfg: &crate::config::Config) -> Limits {
        Limits {
            max_queue: cfg.offline.max_queue,
            max_queue_bytes: cfg.offline.max_queue_bytes,
            sender_share_percent: cfg.offline.sender_share_percent,
            rate_per_sec: cfg.delivery.messages_per_sec,
            rate_burst: cfg.delivery.messages_burst,
        }
    }

    /// Whether a message of `bytes` from `sender` fits into `q`.
    fn admits(&self, q: &QueueUsage, sender: &str, bytes: usize) -> Result<(), StanzaError> {
        if q.count >= self.max_queue || q.bytes + bytes > self.max_queue_bytes {
            return Err(StanzaError::ResourceConstraint);
        }
        let pct = usize::from(self.sender_share_percent.clamp(1, 100));
        let (n, b) = q.of_sender(sender);
        let max_n = (self.max_queue * pct / 100).max(1);
        let max_b = (self.max_queue_bytes / 100 * pct).max(bytes);
        if n >= max_n || b + bytes > max_b {
            return Err(StanzaError::ResourceConstraint);
        }
        Ok(())
    }
}
