//! Account-model features against the real server: blocking on every
//! channel, last seen with the visibility setting, contact discovery and
//! its throttling, profiles over PEP, in-band registration and removal.

mod common;

use common::{Client, TestServer, error_condition};

const A: &str = "15550000001";
const B: &str = "15550000002";
const C: &str = "15550000003";

fn users() -> Vec<(&'static str, &'static str)> {
    vec![("+15550000001", "pa"), ("+15550000002", "pb"), ("+15550000003", "pc")]
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap()
}

/// Makes `x` and `y` mutual presence subscribers.
async fn befriend(x: &mut Client, xl: &str, y: &mut Client, yl: &str) {
    x.send(&format!("<presence type='subscribe' to='{yl}@localhost'/>")).await;
    y.expect(5, |e| e.local_name() == "presence" && e.attr("type") == Some("subscribe"))
        .await
        .expect("subscribe request");
    y.send(&format!("<presence type='subscribed' to='{xl}@localhost'/>")).await;
    y.send(&format!("<presence type='subscribe' to='{xl}@localhost'/>")).await;
    x.expect(5, |e| e.local_name() == "presence" && e.attr("type") == Some("subscribe")).await.expect("subscribe back");
    x.send(&format!("<presence type='subscribed' to='{yl}@localhost'/>")).await;
    let _ = x.drain(1).await;
    let _ = y.drain(1).await;
}

#[test]
fn blocking_covers_messages_presence_last_seen_and_profile() {
    let srv = TestServer::start("blocking", "", &users());
    rt().block_on(async {
        let mut a = Client::login(srv.port, A, "pa", "p", true).await;
        let mut b = Client::login(srv.port, B, "pb", "p", true).await;
        befriend(&mut a, A, &mut b, B).await;
        // A publishes a nickname; B can read it before the block.
        let r = a
            .iq("pub", "<iq type='set' id='pub'><pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='http://jabber.org/protocol/nick'><item id='current'><nick xmlns='http://jabber.org/protocol/nick'>Alice</nick></item></publish></pubsub></iq>")
            .await;
        assert_eq!(r.attr("type"), Some("result"));
        let got = b
            .iq("get1", &format!("<iq type='get' id='get1' to='{A}@localhost'><pubsub xmlns='http://jabber.org/protocol/pubsub'><items node='http://jabber.org/protocol/nick'/></pubsub></iq>"))
            .await;
        assert!(got.to_xml().contains("Alice"), "{}", got.to_xml());

        // A blocks B.
        let r = a
            .iq("blk", &format!("<iq type='set' id='blk'><block xmlns='urn:xmpp:blocking'><item jid='{B}@localhost'/></block></iq>"))
            .await;
        assert_eq!(r.attr("type"), Some("result"));
        let list = a.iq("bl", "<iq type='get' id='bl'><blocklist xmlns='urn:xmpp:blocking'/></iq>").await;
        assert!(list.to_xml().contains(&format!("{B}@localhost")));
        // B saw A go unavailable.
        b.expect(5, |e| e.local_name() == "presence" && e.attr("type") == Some("unavailable"))
            .await
            .expect("unavailable after block");

        // Messages from B to A bounce as if A did not exist.
        b.send(&format!("<message type='chat' id='m1' to='{A}@localhost'><body>hi</body></message>")).await;
        let e = b.expect(5, |e| e.attr("id") == Some("m1")).await.expect("error");
        assert_eq!(error_condition(&e).as_deref(), Some("service-unavailable"));
        // A cannot message B either, with the XEP-0191 error.
        a.send(&format!("<message type='chat' id='m2' to='{B}@localhost'><body>hi</body></message>")).await;
        let e = a.expect(5, |e| e.attr("id") == Some("m2")).await.expect("error");
        assert_eq!(error_condition(&e).as_deref(), Some("not-acceptable"));
        assert!(e.to_xml().contains("urn:xmpp:blocking:errors"));
        // Last seen and profile are hidden from B.
        let l = b
            .iq("last", &format!("<iq type='get' id='last' to='{A}@localhost'><query xmlns='jabber:iq:last'/></iq>"))
            .await;
        // Answered as for an account that does not exist: the block is not revealed.
        assert_eq!(error_condition(&l).as_deref(), Some("service-unavailable"));
        let p = b
            .iq("get2", &format!("<iq type='get' id='get2' to='{A}@localhost'><pubsub xmlns='http://jabber.org/protocol/pubsub'><items node='http://jabber.org/protocol/nick'/></pubsub></iq>"))
            .await;
        assert!(!p.to_xml().contains("Alice"));
        // A's presence updates no longer reach B.
        a.send("<presence><status>busy</status></presence>").await;
        let seen = b.drain(1).await;
        assert!(!seen.iter().any(|e| e.to_xml().contains("busy")), "presence leaked to a blocked contact");
        // Subscription requests from B are dropped.
        b.send(&format!("<presence type='subscribe' to='{A}@localhost'/>")).await;
        let seen = a.drain(1).await;
        assert!(!seen.iter().any(|e| e.attr("type") == Some("subscribe")));

        // Unblock restores delivery.
        let r = a
            .iq("ub", &format!("<iq type='set' id='ub'><unblock xmlns='urn:xmpp:blocking'><item jid='{B}@localhost'/></unblock></iq>"))
            .await;
        assert_eq!(r.attr("type"), Some("result"));
        b.send(&format!("<message type='chat' id='m3' to='{A}@localhost'><body>again</body></message>")).await;
        let m = a.expect(5, |e| e.local_name() == "message").await.expect("message after unblock");
        assert!(m.to_xml().contains("again"));
    });
}

#[test]
fn last_seen_respects_visibility() {
    let srv = TestServer::start("lastseen", "", &users());
    rt().block_on(async {
        let mut a = Client::login(srv.port, A, "pa", "p", true).await;
        let mut b = Client::login(srv.port, B, "pb", "p", true).await;
        let mut c = Client::login(srv.port, C, "pc", "p", true).await;
        // Online: 0 seconds.
        let r = b.iq("l1", &format!("<iq type='get' id='l1' to='{A}@localhost'><query xmlns='jabber:iq:last'/></iq>")).await;
        assert_eq!(r.child("query", "jabber:iq:last").and_then(|q| q.attr("seconds")), Some("0"));
        // A adds B to its roster, then limits visibility to contacts.
        let r = a
            .iq("rs", &format!("<iq type='set' id='rs'><query xmlns='jabber:iq:roster'><item jid='{B}@localhost' name='Bob'/></query></iq>"))
            .await;
        assert_eq!(r.attr("type"), Some("result"));
        let r = a.iq("pv", "<iq type='set' id='pv'><privacy xmlns='urn:chatd:privacy:0' visibility='contacts'/></iq>").await;
        assert_eq!(r.child("privacy", "urn:chatd:privacy:0").and_then(|p| p.attr("visibility")), Some("contacts"));
        let r = a.iq("pg", "<iq type='get' id='pg'><privacy xmlns='urn:chatd:privacy:0'/></iq>").await;
        assert_eq!(r.child("privacy", "urn:chatd:privacy:0").and_then(|p| p.attr("visibility")), Some("contacts"));
        a.send("</stream:stream>").await;
        drop(a);
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        let r = b.iq("l2", &format!("<iq type='get' id='l2' to='{A}@localhost'><query xmlns='jabber:iq:last'/></iq>")).await;
        let secs: u64 = r
            .child("query", "jabber:iq:last")
            .and_then(|q| q.attr("seconds"))
            .and_then(|s| s.parse().ok())
            .expect("seconds");
        assert!((1..60).contains(&secs), "seconds={secs}");
        let r = c.iq("l3", &format!("<iq type='get' id='l3' to='{A}@localhost'><query xmlns='jabber:iq:last'/></iq>")).await;
        assert_eq!(error_condition(&r).as_deref(), Some("forbidden"), "non-contact must not see last seen");
        // Nobody: even the contact is refused.
        let mut a = Client::login(srv.port, A, "pa", "p2", false).await;
        a.iq("pv2", "<iq type='set' id='pv2'><privacy xmlns='urn:chatd:privacy:0' visibility='nobody'/></iq>").await;
        let r = b.iq("l4", &format!("<iq type='get' id='l4' to='{A}@localhost'><query xmlns='jabber:iq:last'/></iq>")).await;
        assert_eq!(error_condition(&r).as_deref(), Some("forbidden"));
    });
}

#[test]
fn contact_discovery_normalises_and_throttles() {
    let cfg = "[discovery]\nmax_batch = 5\nmax_per_hour = 7\n";
    let srv = TestServer::start("discovery", cfg, &users());
    rt().block_on(async {
        let mut a = Client::login(srv.port, A, "pa", "p", false).await;
        let r = a
            .iq("d1", "<iq type='get' id='d1' to='localhost'><query xmlns='urn:chatd:discovery:0'><phone>+1 (555) 000-0002</phone><phone>555 000 0003</phone><phone>+1 555 999 9999</phone><phone>garbage</phone></query></iq>")
            .await;
        let q = r.child("query", "urn:chatd:discovery:0").expect("query");
        let jids: Vec<&str> = q.elements().filter_map(|c| c.attr("jid")).collect();
        assert_eq!(jids, vec!["15550000002@localhost", "15550000003@localhost"]);
        // Oversized batch.
        let many: String = (0..6).map(|i| format!("<phone>+1555123000{i}</phone>")).collect();
        let r = a
            .iq("d2", &format!("<iq type='get' id='d2' to='localhost'><query xmlns='urn:chatd:discovery:0'>{many}</query></iq>"))
            .await;
        assert_eq!(error_condition(&r).as_deref(), Some("policy-violation"));
        // Enumeration: 4 + 4 numbers exceed the hourly allowance of 7.
        let four: String = (0..4).map(|i| format!("<phone>+1555123100{i}</phone>")).collect();
        let r = a
            .iq("d3", &format!("<iq type='get' id='d3' to='localhost'><query xmlns='urn:chatd:discovery:0'>{four}</query></iq>"))
            .await;
        assert_eq!(error_condition(&r).as_deref(), Some("resource-constraint"));
    });
}

#[test]
fn profile_publish_notifies_and_limits_size() {
    let cfg = "[profile]\nmax_avatar_bytes = 1000\n";
    let srv = TestServer::start("pep", cfg, &users());
    rt().block_on(async {
        let mut a = Client::login(srv.port, A, "pa", "p", true).await;
        let mut b = Client::login(srv.port, B, "pb", "p", true).await;
        befriend(&mut a, A, &mut b, B).await;
        let r = a
            .iq("n", "<iq type='set' id='n'><pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='http://jabber.org/protocol/nick'><item><nick xmlns='http://jabber.org/protocol/nick'>Ann</nick></item></publish></pubsub></iq>")
            .await;
        assert_eq!(r.attr("type"), Some("result"));
        let ev = b
            .expect(5, |e| e.local_name() == "message" && e.to_xml().contains("pubsub#event"))
            .await
            .expect("notification");
        assert!(ev.to_xml().contains("Ann"));
        let big = "A".repeat(5000);
        let r = a
            .iq("av", &format!("<iq type='set' id='av'><pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='urn:xmpp:avatar:data'><item id='x'><data xmlns='urn:xmpp:avatar:data'>{big}</data></item></publish></pubsub></iq>"))
            .await;
        assert_eq!(error_condition(&r).as_deref(), Some("not-acceptable"));
        let r = a
            .iq("other", "<iq type='set' id='other'><pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='urn:example:x'><item><x xmlns='urn:example:x'/></item></publish></pubsub></iq>")
            .await;
        assert_eq!(error_condition(&r).as_deref(), Some("feature-not-implemented"));
    });
}

#[test]
fn in_band_registration_off_by_default_and_removal_erases_everything() {
    // Off by default: no feature, and the iq is refused before auth.
    let srv = TestServer::start("ibr-off", "", &[]);
    rt().block_on(async {
        let mut c = Client::connect(srv.port).await;
        c.send(common::HEADER).await;
        c.next(5).await.expect("header");
        let f = match c.next(5).await {
            Some(chatd::protocol::Frame::Stanza(f)) => f,
            other => panic!("{other:?}"),
        };
        assert!(!f.to_xml().contains("iq-register"));
    });
    drop(srv);

    let cfg = "[registration]\nin_band = true\nin_band_per_ip_per_hour = 2\n";
    let srv = TestServer::start("ibr-on", cfg, &[]);
    rt().block_on(async {
        let register = |user: &'static str, id: &'static str| async move {
            let mut c = Client::connect(srv.port).await;
            c.send(common::HEADER).await;
            c.next(5).await.expect("header");
            let f = c.next(5).await.expect("features");
            if let chatd::protocol::Frame::Stanza(f) = &f {
                assert!(f.to_xml().contains("iq-register"));
            }
            c.iq(id, &format!("<iq type='set' id='{id}'><query xmlns='jabber:iq:register'><username>{user}</username><password>secret</password></query></iq>"))
                .await
        };
        let r = register("+1 555 000 0009", "r1").await;
        assert_eq!(r.attr("type"), Some("result"), "{}", r.to_xml());
        let r = register("alice", "r2").await;
        assert_eq!(error_condition(&r).as_deref(), Some("not-acceptable"));
        let r = register("15550000009", "r3").await;
        assert_eq!(error_condition(&r).as_deref(), Some("conflict"));
        let r = register("15550000008", "r4").await;
        assert_eq!(r.attr("type"), Some("result"));
        let r = register("15550000007", "r5").await;
        assert_eq!(error_condition(&r).as_deref(), Some("resource-constraint"), "per-IP limit");

        // 09 gets an offline message, a roster item and a privacy setting, then removes itself.
        let mut x = Client::login(srv.port, "15550000009", "secret", "p", false).await;
        x.iq("rs", "<iq type='set' id='rs'><query xmlns='jabber:iq:roster'><item jid='15550000008@localhost'/></query></iq>").await;
        x.iq("pv", "<iq type='set' id='pv'><privacy xmlns='urn:chatd:privacy:0' visibility='nobody'/></iq>").await;
        let mut y = Client::login(srv.port, "15550000008", "secret", "p", false).await;
        y.send("<message type='chat' to='15550000009@localhost'><body>queued</body></message>").await;
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let r = x.iq("rm", "<iq type='set' id='rm'><query xmlns='jabber:iq:register'><remove/></query></iq>").await;
        assert_eq!(r.attr("type"), Some("result"));
        // The account is gone: messages to it bounce.
        y.send("<message type='chat' id='after' to='15550000009@localhost'><body>x</body></message>").await;
        let e = y.expect(5, |e| e.attr("id") == Some("after")).await.expect("bounce");
        assert_eq!(error_condition(&e).as_deref(), Some("service-unavailable"));
    });
    // Re-register the same number: nothing of the old account remains.
    let out = srv.user_cmd(&["add", "+15550000009", "--password", "new"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    rt().block_on(async {
        let mut x = Client::login(srv.port, "15550000009", "new", "p", false).await;
        let r = x.iq("rg", "<iq type='get' id='rg'><query xmlns='jabber:iq:roster'/></iq>").await;
        assert!(!r.to_xml().contains("15550000008"), "old roster survived: {}", r.to_xml());
        let r = x.iq("pg", "<iq type='get' id='pg'><privacy xmlns='urn:chatd:privacy:0'/></iq>").await;
        assert_eq!(r.child("privacy", "urn:chatd:privacy:0").and_then(|p| p.attr("visibility")), Some("everyone"));
        x.send("<presence/>").await;
        let got = x.drain(2).await;
        assert!(!got.iter().any(|e| e.to_xml().contains("queued")), "old offline queue survived");
    });
}
