//! Who may do what in a group, decided from the asker's standing alone,
//! and how an account an admin names comes in.
//!
//! Keeping these rules pure lets them be read as one table and tested
//! without a server; [`super`] applies them to the management iqs.

use crate::protocol::stanza::StanzaError;
use crate::storage::{Group, GroupRole};

/// The asker's relation to a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    Outsider,
    /// Not a member, with a pending invitation.
    Invited,
    Member,
    Admin,
}

impl Standing {
    pub fn of(g: &Group, local: &str) -> Standing {
        match g.member(local) {
            Some(m) if m.role == GroupRole::Admin => Standing::Admin,
            Some(_) => Standing::Member,
            None if g.invited.iter().any(|l| l == local) => Standing::Invited,
            None => Standing::Outsider,
        }
    }
}

/// Whether an iq of type `typ` asking for `op` (the element's name in
/// the groups namespace) may go ahead, or the error it gets.
///
/// Outsiders learn nothing about a group (not even whether an operation
/// exists); an invitation only allows accepting or declining it; members
/// read the group and may leave it; only admins change it.
pub fn may(standing: Standing, typ: &str, op: &str) -> Result<(), StanzaError> {
    use Standing::*;
    match (standing, typ, op) {
        (Invited, "set", "join" | "decline") => Ok(()),
        (Outsider | Invited, _, _) => Err(StanzaError::Forbidden),
        (Member | Admin, "get", "info") => Ok(()),
        (Member | Admin, "set", "leave") => Ok(()),
        (Member, "set", _) => Err(StanzaError::Forbidden),
        (Admin, "set", "subject" | "description" | "add" | "remove" | "promote" | "demote") => Ok(()),
        (Admin, "set", _) => Err(StanzaError::FeatureNotImplemented),
        _ => Err(StanzaError::BadRequest),
    }
}

/// What an admin's `add` (or a creation) does with one named account.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Nothing: the admin itself, a member already, or blocked either
    /// way (the admin is answered as for an invitation, so a block is
    /// not revealed, and the blocked side hears nothing).
    Skip,
    /// Added at once: its "who can add me to groups" setting allows it.
    Direct,
    /// Invited, to become a member only by accepting.
    Invite,
}

/// `blocked` (either way) and `allows_adder` (the named account's
/// setting) are asked only when the answer matters: each reads settings.
pub fn admission(
    is_adder: bool,
    is_member: bool,
    blocked: impl FnOnce() -> bool,
    allows_adder: impl FnOnce() -> bool,
) -> Admission {
    if is_adder || is_member || blocked() {
        Admission::Skip
    } else if allows_adder() {
        Admission::Direct
    } else {
        Admission::Invite
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Standing::*;
    use StanzaError::*;

    const OPS: [&str; 11] = [
        "info",
        "join",
        "decline",
        "leave",
        "subject",
        "description",
        "add",
        "remove",
        "promote",
        "demote",
        "frobnicate",
    ];

    /// Every standing × type × operation; `ok` lists what is allowed and
    /// `else` the error for the rest.
    #[test]
    fn permission_table() {
        let table: [(Standing, &str, &[&str], StanzaError); 8] = [
            (Outsider, "get", &[], Forbidden),
            (Outsider, "set", &[], Forbidden),
            (Invited, "get", &[], Forbidden),
            (Invited, "set", &["join", "decline"], Forbidden),
            (Member, "get", &["info"], BadRequest),
            (Member, "set", &["leave"], Forbidden),
            (Admin, "get", &["info"], BadRequest),
            (
                Admin,
                "set",
                &["leave", "subject", "description", "add", "remove", "promote", "demote"],
                FeatureNotImplemented,
            ),
        ];
        for (standing, typ, ok, err) in table {
            for op in OPS {
                let want = if ok.contains(&op) { Ok(()) } else { Err(err) };
                assert_eq!(may(standing, typ, op), want, "{standing:?} {typ} {op}");
            }
        }
        for standing in [Member, Admin] {
            assert_eq!(may(standing, "", "leave"), Err(BadRequest), "an iq without a type");
        }
    }

    #[test]
    fn admission_table() {
        // (is_adder, is_member, blocked, allows_adder) → admission
        let table = [
            ((true, false, false, true), Admission::Skip),
            ((false, true, false, true), Admission::Skip),
            ((false, false, true, true), Admission::Skip),
            ((false, false, true, false), Admission::Skip),
            ((false, false, false, true), Admission::Direct),
            ((false, false, false, false), Admission::Invite),
        ];
        for ((a, m, b, y), want) in table {
            assert_eq!(admission(a, m, || b, || y), want, "adder={a} member={m} blocked={b} allows={y}");
        }
        // Settings are not read for the admin itself or a member.
        let unread = || -> bool { panic!("setting read") };
        assert_eq!(admission(true, false, unread, unread), Admission::Skip);
        assert_eq!(admission(false, true, unread, unread), Admission::Skip);
        assert_eq!(admission(false, false, || true, unread), Admission::Skip);
    }

    #[test]
    fn standing_of_an_account() {
        let g = Group {
            id: "g".into(),
            subject: "s".into(),
            description: String::new(),
            created_ms: 0,
            members: vec![
                crate::storage::GroupMember { local: "1".into(), role: GroupRole::Admin },
                crate::storage::GroupMember { local: "2".into(), role: GroupRole::Member },
            ],
            invited: vec!["3".into()],
        };
        assert_eq!(["1", "2", "3", "4"].map(|l| Standing::of(&g, l)), [Admin, Member, Invited, Outsider]);
    }
}
