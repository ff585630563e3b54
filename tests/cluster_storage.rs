//! The cluster storage beyond the per-engine conformance cases: two nodes
//! on one NATS, a reopen, an unreachable NATS, and `chatd user …` on a
//! cluster. Each test starts a nats-server of its own; without the binary
//! they are skipped with the reason printed, unless `CHATD_CI=1`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use chatd::cluster::testing::{LocalNats, nats_server_bin};
use chatd::storage::{Group, GroupMember, GroupRole, RosterItem, ScramKeys, Stores, Ticket, UserRecord};

fn server(test: &str) -> Option<LocalNats> {
    let Some(bin) = nats_server_bin() else {
        assert!(std::env::var("CHATD_CI").as_deref() != Ok("1"), "CHATD_CI=1 and no nats-server (NATS_SERVER_BIN)");
        eprintln!("skipping {test}: no nats-server (set NATS_SERVER_BIN, or run scripts/test.sh)");
        return None;
    };
    Some(LocalNats::start(&bin).expect("start nats-server"))
}

fn record(generation: u32) -> UserRecord {
    let keys =
        |n: usize| ScramKeys { salt: vec![1; 16], iterations: 4096, stored_key: vec![2; n], server_key: vec![3; n] };
    UserRecord { sha1: keys(20), sha256: keys(32), created_ms: 7, key_generation: generation }
}

fn group(id: &str, members: &[&str]) -> Group {
    Group {
        id: id.into(),
        subject: "s".into(),
        description: String::new(),
        created_ms: 1,
        members: members.iter().map(|m| GroupMember { local: m.to_string(), role: GroupRole::Member }).collect(),
        invited: vec![],
    }
}

fn wait(s: &Stores, t: Ticket) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut rx = s.durability.committed();
        tokio::time::timeout(Duration::from_secs(10), chatd::storage::wait_durable(&mut rx, t))
            .await
            .expect("durable within 10 s")
            .expect("engine running");
    });
}

/// Polls `f` until it holds, for at most 5 s.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within 5 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn two_nodes_see_each_others_writes() {
    let Some(nats) = server("two_nodes_see_each_others_writes") else { return };
    let a = Stores::open_nats(&nats.cluster_config("a")).unwrap();
    let b = Stores::open_nats(&nats.cluster_config("b")).unwrap();
    a.users.put_user("100", &record(1)).unwrap();
    assert_eq!(a.users.get_user("100").unwrap(), Some(record(1)), "a node reads its own write at once");
    eventually("b sees a's account", || b.users.get_user("100").unwrap() == Some(record(1)));
    b.users.put_user("100", &record(2)).unwrap();
    eventually("a sees b's later write", || a.users.get_user("100").unwrap() == Some(record(2)));

    let item = RosterItem { jid: "200@localhost".into(), ..Default::default() };
    a.roster.put_roster_item("100", &item).unwrap();
    b.roster.put_roster_item("100", &RosterItem { jid: "300@localhost".into(), ..Default::default() }).unwrap();
    for n in [&a, &b] {
        eventually("both contacts, written on two nodes, on both", || n.roster.roster("100").unwrap().len() == 2);
    }
    a.settings.put_setting("100", "urn:xmpp:avatar:data", b"img").unwrap();
    eventually("settings", || b.settings.get_setting("100", "urn:xmpp:avatar:data").unwrap().is_some());

    a.groups.put_group(&group("g1", &["100", "200"]), None).unwrap();
    eventually("b's member index", || b.groups.groups_of("200").unwrap() == vec!["g1"]);
    b.groups.delete_group(&group("g1", &["100", "200"])).unwrap();
    eventually("a's index after b deleted the group", || a.groups.groups_of("100").unwrap().is_empty());

    let m = chatd::storage::StoredMessage { ts_ms: 1, xml: "<message from='9@localhost/r'/>".into() };
    let t = a.offline.push(&[("100", 1, &m)]).unwrap();
    wait(&a, t);
    assert_eq!(b.offline.count("100").unwrap(), 1, "a durable push is in the stream every node reads");
    let (_, gone_b) = b.offline.remove("100", &[1]).unwrap();
    let (_, gone_a) = a.offline.remove("100", &[1]).unwrap();
    assert_eq!(gone_b.len() + gone_a.len(), 1, "one message is reported deleted once across nodes");

    b.users.delete_user("100").unwrap();
    eventually("a sees the delete", || !a.users.has_user("100").unwrap());
    a.durability.shutdown();
    b.durability.shutdown();
}

/// A write NATS never acknowledges is never reported durable: the store
/// stops, its waiters learn it, later writes fail.
#[test]
fn a_write_nats_never_acknowledges_stops_the_store() {
    let Some(nats) = server("a_write_nats_never_acknowledges_stops_the_store") else { return };
    let s = chatd::cluster::open_with_ack_timeout(&nats.cluster_config("n1"), Duration::from_secs(2)).unwrap();
    let t = s.users.put_user("1", &record(1)).unwrap();
    wait(&s, t);
    drop(nats);
    let t = s.users.put_user("2", &record(2)).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let outcome = rt.block_on(async {
        let mut rx = s.durability.committed();
        tokio::time::timeout(Duration::from_secs(10), chatd::storage::wait_durable(&mut rx, t)).await
    });
    assert!(matches!(outcome, Ok(Err(_))), "the waiter is told the store stopped: {outcome:?}");
    assert!(*s.durability.committed().borrow() < t, "the watermark never passed the unacknowledged write");
    let err = s.users.put_user("3", &record(3)).unwrap_err().to_string();
    assert!(err.contains("stopped"), "{err}");
    assert_eq!(s.users.get_user("1").unwrap(), Some(record(1)), "reads go on from the mirror");
}

/// A server that crashes and comes back within the ack timeout: the
/// write made while it was down is resent, becomes durable, and a fresh
/// node reads it.
#[test]
fn a_write_is_resent_until_nats_is_back() {
    let Some(mut nats) = server("a_write_is_resent_until_nats_is_back") else { return };
    let cfg = nats.cluster_config("n1");
    let s = chatd::cluster::open_with_ack_timeout(&cfg, Duration::from_secs(15)).unwrap();
    let t = s.users.put_user("1", &record(1)).unwrap();
    wait(&s, t);
    nats.kill();
    let t = s.users.put_user("2", &record(2)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(*s.durability.committed().borrow() < t, "not durable while NATS is down");
    nats.restart().unwrap();
    wait(&s, t);
    s.durability.shutdown();
    let fresh = Stores::open_nats(&cfg).unwrap();
    assert_eq!(fresh.users.list_users().unwrap(), vec!["1", "2"]);
    fresh.durability.shutdown();
}

/// The stores are called from tokio workers: nothing in them may need a
/// runtime of the caller's or block one by entering it.
#[test]
fn stores_work_from_tokio_workers() {
    let Some(nats) = server("stores_work_from_tokio_workers") else { return };
    let s = Stores::open_nats(&nats.cluster_config("n1")).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let s2 = s.clone();
    let n = rt.block_on(async move {
        tokio::spawn(async move {
            let m = chatd::storage::StoredMessage { ts_ms: 1, xml: "<message/>".into() };
            let t = s2.offline.push(&[("1", 1, &m)]).unwrap();
            let mut rx = s2.durability.committed();
            chatd::storage::wait_durable(&mut rx, t).await.unwrap();
            s2.users.put_user("1", &record(1)).unwrap();
            (s2.offline.count("1").unwrap(), s2.users.has_user("1").unwrap())
        })
        .await
        .unwrap()
    });
    assert_eq!(n, (1, true));
    s.durability.shutdown();
}

/// Two devices acknowledging the same messages at once, through two
/// nodes: each message is reported deleted exactly once, so each node's
/// cached queue usage stays exact.
#[test]
fn concurrent_acks_report_each_message_once() {
    let Some(nats) = server("concurrent_acks_report_each_message_once") else { return };
    let a = Stores::open_nats(&nats.cluster_config("a")).unwrap();
    let b = Stores::open_nats(&nats.cluster_config("b")).unwrap();
    let m = chatd::storage::StoredMessage { ts_ms: 1, xml: "<message from='9@localhost/r'/>".into() };
    let items: Vec<(&str, u64, &chatd::storage::StoredMessage)> = (1..=20).map(|s| ("100", s, &m)).collect();
    let t = a.offline.push(&items).unwrap();
    wait(&a, t);
    let reported: usize = std::thread::scope(|sc| {
        let hs: Vec<_> = [&a, &b, &a]
            .into_iter()
            .map(|n| sc.spawn(move || (1..=20).map(|s| n.offline.remove("100", &[s]).unwrap().1.len()).sum::<usize>()))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).sum()
    });
    assert_eq!(reported, 20);
    assert_eq!(a.offline.count("100").unwrap(), 0);
    a.durability.shutdown();
    b.durability.shutdown();
}

#[test]
fn a_reopened_node_loads_what_was_written() {
    let Some(nats) = server("a_reopened_node_loads_what_was_written") else { return };
    let cfg = nats.cluster_config("n1");
    {
        let s = Stores::open_nats(&cfg).unwrap();
        s.users.put_users(&[("1".into(), record(1)), ("2".into(), record(2))]).unwrap();
        s.users.delete_user("2").unwrap();
        s.roster.put_roster_item("1", &RosterItem { jid: "2@localhost".into(), ..Default::default() }).unwrap();
        s.settings.put_setting("1", "k", b"").unwrap();
        let t = s.groups.put_group(&group("g", &["1"]), None).unwrap();
        wait(&s, t);
        s.durability.shutdown();
        assert!(s.users.put_user("3", &record(3)).is_err(), "a stopped store refuses writes");
    }
    let s = Stores::open_nats(&cfg).unwrap();
    assert_eq!(s.users.list_users().unwrap(), vec!["1"], "the delete marker is loaded too");
    assert_eq!(s.roster.roster("1").unwrap().len(), 1);
    assert_eq!(s.settings.get_setting("1", "k").unwrap().as_deref(), Some(&b""[..]), "an empty value is not absent");
    assert_eq!(s.groups.groups_of("1").unwrap(), vec!["g"]);
    s.durability.shutdown();
}

#[test]
fn an_unreachable_nats_is_a_clear_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cfg = chatd::config::Cluster {
        node_id: "n1".into(),
        nats_urls: vec![format!("nats://127.0.0.1:{port}")],
        replicas: 1,
        partitions: 1,
        credentials: String::new(),
        tls_ca: String::new(),
    };
    let started = Instant::now();
    let err = Stores::open_nats(&cfg).err().expect("nothing listens there");
    let text = err.to_string();
    assert!(text.contains("cannot reach NATS") && text.contains(&port.to_string()), "{text}");
    assert!(started.elapsed() < Duration::from_secs(15), "fails fast");
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn chatd(config: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_chatd"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env("CHATD_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run chatd")
}

fn ok(out: &std::process::Output) -> String {
    assert!(out.status.success(), "chatd failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn chatd_user_works_on_the_cluster() {
    let Some(nats) = server("chatd_user_works_on_the_cluster") else { return };
    let dir = TempDir(std::env::temp_dir().join(format!("chatd-cluster-cli-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let data = dir.0.join("data");
    let config = dir.0.join("node.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {data:?}\n[auth]\nscram_iterations = 4096\n[cluster]\nnode_id = \"cli\"\n\
             nats_urls = [\"{}\"]\nreplicas = 1\npartitions = 2\n",
            nats.url()
        ),
    )
    .unwrap();
    // A node of the cluster, watching what the CLI does.
    let node = Stores::open_nats(&nats.cluster_config("node")).unwrap();

    ok(&chatd(&config, &["user", "add", "+1 555 000 0001", "--password", "pw1"]));
    let dup = chatd(&config, &["user", "add", "+15550000001", "--password", "x"]);
    assert!(!dup.status.success() && String::from_utf8_lossy(&dup.stderr).contains("already exists"));
    eventually("the node sees the new account", || node.users.has_user("15550000001").unwrap());
    let first = node.users.get_user("15550000001").unwrap().unwrap();

    ok(&chatd(&config, &["user", "passwd", "+15550000001", "--password", "pw2"]));
    eventually("the new key", || node.users.get_user("15550000001").unwrap().is_some_and(|r| r != first));

    let csv = dir.0.join("users.csv");
    std::fs::write(&csv, "phone,password\n+15550000002,a\n+15550000003,b\n").unwrap();
    assert!(ok(&chatd(&config, &["user", "import", csv.to_str().unwrap()])).contains("imported 2"));
    let listed = ok(&chatd(&config, &["user", "list"]));
    assert_eq!(
        listed.lines().collect::<Vec<_>>(),
        vec!["15550000001@localhost", "15550000002@localhost", "15550000003@localhost"]
    );

    node.roster
        .put_roster_item("15550000002", &RosterItem { jid: "x@localhost".into(), ..Default::default() })
        .unwrap();
    let t = node.settings.put_setting("15550000002", "blocklist", b"1").unwrap();
    wait(&node, t);
    ok(&chatd(&config, &["user", "del", "+15550000002"]));
    eventually("the account and its data are gone on the node", || {
        !node.users.has_user("15550000002").unwrap()
            && node.roster.roster("15550000002").unwrap().is_empty()
            && node.settings.get_setting("15550000002", "blocklist").unwrap().is_none()
    });
    assert!(!chatd(&config, &["user", "del", "+15550000002"]).status.success(), "no such account");
    assert!(!data.exists(), "no local store is created on a cluster");

    let serve = chatd(&config, &["serve"]);
    assert!(!serve.status.success());
    assert!(String::from_utf8_lossy(&serve.stderr).contains("[cluster]"), "serve says why it refuses");
    node.durability.shutdown();
}

/// put_user → durable latency, printed. Against `CLUSTER_BENCH_URLS`
/// (comma-separated, replicas 3; e.g. from `scripts/cluster.sh up`) or a
/// local one-server NATS. Run with `--ignored --nocapture`.
#[test]
#[ignore]
fn durable_latency() {
    let local;
    let cfg = match std::env::var("CLUSTER_BENCH_URLS") {
        Ok(urls) => chatd::config::Cluster {
            node_id: "bench".into(),
            nats_urls: urls.split(',').map(str::to_string).collect(),
            replicas: 3,
            partitions: 32,
            credentials: String::new(),
            tls_ca: String::new(),
        },
        Err(_) => {
            let Some(n) = server("durable_latency") else { return };
            local = n;
            local.cluster_config("bench")
        }
    };
    let s = Stores::open_nats(&cfg).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut lat = Vec::new();
    for i in 0..500u32 {
        let started = Instant::now();
        let t = s.users.put_user(&format!("bench{}", i % 50), &record(i)).unwrap();
        rt.block_on(async {
            let mut rx = s.durability.committed();
            chatd::storage::wait_durable(&mut rx, t).await.unwrap();
        });
        lat.push(started.elapsed());
    }
    lat.sort();
    let pct = |p: usize| lat[lat.len() * p / 100].as_secs_f64() * 1000.0;
    println!("put_user → durable over {} servers: p50 {:.2} ms, p99 {:.2} ms", cfg.nats_urls.len(), pct(50), pct(99));
    assert!(pct(50) > 0.0);
    s.durability.shutdown();
}
