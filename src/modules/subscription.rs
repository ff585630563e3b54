//! RFC 6121 §3 presence subscriptions as pure state transitions.
//!
//! A subscription request or answer touches two roster items: the
//! sender's item for the other party (outbound processing, §3.x.1–2) and
//! the other party's item for the sender (inbound processing, §3.x.3).
//! Both are decided here from the item alone, following the tables of
//! RFC 6121 Appendix A and the pre-approval rules of §3.4, so the rules
//! can be read and tested without a server; [`super::presence`] applies
//! the result (storage, roster pushes, delivery, presence).
//!
//! The nine states of Appendix A map onto an item as
//! `subscription` (None/To/From/Both) plus `ask` ("Pending Out") and
//! `pending_in` ("Pending In"); `approved` is the §3.4 pre-approval.

use crate::storage::RosterItem;

/// The four subscription presence types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Subscribe,
    Subscribed,
    Unsubscribe,
    Unsubscribed,
}

impl Kind {
    pub fn parse(typ: &str) -> Option<Kind> {
        match typ {
            "subscribe" => Some(Kind::Subscribe),
            "subscribed" => Some(Kind::Subscribed),
            "unsubscribe" => Some(Kind::Unsubscribe),
            "unsubscribed" => Some(Kind::Unsubscribed),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Subscribe => "subscribe",
            Kind::Subscribed => "subscribed",
            Kind::Unsubscribe => "unsubscribe",
            Kind::Unsubscribed => "unsubscribed",
        }
    }
}

/// What the server does besides storing the new item.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Effects {
    /// The item changed: store it and push it to the owner's resources.
    pub save: bool,
    /// Outbound: pass the stanza on to the other party's server.
    /// Inbound: deliver it to the owner's resources.
    pub forward: bool,
    /// Inbound `subscribe` the owner already granted (or pre-approved):
    /// the owner's server answers `subscribed` itself, without asking.
    pub auto_subscribed: bool,
    /// The other party may now see the owner: send it the owner's
    /// current presence (§3.1.5, §3.4).
    pub send_presence: bool,
    /// The other party's view of the owner ended: send it unavailable
    /// from the owner's available resources (§3.2.2, §3.3.3).
    pub send_unavailable: bool,
}

/// The owner sends `kind` to the item's contact (Appendix A.2).
pub fn outbound(item: &RosterItem, kind: Kind) -> (RosterItem, Effects) {
    let mut n = item.clone();
    let mut fx = Effects::default();
    match kind {
        // A.2.1: always routed; "Pending Out" unless already subscribed.
        Kind::Subscribe => {
            fx.forward = true;
            if !n.subscription.has_to() {
                n.ask = true;
                n.hidden = false;
            }
        }
        // A.2.2: always routed; the owner's subscription and request end.
        Kind::Unsubscribe => {
            fx.forward = true;
            n.subscription = n.subscription.with_to(false);
            n.ask = false;
        }
        // A.2.3 and §3.4: approves a pending request, or pre-approves
        // one that has not arrived yet (never routed then).
        Kind::Subscribed if n.subscription.has_from() => {}
        Kind::Subscribed if n.pending_in => {
            fx.forward = true;
            fx.send_presence = true;
            n.pending_in = false;
            n.approved = false;
            n.hidden = false;
            n.subscription = n.subscription.with_from(true);
        }
        Kind::Subscribed => {
            n.approved = true;
            n.hidden = false;
        }
        // A.2.4 and §3.4: denies a request or cancels a subscription
        // (routed only then), and cancels any pre-approval.
        Kind::Unsubscribed => {
            fx.forward = n.subscription.has_from() || n.pending_in;
            fx.send_unavailable = n.subscription.has_from();
            n.subscription = n.subscription.with_from(false);
            n.pending_in = false;
            n.approved = false;
        }
    }
    fx.save = n != *item;
    (n, fx)
}

/// The item's contact sent `kind` to the owner (Appendix A.3).
pub fn inbound(item: &RosterItem, kind: Kind) -> (RosterItem, Effects) {
    let mut n = item.clone();
    let mut fx = Effects::default();
    match kind {
        // A.3.1 and §3.4: answered at once when already granted or
        // pre-approved; otherwise delivered once and kept as "Pending In".
        Kind::Subscribe => {
            if n.subscription.has_from() || n.approved {
                fx.auto_subscribed = true;
                fx.send_presence = true;
                n.subscription = n.subscription.with_from(true);
                n.approved = false;
                n.pending_in = false;
            } else if !n.pending_in {
                fx.forward = true;
                n.pending_in = true;
            }
        }
        // A.3.2: the contact no longer wants the owner's presence.
        Kind::Unsubscribe => {
            if n.subscription.has_from() || n.pending_in {
                fx.forward = true;
                fx.send_unavailable = n.subscription.has_from();
                n.subscription = n.subscription.with_from(false);
                n.pending_in = false;
            }
        }
        // A.3.3: only an answer to the owner's pending request counts.
        Kind::Subscribed => {
            if n.ask && !n.subscription.has_to() {
                fx.forward = true;
                n.ask = false;
                n.hidden = false;
                n.subscription = n.subscription.with_to(true);
            }
        }
        // A.3.4: the owner's subscription or request was refused.
        Kind::Unsubscribed => {
            if n.subscription.has_to() || n.ask {
                fx.forward = true;
                n.subscription = n.subscription.with_to(false);
                n.ask = false;
            }
        }
    }
    fx.save = n != *item;
    (n, fx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::Subscription;

    /// An Appendix A state by its RFC name ("+ Pre-Approved" is §3.4).
    fn state(name: &str) -> RosterItem {
        let mut it = RosterItem { jid: "15550000002@localhost".into(), ..Default::default() };
        let mut parts = name.split(" + ");
        it.subscription = match parts.next() {
            Some("None") => Subscription::None,
            Some("To") => Subscription::To,
            Some("From") => Subscription::From,
            Some("Both") => Subscription::Both,
            other => panic!("bad state {other:?}"),
        };
        for p in parts {
            match p {
                "Pending Out" => it.ask = true,
                "Pending In" => it.pending_in = true,
                "Pending Out+In" => {
                    it.ask = true;
                    it.pending_in = true;
                }
                "Pre-Approved" => it.approved = true,
                other => panic!("bad flag {other:?}"),
            }
        }
        it
    }

    fn name(it: &RosterItem) -> String {
        let base = match it.subscription {
            Subscription::None => "None",
            Subscription::To => "To",
            Subscription::From => "From",
            Subscription::Both => "Both",
        };
        let mut s = base.to_string();
        match (it.ask, it.pending_in) {
            (true, true) => s.push_str(" + Pending Out+In"),
            (true, false) => s.push_str(" + Pending Out"),
            (false, true) => s.push_str(" + Pending In"),
            (false, false) => {}
        }
        if it.approved {
            s.push_str(" + Pre-Approved");
        }
        s
    }

    /// `(existing state, routed or delivered?, new state)`, one table of
    /// RFC 6121 Appendix A each; "-" is "no state change".
    type Table = &'static [(&'static str, bool, &'static str)];

    fn check(dir: &str, kind: Kind, table: Table, f: fn(&RosterItem, Kind) -> (RosterItem, Effects)) {
        for &(from, forward, to) in table {
            let before = state(from);
            let (after, fx) = f(&before, kind);
            let want = if to == "-" { from } else { to };
            assert_eq!(name(&after), want, "{dir} {} in {from}: new state", kind.as_str());
            assert_eq!(fx.forward, forward, "{dir} {} in {from}: routed/delivered", kind.as_str());
            assert_eq!(fx.save, to != "-", "{dir} {} in {from}: saved only when changed", kind.as_str());
        }
    }

    const NINE: [&str; 9] = [
        "None",
        "None + Pending Out",
        "None + Pending In",
        "None + Pending Out+In",
        "To",
        "To + Pending In",
        "From",
        "From + Pending Out",
        "Both",
    ];

    /// Each table lists every one of the nine states.
    fn complete(table: Table) {
        let mut states: Vec<&str> = table.iter().map(|r| r.0).filter(|s| !s.contains("Pre-Approved")).collect();
        states.sort();
        let mut all = NINE.to_vec();
        all.sort();
        assert_eq!(states, all);
    }

    // A.2.1
    const OUT_SUBSCRIBE: Table = &[
        ("None", true, "None + Pending Out"),
        ("None + Pending Out", true, "-"),
        ("None + Pending In", true, "None + Pending Out+In"),
        ("None + Pending Out+In", true, "-"),
        ("To", true, "-"),
        ("To + Pending In", true, "-"),
        ("From", true, "From + Pending Out"),
        ("From + Pending Out", true, "-"),
        ("Both", true, "-"),
    ];
    // A.2.2
    const OUT_UNSUBSCRIBE: Table = &[
        ("None", true, "-"),
        ("None + Pending Out", true, "None"),
        ("None + Pending In", true, "-"),
        ("None + Pending Out+In", true, "None + Pending In"),
        ("To", true, "None"),
        ("To + Pending In", true, "None + Pending In"),
        ("From", true, "-"),
        ("From + Pending Out", true, "From"),
        ("Both", true, "From"),
    ];
    // A.2.3, with §3.4 pre-approval where nothing is pending.
    const OUT_SUBSCRIBED: Table = &[
        ("None", false, "None + Pre-Approved"),
        ("None + Pending Out", false, "None + Pending Out + Pre-Approved"),
        ("None + Pending In", true, "From"),
        ("None + Pending Out+In", true, "From + Pending Out"),
        ("To", false, "To + Pre-Approved"),
        ("To + Pending In", true, "Both"),
        ("From", false, "-"),
        ("From + Pending Out", false, "-"),
        ("Both", false, "-"),
        ("None + Pre-Approved", false, "-"),
    ];
    // A.2.4, and §3.4: unsubscribed cancels a pre-approval.
    const OUT_UNSUBSCRIBED: Table = &[
        ("None", false, "-"),
        ("None + Pending Out", false, "-"),
        ("None + Pending In", true, "None"),
        ("None + Pending Out+In", true, "None + Pending Out"),
        ("To", false, "-"),
        ("To + Pending In", true, "To"),
        ("From", true, "None"),
        ("From + Pending Out", true, "None + Pending Out"),
        ("Both", true, "To"),
        ("None + Pre-Approved", false, "None"),
        ("To + Pre-Approved", false, "To"),
    ];
    // A.3.1, and §3.4: a pre-approved request is granted at once.
    const IN_SUBSCRIBE: Table = &[
        ("None", true, "None + Pending In"),
        ("None + Pending Out", true, "None + Pending Out+In"),
        ("None + Pending In", false, "-"),
        ("None + Pending Out+In", false, "-"),
        ("To", true, "To + Pending In"),
        ("To + Pending In", false, "-"),
        ("From", false, "-"),
        ("From + Pending Out", false, "-"),
        ("Both", false, "-"),
        ("None + Pre-Approved", false, "From"),
        ("None + Pending Out + Pre-Approved", false, "From + Pending Out"),
        ("To + Pre-Approved", false, "Both"),
    ];
    // A.3.2
    const IN_UNSUBSCRIBE: Table = &[
        ("None", false, "-"),
        ("None + Pending Out", false, "-"),
        ("None + Pending In", true, "None"),
        ("None + Pending Out+In", true, "None + Pending Out"),
        ("To", false, "-"),
        ("To + Pending In", true, "To"),
        ("From", true, "None"),
        ("From + Pending Out", true, "None + Pending Out"),
        ("Both", true, "To"),
    ];
    // A.3.3
    const IN_SUBSCRIBED: Table = &[
        ("None", false, "-"),
        ("None + Pending Out", true, "To"),
        ("None + Pending In", false, "-"),
        ("None + Pending Out+In", true, "To + Pending In"),
        ("To", false, "-"),
        ("To + Pending In", false, "-"),
        ("From", false, "-"),
        ("From + Pending Out", true, "Both"),
        ("Both", false, "-"),
    ];
    // A.3.4
    const IN_UNSUBSCRIBED: Table = &[
        ("None", false, "-"),
        ("None + Pending Out", true, "None"),
        ("None + Pending In", false, "-"),
        ("None + Pending Out+In", true, "None + Pending In"),
        ("To", true, "None"),
        ("To + Pending In", true, "None + Pending In"),
        ("From", false, "-"),
        ("From + Pending Out", true, "From"),
        ("Both", true, "From"),
    ];

    #[test]
    fn outbound_follows_appendix_a2() {
        for (kind, table) in [
            (Kind::Subscribe, OUT_SUBSCRIBE),
            (Kind::Unsubscribe, OUT_UNSUBSCRIBE),
            (Kind::Subscribed, OUT_SUBSCRIBED),
            (Kind::Unsubscribed, OUT_UNSUBSCRIBED),
        ] {
            complete(table);
            check("outbound", kind, table, outbound);
        }
    }

    #[test]
    fn inbound_follows_appendix_a3() {
        for (kind, table) in [
            (Kind::Subscribe, IN_SUBSCRIBE),
            (Kind::Unsubscribe, IN_UNSUBSCRIBE),
            (Kind::Subscribed, IN_SUBSCRIBED),
            (Kind::Unsubscribed, IN_UNSUBSCRIBED),
        ] {
            complete(table);
            check("inbound", kind, table, inbound);
        }
    }

    /// §3.1.3: a request the owner already granted or pre-approved is
    /// answered by the server, and the requester gets the owner's presence.
    #[test]
    fn granted_requests_are_answered_by_the_server() {
        for s in ["From", "From + Pending Out", "Both", "None + Pre-Approved", "To + Pre-Approved"] {
            let (_, fx) = inbound(&state(s), Kind::Subscribe);
            assert!(fx.auto_subscribed && fx.send_presence, "{s}");
        }
        for s in ["None", "None + Pending In", "To", "To + Pending In"] {
            let (_, fx) = inbound(&state(s), Kind::Subscribe);
            assert!(!fx.auto_subscribed && !fx.send_presence, "{s}");
        }
    }

    /// Presence follows the subscription: it starts when the owner
    /// approves, and stops (unavailable) exactly when a `from` ends.
    #[test]
    fn presence_follows_the_from_half() {
        assert!(outbound(&state("None + Pending In"), Kind::Subscribed).1.send_presence);
        assert!(!outbound(&state("None"), Kind::Subscribed).1.send_presence, "a pre-approval shares nothing");
        for s in NINE {
            let had_from = state(s).subscription.has_from();
            assert_eq!(outbound(&state(s), Kind::Unsubscribed).1.send_unavailable, had_from, "outbound in {s}");
            assert_eq!(inbound(&state(s), Kind::Unsubscribe).1.send_unavailable, had_from, "inbound in {s}");
            for k in [Kind::Subscribe, Kind::Unsubscribe, Kind::Subscribed] {
                assert!(!outbound(&state(s), k).1.send_unavailable, "outbound {} in {s}", k.as_str());
            }
        }
    }

    /// Items that only carry a stranger's request stay out of roster
    /// gets until the owner acts on them; the owner's own acts make them
    /// visible.
    #[test]
    fn hidden_items_become_visible_when_the_owner_acts() {
        let hidden = RosterItem { jid: "x@localhost".into(), hidden: true, ..Default::default() };
        let (pending, _) = inbound(&hidden, Kind::Subscribe);
        assert!(pending.hidden && pending.pending_in);
        assert!(!outbound(&pending, Kind::Subscribed).0.hidden);
        assert!(!outbound(&hidden, Kind::Subscribe).0.hidden);
        assert!(!outbound(&hidden, Kind::Subscribed).0.hidden, "a pre-approval is the owner's act");
        let (denied, fx) = outbound(&pending, Kind::Unsubscribed);
        assert!(denied.hidden && fx.forward && fx.save, "a denied request leaves an empty hidden item");
    }

    /// Two local accounts keep mirrored items: whatever sequence of
    /// requests and answers, A's `to`/`ask` equals B's `from`/`pending_in`.
    #[test]
    fn both_sides_stay_mirrored() {
        let kinds = [Kind::Subscribe, Kind::Subscribed, Kind::Unsubscribe, Kind::Unsubscribed];
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let (mut a, mut b) = (RosterItem::default(), RosterItem::default());
        for step in 0..5000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let kind = kinds[(x % 4) as usize];
            let (sender, receiver) = if x & 8 == 0 { (&mut a, &mut b) } else { (&mut b, &mut a) };
            let (s2, out) = outbound(sender, kind);
            *sender = s2;
            if out.forward {
                let (r2, inn) = inbound(receiver, kind);
                *receiver = r2;
                if inn.auto_subscribed {
                    let (s3, _) = inbound(sender, Kind::Subscribed);
                    *sender = s3;
                }
            }
            assert_eq!(a.subscription.has_to(), b.subscription.has_from(), "step {step}: a.to vs b.from");
            assert_eq!(b.subscription.has_to(), a.subscription.has_from(), "step {step}: b.to vs a.from");
            assert_eq!(a.ask && !a.subscription.has_to(), b.pending_in, "step {step}: a.ask vs b.pending_in");
            assert_eq!(b.ask && !b.subscription.has_to(), a.pending_in, "step {step}: b.ask vs a.pending_in");
        }
    }
}
