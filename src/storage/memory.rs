//! In-memory implementation of every store trait, for unit tests and
//! for running the feature logic without disk. Every write is
//! "durable" as soon as it returns.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::watch;

use super::{
    Durability, Group, GroupStore, OfflineStore, QueueUsage, QueuedMeta, Result, RosterItem, RosterStore,
    SettingsStore, StoreError, StoredMessage, Ticket, UserRecord, UserStore,
};

pub struct MemoryStore {
    users: Mutex<BTreeMap<String, UserRecord>>,
    offline: Mutex<BTreeMap<(String, u64), StoredMessage>>,
    seq_marks: Mutex<HashMap<String, u64>>,
    roster: Mutex<HashMap<String, BTreeMap<String, RosterItem>>>,
    settings: Mutex<HashMap<(String, String), Vec<u8>>>,
    groups: Mutex<BTreeMap<String, Group>>,
    issued: AtomicU64,
    tx: watch::Sender<Ticket>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore {
            users: Mutex::default(),
            offline: Mutex::default(),
            seq_marks: Mutex::default(),
            roster: Mutex::default(),
            settings: Mutex::default(),
            groups: Mutex::default(),
            issued: AtomicU64::new(0),
            tx: watch::channel(0).0,
        }
    }
}

fn poisoned<T>(_: T) -> StoreError {
    StoreError::Engine("lock poisoned".into())
}

impl MemoryStore {
    fn ticket(&self) -> Ticket {
        let t = self.issued.fetch_add(1, Ordering::AcqRel) + 1;
        self.tx.send_modify(|c| *c = (*c).max(t));
        super::note_ticket(t);
        t
    }
}

impl Durability for MemoryStore {
    fn committed(&self) -> watch::Receiver<Ticket> {
        self.tx.subscribe()
    }
    fn shutdown(&self) {}
}

impl UserStore for MemoryStore {
    fn get_user(&self, local: &str) -> Result<Option<UserRecord>> {
        Ok(self.users.lock().map_err(poisoned)?.get(local).cloned())
    }
    fn put_user(&self, local: &str, rec: &UserRecord) -> Result<Ticket> {
        self.users.lock().map_err(poisoned)?.insert(local.to_string(), rec.clone());
        Ok(self.ticket())
    }
    fn put_users(&self, recs: &[(String, UserRecord)]) -> Result<Ticket> {
        let mut u = self.users.lock().map_err(poisoned)?;
        for (l, r) in recs {
            u.insert(l.clone(), r.clone());
        }
        Ok(self.ticket())
    }
    fn delete_user(&self, local: &str) -> Result<Ticket> {
        self.users.lock().map_err(poisoned)?.remove(local);
        Ok(self.ticket())
    }
    fn list_users(&self) -> Result<Vec<String>> {
        Ok(self.users.lock().map_err(poisoned)?.keys().cloned().collect())
    }
}

impl OfflineStore for MemoryStore {
    fn push(&self, items: &[(&str, u64, &StoredMessage)]) -> Result<Ticket> {
        let mut q = self.offline.lock().map_err(poisoned)?;
        let mut marks = self.seq_marks.lock().map_err(poisoned)?;
        for (l, s, m) in items {
            q.insert((l.to_string(), *s), (*m).clone());
            let mark = marks.entry(l.to_string()).or_default();
            *mark = (*mark).max(*s);
        }
        Ok(self.ticket())
    }
    fn remove(&self, local: &str, seqs: &[u64]) -> Result<(Ticket, Vec<QueuedMeta>)> {
        let mut q = self.offline.lock().map_err(poisoned)?;
        let gone = seqs.iter().filter_map(|s| q.remove(&(local.to_string(), *s))).map(|m| QueuedMeta::of(&m)).collect();
        Ok((self.ticket(), gone))
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
        let q = self.offline.lock().map_err(poisoned)?;
        let mut out = Vec::new();
        let mut bytes = 0;
        for ((_, s), m) in q.range((local.to_string(), after + 1)..=(local.to_string(), upto)) {
            bytes += m.xml.len();
            out.push((*s, m.clone()));
            if out.len() >= limit || bytes >= max_bytes {
                break;
            }
        }
        Ok(out)
    }
    fn count(&self, local: &str) -> Result<usize> {
        let q = self.offline.lock().map_err(poisoned)?;
        Ok(q.range((local.to_string(), 0)..=(local.to_string(), u64::MAX)).count())
    }
    fn usage(&self, local: &str) -> Result<QueueUsage> {
        let q = self.offline.lock().map_err(poisoned)?;
        let mut u = QueueUsage::default();
        for m in q.range((local.to_string(), 0)..=(local.to_string(), u64::MAX)).map(|(_, m)| QueuedMeta::of(m)) {
            u.add(&m.sender, m.bytes);
        }
        Ok(u)
    }
    fn clear(&self, local: &str) -> Result<Ticket> {
        self.offline.lock().map_err(poisoned)?.retain(|(l, _), _| l != local);
        Ok(self.ticket())
    }
    fn expire(&self, cutoff_ms: u64) -> Result<usize> {
        let mut q = self.offline.lock().map_err(poisoned)?;
        let before = q.len();
        q.retain(|_, m| m.ts_ms >= cutoff_ms);
        Ok(before - q.len())
    }
    fn last_seq(&self, local: &str) -> Result<u64> {
        Ok(self.seq_marks.lock().map_err(poisoned)?.get(local).copied().unwrap_or(0))
    }
}

impl RosterStore for MemoryStore {
    fn roster(&self, owner: &str) -> Result<Vec<RosterItem>> {
        Ok(self.roster.lock().map_err(poisoned)?.get(owner).map(|m| m.values().cloned().collect()).unwrap_or_default())
    }
    fn roster_item(&self, owner: &str, contact: &str) -> Result<Option<RosterItem>> {
        Ok(self.roster.lock().map_err(poisoned)?.get(owner).and_then(|m| m.get(contact).cloned()))
    }
    fn put_roster_item(&self, owner: &str, item: &RosterItem) -> Result<Ticket> {
        self.roster
            .lock()
            .map_err(poisoned)?
            .entry(owner.to_string())
            .or_default()
            .insert(item.jid.clone(), item.clone());
        Ok(self.ticket())
    }
    fn remove_roster_item(&self, owner: &str, contact: &str) -> Result<Ticket> {
        if let Some(m) = self.roster.lock().map_err(poisoned)?.get_mut(owner) {
            m.remove(contact);
        }
        Ok(self.ticket())
    }
    fn clear_roster(&self, owner: &str) -> Result<Ticket> {
        self.roster.lock().map_err(poisoned)?.remove(owner);
        Ok(self.ticket())
    }
}

impl SettingsStore for MemoryStore {
    fn get_setting(&self, owner: &str, name: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.settings.lock().map_err(poisoned)?.get(&(owner.to_string(), name.to_string())).cloned())
    }
    fn put_setting(&self, owner: &str, name: &str, value: &[u8]) -> Result<Ticket> {
        self.settings.lock().map_err(poisoned)?.insert((owner.to_string(), name.to_string()), value.to_vec());
        Ok(self.ticket())
    }
    fn clear_settings(&self, owner: &str) -> Result<Ticket> {
        self.settings.lock().map_err(poisoned)?.retain(|(o, _), _| o != owner);
        Ok(self.ticket())
    }
}

impl GroupStore for MemoryStore {
    fn get_group(&self, id: &str) -> Result<Option<Group>> {
        Ok(self.groups.lock().map_err(poisoned)?.get(id).cloned())
    }
    fn put_group(&self, group: &Group, _previous: Option<&Group>) -> Result<Ticket> {
        self.groups.lock().map_err(poisoned)?.insert(group.id.clone(), group.clone());
        Ok(self.ticket())
    }
    fn delete_group(&self, group: &Group) -> Result<Ticket> {
        self.groups.lock().map_err(poisoned)?.remove(&group.id);
        Ok(self.ticket())
    }
    fn groups_of(&self, local: &str) -> Result<Vec<String>> {
        Ok(self
            .groups
            .lock()
            .map_err(poisoned)?
            .values()
            .filter(|g| g.member(local).is_some())
            .map(|g| g.id.clone())
            .collect())
    }
}
