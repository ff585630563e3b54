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
//! The block list and the settings are cached in the account's registry
//! entry, so the message path checks them without touching storage. Only
//! accounts that exist get an entry: asking about any other name costs no
//! memory (it has the default policy and nothing is kept).

use std::collections::HashSet;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::c2s::session::Session;
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

/// The policy of `local`, cached in the registry for existing accounts.
/// A name that is not an account gets the default policy and leaves no
/// trace: anyone can make up names, so caching them would let strangers
/// grow the server's memory without bound.
pub fn policy(srv: &Server, local: &str) -> Arc<Policy> {
    if let Some(Some(p)) = srv.registry.peek(local, |e| e.policy.clone()) {
        return p;
    }
    if !srv.router.account_exists(local) {
        return Arc::new(Policy::default());
    }
    let loaded = Arc::new(load(srv, local));
    srv.registry.with(local, |e| e.policy.get_or_insert(loaded).clone())
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
    let p = Arc::new(p);
    srv.registry.with(local, |e| e.policy = Some(p));
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
    let online = srv.registry.sessions(&owner).iter().any(|h| h.available);
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
