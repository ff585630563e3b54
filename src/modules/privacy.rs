//! Who may see what: the block list (XEP-0191, see [`super::blocking`])
//! and the visibility setting for last seen and presence.
//!
//! The setting is one of `everyone`, `contacts`, `nobody` and governs both
//! "last seen" (XEP-0012) and presence broadcast:
//! - `everyone`: anyone may ask for last seen; presence goes to every
//!   approved subscriber;
//! - `contacts`: only accounts on the owner's roster (visible items);
//! - `nobody`: last-seen queries are refused and presence is only shared
//!   between the owner's own devices.
//!
//! A second setting, `groups`, says who may add the account to a group
//! (WhatsApp's "who can add me to groups"), with the same three values:
//! anyone else sends an XEP-0249 invitation the account may accept or
//! ignore (see [`super::groups`]).
//!
//! Clients read and change both with an iq in `urn:chatd:privacy:0`:
//! `<iq type='get'><privacy xmlns='urn:chatd:privacy:0'/></iq>` returns
//! `<privacy xmlns='urn:chatd:privacy:0' visibility='contacts' groups='everyone'/>`;
//! an iq of type `set` with the same element changes the attributes it
//! carries.
//!
//! The block list and the settings are cached per node in a
//! [`PolicyCache`], so the message path checks them without touching
//! storage. Only accounts that exist get an entry: asking about any other
//! name costs no memory (it has the default policy and nothing is kept),
//! and the cache forgets by generations, so it stays bounded however many
//! accounts write.

use std::collections::HashSet;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::session::Session;
use crate::hooks::{GET_SET, Hooks, IqTarget, Module};
use crate::protocol::stanza::{StanzaError, iq_result};
use crate::protocol::{Element, Jid};
use crate::server::Server;

pub const NS: &str = "urn:chatd:privacy:0";
pub const LAST: &str = "jabber:iq:last";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Visibility {
    #[default]
    Everyone,
    Contacts,
    Nobody,
}

impl Visibility {
    pub fn as_str(self) -> &'static str {
        match self {
            Visibility::Everyone => "everyone",
            Visibility::Contacts => "contacts",
            Visibility::Nobody => "nobody",
        }
    }
    fn parse(s: &str) -> Option<Visibility> {
        match s {
            "everyone" => Some(Visibility::Everyone),
            "contacts" => Some(Visibility::Contacts),
            "nobody" => Some(Visibility::Nobody),
            _ => None,
        }
    }
}

/// An account's block list and visibility, as cached.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// Bare JIDs (or domains) the account blocked.
    pub blocked: HashSet<String>,
    pub visibility: Visibility,
    /// Who may add the account to a group without an invitation.
    pub group_adds: Visibility,
}

impl Policy {
    /// Whether `jid` (bare) is blocked by this policy.
    pub fn blocks(&self, jid: &str) -> bool {
        if self.blocked.is_empty() {
            return false;
        }
        if self.blocked.contains(jid) {
            return true;
        }
        let domain = jid.rsplit('@').next().unwrap_or(jid);
        self.blocked.contains(domain)
    }
}

const BLOCKLIST: &str = "blocklist";
const VISIBILITY: &str = "visibility";
const GROUP_ADDS: &str = "group_adds";
pub const LAST_SEEN: &str = "last_seen";

fn load(srv: &Server, local: &str) -> Policy {
    let mut p = Policy::default();
    if let Ok(Some(v)) = srv.stores.settings.get_setting(local, BLOCKLIST)
        && let Ok(list) = serde_json::from_slice::<Vec<String>>(&v)
    {
        p.blocked = list.into_iter().collect();
    }
    if let Ok(Some(v)) = srv.stores.settings.get_setting(local, VISIBILITY)
        && let Ok(vis) = serde_json::from_slice::<Visibility>(&v)
    {
        p.visibility = vis;
    }
    if let Ok(Some(v)) = srv.stores.settings.get_setting(local, GROUP_ADDS)
        && let Ok(vis) = serde_json::from_slice::<Visibility>(&v)
    {
        p.group_adds = vis;
    }
    p
}

const CACHE_SHARDS: usize = 16;

/// Policies of recently seen accounts, on this node.
///
/// Each shard holds two generations of at most `capacity / CACHE_SHARDS`
/// entries; when the current one fills, the previous one is dropped. A
/// lookup that finds an entry in the previous generation moves it
/// forward, so accounts in use stay cached.
pub struct PolicyCache {
    shards: Vec<std::sync::Mutex<Generations>>,
    per_shard: usize,
    hasher: std::collections::hash_map::RandomState,
}

#[derive(Default)]
struct Generations {
    cur: std::collections::HashMap<String, Arc<Policy>>,
    prev: std::collections::HashMap<String, Arc<Policy>>,
}

impl PolicyCache {
    pub fn new(capacity: usize) -> PolicyCache {
        PolicyCache {
            shards: (0..CACHE_SHARDS).map(|_| Default::default()).collect(),
            per_shard: (capacity / CACHE_SHARDS).max(1),
            hasher: Default::default(),
        }
    }

    fn shard(&self, local: &str) -> std::sync::MutexGuard<'_, Generations> {
        use std::hash::BuildHasher;
        let i = (self.hasher.hash_one(local) as usize) % CACHE_SHARDS;
        match self.shards[i].lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn get(&self, local: &str) -> Option<Arc<Policy>> {
        let mut g = self.shard(local);
        if let Some(p) = g.cur.get(local) {
            return Some(p.clone());
        }
        let p = g.prev.remove(local)?;
        self.insert_locked(&mut g, local, p.clone());
        Some(p)
    }

    fn insert(&self, local: &str, p: Arc<Policy>) {
        let mut g = self.shard(local);
        g.prev.remove(local);
        self.insert_locked(&mut g, local, p);
    }

    fn insert_locked(&self, g: &mut Generations, local: &str, p: Arc<Policy>) {
        if g.cur.len() >= self.per_shard && !g.cur.contains_key(local) {
            g.prev = std::mem::take(&mut g.cur);
        }
        g.cur.insert(local.to_string(), p);
    }

    /// Forgets `local`'s policy (its settings were erased).
    pub fn forget(&self, local: &str) {
        let mut g = self.shard(local);
        g.cur.remove(local);
        g.prev.remove(local);
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        (0..CACHE_SHARDS)
            .map(|i| match self.shards[i].lock() {
                Ok(g) => g.cur.len() + g.prev.len(),
                Err(_) => 0,
            })
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The policy of `local`, cached for existing accounts.
/// A name that is not an account gets the default policy and leaves no
/// trace: anyone can make up names, so caching them would let strangers
/// grow the server's memory without bound.
pub fn policy(srv: &Server, local: &str) -> Arc<Policy> {
    if let Some(p) = srv.policies.get(local) {
        return p;
    }
    if !srv.router.account_exists(local) {
        return Arc::new(Policy::default());
    }
    let loaded = Arc::new(load(srv, local));
    srv.policies.insert(local, loaded.clone());
    loaded
}

/// Stores and caches a new policy.
pub fn save(srv: &Server, local: &str, p: Policy) {
    let mut list: Vec<&String> = p.blocked.iter().collect();
    list.sort();
    let r1 = srv.stores.settings.put_setting(local, BLOCKLIST, &serde_json::to_vec(&list).unwrap_or_default());
    let r2 = srv.stores.settings.put_setting(local, VISIBILITY, &serde_json::to_vec(&p.visibility).unwrap_or_default());
    let r3 = srv.stores.settings.put_setting(local, GROUP_ADDS, &serde_json::to_vec(&p.group_adds).unwrap_or_default());
    if let Err(e) = r1.and(r2).and(r3) {
        tracing::error!(account = local, error = %e, "saving privacy settings failed");
    }
    srv.policies.insert(local, Arc::new(p));
}

/// Whether either side blocked the other (`a`, `b` are localparts or bare
/// JIDs of this server's accounts).
pub fn blocked_between(srv: &Server, a_local: &str, b_local: &str) -> bool {
    let d = srv.domain();
    policy(srv, a_local).blocks(&format!("{b_local}@{d}")) || policy(srv, b_local).blocks(&format!("{a_local}@{d}"))
}

/// Whether `other` is a visible item of `owner`'s roster.
pub fn is_contact(srv: &Server, owner: &str, other: &str) -> bool {
    let bare = format!("{other}@{}", srv.domain());
    matches!(srv.stores.roster.roster_item(owner, &bare), Ok(Some(i)) if !i.hidden)
}

fn allows(srv: &Server, owner: &str, other: &str, setting: Visibility) -> bool {
    match setting {
        Visibility::Everyone => true,
        Visibility::Nobody => false,
        Visibility::Contacts => is_contact(srv, owner, other),
    }
}

/// Whether `viewer` may see `owner`'s last seen and presence.
pub fn may_see(srv: &Server, owner: &str, viewer: &str) -> bool {
    if owner == viewer {
        return true;
    }
    if blocked_between(srv, owner, viewer) {
        return false;
    }
    allows(srv, owner, viewer, policy(srv, owner).visibility)
}

/// Whether `adder` may put `owner` into a group without an invitation
/// (never when either blocked the other).
pub fn may_add_to_group(srv: &Server, owner: &str, adder: &str) -> bool {
    if owner == adder {
        return true;
    }
    if blocked_between(srv, owner, adder) {
        return false;
    }
    allows(srv, owner, adder, policy(srv, owner).group_adds)
}

/// `urn:chatd:privacy:0` get/set.
pub const MODULE: Module = Module { name: "privacy", specs: &["XEP-0012"], register };

fn register(h: &mut Hooks) {
    h.disco_feature(LAST);
    h.disco_feature(NS);
    h.iq_server(GET_SET, NS, "privacy", |s, r| handle_iq(s, r.iq, r.payload));
    h.iq(IqTarget::Account, GET_SET, LAST, "query", |s, r| handle_last(s, r.iq, r.to));
    // The settings themselves are erased with the account's other
    // settings; the cached copy goes here.
    h.account_erased(|_, srv, local| {
        if let Some(srv) = srv {
            srv.policies.forget(local);
        }
        Ok(0)
    });
}

pub fn handle_iq(s: &mut Session, iq: &Element, q: &Element) {
    let srv = s.srv.clone();
    match iq.attr("type") {
        Some("get") => {}
        Some("set") => {
            let parse = |name: &str| q.attr(name).map(|v| Visibility::parse(v).ok_or(()));
            let (vis, adds) = match (parse("visibility"), parse("groups")) {
                (None, None) | (Some(Err(())), _) | (_, Some(Err(()))) => {
                    s.reply_error(iq, StanzaError::BadRequest);
                    return;
                }
                (v, a) => (v.and_then(Result::ok), a.and_then(Result::ok)),
            };
            let mut p = (*policy(&srv, &s.local)).clone();
            if let Some(v) = vis {
                p.visibility = v;
            }
            if let Some(a) = adds {
                p.group_adds = a;
            }
            save(&srv, &s.local, p);
        }
        _ => {
            s.reply_error(iq, StanzaError::BadRequest);
            return;
        }
    }
    let p = policy(&srv, &s.local);
    let mut r = iq_result(iq);
    r.set_attr("to", s.jid.to_string());
    r.remove_attr("from");
    r.push(
        Element::new("privacy", NS)
            .with_attr("visibility", p.visibility.as_str())
            .with_attr("groups", p.group_adds.as_str()),
    );
    s.send(&r);
}

/// Records when an account's last session ended.
pub fn record_last_seen(srv: &Server, local: &str, ms: u64) {
    let _ = srv.stores.settings.put_setting(local, LAST_SEEN, &ms.to_be_bytes());
}

/// XEP-0012 Last Activity for another account's bare JID: seconds since
/// its last session ended, 0 while it is online; `forbidden` when the
/// owner's setting or a block hides it.
pub fn handle_last(s: &mut Session, iq: &Element, to: Option<&Jid>) {
    let srv = s.srv.clone();
    let Some(owner) = to.and_then(|j| j.local.clone()) else {
        s.reply_error(iq, StanzaError::ServiceUnavailable);
        return;
    };
    if iq.attr("type") != Some("get") || !srv.router.account_exists(&owner) {
        s.reply_error(iq, StanzaError::ServiceUnavailable);
        return;
    }
    if !may_see(&srv, &owner, &s.local) {
        s.reply_error(iq, StanzaError::Forbidden);
        return;
    }
    let online = srv.router.sessions(&owner).iter().any(|h| h.available);
    let seconds = if online {
        0
    } else {
        match srv.stores.settings.get_setting(&owner, LAST_SEEN) {
            Ok(Some(v)) if v.len() == 8 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&v);
                crate::accounts::now_ms().saturating_sub(u64::from_be_bytes(b)) / 1000
            }
            _ => {
                s.reply_error(iq, StanzaError::ItemNotFound);
                return;
            }
        }
    };
    let mut r = iq_result(iq);
    r.set_attr("to", s.jid.to_string());
    r.push(Element::new("query", LAST).with_attr("seconds", seconds.to_string()));
    s.send(&r);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// However many accounts are looked up, the cache holds at most two
    /// generations of its capacity, and an account in use stays cached.
    #[test]
    fn policy_cache_is_bounded_and_keeps_what_is_used() {
        let c = PolicyCache::new(64);
        c.insert("hot", Arc::new(Policy::default()));
        for i in 0..10_000 {
            c.insert(&format!("1555{i:07}"), Arc::new(Policy::default()));
            assert!(c.get("hot").is_some(), "an account in use is not forgotten");
        }
        assert!(c.len() <= 2 * 64 + CACHE_SHARDS, "{} entries for a capacity of 64", c.len());
        c.forget("hot");
        assert!(c.get("hot").is_none());
    }
}
