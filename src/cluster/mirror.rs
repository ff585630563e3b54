//! The RAM mirror of one KV bucket.
//!
//! Two sources change it: the bucket's watch (every node's writes, in
//! revision order) and this node's own writes, applied when they are
//! made. Per key the mirror keeps the latest watched `(revision, value)`
//! and this node's latest own write. What a read sees is the own write
//! until the watch has delivered a revision at least as new as the one
//! NATS gave that write (known from its PubAck); from then on the watched
//! value, which may be another node's later write. So a node always reads
//! its own writes, and never keeps a value that a later write elsewhere
//! replaced.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use bytes::Bytes;

use crate::storage::{Group, Ticket};

#[derive(Default)]
struct Slot {
    /// Latest revision from the watch, and its value (`None`: deleted).
    watched: Option<(u64, Option<Bytes>)>,
    own: Option<Own>,
}

struct Own {
    ticket: Ticket,
    value: Option<Bytes>,
    /// The write's revision, once its PubAck arrived.
    revision: Option<u64>,
}

impl Slot {
    fn visible(&self) -> Option<&Bytes> {
        let watched_rev = self.watched.as_ref().map_or(0, |w| w.0);
        if let Some(o) = &self.own
            && o.revision.is_none_or(|r| watched_rev < r)
        {
            return o.value.as_ref();
        }
        self.watched.as_ref().and_then(|w| w.1.as_ref())
    }

    /// Drops the own write once the watch has caught up with it.
    fn settle(&mut self) {
        let watched_rev = self.watched.as_ref().map_or(0, |w| w.0);
        if self.own.as_ref().is_some_and(|o| o.revision.is_some_and(|r| watched_rev >= r)) {
            self.own = None;
        }
    }

    fn is_empty(&self) -> bool {
        self.own.is_none() && self.watched.as_ref().is_none_or(|w| w.1.is_none())
    }
}

#[derive(Default)]
struct Inner {
    slots: BTreeMap<String, Slot>,
    /// Highest revision the watch delivered (where a new watch resumes).
    watched_to: u64,
    /// Member → group keys, for a bucket of groups.
    members: Option<BTreeMap<String, BTreeSet<String>>>,
}

/// One bucket's mirror. Its lock is a leaf: held only for map operations.
pub struct Mirror {
    pub bucket: &'static str,
    inner: Mutex<Inner>,
}

impl Mirror {
    pub fn new(bucket: &'static str) -> Mirror {
        Mirror { bucket, inner: Mutex::default() }
    }

    /// A mirror of groups that also keeps the member → groups index.
    pub fn with_member_index(bucket: &'static str) -> Mirror {
        Mirror { bucket, inner: Mutex::new(Inner { members: Some(BTreeMap::new()), ..Default::default() }) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a slot half-written
        // (every change is one assignment), so a poisoned lock is usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The value a read sees for `key`.
    pub fn get(&self, key: &str) -> Option<Bytes> {
        self.lock().slots.get(key).and_then(|s| s.visible().cloned())
    }

    /// Every visible `(key, value)` whose key starts with `prefix`, in key order.
    pub fn scan(&self, prefix: &str) -> Vec<(String, Bytes)> {
        let inner = self.lock();
        inner
            .slots
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .filter_map(|(k, s)| s.visible().map(|v| (k.clone(), v.clone())))
            .collect()
    }

    /// Visible keys starting with `prefix`, in order.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        self.scan(prefix).into_iter().map(|(k, _)| k).collect()
    }

    /// Group keys whose group lists `member` (a groups mirror only).
    pub fn groups_of(&self, member: &str) -> Vec<String> {
        let inner = self.lock();
        inner.members.as_ref().and_then(|m| m.get(member)).map(|s| s.iter().cloned().collect()).unwrap_or_default()
    }

    /// Records this node's write of `key` (`None`: delete), made under `ticket`.
    pub fn own_write(&self, key: &str, value: Option<Bytes>, ticket: Ticket) {
        self.change(key, |slot| slot.own = Some(Own { ticket, value, revision: None }));
    }

    /// The PubAck of `ticket`'s write of `key` arrived: NATS stored it as `revision`.
    pub fn acked(&self, key: &str, ticket: Ticket, revision: u64) {
        self.change(key, |slot| {
            if let Some(o) = slot.own.as_mut()
                && o.ticket == ticket
            {
                o.revision = Some(revision);
            }
            slot.settle();
        });
    }

    /// Whether a write of this node to `key` later than `ticket` exists
    /// (pending, or already acknowledged and settled): a resend of
    /// `ticket`'s write would only bring back an older value.
    pub fn superseded(&self, key: &str, ticket: Ticket) -> bool {
        self.lock().slots.get(key).and_then(|s| s.own.as_ref()).is_none_or(|o| o.ticket > ticket)
    }

    /// The watch delivered `key` at `revision` (`None`: deleted or purged).
    pub fn watched(&self, key: &str, revision: u64, value: Option<Bytes>) {
        self.change(key, |slot| {
            if slot.watched.as_ref().is_none_or(|w| w.0 < revision) {
                slot.watched = Some((revision, value));
            }
            slot.settle();
        });
        let mut inner = self.lock();
        inner.watched_to = inner.watched_to.max(revision);
    }

    /// Highest revision the watch delivered so far.
    pub fn watched_to(&self) -> u64 {
        self.lock().watched_to
    }

    fn change(&self, key: &str, f: impl FnOnce(&mut Slot)) {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let slot = inner.slots.entry(key.to_string()).or_default();
        let before = slot.visible().cloned();
        f(slot);
        let after = slot.visible().cloned();
        if slot.is_empty() {
            inner.slots.remove(key);
        }
        if let Some(index) = inner.members.as_mut()
            && before != after
        {
            for (value, add) in [(before, false), (after, true)] {
                let Some(v) = value else { continue };
                // A group that does not decode is in no one's index; reading
                // it reports the corruption.
                let Ok(g) = serde_json::from_slice::<Group>(&v) else {
                    if add {
                        tracing::error!(bucket = self.bucket, key, "undecodable group in the cluster store");
                    }
                    continue;
                };
                for m in &g.members {
                    if add {
                        index.entry(m.local.clone()).or_default().insert(key.to_string());
                    } else if let Some(set) = index.get_mut(&m.local) {
                        set.remove(key);
                        if set.is_empty() {
                            index.remove(&m.local);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Option<Bytes> {
        Some(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn own_writes_win_until_the_watch_catches_up() {
        let m = Mirror::new("t");
        m.watched("k", 1, b("old"));
        m.own_write("k", b("mine"), 7);
        m.watched("k", 2, b("stale"));
        assert_eq!(m.get("k"), b("mine"), "a watched revision older than the own write's does not hide it");
        m.acked("k", 7, 3);
        assert_eq!(m.get("k"), b("mine"));
        m.watched("k", 3, b("mine"));
        m.watched("k", 4, b("theirs"));
        assert_eq!(m.get("k"), b("theirs"), "a later write elsewhere replaces it");
    }

    #[test]
    fn a_later_write_elsewhere_seen_before_the_ack_wins_after_it() {
        let m = Mirror::new("t");
        m.own_write("k", b("mine"), 1);
        m.watched("k", 5, b("mine"));
        m.watched("k", 6, b("theirs"));
        assert_eq!(m.get("k"), b("mine"), "the own write's revision is not known yet");
        m.acked("k", 1, 5);
        assert_eq!(m.get("k"), b("theirs"));
    }

    #[test]
    fn only_the_latest_own_write_settles() {
        let m = Mirror::new("t");
        m.own_write("k", b("one"), 1);
        m.own_write("k", None, 2);
        m.acked("k", 1, 10);
        m.watched("k", 10, b("one"));
        assert_eq!(m.get("k"), None, "the delete of ticket 2 is still pending");
        m.acked("k", 2, 11);
        m.watched("k", 11, None);
        assert_eq!(m.get("k"), None);
        assert!(m.keys("").is_empty(), "deleted keys leave the map");
    }

    #[test]
    fn a_resend_is_superseded_only_by_a_later_own_write() {
        let m = Mirror::new("t");
        m.own_write("k", b("one"), 1);
        assert!(!m.superseded("k", 1), "still the latest write of the key");
        m.own_write("k", b("two"), 2);
        assert!(m.superseded("k", 1));
        m.acked("k", 2, 9);
        m.watched("k", 9, b("two"));
        assert!(m.superseded("k", 1), "the later write settled");
        assert!(m.superseded("other", 1), "no own write pending there");
    }

    #[test]
    fn scans_stop_at_the_prefix() {
        let m = Mirror::new("t");
        for (i, k) in ["a.1", "a.2", "ab.1", "b.1"].iter().enumerate() {
            m.own_write(k, b("v"), i as u64 + 1);
        }
        assert_eq!(m.keys("a."), vec!["a.1", "a.2"]);
    }

    #[test]
    fn member_index_follows_visible_groups_and_skips_corrupt_ones() {
        let m = Mirror::with_member_index("g");
        let g = |members: &[&str]| {
            let g = Group {
                id: "x".into(),
                subject: String::new(),
                description: String::new(),
                created_ms: 0,
                members: members
                    .iter()
                    .map(|l| crate::storage::GroupMember {
                        local: l.to_string(),
                        role: crate::storage::GroupRole::Member,
                    })
                    .collect(),
                invited: vec![],
            };
            Some(Bytes::from(serde_json::to_vec(&g).unwrap()))
        };
        m.own_write("x", g(&["1", "2"]), 1);
        assert_eq!(m.groups_of("2"), vec!["x"]);
        m.own_write("x", g(&["1"]), 2);
        assert!(m.groups_of("2").is_empty());
        m.own_write("x", b("not json"), 3);
        assert!(m.groups_of("1").is_empty());
        m.own_write("x", None, 4);
        assert!(m.groups_of("1").is_empty());
    }
}
