//! Delivery under pressure, against the real binary: per-sender order
//! while a large backlog drains, bounded memory for a client that never
//! acknowledges, and one sender's flood not closing a recipient's inbox
//! to everyone else.

mod common;

use std::time::{Duration, Instant};

use chatd::protocol::{Element, Frame};
use common::{Client, TestServer, error_condition};

const A: &str = "15550001001";
const B: &str = "15550001002";
const C: &str = "15550001003";
const PW: &str = "pw";

fn chat(to: &str, body: &str) -> String {
    format!("<message type='chat' to='{to}@localhost'><body>{body}</body></message>")
}

fn body(e: &Element) -> Option<String> {
    e.child("body", chatd::protocol::ns::CLIENT).map(|b| b.text())
}

/// Resident memory of a process, in KiB, read from /proc as any outsider
/// could.
fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Waits until the server has processed everything `c` sent before;
/// returns the stanzas that arrived meanwhile.
async fn sync(c: &mut Client, id: &str) -> Vec<Element> {
    c.send(&format!("<iq type='get' id='{id}' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")).await;
    let mut seen = Vec::new();
    loop {
        match c.next(30).await {
            Some(Frame::Stanza(e)) if e.local_name() == "iq" && e.attr("id") == Some(id) => {
                assert_eq!(e.attr("type"), Some("result"));
                return seen;
            }
            Some(Frame::Stanza(e)) => seen.push(e),
            Some(_) => {}
            None => panic!("no answer to ping {id}"),
        }
    }
}

fn errors(v: Vec<Element>) -> Vec<Element> {
    v.into_iter().filter(|e| e.attr("type") == Some("error")).collect()
}

/// A client with XEP-0198 that acknowledges as it reads: counts inbound
/// stanzas and answers every `<r/>`; answers pings. Returns the bodies
/// received, in order, until `want` bodies arrived or `secs` passed.
async fn read_acking(c: &mut Client, want: usize, secs: u64) -> Vec<String> {
    let mut h: u32 = 0;
    let mut bodies = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(secs);
    while bodies.len() < want && Instant::now() < deadline {
        let Some(f) = c.next(5).await else { break };
        let Frame::Stanza(e) = f else { continue };
        match e.local_name() {
            "r" => c.send(&format!("<a xmlns='urn:xmpp:sm:3' h='{h}'/>")).await,
            "message" | "presence" | "iq" => {
                h = h.wrapping_add(1);
                if e.local_name() == "iq" && e.attr("type") == Some("get") {
                    let id = e.attr("id").unwrap_or("").to_string();
                    c.send(&format!("<iq type='result' id='{id}' to='localhost'/>")).await;
                }
                if let Some(b) = body(&e) {
                    bodies.push(b);
                }
            }
            _ => {}
        }
    }
    c.send(&format!("<a xmlns='urn:xmpp:sm:3' h='{h}'/>")).await;
    bodies
}

const FAST: &str = "[delivery]\nmessages_per_sec = 100000.0\nmessages_burst = 100000.0\n";

/// Delivery rule 6 while a backlog drains: the recipient has 2,000
/// messages waiting, logs in with XEP-0198 acking as it reads, and the same
/// sender sends 500 more live meanwhile. Every message arrives, each once,
/// in the order sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_drain_keeps_per_sender_order_with_live_messages() {
    let srv = TestServer::start("order-drain", FAST, &[(A, PW), (B, PW)]);
    let mut a = Client::login(srv.port, A, PW, "a", false).await;
    for chunk in (0..2000).collect::<Vec<u32>>().chunks(100) {
        let xml: String = chunk.iter().map(|i| chat(B, &i.to_string())).collect();
        a.send(&xml).await;
    }
    assert!(errors(sync(&mut a, "stored").await).is_empty());

    let mut b = Client::login(srv.port, B, PW, "b", false).await;
    b.send("<enable xmlns='urn:xmpp:sm:3'/><presence/>").await;
    let live = tokio::spawn(async move {
        // Spread over the whole drain, so live messages keep arriving
        // between its batches.
        for i in 2000..2500u32 {
            a.send(&chat(B, &i.to_string())).await;
            if i % 2 == 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        sync(&mut a, "live").await;
        a
    });
    let got = read_acking(&mut b, 2500, 90).await;
    let _a = live.await.expect("sender");
    let nums: Vec<u32> = got.iter().filter_map(|b| b.parse().ok()).collect();
    let out_of_order = nums.windows(2).filter(|w| w[1] < w[0]).count();
    println!("backlog drain: 2000 stored + 500 live, {} received, {out_of_order} out of order", nums.len());
    assert_eq!(out_of_order, 0, "{out_of_order} messages out of order");
    assert_eq!(nums, (0..2500).collect::<Vec<u32>>(), "every message once, in order");
}

/// A client that enables XEP-0198 and never acknowledges, while a lot is
/// sent to it: the server's memory stays bounded (RSS from /proc), the
/// stream is closed with `policy-violation`, and every message is
/// delivered at the next login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_buffer_is_bounded_in_bytes() {
    const N: usize = 1000;
    // The outbound queue may hold a lot here, so that the unacked limit,
    // not the slow-consumer one, is what closes the stream.
    let mut cfg = format!(
        "{FAST}max_outbound_bytes = 268435456\n[offline]\nmax_queue_bytes = 268435456\nsender_share_percent = 100\n"
    );
    // For a figure without the limit: UNACKED_LIMIT=1073741824.
    if let Ok(l) = std::env::var("UNACKED_LIMIT") {
        cfg = cfg.replace("[delivery]\n", &format!("[delivery]\nmax_unacked_bytes = {l}\n"));
    }
    let srv = TestServer::start("unacked", &cfg, &[(A, PW), (B, PW), (C, PW)]);
    let pid = srv.child.id();
    let mut a = Client::login(srv.port, A, PW, "a", false).await;
    let pad = "x".repeat(100 * 1024);
    // Sends N large messages to `to`, returning the server's peak RSS.
    async fn send_all(a: &mut Client, to: &str, pad: &str, pid: u32) -> u64 {
        let mut peak = rss_kib(pid);
        for i in 0..N {
            a.send(&chat(to, &format!("{i} {pad}"))).await;
            if i % 50 == 49 {
                assert!(errors(sync(a, &format!("s{i}")).await).is_empty());
                peak = peak.max(rss_kib(pid));
            }
        }
        sync(a, "sent").await;
        peak.max(rss_kib(pid))
    }
    // Baseline in the same process: the same volume to an offline
    // account costs the store what it costs (memtables, caches, allocator).
    let start = rss_kib(pid);
    let baseline = send_all(&mut a, C, &pad, pid).await;

    let mut b = Client::login(srv.port, B, PW, "b", false).await;
    b.send("<enable xmlns='urn:xmpp:sm:3'/><presence/>").await;
    sync(&mut b, "b-ready").await;
    // The victim reads everything (so it is no slow consumer) but never acks.
    let reader = tokio::spawn(async move {
        let mut closed_with = None;
        let mut got = 0usize;
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            match b.next(10).await {
                Some(Frame::Stanza(e)) if e.local_name() == "message" => got += 1,
                Some(Frame::Stanza(e)) if e.local_name() == "error" => {
                    let cond = e.elements().next().map(|c| c.local_name().to_string()).unwrap_or_default();
                    let text = e.elements().find(|c| c.local_name() == "text").map(|t| t.text()).unwrap_or_default();
                    closed_with = Some(format!("{cond}: {text}"));
                }
                Some(Frame::Close) | None => break,
                Some(_) => {}
            }
        }
        (got, closed_with)
    });
    let peak = send_all(&mut a, B, &pad, pid).await;
    let (got, closed_with) = reader.await.expect("reader");
    let growth_mib = peak.saturating_sub(baseline) / 1024;
    let sent_mib = N * pad.len() / (1 << 20);
    println!(
        "unacked: {sent_mib} MiB to an offline account: RSS +{} MiB; then {sent_mib} MiB to a client that never acks \
         (read {got} before close): RSS +{growth_mib} MiB more",
        baseline.saturating_sub(start) / 1024
    );
    let closed_with = closed_with.unwrap_or_default();
    assert!(
        closed_with.starts_with("policy-violation") && closed_with.contains("not acknowledged"),
        "stream closed with policy-violation: {closed_with}"
    );
    assert!(got < N / 2, "closed early ({got} messages read)");
    assert!(growth_mib < (sent_mib * 2 / 3) as u64, "server grew by {growth_mib} MiB for {sent_mib} MiB sent");

    // Nothing was lost: the next login gets every message, in order.
    let mut b = Client::login(srv.port, B, PW, "b2", false).await;
    b.send("<enable xmlns='urn:xmpp:sm:3'/><presence/>").await;
    let got = read_acking(&mut b, N, 120).await;
    let nums: Vec<usize> = got.iter().filter_map(|b| b.split(' ').next()?.parse().ok()).collect();
    assert_eq!(nums, (0..N).collect::<Vec<_>>());
}

/// A client without stream management that stops reading while a lot is
/// sent to it: its outbound queue is bounded in bytes. Past
/// `delivery.max_outbound_bytes` the session is closed as a slow consumer
/// (`policy-violation`), the sender is not held up, and every message is
/// delivered from the store at the next login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_queue_is_bounded_in_bytes() {
    const N: usize = 300;
    // A stanza count far above N, so the byte limit is what closes it.
    let mut cfg = format!(
        "{FAST}max_outbound_bytes = 1048576\n[limits]\nsession_queue = 100000\n[offline]\nmax_queue_bytes = 268435456\nsender_share_percent = 100\n"
    );
    // Without the limit: OUTBOUND_LIMIT=1073741824 (the stream then stays open).
    if let Ok(l) = std::env::var("OUTBOUND_LIMIT") {
        cfg = cfg.replace("max_outbound_bytes = 1048576", &format!("max_outbound_bytes = {l}"));
    }
    let srv = TestServer::start("outbound", &cfg, &[(A, PW), (B, PW)]);
    let mut b = Client::login(srv.port, B, PW, "b", true).await;
    sync(&mut b, "b-ready").await;
    // From here B reads nothing until everything is sent.
    let mut a = Client::login(srv.port, A, PW, "a", false).await;
    let pad = "x".repeat(100 * 1024);
    let t = Instant::now();
    for i in 0..N {
        a.send(&chat(B, &format!("{i} {pad}"))).await;
        if i % 50 == 49 {
            assert!(errors(sync(&mut a, &format!("o{i}")).await).is_empty());
        }
    }
    sync(&mut a, "sent").await;
    let took = t.elapsed();
    assert!(took < Duration::from_secs(20), "the sender was held up for {took:?}");

    let mut got = 0usize;
    let mut closed_with = None;
    while let Some(f) = b.next(10).await {
        match f {
            Frame::Stanza(e) if e.local_name() == "message" => got += 1,
            Frame::Stanza(e) if e.local_name() == "error" => {
                closed_with = e.elements().next().map(|c| c.local_name().to_string());
            }
            Frame::Close => break,
            _ => {}
        }
    }
    println!("outbound: {N} messages of 100 KiB to a client that stopped reading: {got} read, then {closed_with:?}");
    assert_eq!(closed_with.as_deref(), Some("policy-violation"), "closed as a slow consumer");
    assert!(got < N, "closed before everything was queued for it ({got} read)");

    let mut b = Client::login(srv.port, B, PW, "b2", false).await;
    b.send("<enable xmlns='urn:xmpp:sm:3'/><presence/>").await;
    let got = read_acking(&mut b, N, 120).await;
    let nums: Vec<usize> = got.iter().filter_map(|b| b.split(' ').next()?.parse().ok()).collect();
    assert_eq!(nums, (0..N).collect::<Vec<_>>());
}

/// One sender floods an offline recipient: past its share of the queue it
/// gets `resource-constraint`, and a second sender still gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sender_cannot_fill_anothers_inbox() {
    let cfg = format!("{FAST}\n[offline]\nmax_queue = 40\nsender_share_percent = 25\n");
    let srv = TestServer::start("flood-share", &cfg, &[(A, PW), (B, PW), (C, PW)]);
    let mut a = Client::login(srv.port, A, PW, "a", false).await;
    let xml: String = (0..30)
        .map(|i| format!("<message type='chat' to='{B}@localhost' id='f{i}'><body>f{i}</body></message>"))
        .collect();
    a.send(&xml).await;
    let refused = errors(sync(&mut a, "flood").await);
    assert_eq!(refused.len(), 20, "10 of 30 accepted (25% of 40)");
    assert!(refused.iter().all(|e| error_condition(e).as_deref() == Some("resource-constraint")));

    let mut c = Client::login(srv.port, C, PW, "c", false).await;
    c.send(&format!("<message type='chat' to='{B}@localhost' id='c1'><body>hi from c</body></message>")).await;
    assert!(errors(sync(&mut c, "c").await).is_empty(), "the second sender gets through");

    let mut b = Client::login(srv.port, B, PW, "b", false).await;
    b.send("<enable xmlns='urn:xmpp:sm:3'/><presence/>").await;
    let got = read_acking(&mut b, 11, 20).await;
    assert_eq!(got.len(), 11);
    assert_eq!(got.iter().filter(|b| b.starts_with('f')).count(), 10);
    assert!(got.contains(&"hi from c".to_string()));
}

/// Messages have a per-account rate limit: past the burst the sender gets
/// `policy-violation`; other senders are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_rate_is_limited_per_account() {
    let cfg = "[delivery]\nmessages_per_sec = 1.0\nmessages_burst = 20.0\n";
    let srv = TestServer::start("flood-rate", cfg, &[(A, PW), (B, PW), (C, PW)]);
    let mut b = Client::login(srv.port, B, PW, "b", true).await;
    let mut a = Client::login(srv.port, A, PW, "a", false).await;
    let xml: String = (0..40)
        .map(|i| format!("<message type='chat' to='{B}@localhost' id='r{i}'><body>r{i}</body></message>"))
        .collect();
    a.send(&xml).await;
    let errors = errors(sync(&mut a, "rate").await);
    assert!((18..=20).contains(&errors.len()), "{} refused", errors.len());
    assert!(errors.iter().all(|e| error_condition(e).as_deref() == Some("policy-violation")));
    let mut c = Client::login(srv.port, C, PW, "c", false).await;
    c.send(&format!("<message type='chat' to='{B}@localhost' id='c1'><body>from c</body></message>")).await;
    let got = b.expect(10, |e| body(e).as_deref() == Some("from c")).await;
    assert!(got.is_some(), "another sender still reaches the recipient");
}

/// Authenticates with PLAIN and restarts the stream, without binding.
async fn authenticated(port: u16, local: &str) -> Client {
    use base64::Engine;
    let mut c = Client::connect(port).await;
    c.send(common::HEADER).await;
    c.next(5).await.expect("header");
    c.next(5).await.expect("features");
    let cred = base64::engine::general_purpose::STANDARD.encode(format!("\0{local}\0{PW}"));
    c.send(&format!("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{cred}</auth>")).await;
    assert!(matches!(c.next(5).await, Some(Frame::Stanza(e)) if e.local_name() == "success"));
    c.framer.reset();
    c.send(common::HEADER).await;
    c.next(5).await.expect("header");
    c.next(5).await.expect("features");
    c
}

/// A session parked for resumption holds what is routed to it only up to
/// `delivery.max_unacked_bytes`: past it the session ends (resumption
/// then fails), and a fresh login gets every message from the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_session_is_bounded_in_bytes() {
    const N: usize = 200;
    // A large outbound queue: the unacked limit is what ends the session.
    let mut cfg = format!("{FAST}max_outbound_bytes = 268435456\n[offline]\nsender_share_percent = 100\n");
    // Without the limit: UNACKED_LIMIT=1073741824 (resumption then succeeds).
    if let Ok(l) = std::env::var("UNACKED_LIMIT") {
        cfg = cfg.replace("[delivery]\n", &format!("[delivery]\nmax_unacked_bytes = {l}\n"));
    }
    let srv = TestServer::start("parked", &cfg, &[(A, PW), (B, PW)]);
    let mut b = Client::login(srv.port, B, PW, "b", false).await;
    b.send("<enable xmlns='urn:xmpp:sm:3' resume='true'/><presence/>").await;
    let enabled = b.expect(5, |e| e.local_name() == "enabled").await.expect("enabled");
    let previd = enabled.attr("id").expect("resumption id").to_string();
    sync(&mut b, "b-ready").await;
    drop(b);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut a = Client::login(srv.port, A, PW, "a", false).await;
    let pad = "x".repeat(100 * 1024);
    for i in 0..N {
        a.send(&chat(B, &format!("{i} {pad}"))).await;
        if i % 20 == 19 {
            assert!(errors(sync(&mut a, &format!("p{i}")).await).is_empty());
        }
    }
    sync(&mut a, "sent").await;

    let mut r = authenticated(srv.port, B).await;
    r.send(&format!("<resume xmlns='urn:xmpp:sm:3' previd='{previd}' h='0'/>")).await;
    let answer = r.expect(10, |e| matches!(e.local_name(), "resumed" | "failed")).await.expect("resume answer");
    assert_eq!(answer.local_name(), "failed", "the parked session outgrew its byte limit and ended");

    let mut b = Client::login(srv.port, B, PW, "b2", false).await;
    b.send("<enable xmlns='urn:xmpp:sm:3'/><presence/>").await;
    let got = read_acking(&mut b, N, 60).await;
    let nums: Vec<usize> = got.iter().filter_map(|b| b.split(' ').next()?.parse().ok()).collect();
    assert_eq!(nums, (0..N).collect::<Vec<_>>());
}
