//! Storage conformance: the same cases run against every engine.
//!
//! The feature code only sees the storage traits, so an engine is correct
//! when it is indistinguishable from the others through them. Each case
//! below is written once and instantiated for the in-memory store and for
//! fjall (in a fresh directory); model tests then drive both engines with
//! the same random operation sequences (queues; accounts, rosters,
//! settings and groups) and compare every answer, and a persistent engine
//! must keep what it made durable across a reopen. A new engine joins by
//! adding one line to `engines!`; the cluster engine (`on_nats`) runs
//! every case on a nats-server of its own.

use std::path::PathBuf;
use std::time::Duration;

use chatd::storage::{
    Group, GroupMember, GroupRole, QueuedMeta, RosterItem, ScramKeys, StoredMessage, Stores, Subscription, Ticket,
    UserRecord,
};

/// A data directory removed when the test ends.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("chatd-conf-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An engine under test, and what keeps it alive.
struct Engine {
    stores: Stores,
    _dir: Option<TempDir>,
    /// Declared last: the server outlives the stores' shutdown.
    _nats: Option<chatd::cluster::testing::LocalNats>,
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stores.durability.shutdown();
    }
}

fn memory(_: &str) -> Engine {
    Engine { stores: Stores::memory(), _dir: None, _nats: None }
}

fn fjall(name: &str) -> Engine {
    let dir = TempDir::new(name);
    let stores = Stores::open_fjall(&dir.0).expect("open fjall");
    Engine { stores, _dir: Some(dir), _nats: None }
}

/// The cluster engine on a nats-server of its own (one replica), or
/// `None` with the reason printed when the nats-server binary is missing
/// (`scripts/test.sh` installs it and sets `NATS_SERVER_BIN`). With
/// `CHATD_CI=1` a missing binary fails the case instead.
fn nats(name: &str) -> Option<Engine> {
    let Some(bin) = chatd::cluster::testing::nats_server_bin() else {
        assert!(
            std::env::var("CHATD_CI").as_deref() != Ok("1"),
            "CHATD_CI=1 and no nats-server: set NATS_SERVER_BIN or run scripts/test.sh"
        );
        eprintln!("skipping the NATS case {name}: no nats-server (set NATS_SERVER_BIN, or run scripts/test.sh)");
        return None;
    };
    let server = chatd::cluster::testing::LocalNats::start(&bin).expect("start nats-server");
    let stores = Stores::open_nats(&server.cluster_config(name)).expect("open the cluster store");
    Some(Engine { stores, _dir: None, _nats: Some(server) })
}

/// Instantiates every case for every engine: `case_engine`.
macro_rules! engines {
    ($($case:ident),* $(,)?) => {
        mod on_memory { $(#[test] fn $case() { super::$case(super::memory(stringify!($case))); })* }
        mod on_fjall { $(#[test] fn $case() { super::$case(super::fjall(stringify!($case))); })* }
        mod on_nats { $(#[test] fn $case() { if let Some(e) = super::nats(stringify!($case)) { super::$case(e) } })* }
    };
}

engines!(
    users_round_trip,
    users_bulk_and_listing,
    queue_order_and_ranges,
    queue_byte_bound_returns_at_least_one,
    queue_remove_reports_what_existed,
    queue_usage_per_sender,
    queue_clear_keeps_sequence_mark,
    queue_expiry,
    names_that_prefix_each_other_stay_apart,
    roster_items,
    settings_documents,
    groups_and_index,
    groups_index_follows_every_change,
    every_ticket_becomes_durable,
);

fn record(generation: u32) -> UserRecord {
    let keys =
        |n: usize| ScramKeys { salt: vec![1; 16], iterations: 4096, stored_key: vec![2; n], server_key: vec![3; n] };
    UserRecord { sha1: keys(20), sha256: keys(32), created_ms: 7, key_generation: generation }
}

fn msg(ts: u64, from: &str, body: &str) -> StoredMessage {
    StoredMessage { ts_ms: ts, xml: format!("<message from='{from}/r' to='x@localhost'><body>{body}</body></message>") }
}

fn seqs(v: &[(u64, StoredMessage)]) -> Vec<u64> {
    v.iter().map(|(s, _)| *s).collect()
}

fn wait(s: &Stores, t: Ticket) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut rx = s.durability.committed();
        tokio::time::timeout(Duration::from_secs(10), chatd::storage::wait_durable(&mut rx, t))
            .await
            .expect("ticket durable within 10 s")
            .expect("engine running");
    });
}

fn users_round_trip(e: Engine) {
    let u = &e.stores.users;
    assert_eq!(u.get_user("15550000001").unwrap(), None);
    assert!(!u.has_user("15550000001").unwrap());
    u.put_user("15550000001", &record(1)).unwrap();
    assert_eq!(u.get_user("15550000001").unwrap(), Some(record(1)));
    assert!(u.has_user("15550000001").unwrap());
    u.put_user("15550000001", &record(2)).unwrap();
    assert_eq!(u.get_user("15550000001").unwrap().unwrap().key_generation, 2, "a put replaces");
    u.delete_user("15550000001").unwrap();
    assert_eq!(u.get_user("15550000001").unwrap(), None);
    assert!(!u.has_user("15550000001").unwrap());
    u.delete_user("15550000001").unwrap();
}

fn users_bulk_and_listing(e: Engine) {
    let u = &e.stores.users;
    let recs: Vec<(String, UserRecord)> = [3, 1, 2].iter().map(|i| (format!("1555000000{i}"), record(*i))).collect();
    u.put_users(&recs).unwrap();
    u.put_user("1555", &record(9)).unwrap();
    assert_eq!(u.list_users().unwrap(), vec!["1555", "15550000001", "15550000002", "15550000003"], "sorted by name");
    assert_eq!(u.get_user("15550000003").unwrap(), Some(record(3)));
}

fn queue_order_and_ranges(e: Engine) {
    let q = &e.stores.offline;
    let m: Vec<StoredMessage> = (1..=6).map(|i| msg(i, "a@localhost", &i.to_string())).collect();
    // Pushed out of order, in two batches and for two accounts at once.
    q.push(&[("100", 5, &m[4]), ("100", 2, &m[1]), ("200", 3, &m[2])]).unwrap();
    q.push(&[("100", 9, &m[5]), ("100", 4, &m[3])]).unwrap();
    assert_eq!(seqs(&q.list("100", 0, u64::MAX, 100, usize::MAX).unwrap()), vec![2, 4, 5, 9]);
    assert_eq!(q.list("100", 0, u64::MAX, 100, usize::MAX).unwrap()[0].1, m[1], "stored as given");
    assert_eq!(seqs(&q.list("100", 2, 5, 100, usize::MAX).unwrap()), vec![4, 5], "after < seq <= upto");
    assert_eq!(seqs(&q.list("100", 0, u64::MAX, 2, usize::MAX).unwrap()), vec![2, 4], "limit");
    assert!(q.list("100", 5, 5, 100, usize::MAX).unwrap().is_empty());
    assert!(q.list("100", 9, 2, 100, usize::MAX).unwrap().is_empty());
    assert_eq!(q.count("100").unwrap(), 4);
    assert_eq!(q.count("200").unwrap(), 1);
    assert_eq!(q.count("300").unwrap(), 0);
    assert_eq!(q.last_seq("100").unwrap(), 9);
    assert_eq!(q.last_seq("200").unwrap(), 3);
    assert_eq!(q.last_seq("300").unwrap(), 0);
}

fn queue_byte_bound_returns_at_least_one(e: Engine) {
    let q = &e.stores.offline;
    let big = msg(1, "a@localhost", &"x".repeat(1000));
    let small = msg(2, "a@localhost", "y");
    q.push(&[("100", 1, &big), ("100", 2, &small), ("100", 3, &small)]).unwrap();
    assert_eq!(seqs(&q.list("100", 0, u64::MAX, 100, 1).unwrap()), vec![1], "the first is always read");
    let two = big.xml.len() + small.xml.len();
    assert_eq!(seqs(&q.list("100", 0, u64::MAX, 100, two).unwrap()), vec![1, 2], "stops once the bound is reached");
    assert_eq!(seqs(&q.list("100", 0, u64::MAX, 100, two + 1).unwrap()), vec![1, 2, 3]);
}

fn queue_remove_reports_what_existed(e: Engine) {
    let q = &e.stores.offline;
    let a = msg(1, "a@localhost", "one");
    let b = msg(2, "g@groups.localhost", "two");
    q.push(&[("100", 1, &a), ("100", 2, &b)]).unwrap();
    let (_, gone) = q.remove("100", &[2, 7]).unwrap();
    assert_eq!(gone, vec![QueuedMeta { sender: "g@groups.localhost".into(), bytes: b.xml.len() }]);
    let (_, gone) = q.remove("100", &[2]).unwrap();
    assert!(gone.is_empty(), "a second acknowledgement deletes nothing");
    let (_, gone) = q.remove("200", &[1]).unwrap();
    assert!(gone.is_empty(), "another account's number");
    assert_eq!(seqs(&q.list("100", 0, u64::MAX, 10, usize::MAX).unwrap()), vec![1]);
    let (_, gone) = q.remove("100", &[1, 1]).unwrap();
    assert_eq!(gone.len(), 1, "a number named twice is one message");
    assert!(q.remove("100", &[]).unwrap().1.is_empty());
}

fn queue_usage_per_sender(e: Engine) {
    let q = &e.stores.offline;
    let (a1, a2, b1) = (msg(1, "a@localhost", "1"), msg(2, "a@localhost", "22"), msg(3, "b@localhost", "333"));
    q.push(&[("100", 1, &a1), ("100", 2, &a2), ("100", 3, &b1), ("200", 1, &b1)]).unwrap();
    let u = q.usage("100").unwrap();
    assert_eq!(u.count, 3);
    assert_eq!(u.bytes, a1.xml.len() + a2.xml.len() + b1.xml.len());
    assert_eq!(u.of_sender("a@localhost"), (2, a1.xml.len() + a2.xml.len()));
    assert_eq!(u.of_sender("b@localhost"), (1, b1.xml.len()));
    assert_eq!(u.of_sender("c@localhost"), (0, 0));
    // What `remove` reports keeps a cached usage exact.
    let mut cached = u.clone();
    for m in q.remove("100", &[2]).unwrap().1 {
        cached.sub(&m);
    }
    assert_eq!(cached, q.usage("100").unwrap());
}

fn queue_clear_keeps_sequence_mark(e: Engine) {
    let q = &e.stores.offline;
    let m = msg(1, "a@localhost", "x");
    q.push(&[("100", 41, &m), ("100", 42, &m), ("200", 7, &m)]).unwrap();
    q.clear("100").unwrap();
    assert_eq!(q.count("100").unwrap(), 0);
    assert_eq!(q.last_seq("100").unwrap(), 42, "numbers are never reused");
    q.remove("200", &[7]).unwrap();
    assert_eq!(q.last_seq("200").unwrap(), 7);
    assert_eq!(q.count("200").unwrap(), 0);
}

fn queue_expiry(e: Engine) {
    let q = &e.stores.offline;
    q.push(&[
        ("100", 1, &msg(10, "a@localhost", "old")),
        ("100", 2, &msg(20, "a@localhost", "edge")),
        ("200", 1, &msg(5, "a@localhost", "old")),
        ("200", 2, &msg(30, "a@localhost", "new")),
    ])
    .unwrap();
    assert_eq!(q.expire(20).unwrap(), 2, "strictly before the cutoff");
    assert_eq!(seqs(&q.list("100", 0, u64::MAX, 10, usize::MAX).unwrap()), vec![2]);
    assert_eq!(seqs(&q.list("200", 0, u64::MAX, 10, usize::MAX).unwrap()), vec![2]);
    assert_eq!(q.expire(20).unwrap(), 0);
    assert_eq!(q.last_seq("100").unwrap(), 2);
}

/// Account names are digits, so one is often a prefix of another: no
/// engine may let "1555" see or delete "15551"'s data.
fn names_that_prefix_each_other_stay_apart(e: Engine) {
    let s = &e.stores;
    let m = msg(1, "a@localhost", "x");
    s.offline.push(&[("1555", 1, &m), ("15551", 1, &m), ("15551", 2, &m)]).unwrap();
    assert_eq!(s.offline.count("1555").unwrap(), 1);
    assert_eq!(seqs(&s.offline.list("1555", 0, u64::MAX, 10, usize::MAX).unwrap()), vec![1]);
    assert_eq!(s.offline.usage("1555").unwrap().count, 1);
    s.offline.clear("1555").unwrap();
    assert_eq!(s.offline.count("15551").unwrap(), 2);
    assert_eq!(s.offline.last_seq("1555").unwrap(), 1);
    assert_eq!(s.offline.last_seq("15551").unwrap(), 2);

    let item = |jid: &str| RosterItem { jid: jid.into(), ..Default::default() };
    s.roster.put_roster_item("1555", &item("9@localhost")).unwrap();
    s.roster.put_roster_item("15551", &item("8@localhost")).unwrap();
    assert_eq!(s.roster.roster("1555").unwrap(), vec![item("9@localhost")]);
    s.roster.clear_roster("1555").unwrap();
    assert_eq!(s.roster.roster("15551").unwrap(), vec![item("8@localhost")]);

    s.settings.put_setting("1555", "a", b"1").unwrap();
    s.settings.put_setting("15551", "a", b"2").unwrap();
    s.settings.put_setting("1555", "1a", b"3").unwrap();
    s.settings.clear_settings("1555").unwrap();
    assert_eq!(s.settings.get_setting("15551", "a").unwrap().as_deref(), Some(&b"2"[..]));
    assert_eq!(s.settings.get_setting("1555", "1a").unwrap(), None);

    let g = group("gx", &["1555"]);
    s.groups.put_group(&g, None).unwrap();
    assert_eq!(s.groups.groups_of("1555").unwrap(), vec!["gx"]);
    assert!(s.groups.groups_of("15551").unwrap().is_empty());
    assert!(s.groups.groups_of("155").unwrap().is_empty());
}

fn roster_items(e: Engine) {
    let r = &e.stores.roster;
    assert!(r.roster("100").unwrap().is_empty());
    let b = RosterItem {
        jid: "b@localhost".into(),
        name: Some("Bea".into()),
        subscription: Subscription::Both,
        groups: vec!["friends".into()],
        ..Default::default()
    };
    let a = RosterItem { jid: "a@localhost".into(), ask: true, pending_in: true, hidden: true, ..Default::default() };
    r.put_roster_item("100", &b).unwrap();
    r.put_roster_item("100", &a).unwrap();
    assert_eq!(r.roster("100").unwrap(), vec![a.clone(), b.clone()], "every field, ordered by contact");
    assert_eq!(r.roster_item("100", "b@localhost").unwrap(), Some(b.clone()));
    assert_eq!(r.roster_item("100", "c@localhost").unwrap(), None);
    let b2 = RosterItem { subscription: Subscription::From, approved: true, ..b.clone() };
    r.put_roster_item("100", &b2).unwrap();
    assert_eq!(r.roster_item("100", "b@localhost").unwrap(), Some(b2));
    r.remove_roster_item("100", "a@localhost").unwrap();
    r.remove_roster_item("100", "zz@localhost").unwrap();
    assert_eq!(r.roster("100").unwrap().len(), 1);
    r.clear_roster("100").unwrap();
    assert!(r.roster("100").unwrap().is_empty());
}

fn settings_documents(e: Engine) {
    let s = &e.stores.settings;
    assert_eq!(s.get_setting("100", "blocklist").unwrap(), None);
    s.put_setting("100", "blocklist", b"one").unwrap();
    s.put_setting("100", "blocklist", b"two").unwrap();
    s.put_setting("100", "empty", b"").unwrap();
    assert_eq!(s.get_setting("100", "blocklist").unwrap().as_deref(), Some(&b"two"[..]));
    assert_eq!(s.get_setting("100", "empty").unwrap().as_deref(), Some(&b""[..]), "empty is not absent");
    s.put_setting("100", "blocklistx", b"other").unwrap();
    s.put_setting("1000", "blocklist", b"another owner").unwrap();
    assert_eq!(s.get_setting("100", "blocklistx").unwrap().as_deref(), Some(&b"other"[..]), "a longer name is apart");
    s.clear_settings("100").unwrap();
    assert_eq!(s.get_setting("100", "blocklist").unwrap(), None, "cleared");
    assert_eq!(
        s.get_setting("1000", "blocklist").unwrap().as_deref(),
        Some(&b"another owner"[..]),
        "an owner whose name the cleared one prefixes keeps its settings"
    );
    assert_eq!(s.get_setting("100", "blocklistx").unwrap(), None);
    assert_eq!(s.get_setting("100", "empty").unwrap(), None);
}

fn group(id: &str, members: &[&str]) -> Group {
    Group {
        id: id.into(),
        subject: "s".into(),
        description: String::new(),
        created_ms: 1,
        members: members
            .iter()
            .enumerate()
            .map(|(i, m)| GroupMember {
                local: m.to_string(),
                role: if i == 0 { GroupRole::Admin } else { GroupRole::Member },
            })
            .collect(),
        invited: vec![],
    }
}

fn groups_and_index(e: Engine) {
    let g = &e.stores.groups;
    assert_eq!(g.get_group("g1").unwrap(), None);
    let g1 = group("g1", &["100", "200", "300"]);
    let g2 = group("g2", &["200"]);
    g.put_group(&g1, None).unwrap();
    g.put_group(&g2, None).unwrap();
    assert_eq!(g.get_group("g1").unwrap(), Some(g1.clone()));
    assert_eq!(g.groups_of("200").unwrap(), vec!["g1", "g2"]);
    // 300 leaves, 400 joins, an invitation is recorded.
    let mut g1b = group("g1", &["100", "200", "400"]);
    g1b.invited = vec!["500".into()];
    g.put_group(&g1b, Some(&g1)).unwrap();
    assert_eq!(g.get_group("g1").unwrap(), Some(g1b.clone()));
    assert!(g.groups_of("300").unwrap().is_empty(), "a member who left is out of the index");
    assert_eq!(g.groups_of("400").unwrap(), vec!["g1"]);
    assert!(g.groups_of("500").unwrap().is_empty(), "an invitation is not membership");
    g.delete_group(&g1b).unwrap();
    assert_eq!(g.get_group("g1").unwrap(), None);
    assert_eq!(g.groups_of("200").unwrap(), vec!["g2"]);
    assert!(g.groups_of("100").unwrap().is_empty());
}

/// Membership changes of every kind keep `groups_of` exact: members
/// joining and leaving in one write, a member in several groups, a group
/// deleted with members still in it, an id reused after deletion.
fn groups_index_follows_every_change(e: Engine) {
    let g = &e.stores.groups;
    let a = group("ga", &["100", "200"]);
    let b = group("gb", &["200", "300"]);
    g.put_group(&a, None).unwrap();
    g.put_group(&b, None).unwrap();
    let a2 = group("ga", &["300", "200"]);
    g.put_group(&a2, Some(&a)).unwrap();
    assert!(g.groups_of("100").unwrap().is_empty());
    assert_eq!(g.groups_of("300").unwrap(), vec!["ga", "gb"], "ids in order");
    let b2 = Group { subject: "renamed".into(), ..b.clone() };
    g.put_group(&b2, Some(&b)).unwrap();
    assert_eq!(g.get_group("gb").unwrap().unwrap().subject, "renamed");
    assert_eq!(g.groups_of("200").unwrap(), vec!["ga", "gb"], "a rewrite with the same members keeps them");
    g.delete_group(&a2).unwrap();
    assert_eq!(g.groups_of("300").unwrap(), vec!["gb"]);
    let again = group("ga", &["100"]);
    g.put_group(&again, None).unwrap();
    assert_eq!(g.groups_of("100").unwrap(), vec!["ga"]);
    assert_eq!(g.groups_of("200").unwrap(), vec!["gb"], "nothing of the deleted group comes back");
}

fn every_ticket_becomes_durable(e: Engine) {
    let s = &e.stores;
    let m = msg(1, "a@localhost", "x");
    let mut last = 0;
    let tickets = [
        s.users.put_user("100", &record(1)).unwrap(),
        s.offline.push(&[("100", 1, &m)]).unwrap(),
        s.roster.put_roster_item("100", &RosterItem { jid: "b@localhost".into(), ..Default::default() }).unwrap(),
        s.settings.put_setting("100", "k", b"v").unwrap(),
        s.groups.put_group(&group("g", &["100"]), None).unwrap(),
        s.offline.remove("100", &[1]).unwrap().0,
        s.users.delete_user("100").unwrap(),
    ];
    for t in tickets {
        assert!(t >= last, "tickets follow the write order: {t} after {last}");
        last = t;
    }
    wait(s, last);
    assert!(*s.durability.committed().borrow() >= last);
}

/// A small deterministic generator, so a failure replays exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn engines_agree_on_random_operations() {
    queues_agree(memory("model"), fjall("model"), 3000);
}

/// The cluster engine against the model, shorter: its queue reads are
/// round trips to the stream leader.
#[test]
fn nats_agrees_on_random_operations() {
    if let Some(n) = nats("model") {
        queues_agree(memory("model-n"), n, 800);
    }
}

/// Both engines get the same `steps` random operations over accounts
/// whose names prefix each other; every answer must be the same.
fn queues_agree(a: Engine, b: Engine, steps: u64) {
    let (ma, mb) = (&a.stores, &b.stores);
    let names = ["1555", "15551", "155512", "2"];
    let senders = ["a@localhost", "b@localhost", "g@groups.localhost"];
    let mut next_seq = [0u64; 4];
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    for step in 0..steps {
        let who = rng.below(names.len() as u64) as usize;
        let local = names[who];
        match rng.below(10) {
            0..=3 => {
                let n = 1 + rng.below(3);
                let mut batch = Vec::new();
                for _ in 0..n {
                    next_seq[who] += 1 + rng.below(2);
                    let from = senders[rng.below(3) as usize];
                    let body = "m".repeat(rng.below(40) as usize);
                    batch.push((next_seq[who], msg(step, from, &body)));
                }
                let items: Vec<(&str, u64, &StoredMessage)> = batch.iter().map(|(s, m)| (local, *s, m)).collect();
                ma.offline.push(&items).unwrap();
                mb.offline.push(&items).unwrap();
            }
            4 | 5 => {
                let top = next_seq[who] + 2;
                let del: Vec<u64> = (0..1 + rng.below(4)).map(|_| rng.below(top + 1)).collect();
                // Which messages were deleted matters, not the order they are reported in.
                let gone = |s: &Stores| {
                    let mut v: Vec<(String, usize)> =
                        s.offline.remove(local, &del).unwrap().1.into_iter().map(|m| (m.sender, m.bytes)).collect();
                    v.sort();
                    v
                };
                assert_eq!(gone(ma), gone(mb), "step {step}: remove {del:?}");
            }
            6 => {
                let (after, upto) = (rng.below(next_seq[who] + 2), rng.below(next_seq[who] + 3));
                let (limit, bytes) = (1 + rng.below(6) as usize, 1 + rng.below(400) as usize);
                assert_eq!(
                    ma.offline.list(local, after, upto, limit, bytes).unwrap(),
                    mb.offline.list(local, after, upto, limit, bytes).unwrap(),
                    "step {step}"
                );
            }
            7 => {
                assert_eq!(ma.offline.usage(local).unwrap(), mb.offline.usage(local).unwrap(), "step {step}");
                assert_eq!(ma.offline.count(local).unwrap(), mb.offline.count(local).unwrap(), "step {step}");
            }
            8 => {
                if rng.below(8) == 0 {
                    ma.offline.clear(local).unwrap();
                    mb.offline.clear(local).unwrap();
                } else {
                    let cutoff = rng.below(step + 1);
                    assert_eq!(ma.offline.expire(cutoff).unwrap(), mb.offline.expire(cutoff).unwrap(), "step {step}");
                }
            }
            _ => {
                assert_eq!(ma.offline.last_seq(local).unwrap(), mb.offline.last_seq(local).unwrap(), "step {step}");
            }
        }
    }
    for local in names {
        assert_eq!(
            ma.offline.list(local, 0, u64::MAX, usize::MAX, usize::MAX).unwrap(),
            mb.offline.list(local, 0, u64::MAX, usize::MAX, usize::MAX).unwrap()
        );
        assert_eq!(ma.offline.last_seq(local).unwrap(), mb.offline.last_seq(local).unwrap());
    }
}

#[test]
fn engines_agree_on_accounts_rosters_settings_and_groups() {
    records_agree(memory("model2"), fjall("model2"), 3000);
}

#[test]
fn nats_agrees_on_accounts_rosters_settings_and_groups() {
    if let Some(n) = nats("model2") {
        records_agree(memory("model2-n"), n, 3000);
    }
}

/// Both engines get the same random writes to accounts, rosters,
/// settings and groups (names and contacts that prefix each other, groups
/// changing membership); every read must agree.
fn records_agree(a: Engine, b: Engine, steps: u64) {
    let (ma, mb) = (&a.stores, &b.stores);
    let names = ["1555", "15551", "155512", "2"];
    let contacts = ["1@localhost", "1@localhost.x", "12@localhost", "g@groups.localhost"];
    let settings = ["a", "ab", "b"];
    let subs = [Subscription::None, Subscription::To, Subscription::From, Subscription::Both];
    // The current version of each group, so every write names its predecessor.
    let mut groups: std::collections::BTreeMap<String, Group> = Default::default();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for step in 0..steps {
        let local = names[rng.below(names.len() as u64) as usize];
        let contact = contacts[rng.below(contacts.len() as u64) as usize];
        match rng.below(12) {
            0 => {
                let r = record(rng.below(3) as u32);
                ma.users.put_user(local, &r).unwrap();
                mb.users.put_user(local, &r).unwrap();
            }
            1 => {
                ma.users.delete_user(local).unwrap();
                mb.users.delete_user(local).unwrap();
            }
            2 => {
                let item = RosterItem {
                    jid: contact.into(),
                    name: (rng.below(2) == 0).then(|| format!("n{step}")),
                    subscription: subs[rng.below(4) as usize],
                    ask: rng.below(2) == 0,
                    pending_in: rng.below(2) == 0,
                    approved: rng.below(2) == 0,
                    groups: (0..rng.below(3)).map(|i| format!("grp{i}")).collect(),
                    hidden: rng.below(4) == 0,
                };
                ma.roster.put_roster_item(local, &item).unwrap();
                mb.roster.put_roster_item(local, &item).unwrap();
            }
            3 => {
                if rng.below(6) == 0 {
                    ma.roster.clear_roster(local).unwrap();
                    mb.roster.clear_roster(local).unwrap();
                } else {
                    ma.roster.remove_roster_item(local, contact).unwrap();
                    mb.roster.remove_roster_item(local, contact).unwrap();
                }
            }
            4 => {
                let (name, value) = (settings[rng.below(3) as usize], format!("v{step}"));
                ma.settings.put_setting(local, name, value.as_bytes()).unwrap();
                mb.settings.put_setting(local, name, value.as_bytes()).unwrap();
            }
            5 => {
                if rng.below(3) == 0 {
                    ma.settings.clear_settings(local).unwrap();
                    mb.settings.clear_settings(local).unwrap();
                }
            }
            6 | 7 => {
                let id = format!("g{}", rng.below(4));
                let members: Vec<&str> = names.iter().copied().filter(|_| rng.below(2) == 0).collect();
                let mut g = group(&id, &members);
                g.subject = format!("s{step}");
                let prev = groups.get(&id).cloned();
                ma.groups.put_group(&g, prev.as_ref()).unwrap();
                mb.groups.put_group(&g, prev.as_ref()).unwrap();
                groups.insert(id, g);
            }
            8 => {
                let id = format!("g{}", rng.below(4));
                if let Some(g) = groups.remove(&id) {
                    ma.groups.delete_group(&g).unwrap();
                    mb.groups.delete_group(&g).unwrap();
                }
            }
            _ => {
                assert_eq!(ma.users.get_user(local).unwrap(), mb.users.get_user(local).unwrap(), "step {step}");
                assert_eq!(ma.users.has_user(local).unwrap(), mb.users.has_user(local).unwrap(), "step {step}");
                assert_eq!(ma.users.list_users().unwrap(), mb.users.list_users().unwrap(), "step {step}");
                assert_eq!(ma.roster.roster(local).unwrap(), mb.roster.roster(local).unwrap(), "step {step}");
                assert_eq!(
                    ma.roster.roster_item(local, contact).unwrap(),
                    mb.roster.roster_item(local, contact).unwrap(),
                    "step {step}"
                );
                for n in settings {
                    assert_eq!(ma.settings.get_setting(local, n).unwrap(), mb.settings.get_setting(local, n).unwrap());
                }
                assert_eq!(ma.groups.groups_of(local).unwrap(), mb.groups.groups_of(local).unwrap(), "step {step}");
                for id in ["g0", "g1", "g2", "g3"] {
                    assert_eq!(ma.groups.get_group(id).unwrap(), mb.groups.get_group(id).unwrap(), "step {step}");
                }
            }
        }
    }
    for local in names {
        assert_eq!(ma.roster.roster(local).unwrap(), mb.roster.roster(local).unwrap());
        assert_eq!(ma.groups.groups_of(local).unwrap(), mb.groups.groups_of(local).unwrap());
        let want: Vec<String> = groups.values().filter(|g| g.member(local).is_some()).map(|g| g.id.clone()).collect();
        assert_eq!(mb.groups.groups_of(local).unwrap(), want, "the index matches the groups themselves");
    }
}

/// What a persistent engine made durable is there after a clean
/// shutdown and a new open: every store, and the sequence marks of
/// emptied queues (numbers are never reused across restarts).
#[test]
fn fjall_keeps_durable_writes_across_reopen() {
    let dir = TempDir::new("reopen");
    let m = msg(5, "a@localhost", "kept");
    let item =
        RosterItem { jid: "b@localhost".into(), subscription: Subscription::To, ask: true, ..Default::default() };
    {
        let s = Stores::open_fjall(&dir.0).unwrap();
        s.users.put_user("100", &record(4)).unwrap();
        s.offline.push(&[("100", 7, &m), ("200", 3, &m)]).unwrap();
        s.offline.clear("200").unwrap();
        s.roster.put_roster_item("100", &item).unwrap();
        s.settings.put_setting("100", "k", b"v").unwrap();
        s.settings.put_setting("200", "gone", b"x").unwrap();
        s.settings.clear_settings("200").unwrap();
        let t = s.groups.put_group(&group("g", &["100", "200"]), None).unwrap();
        wait(&s, t);
        s.durability.shutdown();
    }
    let s = Stores::open_fjall(&dir.0).unwrap();
    assert_eq!(s.users.get_user("100").unwrap(), Some(record(4)));
    assert_eq!(s.offline.list("100", 0, u64::MAX, 10, usize::MAX).unwrap(), vec![(7, m)]);
    assert_eq!(s.offline.count("200").unwrap(), 0);
    assert_eq!(s.offline.last_seq("200").unwrap(), 3, "the mark of an emptied queue survives");
    assert_eq!(s.offline.usage("100").unwrap().of_sender("a@localhost").0, 1);
    assert_eq!(s.roster.roster("100").unwrap(), vec![item]);
    assert_eq!(s.settings.get_setting("100", "k").unwrap().as_deref(), Some(&b"v"[..]));
    assert_eq!(s.settings.get_setting("200", "gone").unwrap(), None);
    assert_eq!(s.groups.groups_of("200").unwrap(), vec!["g"]);
    // Tickets of the new process become durable too.
    let t = s.settings.put_setting("100", "k", b"w").unwrap();
    wait(&s, t);
    s.durability.shutdown();
}
