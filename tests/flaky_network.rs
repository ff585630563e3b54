//! Flaky-network test: clients message each other while their TCP
//! connections are cut at random points (mid-stanza, right after sending,
//! right after an ack), and the server is killed with SIGKILL and
//! restarted in the middle. Clients reconnect, some resuming their
//! XEP-0198 session and some logging in fresh.
//!
//! Asserted: every message the server acknowledged to its sender reaches
//! its recipient, in per-sender order; the application sees each message
//! once (clients drop redeliveries by the sender's message id, as real
//! clients do). Wire-level redeliveries are counted and printed.
//!
//! Size via env: `FLAKY_CLIENTS` (default 24), `FLAKY_MESSAGES` per
//! client (default 40), `FLAKY_KILL` (default 1: one kill -9 mid-run).

mod common;

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Write;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chatd::protocol::{Element, Frame, ns};
use common::{Client, Read};
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d)
}

struct Server {
    child: Child,
    port: u16,
}

fn start_server(dir: &std::path::Path, cfg: &std::path::Path) -> Server {
    let (child, port, _) = common::spawn(dir, cfg);
    Server { child, port }
}

/// What the whole run observed.
#[derive(Default)]
struct Ledger {
    /// (sender, recipient, seq) acknowledged by the server to the sender.
    acked: HashSet<(usize, usize, u64)>,
    /// Per recipient: (sender, seq) in order of first delivery.
    delivered: HashMap<usize, Vec<(usize, u64)>>,
    seen: HashSet<(usize, usize, u64)>,
    wire_redeliveries: u64,
    sent: u64,
}

#[derive(Clone)]
struct Out {
    /// Recipient and seq for messages; None for presence.
    msg: Option<(usize, u64)>,
    xml: String,
}

/// Client state that survives reconnects.
struct ClientState {
    idx: usize,
    next_seq: u64,
    to_send: u64,
    /// Stanzas sent in the current SM session, not yet acked by the server.
    unacked: VecDeque<Out>,
    /// Server's last h for us.
    server_h: u32,
    sm_id: Option<String>,
    /// Stanzas we received in the current SM session.
    inbound: u32,
}

fn local(i: usize) -> String {
    format!("1555{:07}", i)
}

fn msg_xml(from: usize, to: usize, seq: u64) -> String {
    format!("<message type='chat' id='m{from}-{seq}' to='{}@localhost'><body>{from}:{seq}</body></message>", local(to))
}

enum Cut {
    None,
    /// Drop after this many milliseconds.
    After(u64),
}

/// Negotiates up to a bound (or resumed) session. Returns the server's
/// `h` when the session was resumed.
async fn login(c: &mut Client, st: &mut ClientState, try_resume: bool) -> Option<Option<u32>> {
    c.open().await?;
    c.plain(&local(st.idx), &format!("pw{}", st.idx)).await?;
    if try_resume && let Some(id) = st.sm_id.clone() {
        let e = c.resume(&id, st.inbound).await?;
        if e.local_name() == "resumed" {
            let h: u32 = e.attr("h")?.parse().ok()?;
            return Some(Some(h));
        }
    }
    c.bind(&local(st.idx), "dev").await?;
    let e = c.enable_sm(true).await?;
    st.sm_id = e.attr("id").map(str::to_string);
    st.inbound = 0;
    st.server_h = 0;
    Some(None)
}

/// One connection's life. Returns when the connection ends (cut, error,
/// or all done and drained).
async fn session(
    port: u16,
    st: &mut ClientState,
    ledger: &Arc<Mutex<Ledger>>,
    n_clients: usize,
    cut: Cut,
    try_resume: bool,
    stop_at: Instant,
) {
    let Some(mut c) = Client::try_connect(port).await else {
        tokio::time::sleep(Duration::from_millis(50)).await;
        return;
    };
    let Some(resumed) = login(&mut c, st, try_resume).await else { return };
    let mut rng = rand::rngs::StdRng::from_entropy();
    let mut wbuf = String::new();
    if let Some(h) = resumed {
        // Drop what the server says it handled, re-send the rest.
        ack_to(st, h, ledger);
        for o in st.unacked.iter() {
            wbuf.push_str(&o.xml);
        }
    } else {
        // A fresh session: unacked messages are sent again as new stanzas.
        let pending: Vec<Out> = st.unacked.drain(..).filter(|o| o.msg.is_some()).collect();
        let p = Out { msg: None, xml: "<presence/>".into() };
        wbuf.push_str(&p.xml);
        st.unacked.push_back(p);
        for o in pending {
            wbuf.push_str(&o.xml);
            st.unacked.push_back(o);
        }
    }
    let cut_at = match cut {
        Cut::None => None,
        Cut::After(ms) => Some(Instant::now() + Duration::from_millis(ms)),
    };
    let mut next_send = Instant::now();
    loop {
        // Send a message now and then.
        if st.next_seq < st.to_send && Instant::now() >= next_send {
            let mut to = rng.gen_range(0..n_clients);
            if to == st.idx {
                to = (to + 1) % n_clients;
            }
            let seq = st.next_seq;
            st.next_seq += 1;
            let o = Out { msg: Some((to, seq)), xml: msg_xml(st.idx, to, seq) };
            wbuf.push_str(&o.xml);
            st.unacked.push_back(o);
            ledger.lock().unwrap().sent += 1;
            if rng.gen_bool(0.3) {
                wbuf.push_str("<r xmlns='urn:xmpp:sm:3'/>");
            }
            next_send = Instant::now() + Duration::from_millis(rng.gen_range(1..15));
        }
        if st.next_seq >= st.to_send && !st.unacked.is_empty() && rng.gen_bool(0.2) {
            wbuf.push_str("<r xmlns='urn:xmpp:sm:3'/>");
        }
        if let Some(at) = cut_at
            && Instant::now() >= at
        {
            // Cut: sometimes mid-stanza.
            if rng.gen_bool(0.3) {
                wbuf.push_str("<message to='1555");
            }
            let _ = c.try_send(&wbuf).await;
            return;
        }
        if !wbuf.is_empty() {
            if !c.try_send(&wbuf).await {
                return;
            }
            wbuf.clear();
        }
        if Instant::now() >= stop_at {
            return;
        }
        // Read whatever arrives within a short slice.
        let slice = Instant::now() + Duration::from_millis(5);
        loop {
            match c.read_until(slice).await {
                Read::Frame(Frame::Stanza(e)) => handle(e, st, ledger, &mut wbuf),
                Read::Frame(_) | Read::Closed => return,
                Read::Idle => break,
            }
        }
    }
}

fn ack_to(st: &mut ClientState, h: u32, ledger: &Arc<Mutex<Ledger>>) {
    let n = h.wrapping_sub(st.server_h) as usize;
    let mut l = ledger.lock().unwrap();
    for _ in 0..n.min(st.unacked.len()) {
        if let Some(o) = st.unacked.pop_front()
            && let Some((to, seq)) = o.msg
        {
            l.acked.insert((st.idx, to, seq));
        }
    }
    st.server_h = h;
}

fn handle(e: Element, st: &mut ClientState, ledger: &Arc<Mutex<Ledger>>, wbuf: &mut String) {
    if e.ns == ns::SM {
        match e.local_name() {
            "r" => wbuf.push_str(&format!("<a xmlns='urn:xmpp:sm:3' h='{}'/>", st.inbound)),
            "a" => {
                if let Some(h) = e.attr("h").and_then(|h| h.parse().ok()) {
                    ack_to(st, h, ledger);
                }
            }
            _ => {}
        }
        return;
    }
    st.inbound = st.inbound.wrapping_add(1);
    match e.local_name() {
        "message" => {
            let body = e.child("body", ns::CLIENT).map(|b| b.text()).unwrap_or_default();
            if e.attr("type") == Some("error") {
                return;
            }
            let Some((from, seq)) = body.split_once(':') else { return };
            let (Ok(from), Ok(seq)) = (from.parse::<usize>(), seq.parse::<u64>()) else { return };
            let mut l = ledger.lock().unwrap();
            if l.seen.insert((from, st.idx, seq)) {
                l.delivered.entry(st.idx).or_default().push((from, seq));
            } else {
                l.wire_redeliveries += 1;
            }
        }
        "iq" if e.attr("type") == Some("get") => {
            let id = e.attr("id").unwrap_or("");
            let o = Out { msg: None, xml: format!("<iq type='result' id='{id}' to='localhost'/>") };
            wbuf.push_str(&o.xml);
            st.unacked.push_back(o);
        }
        _ => {}
    }
}

#[test]
fn flaky_network_loses_nothing_acked() {
    let n_clients = env_usize("FLAKY_CLIENTS", 24);
    let per_client = env_usize("FLAKY_MESSAGES", 40) as u64;
    let kills = env_usize("FLAKY_KILL", 1);
    let dir = std::env::temp_dir().join(format!("chatd-flaky-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("chatd.toml");
    std::fs::write(&cfg, "[limits]\nresume_timeout_secs = 5\nping_interval_secs = 5\nping_timeout_secs = 5\n").unwrap();
    let data = dir.join("data");
    let csv = dir.join("users.csv");
    let mut f = std::fs::File::create(&csv).unwrap();
    for i in 0..n_clients {
        writeln!(f, "+{},pw{i}", local(i)).unwrap();
    }
    drop(f);
    let st = Command::new(env!("CARGO_BIN_EXE_chatd"))
        .args(["user", "import"])
        .arg(&csv)
        .arg("--data-dir")
        .arg(&data)
        .env("CHATD_LOG", "warn")
        .status()
        .unwrap();
    assert!(st.success(), "import failed");

    let server = Arc::new(Mutex::new(start_server(&data, &cfg)));
    let port = Arc::new(AtomicU16::new(server.lock().unwrap().port));
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let started = Instant::now();
    let chaos_for = Duration::from_secs(env_usize("FLAKY_SECONDS", 8) as u64);
    let resumes = Arc::new(AtomicU64::new(0));

    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        // Kill -9 and restart mid-run.
        let killer = {
            let server = server.clone();
            let port = port.clone();
            let data = data.clone();
            let cfg = cfg.clone();
            tokio::spawn(async move {
                for k in 0..kills {
                    tokio::time::sleep(chaos_for / (kills as u32 + 1)).await;
                    let mut s = server.lock().unwrap();
                    let _ = s.child.kill();
                    let _ = s.child.wait();
                    eprintln!("kill -9 #{} at {:?}", k + 1, started.elapsed());
                    *s = start_server(&data, &cfg);
                    port.store(s.port, Ordering::SeqCst);
                }
            })
        };
        let mut tasks = Vec::new();
        for idx in 0..n_clients {
            let ledger = ledger.clone();
            let port = port.clone();
            let resumes = resumes.clone();
            tasks.push(tokio::spawn(async move {
                let mut st = ClientState {
                    idx,
                    next_seq: 0,
                    to_send: per_client,
                    unacked: VecDeque::new(),
                    server_h: 0,
                    sm_id: None,
                    inbound: 0,
                };
                let chaos_end = started + chaos_for;
                // Chaos phase: short-lived connections.
                while Instant::now() < chaos_end {
                    let (cut, resume) = {
                        let mut rng = rand::thread_rng();
                        (Cut::After(rng.gen_range(20..400)), rng.gen_bool(0.5))
                    };
                    let p = port.load(Ordering::SeqCst);
                    session(p, &mut st, &ledger, n_clients, cut, resume, chaos_end).await;
                    if resume {
                        resumes.fetch_add(1, Ordering::Relaxed);
                    }
                }
                // Calm phase: stay connected until everything is sent,
                // acked, and delivered.
                let calm_end = Instant::now() + Duration::from_secs(20);
                while Instant::now() < calm_end {
                    let p = port.load(Ordering::SeqCst);
                    let stop = (Instant::now() + Duration::from_secs(4)).min(calm_end);
                    session(p, &mut st, &ledger, n_clients, Cut::None, true, stop).await;
                    if st.next_seq >= st.to_send && st.unacked.is_empty() {
                        // Stay a little longer to receive the rest.
                        let stop = Instant::now() + Duration::from_secs(3);
                        session(p, &mut st, &ledger, n_clients, Cut::None, true, stop).await;
                        break;
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        let _ = killer.await;
    });
    let _ = server.lock().unwrap().child.kill();

    let l = ledger.lock().unwrap();
    let mut lost = Vec::new();
    for &(from, to, seq) in &l.acked {
        if !l.seen.contains(&(from, to, seq)) {
            lost.push((from, to, seq));
        }
    }
    // Per-sender order at each recipient.
    let mut order_violations = 0;
    for list in l.delivered.values() {
        let mut last: HashMap<usize, u64> = HashMap::new();
        for &(from, seq) in list {
            if let Some(&p) = last.get(&from)
                && seq < p
            {
                order_violations += 1;
            }
            last.insert(from, seq);
        }
    }
    let delivered: usize = l.delivered.values().map(|v| v.len()).sum();
    println!(
        "flaky network: clients={n_clients} sent={} acked={} delivered={} lost={} duplicates_seen_by_app=0 wire_redeliveries={} order_violations={order_violations} reconnects_with_resume_attempt={} kills={kills} elapsed={:?}",
        l.sent,
        l.acked.len(),
        delivered,
        lost.len(),
        l.wire_redeliveries,
        resumes.load(Ordering::Relaxed),
        started.elapsed()
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert!(lost.is_empty(), "acked but never delivered: {:?}", &lost[..lost.len().min(10)]);
    assert_eq!(order_violations, 0, "per-sender order broken");
    assert!(
        l.acked.len() as u64 >= (n_clients as u64 * per_client) * 9 / 10,
        "too few messages acked: {}",
        l.acked.len()
    );
}
