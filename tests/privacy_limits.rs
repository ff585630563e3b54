//! No state for names that do not exist and no oracle: unknown names
//! cost no memory (read from `/proc`), every "is this number registered
//! or online?" answer draws on the contact-discovery allowance, full-JID
//! iqs do not reveal presence, nothing from a blocked account gets
//! through. Plus the roster limit, re-registration wiping the previous
//! owner, and password changes ending the other sessions on every path.

mod common;

use chatd::protocol::{Element, Frame};
use common::{Client, TestServer, error_condition, http};

const A: &str = "15550000001";
const B: &str = "15550000002";
const C: &str = "15550000003";
const D: &str = "15550000004";

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap()
}

fn users() -> Vec<(&'static str, &'static str)> {
    vec![("+15550000001", "pa"), ("+15550000002", "pb"), ("+15550000003", "pc"), ("+15550000004", "pd")]
}

fn rss_kib(srv: &TestServer) -> u64 {
    let st = std::fs::read_to_string(format!("/proc/{}/status", srv.child.id())).expect("/proc/PID/status");
    st.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Sends messages to `n` made-up numbers starting at `from`, in batches
/// closed by a ping so the server has processed each batch.
async fn message_unknown(a: &mut Client, from: u64, n: u64) {
    let mut batch = String::new();
    for i in from..from + n {
        batch.push_str(&format!("<message type='chat' to='1555{i:07}@localhost'><body>hi</body></message>"));
        if (i - from + 1).is_multiple_of(500) || i + 1 == from + n {
            a.send(&batch).await;
            batch.clear();
            let id = format!("p{i}");
            a.iq(&id, &format!("<iq type='get' id='{id}' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")).await;
        }
    }
}

#[test]
fn unknown_names_leave_no_state() {
    let srv = TestServer::start("priv-unknown", "", &users());
    rt().block_on(async {
        let mut a = Client::login(srv.port, A, "pa", "p", true).await;
        message_unknown(&mut a, 3_000_000, 3_000).await;
        let before = rss_kib(&srv);
        message_unknown(&mut a, 4_000_000, 40_000).await;
        let after = rss_kib(&srv);
        let grown = after.saturating_sub(before);
        println!("messages to 40,000 unknown names: RSS {before} KiB -> {after} KiB (+{grown} KiB)");
        assert!(grown < 4 * 1024, "server kept {grown} KiB for names that do not exist");
    });
}

#[test]
fn every_probe_shares_the_discovery_allowance() {
    let srv = TestServer::start("priv-probe", "[discovery]\nmax_per_hour = 6\n", &users());
    rt().block_on(async {
        let mut a = Client::login(srv.port, A, "pa", "p", true).await;
        let r = a.iq("ro", &format!("<iq type='set' id='ro'><query xmlns='jabber:iq:roster'><item jid='{B}@localhost'/></query></iq>")).await;
        assert_eq!(r.attr("type"), Some("result"));
        // Six questions about strangers, each a different way.
        let r = a.iq("q1", &format!("<iq type='get' id='q1' to='{C}@localhost'><ping xmlns='urn:xmpp:ping'/></iq>")).await;
        assert_eq!(r.attr("type"), Some("result"));
        let r = a.iq("q2", &format!("<iq type='get' id='q2' to='{D}@localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>")).await;
        assert_eq!(r.attr("type"), Some("result"));
        let r = a.iq("q3", "<iq type='get' id='q3' to='15559990001@localhost'><query xmlns='jabber:iq:last'/></iq>").await;
        assert_eq!(error_condition(&r).as_deref(), Some("service-unavailable"));
        a.send("<message type='chat' id='q4' to='15559990002@localhost'><body>x</body></message>").await;
        let e = a.expect(5, |e| e.attr("id") == Some("q4")).await.expect("not registered");
        assert_eq!(error_condition(&e).as_deref(), Some("service-unavailable"));
        let r = a.iq("q5", "<iq type='get' id='q5' to='15559990003@localhost'><pubsub xmlns='http://jabber.org/protocol/pubsub'><items node='http://jabber.org/protocol/nick'/></pubsub></iq>").await;
        assert_eq!(r.attr("type"), Some("error"));
        let r = a.iq("q6", &format!("<iq type='get' id='q6' to='{C}@localhost/phone'><query xmlns='jabber:iq:version'/></iq>")).await;
        assert_eq!(error_condition(&r).as_deref(), Some("service-unavailable"));
        // The allowance is spent: no answer tells anything any more.
        let r = a.iq("q7", &format!("<iq type='get' id='q7' to='{C}@localhost'><ping xmlns='urn:xmpp:ping'/></iq>")).await;
        assert_eq!(error_condition(&r).as_deref(), Some("resource-constraint"));
        let r = a.iq("q8", "<iq type='get' id='q8' to='15559990004@localhost'><ping xmlns='urn:xmpp:ping'/></iq>").await;
        assert_eq!(error_condition(&r).as_deref(), Some("resource-constraint"));
        let r = a.iq("q9", "<iq type='get' id='q9' to='localhost'><query xmlns='urn:chatd:discovery:0'><phone>+15550000004</phone></query></iq>").await;
        assert_eq!(error_condition(&r).as_deref(), Some("resource-constraint"), "discovery shares the budget");
        a.send("<message type='chat' id='q10' to='15559990005@localhost'><body>x</body></message>").await;
        let got = a.drain(2).await;
        assert!(!got.iter().any(|e| e.attr("id") == Some("q10")), "an unknown number is no longer told apart");
        // Contacts cost nothing.
        let r = a.iq("q11", &format!("<iq type='get' id='q11' to='{B}@localhost'><ping xmlns='urn:xmpp:ping'/></iq>")).await;
        assert_eq!(r.attr("type"), Some("result"));
    });
}

#[test]
fn full_jid_iqs_do_not_reveal_presence() {
    let srv = TestServer::start("priv-fulljid", "", &users());
    rt().block_on(async {
        let mut a = Client::login(srv.port, A, "pa", "p", true).await;
        let mut b = Client::login(srv.port, B, "pb", "phone", true).await;
        let mut c = Client::login(srv.port, C, "pc", "phone", true).await;
        let r =
            b.iq("v", "<iq type='set' id='v'><privacy xmlns='urn:chatd:privacy:0' visibility='nobody'/></iq>").await;
        assert_eq!(r.attr("type"), Some("result"));
        let ask =
            |id: &str, to: &str| format!("<iq type='get' id='{id}' to='{to}'><query xmlns='jabber:iq:version'/></iq>");
        let online = a.iq("on", &ask("on", &format!("{B}@localhost/phone"))).await;
        let offline = a.iq("off", &ask("off", &format!("{B}@localhost/tablet"))).await;
        assert_eq!(error_condition(&online).as_deref(), Some("service-unavailable"));
        assert_eq!(error_condition(&offline), error_condition(&online), "online and offline look alike");
        assert!(!b.drain(1).await.iter().any(|e| e.attr("id") == Some("on")), "the iq was forwarded");
        // Visible accounts still get iqs.
        a.send(&ask("toc", &format!("{C}@localhost/phone"))).await;
        c.expect(5, |e| e.attr("id") == Some("toc")).await.expect("forwarded to a visible device");
    });
}

#[test]
fn nothing_from_a_blocked_account_gets_through() {
    let srv = TestServer::start("priv-blockiq", "", &users());
    rt().block_on(async {
        let mut a = Client::login(srv.port, A, "pa", "p", true).await;
        let mut b = Client::login(srv.port, B, "pb", "phone", true).await;
        let r = b.iq("blk", &format!("<iq type='set' id='blk'><block xmlns='urn:xmpp:blocking'><item jid='{A}@localhost'/></block></iq>")).await;
        assert_eq!(r.attr("type"), Some("result"));
        let to = format!("{B}@localhost/phone");
        a.send(&format!("<iq type='result' id='res1' to='{to}'><query xmlns='jabber:iq:version'><name>x</name></query></iq>")).await;
        a.send(&format!("<iq type='error' id='err1' to='{to}'><error type='cancel'><item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>")).await;
        a.send(&format!("<message type='error' id='merr' to='{to}'><error type='cancel'><item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>")).await;
        a.send(&format!("<presence type='error' id='perr' to='{to}'/>")).await;
        let got = b.drain(2).await;
        let leaked: Vec<String> = got.iter().filter(|e| e.attr("from").is_some_and(|f| f.starts_with(A))).map(Element::to_xml).collect();
        assert!(leaked.is_empty(), "reached the blocker: {leaked:?}");
    });
}

#[test]
fn roster_size_is_limited() {
    let srv = TestServer::start("priv-roster", "[roster]\nmax_items = 3\n", &users());
    rt().block_on(async {
        let mut a = Client::login(srv.port, A, "pa", "p", true).await;
        let set = |id: &str, jid: &str| format!("<iq type='set' id='{id}'><query xmlns='jabber:iq:roster'><item jid='{jid}'/></query></iq>");
        for i in 0..3 {
            let r = a.iq(&format!("s{i}"), &set(&format!("s{i}"), &format!("1555777000{i}@localhost"))).await;
            assert_eq!(r.attr("type"), Some("result"));
        }
        let r = a.iq("s3", &set("s3", "15557770003@localhost")).await;
        assert_eq!(error_condition(&r).as_deref(), Some("resource-constraint"));
        // Renaming an item already there is fine.
        let r = a.iq("s4", "<iq type='set' id='s4'><query xmlns='jabber:iq:roster'><item jid='15557770001@localhost' name='Bo'/></query></iq>").await;
        assert_eq!(r.attr("type"), Some("result"));
        let r = a.iq("g", "<iq type='get' id='g'><query xmlns='jabber:iq:roster'/></iq>").await;
        assert_eq!(r.child("query", "jabber:iq:roster").map(|q| q.elements().count()), Some(3));
    });
}

/// The last code the log gateway wrote for `digits`.
fn code_for(srv: &TestServer, digits: &str) -> String {
    for _ in 0..50 {
        if let Ok(text) = std::fs::read_to_string(srv.data().join("sms-outbox.log"))
            && let Some(line) = text.lines().rev().find(|l| l.starts_with(&format!("{digits} ")))
        {
            return line.split_whitespace().nth(1).unwrap_or("").to_string();
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("no code for {digits} in the outbox");
}

async fn sms_register(srv: &TestServer, digits: &str) -> String {
    let (st, _, _) = http(srv.http_port, "POST", "/v1/accounts/code", &format!("{{\"phone\":\"+{digits}\"}}")).await;
    assert_eq!(st, 200);
    let code = code_for(srv, digits);
    let (st, _, body) = http(
        srv.http_port,
        "POST",
        "/v1/accounts/register",
        &format!("{{\"phone\":\"+{digits}\",\"code\":\"{code}\"}}"),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["password"].as_str().unwrap().to_string()
}

#[test]
fn a_new_owner_of_a_number_inherits_nothing() {
    const X: &str = "15559998888";
    let srv = TestServer::start("priv-reassign", "[sms]\nresend_secs = 0\n", &users());
    rt().block_on(async {
        let first = sms_register(&srv, X).await;
        let mut old = Client::login(srv.port, X, &first, "old", true).await;
        let mut b = Client::login(srv.port, B, "pb", "p", true).await;
        // The old owner: settings, a block, a profile, a mutual contact, a group.
        for (id, xml) in [
            ("v", "<iq type='set' id='v'><privacy xmlns='urn:chatd:privacy:0' visibility='nobody' groups='nobody'/></iq>".to_string()),
            ("bl", format!("<iq type='set' id='bl'><block xmlns='urn:xmpp:blocking'><item jid='{C}@localhost'/></block></iq>")),
            ("nick", "<iq type='set' id='nick'><pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='http://jabber.org/protocol/nick'><item id='current'><nick xmlns='http://jabber.org/protocol/nick'>Old Owner</nick></item></publish></pubsub></iq>".to_string()),
        ] {
            let r = old.iq(id, &xml).await;
            assert_eq!(r.attr("type"), Some("result"), "{}", r.to_xml());
        }
        old.send(&format!("<presence type='subscribe' to='{B}@localhost'/>")).await;
        b.expect(5, |e| e.attr("type") == Some("subscribe")).await.expect("request");
        b.send(&format!("<presence type='subscribed' to='{X}@localhost'/>")).await;
        b.send(&format!("<presence type='subscribe' to='{X}@localhost'/>")).await;
        old.expect(5, |e| e.attr("type") == Some("subscribe")).await.expect("request back");
        old.send(&format!("<presence type='subscribed' to='{B}@localhost'/>")).await;
        let r = b.iq("mk", &format!("<iq type='set' id='mk' to='groups.localhost'><create xmlns='urn:chatd:groups:0' subject='Old friends'><member jid='{X}@localhost'/></create></iq>")).await;
        assert_eq!(r.attr("type"), Some("result"));
        drop(old);
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        b.send(&format!("<message type='chat' id='secret' to='{X}@localhost'><body>for the old owner</body></message>")).await;
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;

        // The number changes hands.
        let second = sms_register(&srv, X).await;
        let mut new = Client::login(srv.port, X, &second, "new", true).await;
        let got = new.drain(2).await;
        assert!(!got.iter().any(|e| e.to_xml().contains("for the old owner")), "queue inherited");
        assert!(!got.iter().any(|e| e.attr("type") == Some("available") || e.local_name() == "presence" && e.attr("from").is_some_and(|f| f.starts_with(B))),
            "presence of the old owner's contacts");
        let r = new.iq("ro", "<iq type='get' id='ro'><query xmlns='jabber:iq:roster'/></iq>").await;
        assert_eq!(r.child("query", "jabber:iq:roster").map(|q| q.elements().count()), Some(0), "{}", r.to_xml());
        let r = new.iq("bl", "<iq type='get' id='bl'><blocklist xmlns='urn:xmpp:blocking'/></iq>").await;
        assert!(!r.to_xml().contains(C), "{}", r.to_xml());
        let r = new.iq("pv", "<iq type='get' id='pv'><privacy xmlns='urn:chatd:privacy:0'/></iq>").await;
        let p = r.child("privacy", "urn:chatd:privacy:0").expect("privacy");
        assert_eq!((p.attr("visibility"), p.attr("groups")), (Some("everyone"), Some("everyone")));
        let r = new.iq("gl", "<iq type='get' id='gl' to='groups.localhost'><list xmlns='urn:chatd:groups:0'/></iq>").await;
        assert!(!r.to_xml().contains("Old friends"), "{}", r.to_xml());
        let r = new.iq("pn", "<iq type='get' id='pn'><pubsub xmlns='http://jabber.org/protocol/pubsub'><items node='http://jabber.org/protocol/nick'/></pubsub></iq>").await;
        assert!(!r.to_xml().contains("Old Owner"), "{}", r.to_xml());
        // The old owner's contact no longer holds a subscription to the number.
        let r = b.iq("bro", "<iq type='get' id='bro'><query xmlns='jabber:iq:roster'/></iq>").await;
        let item = r.child("query", "jabber:iq:roster").and_then(|q| q.elements().find(|i| i.attr("jid") == Some(&format!("{X}@localhost")))).map(Element::to_xml).unwrap_or_default();
        assert!(!item.contains("subscription=\"both\"") && !item.contains("subscription=\"to\""), "{item}");
    });
}

/// Whether the server ended this session: a live one answers a ping.
async fn ends(c: &mut Client) -> bool {
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    c.send("<iq type='get' id='alive' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>").await;
    loop {
        match c.next(5).await {
            Some(Frame::Stanza(e)) if e.attr("id") == Some("alive") => return false,
            Some(Frame::Stanza(e)) if e.local_name() == "error" => {
                assert!(e.to_xml().contains("not-authorized"), "{}", e.to_xml());
            }
            Some(Frame::Close) | None => return true,
            Some(_) => {}
        }
    }
}

#[test]
fn password_changes_end_the_other_sessions_on_every_path() {
    let srv = TestServer::start("priv-passwd", "[registration]\nin_band = true\n", &users());
    rt().block_on(async {
        // In-band change: the changing session stays, the others end.
        let mut me = Client::login(srv.port, A, "pa", "one", true).await;
        let mut other = Client::login(srv.port, A, "pa", "two", true).await;
        let r = me.iq("pw", &format!("<iq type='set' id='pw'><query xmlns='jabber:iq:register'><username>{A}</username><password>new1</password></query></iq>")).await;
        assert_eq!(r.attr("type"), Some("result"), "{}", r.to_xml());
        assert!(ends(&mut other).await, "the other session survived an in-band password change");
        let r = me.iq("still", "<iq type='get' id='still' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>").await;
        assert_eq!(r.attr("type"), Some("result"));
        // `chatd user import` replacing a password.
        let mut s3 = Client::login(srv.port, A, "new1", "three", true).await;
        let csv = srv.dir.join("pw.csv");
        std::fs::write(&csv, format!("+{A},new2\n")).unwrap();
        let out = srv.user_cmd(&["import", csv.to_str().unwrap()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(ends(&mut s3).await, "a session survived a password replaced by import");
        // `chatd user passwd`.
        let mut s4 = Client::login(srv.port, A, "new2", "four", true).await;
        let out = srv.user_cmd(&["passwd", &format!("+{A}"), "--password", "new3"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(ends(&mut s4).await, "a session survived chatd user passwd");
        let _ok = Client::login(srv.port, A, "new3", "five", true).await;
    });
}

#[test]
fn a_reassigned_number_survives_kill_9() {
    const X: &str = "15559997777";
    let mut srv = TestServer::start("priv-reassign-kill", "[sms]\nresend_secs = 0\n", &users());
    let second = rt().block_on(async {
        let first = sms_register(&srv, X).await;
        let mut old = Client::login(srv.port, X, &first, "old", true).await;
        let r = old.iq("ro", &format!("<iq type='set' id='ro'><query xmlns='jabber:iq:roster'><item jid='{B}@localhost' name='Bob'/></query></iq>")).await;
        assert_eq!(r.attr("type"), Some("result"));
        drop(old);
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let mut b = Client::login(srv.port, B, "pb", "p", true).await;
        b.send(&format!("<message type='chat' id='s1' to='{X}@localhost'><body>for the old owner</body></message>")).await;
        let r = b.iq("sync", "<iq type='get' id='sync' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>").await;
        assert_eq!(r.attr("type"), Some("result"));
        // The server dies the moment the new key is handed out.
        let second = sms_register(&srv, X).await;
        let _ = srv.child.kill();
        let _ = srv.child.wait();
        second
    });
    let (child, port, http_port) = common::spawn(&srv.data(), &srv.cfg);
    srv.child = child;
    srv.port = port;
    srv.http_port = http_port;
    rt().block_on(async {
        let mut new = Client::login(srv.port, X, &second, "new", true).await;
        let got = new.drain(2).await;
        assert!(!got.iter().any(|e| e.to_xml().contains("for the old owner")), "queue inherited after a crash");
        let r = new.iq("ro", "<iq type='get' id='ro'><query xmlns='jabber:iq:roster'/></iq>").await;
        assert_eq!(r.child("query", "jabber:iq:roster").map(|q| q.elements().count()), Some(0), "{}", r.to_xml());
    });
}
