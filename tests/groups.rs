//! Groups end to end: management and permissions, durable fan-out to
//! online and offline members in order, reflection to the sender's other
//! devices, per-member receipts, removal, the size limit, non-members,
//! and the MUC view for standard clients.

mod common;

use common::{Client, TestServer, error_condition};

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

fn is_event(e: &chatd::protocol::Element, kind: &str) -> bool {
    e.local_name() == "message"
        && e.to_xml().contains("urn:chatd:groups:0")
        && e.to_xml().contains(&format!("type=\"{kind}\""))
}

async fn create_group(a: &mut Client, members: &[&str]) -> String {
    let m: String = members.iter().map(|l| format!("<member jid='{l}@localhost'/>")).collect();
    let r = a
        .iq("mk", &format!("<iq type='set' id='mk' to='groups.localhost'><create xmlns='urn:chatd:groups:0' subject='Family'>{m}</create></iq>"))
        .await;
    assert_eq!(r.attr("type"), Some("result"), "{}", r.to_xml());
    r.child("group", "urn:chatd:groups:0").and_then(|g| g.attr("jid")).expect("group jid").to_string()
}

fn body_of(e: &chatd::protocol::Element) -> String {
    e.child("body", chatd::protocol::ns::CLIENT).map(|b| b.text()).unwrap_or_default()
}

#[test]
fn fan_out_online_offline_in_order_with_receipts() {
    let srv = TestServer::start("groups-fanout", "", &users());
    rt().block_on(async {
        let mut a = Client::login(srv.port, A, "pa", "phone", true).await;
        let mut a2 = Client::login(srv.port, A, "pa", "desktop", true).await;
        let mut b = Client::login(srv.port, B, "pb", "phone", true).await;
        let g = create_group(&mut a, &[B, C]).await;
        b.expect(5, |e| is_event(e, "created")).await.expect("created event");
        b.expect(5, |e| e.to_xml().contains("jabber:x:conference")).await.expect("XEP-0249 invitation");

        // C is offline for three messages.
        for i in 0..3 {
            a.send(&format!("<message type='groupchat' id='g{i}' to='{g}'><body>hello {i}</body><request xmlns='urn:xmpp:receipts'/></message>")).await;
        }
        for i in 0..3 {
            let m = b.expect(5, |e| e.attr("type") == Some("groupchat")).await.expect("B gets group message");
            assert_eq!(body_of(&m), format!("hello {i}"));
            assert_eq!(m.attr("from"), Some(format!("{g}/{A}").as_str()));
        }
        // Reflection to the sender's other device.
        let m = a2.expect(5, |e| e.attr("type") == Some("groupchat")).await.expect("reflected copy");
        assert_eq!(body_of(&m), "hello 0");

        // B's receipt reaches A, naming B.
        b.send(&format!("<message to='{g}/{A}' id='rcpt'><received xmlns='urn:xmpp:receipts' id='g0'/></message>")).await;
        let r = a
            .expect(5, |e| e.to_xml().contains("urn:xmpp:receipts") && e.attr("id") == Some("rcpt"))
            .await
            .expect("receipt");
        assert_eq!(r.attr("from"), Some(format!("{g}/{B}").as_str()));

        // C logs in: every message, in order, with delay stamps.
        let mut c = Client::login(srv.port, C, "pc", "phone", true).await;
        let mut got = Vec::new();
        while got.len() < 3 {
            let m = c.expect(5, |e| e.attr("type") == Some("groupchat")).await.expect("C backlog");
            assert!(m.to_xml().contains("urn:xmpp:delay"), "stored copy carries a delay stamp");
            got.push(body_of(&m));
        }
        assert_eq!(got, vec!["hello 0", "hello 1", "hello 2"]);
    });
}

#[test]
fn management_permissions_removal_and_limits() {
    let srv = TestServer::start("groups-admin", "[groups]\nmax_members = 3\n", &users());
    rt().block_on(async {
        let mut a = Client::login(srv.port, A, "pa", "p", true).await;
        let mut b = Client::login(srv.port, B, "pb", "p", true).await;
        let mut c = Client::login(srv.port, C, "pc", "p", true).await;
        let mut d = Client::login(srv.port, D, "pd", "p", true).await;
        let g = create_group(&mut a, &[B]).await;

        // Members cannot manage.
        let r = b.iq("badd", &format!("<iq type='set' id='badd' to='{g}'><add xmlns='urn:chatd:groups:0'><member jid='{C}@localhost'/></add></iq>")).await;
        assert_eq!(error_condition(&r).as_deref(), Some("forbidden"));
        let r = b.iq("bsub", &format!("<iq type='set' id='bsub' to='{g}'><subject xmlns='urn:chatd:groups:0'>Mine</subject></iq>")).await;
        assert_eq!(error_condition(&r).as_deref(), Some("forbidden"));

        // Admin adds C; everyone hears about it.
        let r = a.iq("add", &format!("<iq type='set' id='add' to='{g}'><add xmlns='urn:chatd:groups:0'><member jid='{C}@localhost'/></add></iq>")).await;
        assert_eq!(r.attr("type"), Some("result"));
        b.expect(5, |e| is_event(e, "added")).await.expect("B told");
        c.expect(5, |e| is_event(e, "added")).await.expect("C told");
        // Size limit (3).
        let r = a.iq("add2", &format!("<iq type='set' id='add2' to='{g}'><add xmlns='urn:chatd:groups:0'><member jid='{D}@localhost'/></add></iq>")).await;
        assert_eq!(error_condition(&r).as_deref(), Some("resource-constraint"));

        // Promote B; B can now change the subject; the last admin cannot be demoted away.
        let r = a.iq("pro", &format!("<iq type='set' id='pro' to='{g}'><promote xmlns='urn:chatd:groups:0'><member jid='{B}@localhost'/></promote></iq>")).await;
        assert_eq!(r.attr("type"), Some("result"));
        let r = b.iq("sub", &format!("<iq type='set' id='sub' to='{g}'><subject xmlns='urn:chatd:groups:0'>Cousins</subject></iq>")).await;
        assert_eq!(r.attr("type"), Some("result"));
        c.expect(5, |e| is_event(e, "subject")).await.expect("subject event");
        let info = c.iq("info", &format!("<iq type='get' id='info' to='{g}'><info xmlns='urn:chatd:groups:0'/></iq>")).await;
        let x = info.to_xml();
        assert!(x.contains("Cousins") && x.contains(&format!("{B}@localhost\" role=\"admin\"")), "{x}");
        let r = b.iq("dem", &format!("<iq type='set' id='dem' to='{g}'><demote xmlns='urn:chatd:groups:0'><member jid='{A}@localhost'/><member jid='{B}@localhost'/></demote></iq>")).await;
        assert_eq!(error_condition(&r).as_deref(), Some("not-allowed"));

        // Non-members can neither post nor read.
        d.send(&format!("<message type='groupchat' id='dm' to='{g}'><body>let me in</body></message>")).await;
        let e = d.expect(5, |e| e.attr("id") == Some("dm")).await.expect("error");
        assert_eq!(error_condition(&e).as_deref(), Some("forbidden"));
        let r = d.iq("dinfo", &format!("<iq type='get' id='dinfo' to='{g}'><info xmlns='urn:chatd:groups:0'/></iq>")).await;
        assert_eq!(error_condition(&r).as_deref(), Some("forbidden"));

        // Remove C: C is told, then receives nothing more.
        let r = a.iq("rm", &format!("<iq type='set' id='rm' to='{g}'><remove xmlns='urn:chatd:groups:0'><member jid='{C}@localhost'/></remove></iq>")).await;
        assert_eq!(r.attr("type"), Some("result"));
        c.expect(5, |e| is_event(e, "removed")).await.expect("C told of removal");
        a.send(&format!("<message type='groupchat' to='{g}'><body>after removal</body></message>")).await;
        b.expect(5, |e| body_of(e) == "after removal").await.expect("B still gets it");
        let late = c.drain(1).await;
        assert!(!late.iter().any(|e| body_of(e) == "after removal"), "removed member got a message");

        // List and leave.
        let l = b.iq("ls", "<iq type='get' id='ls' to='groups.localhost'><list xmlns='urn:chatd:groups:0'/></iq>").await;
        assert!(l.to_xml().contains(&g));
        let r = b.iq("lv", &format!("<iq type='set' id='lv' to='{g}'><leave xmlns='urn:chatd:groups:0'/></iq>")).await;
        assert_eq!(r.attr("type"), Some("result"));
        a.expect(5, |e| is_event(e, "left")).await.expect("A told B left");
    });
}

#[test]
fn muc_view_for_standard_clients() {
    let srv = TestServer::start("groups-muc", "", &users());
    rt().block_on(async {
        let mut a = Client::login(srv.port, A, "pa", "p", true).await;
        let mut b = Client::login(srv.port, B, "pb", "p", true).await;
        let mut d = Client::login(srv.port, D, "pd", "p", true).await;
        let g = create_group(&mut a, &[B]).await;
        let info = b
            .iq(
                "di",
                &format!("<iq type='get' id='di' to='{g}'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>"),
            )
            .await;
        let x = info.to_xml();
        assert!(x.contains("muc_membersonly") && x.contains("muc_persistent") && x.contains("conference"), "{x}");
        b.send(&format!("<presence to='{g}/whatever'><x xmlns='http://jabber.org/protocol/muc'/></presence>")).await;
        let other = b
            .expect(5, |e| e.local_name() == "presence" && e.attr("from") == Some(&format!("{g}/{A}")))
            .await
            .expect("occupant A");
        assert!(other.to_xml().contains("affiliation=\"owner\""));
        let me = b
            .expect(5, |e| e.local_name() == "presence" && e.attr("from") == Some(&format!("{g}/{B}")))
            .await
            .expect("self presence");
        assert!(me.to_xml().contains("code=\"110\""));
        let subj = b
            .expect(5, |e| e.local_name() == "message" && e.child("subject", chatd::protocol::ns::CLIENT).is_some())
            .await
            .expect("subject");
        assert!(subj.to_xml().contains("Family"));
        // A non-member cannot join a members-only room.
        d.send(&format!("<presence to='{g}/d'><x xmlns='http://jabber.org/protocol/muc'/></presence>")).await;
        let e = d
            .expect(5, |e| e.local_name() == "presence" && e.attr("type") == Some("error"))
            .await
            .expect("join refused");
        assert!(e.to_xml().contains("registration-required"));
        // The service is discoverable from the server.
        let items = a
            .iq(
                "it",
                "<iq type='get' id='it' to='localhost'><query xmlns='http://jabber.org/protocol/disco#items'/></iq>",
            )
            .await;
        assert!(items.to_xml().contains("groups.localhost"));
    });
}
