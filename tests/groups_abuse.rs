//! Groups that cannot be used against people: consent ("who can add me
//! to groups" and invitations), blocking on every group path, one
//! announcement per admin action, creation and size limits, and full
//! queues reported to the sender. Costs are read from the running
//! server's `/proc/PID/io`, as an outsider would.

mod common;

use chatd::protocol::Element;
use common::{Client, TestServer, error_condition};

const A: &str = "15550000001";
const B: &str = "15550000002";
const C: &str = "15550000003";
const D: &str = "15550000004";
const E: &str = "15550000005";
const NS: &str = "urn:chatd:groups:0";

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap()
}

fn users() -> Vec<(&'static str, &'static str)> {
    vec![
        ("+15550000001", "pa"),
        ("+15550000002", "pb"),
        ("+15550000003", "pc"),
        ("+15550000004", "pd"),
        ("+15550000005", "pe"),
    ]
}

/// Bytes the server process passed to write(2) so far.
fn wchar(srv: &TestServer) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{}/io", srv.child.id())).expect("/proc/PID/io");
    io.lines().find_map(|l| l.strip_prefix("wchar: ")).and_then(|v| v.trim().parse().ok()).expect("wchar")
}

/// Creates `n` extra accounts (`1555200NNNN`, password `pw`) through the
/// running server's admin socket; returns their localparts.
fn import(srv: &TestServer, n: usize) -> Vec<String> {
    let locals: Vec<String> = (0..n).map(|i| format!("1555200{i:04}")).collect();
    let csv: String = locals.iter().map(|l| format!("+{l},pw\n")).collect();
    let path = srv.dir.join("import.csv");
    std::fs::write(&path, csv).unwrap();
    let out = srv.user_cmd(&["import", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    locals
}

fn is_event(e: &Element, kind: &str) -> bool {
    e.local_name() == "message" && e.to_xml().contains(NS) && e.to_xml().contains(&format!("type=\"{kind}\""))
}

fn is_invitation(e: &Element) -> bool {
    e.local_name() == "message" && e.to_xml().contains("jabber:x:conference")
}

fn members(xs: &[&str]) -> String {
    xs.iter().map(|l| format!("<member jid='{l}@localhost'/>")).collect()
}

async fn create(a: &mut Client, id: &str, named: &str) -> Element {
    a.iq(
        id,
        &format!(
            "<iq type='set' id='{id}' to='groups.localhost'><create xmlns='{NS}' subject='Team'>{named}</create></iq>"
        ),
    )
    .await
}

fn group_of(r: &Element) -> String {
    assert_eq!(r.attr("type"), Some("result"), "{}", r.to_xml());
    r.child("group", NS).and_then(|g| g.attr("jid")).expect("group jid").to_string()
}

async fn member_jids(c: &mut Client, g: &str, id: &str) -> Vec<String> {
    let r = c.iq(id, &format!("<iq type='get' id='{id}' to='{g}'><info xmlns='{NS}'/></iq>")).await;
    let info = r.child("info", NS).unwrap_or_else(|| panic!("no info: {}", r.to_xml()));
    info.elements().filter_map(|m| m.attr("jid")).map(str::to_string).collect()
}

#[test]
fn who_can_add_me_and_invitations() {
    let srv = TestServer::start("gabuse-consent", "", &users());
    rt().block_on(async {
        let mut a = Client::login(srv.port, A, "pa", "p", true).await;
        let mut b = Client::login(srv.port, B, "pb", "p", true).await;
        let mut c = Client::login(srv.port, C, "pc", "p", true).await;
        let mut d = Client::login(srv.port, D, "pd", "p", true).await;
        // B: contacts only; C: nobody; D: contacts, and A is D's contact.
        let r =
            b.iq("pb", "<iq type='set' id='pb'><privacy xmlns='urn:chatd:privacy:0' groups='contacts'/></iq>").await;
        assert_eq!(r.child("privacy", "urn:chatd:privacy:0").and_then(|p| p.attr("groups")), Some("contacts"));
        let r = c.iq("pc", "<iq type='set' id='pc'><privacy xmlns='urn:chatd:privacy:0' groups='nobody'/></iq>").await;
        assert_eq!(r.attr("type"), Some("result"));
        let r =
            d.iq("pd", "<iq type='set' id='pd'><privacy xmlns='urn:chatd:privacy:0' groups='contacts'/></iq>").await;
        assert_eq!(r.attr("type"), Some("result"));
        let r = d
            .iq(
                "rd",
                &format!(
                    "<iq type='set' id='rd'><query xmlns='jabber:iq:roster'><item jid='{A}@localhost'/></query></iq>"
                ),
            )
            .await;
        assert_eq!(r.attr("type"), Some("result"));
        let r =
            c.iq("bad", "<iq type='set' id='bad'><privacy xmlns='urn:chatd:privacy:0' groups='strangers'/></iq>").await;
        assert_eq!(error_condition(&r).as_deref(), Some("bad-request"));

        let r = create(&mut a, "mk", &members(&[B, C, D])).await;
        let g = group_of(&r);
        let invited = r.child("group", NS).and_then(|x| x.child("invited", NS)).map(|i| i.to_xml()).unwrap_or_default();
        assert!(invited.contains(B) && invited.contains(C) && !invited.contains(D), "{}", r.to_xml());
        let m = member_jids(&mut a, &g, "i1").await;
        assert_eq!(m, vec![format!("{A}@localhost"), format!("{D}@localhost")], "only D was added directly");

        // B and C are invited, not members: they get no group traffic.
        let inv = b.expect(5, is_invitation).await.expect("B gets an invitation");
        assert_eq!(inv.attr("from"), Some(format!("{A}@localhost").as_str()));
        c.expect(5, is_invitation).await.expect("C gets an invitation");
        a.send(&format!("<message type='groupchat' to='{g}' id='m1'><body>before</body></message>")).await;
        d.expect(5, |e| e.attr("type") == Some("groupchat")).await.expect("D gets it");
        let r = b.iq("bi", &format!("<iq type='get' id='bi' to='{g}'><info xmlns='{NS}'/></iq>")).await;
        assert_eq!(error_condition(&r).as_deref(), Some("forbidden"));
        assert!(!b.drain(1).await.iter().any(|e| e.attr("type") == Some("groupchat")));

        // B accepts with <join/>; C with a MUC join.
        let r = b.iq("bj", &format!("<iq type='set' id='bj' to='{g}'><join xmlns='{NS}'/></iq>")).await;
        assert_eq!(r.attr("type"), Some("result"), "{}", r.to_xml());
        a.expect(5, |e| is_event(e, "joined") && e.to_xml().contains(B)).await.expect("A told B joined");
        c.send(&format!("<presence to='{g}/c'><x xmlns='http://jabber.org/protocol/muc'/></presence>")).await;
        let me = c
            .expect(5, |e| e.local_name() == "presence" && e.attr("from") == Some(&format!("{g}/{C}")))
            .await
            .expect("C joined the room");
        assert!(me.to_xml().contains("code=\"110\""));
        a.send(&format!("<message type='groupchat' to='{g}' id='m2'><body>after</body></message>")).await;
        b.expect(5, |e| e.attr("type") == Some("groupchat")).await.expect("B is a member now");
        c.expect(5, |e| e.attr("type") == Some("groupchat")).await.expect("C is a member now");
        assert_eq!(member_jids(&mut a, &g, "i2").await.len(), 4);

        // Nobody can join uninvited, and an invitation is used once.
        let mut e = Client::login(srv.port, E, "pe", "p", true).await;
        let r = e.iq("ej", &format!("<iq type='set' id='ej' to='{g}'><join xmlns='{NS}'/></iq>")).await;
        assert_eq!(error_condition(&r).as_deref(), Some("forbidden"));
        // A declined invitation leaves no membership.
        let r = e.iq("ep", "<iq type='set' id='ep'><privacy xmlns='urn:chatd:privacy:0' groups='nobody'/></iq>").await;
        assert_eq!(r.attr("type"), Some("result"));
        let r = a
            .iq("ae", &format!("<iq type='set' id='ae' to='{g}'><add xmlns='{NS}'>{}</add></iq>", members(&[E])))
            .await;
        assert_eq!(r.attr("type"), Some("result"));
        e.expect(5, is_invitation).await.expect("E invited");
        let r = e.iq("ed", &format!("<iq type='set' id='ed' to='{g}'><decline xmlns='{NS}'/></iq>")).await;
        assert_eq!(r.attr("type"), Some("result"));
        let r = e.iq("ej2", &format!("<iq type='set' id='ej2' to='{g}'><join xmlns='{NS}'/></iq>")).await;
        assert_eq!(error_condition(&r).as_deref(), Some("forbidden"));
    });
}

#[test]
fn blocked_accounts_reach_nobody_through_groups() {
    let srv = TestServer::start("gabuse-block", "", &users());
    rt().block_on(async {
        let mut a = Client::login(srv.port, A, "pa", "p", true).await;
        let mut b = Client::login(srv.port, B, "pb", "p", true).await;
        let mut c = Client::login(srv.port, C, "pc", "p", true).await;
        let r = b
            .iq(
                "blk",
                &format!(
                    "<iq type='set' id='blk'><block xmlns='urn:xmpp:blocking'><item jid='{A}@localhost'/></block></iq>"
                ),
            )
            .await;
        assert_eq!(r.attr("type"), Some("result"));

        // A cannot add B, not even by invitation, and is not told why.
        let r = create(&mut a, "mk", &members(&[B, C])).await;
        let g1 = group_of(&r);
        assert!(r.to_xml().contains(&format!("{B}@localhost")), "answered like an invitation: {}", r.to_xml());
        assert_eq!(member_jids(&mut a, &g1, "i1").await, vec![format!("{A}@localhost"), format!("{C}@localhost")]);
        let r = a
            .iq("add", &format!("<iq type='set' id='add' to='{g1}'><add xmlns='{NS}'>{}</add></iq>", members(&[B])))
            .await;
        assert_eq!(r.attr("type"), Some("result"));
        assert_eq!(member_jids(&mut a, &g1, "i1b").await.len(), 2);
        let r = b.iq("bj", &format!("<iq type='set' id='bj' to='{g1}'><join xmlns='{NS}'/></iq>")).await;
        assert_eq!(error_condition(&r).as_deref(), Some("forbidden"));

        // In a group C made with both, B gets nothing from A.
        let g2 = group_of(&create(&mut c, "mk2", &members(&[A, B])).await);
        let r = c
            .iq(
                "pro",
                &format!("<iq type='set' id='pro' to='{g2}'><promote xmlns='{NS}'>{}</promote></iq>", members(&[A])),
            )
            .await;
        assert_eq!(r.attr("type"), Some("result"));
        a.send(&format!("<message type='groupchat' to='{g2}' id='fromA'><body>from A</body></message>")).await;
        a.send(&format!("<message to='{g2}/{B}' id='privA'><body>private from A</body></message>")).await;
        let r = a
            .iq(
                "subj",
                &format!("<iq type='set' id='subj' to='{g2}'><subject xmlns='{NS}'>Renamed by A</subject></iq>"),
            )
            .await;
        assert_eq!(r.attr("type"), Some("result"));
        c.send(&format!("<message type='groupchat' to='{g2}' id='fromC'><body>from C</body></message>")).await;
        c.expect(5, |e| e.attr("type") == Some("groupchat") && e.to_xml().contains("from A"))
            .await
            .expect("C gets A's message");
        let got = b.drain(3).await;
        let texts: Vec<String> = got.iter().map(|e| e.to_xml()).collect();
        assert!(texts.iter().any(|x| x.contains("from C")), "B still gets C's message: {texts:?}");
        let from_a = format!("from=\"{A}@localhost");
        let actor_a = format!("actor=\"{A}@localhost");
        assert!(
            !texts.iter().any(|x| x.contains("from A") || x.contains(&from_a) || x.contains(&actor_a)),
            "something from A reached B: {texts:?}"
        );
    });
}

#[test]
fn one_announcement_per_admin_action() {
    // GROUP_AMP_MEMBERS=1023 reproduces the full-size figure (slow in debug).
    let n = std::env::var("GROUP_AMP_MEMBERS").ok().and_then(|v| v.parse().ok()).unwrap_or(150);
    let named_n = std::env::var("GROUP_AMP_NAMED").ok().and_then(|v| v.parse().ok()).unwrap_or(n);
    let srv = TestServer::start("gabuse-amp", "", &users());
    let others = import(&srv, n);
    rt().block_on(async {
        let mut a = Client::login(srv.port, A, "pa", "p", true).await;
        let named: String = others.iter().map(|l| format!("<member jid='{l}@localhost'/>")).collect();
        let g = group_of(&create(&mut a, "mk", &named).await);
        let promote: String = others[..named_n].iter().map(|l| format!("<member jid='{l}@localhost'/>")).collect();
        let before = wchar(&srv);
        let r = a
            .iq("pro", &format!("<iq type='set' id='pro' to='{g}'><promote xmlns='{NS}'>{promote}</promote></iq>"))
            .await;
        assert_eq!(r.attr("type"), Some("result"));
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let written = wchar(&srv) - before;
        // A member that was offline finds exactly one event for the action.
        let mut m = Client::login(srv.port, &others[7], "pw", "p", true).await;
        let got = m.drain(3).await;
        let promoted: Vec<&Element> = got.iter().filter(|e| is_event(e, "promoted")).collect();
        println!(
            "promote naming {named_n} members in a group of {}: {} promoted events per member, {} stored in all, {written} bytes written",
            others.len() + 1,
            promoted.len(),
            promoted.len() * (others.len() + 1)
        );
        assert_eq!(promoted.len(), 1, "one announcement per member for one action");
        let ev = promoted[0].to_xml();
        assert!(ev.contains(&format!("count=\"{named_n}\"")), "{ev}");
        // Written bytes: one small event per member, not one per named member.
        assert!(written < 2_000_000, "promote wrote {written} bytes");
    });
}

#[test]
fn creation_rate_sizes_and_ids() {
    let cfg = "[groups]\ncreations_per_hour = 3\nmax_message_bytes = 4096\nmax_subject_bytes = 20\nmax_description_bytes = 40\n";
    let srv = TestServer::start("gabuse-limits", cfg, &users());
    let others = import(&srv, 50);
    rt().block_on(async {
        let mut a = Client::login(srv.port, A, "pa", "p", true).await;
        let long = "x".repeat(21);
        let r = a.iq("s", &format!("<iq type='set' id='s' to='groups.localhost'><create xmlns='{NS}' subject='{long}'/></iq>")).await;
        assert_eq!(error_condition(&r).as_deref(), Some("not-acceptable"));
        let r = a.iq("d", &format!("<iq type='set' id='d' to='groups.localhost'><create xmlns='{NS}' subject='ok' description='{}'/></iq>", "y".repeat(41))).await;
        assert_eq!(error_condition(&r).as_deref(), Some("not-acceptable"));
        let named: String = others.iter().map(|l| format!("<member jid='{l}@localhost'/>")).collect();
        let g = group_of(&create(&mut a, "g1", &named).await);
        let id = g.split('@').next().unwrap();
        assert_eq!(id.len(), 33, "g + 128 bits in hex: {id}");
        let r = a.iq("sub", &format!("<iq type='set' id='sub' to='{g}'><subject xmlns='{NS}'>{long}</subject></iq>")).await;
        assert_eq!(error_condition(&r).as_deref(), Some("not-acceptable"));
        let r = a.iq("desc", &format!("<iq type='set' id='desc' to='{g}'><description xmlns='{NS}'>{}</description></iq>", "y".repeat(41))).await;
        assert_eq!(error_condition(&r).as_deref(), Some("not-acceptable"));
        let g2 = group_of(&create(&mut a, "g2", "").await);
        let g3 = group_of(&create(&mut a, "g3", "").await);
        assert!(g != g2 && g2 != g3);
        let r = create(&mut a, "g4", "").await;
        assert_eq!(error_condition(&r).as_deref(), Some("resource-constraint"), "creation rate");

        // Group message size: a big message is refused before it is stored
        // 51 times; a small one goes through.
        let before = wchar(&srv);
        for i in 0..3 {
            let body = "z".repeat(200_000);
            a.send(&format!("<message type='groupchat' to='{g}' id='big{i}'><body>{body}</body></message>")).await;
            let e = a.expect(10, |e| e.attr("id") == Some(&format!("big{i}"))).await.expect("answer");
            assert_eq!(error_condition(&e).as_deref(), Some("policy-violation"), "{}", e.attr("type").unwrap_or(""));
            assert!(e.to_xml().len() < 2000, "the error does not echo the payload");
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let written = wchar(&srv) - before;
        println!("three 200 KB group messages to 51 members: {written} bytes written");
        assert!(written < 1_000_000, "{written}");
        a.send(&format!("<message type='groupchat' to='{g}' id='small'><body>{}</body></message>", "s".repeat(1000))).await;
        let e = a.expect(5, |e| e.attr("id") == Some("small")).await.expect("reflected copy");
        assert_eq!(e.attr("type"), Some("groupchat"));
    });
}

#[test]
fn full_queues_are_reported_to_the_sender() {
    // The whole queue may hold one sender's messages here, so it is the
    // queue limit, not the sender's share of it, that refuses.
    let srv = TestServer::start("gabuse-full", "[offline]\nmax_queue = 4\nsender_share_percent = 100\n", &users());
    rt().block_on(async {
        let mut a = Client::login(srv.port, A, "pa", "p", true).await;
        let g = group_of(&create(&mut a, "mk", &members(&[B, C])).await);
        // C stays offline: created event + invitation = 2 queued. B reads.
        let mut b = Client::login(srv.port, B, "pb", "p", true).await;
        let mut reported = None;
        for i in 0..4 {
            a.send(&format!("<message type='groupchat' to='{g}' id='m{i}'><body>m{i}</body></message>")).await;
            let e = a.expect(5, |e| e.attr("id") == Some(&format!("m{i}"))).await.expect("copy or error");
            if e.attr("type") == Some("error") {
                reported = Some((i, e));
                break;
            }
            b.expect(5, |e| e.attr("id") == Some(&format!("m{i}"))).await.expect("B gets it");
            // B answers the server's delivery ping, so its queue empties.
            let _ = b.expect(1, |_| false).await;
        }
        let (i, e) = reported.expect("the sender learns some member did not get a message");
        assert_eq!(i, 2, "C's queue (4) holds the event, the invitation and two messages");
        assert_eq!(error_condition(&e).as_deref(), Some("resource-constraint"));
        let u = e
            .child("error", chatd::protocol::ns::CLIENT)
            .and_then(|x| x.child("undelivered", NS))
            .expect("undelivered list")
            .to_xml();
        assert!(u.contains(&format!("{C}@localhost")) && !u.contains(&format!("{B}@localhost")), "{u}");
        b.expect(5, |e| e.attr("id") == Some("m2")).await.expect("the others still get it");

        // Announcements and invitations: the iq result names C.
        let r = a
            .iq(
                "pro",
                &format!("<iq type='set' id='pro' to='{g}'><promote xmlns='{NS}'>{}</promote></iq>", members(&[C])),
            )
            .await;
        assert_eq!(r.attr("type"), Some("result"));
        let u = r.child("undelivered", NS).expect("undelivered in the result").to_xml();
        assert!(u.contains(&format!("{C}@localhost")), "{u}");
    });
}

#[test]
fn naming_numbers_draws_on_the_discovery_allowance() {
    let srv = TestServer::start("gabuse-probe", "[discovery]\nmax_per_hour = 3\n", &users());
    rt().block_on(async {
        let mut a = Client::login(srv.port, A, "pa", "p", true).await;
        // Three strangers named: the allowance is spent...
        let g = group_of(&create(&mut a, "mk", &members(&[B, C, D])).await);
        // ...so naming another stranger is refused, registered or not,
        let r = a
            .iq("add", &format!("<iq type='set' id='add' to='{g}'><add xmlns='{NS}'>{}</add></iq>", members(&[E])))
            .await;
        assert_eq!(error_condition(&r).as_deref(), Some("resource-constraint"));
        let r = a
            .iq(
                "add2",
                &format!(
                    "<iq type='set' id='add2' to='{g}'><add xmlns='{NS}'>{}</add></iq>",
                    members(&["15559990009"])
                ),
            )
            .await;
        assert_eq!(error_condition(&r).as_deref(), Some("resource-constraint"));
        // ...while managing the group's own members costs nothing.
        let r = a
            .iq(
                "pro",
                &format!(
                    "<iq type='set' id='pro' to='{g}'><promote xmlns='{NS}'>{}</promote></iq>",
                    members(&[B, C, D])
                ),
            )
            .await;
        assert_eq!(r.attr("type"), Some("result"), "{}", r.to_xml());
    });
}

#[test]
fn group_bytes_per_sender_are_budgeted() {
    let srv = TestServer::start("gabuse-bytes", "[groups]\nfanout_bytes_per_minute = 200000\n", &users());
    let others = import(&srv, 50);
    rt().block_on(async {
        let mut a = Client::login(srv.port, A, "pa", "p", true).await;
        let named: String = others.iter().map(|l| format!("<member jid='{l}@localhost'/>")).collect();
        let g = group_of(&create(&mut a, "mk", &named).await);
        // About 1.1 KB to 51 members: some 57 KB stored per message.
        let body = "b".repeat(1000);
        let mut refused = None;
        for i in 0..6 {
            a.send(&format!("<message type='groupchat' to='{g}' id='b{i}'><body>{body}</body></message>")).await;
            let e = a.expect(5, |e| e.attr("id") == Some(&format!("b{i}"))).await.expect("copy or error");
            if e.attr("type") == Some("error") {
                assert_eq!(error_condition(&e).as_deref(), Some("resource-constraint"));
                assert!(!e.to_xml().contains(&body), "the error does not echo the payload");
                refused = Some(i);
                break;
            }
        }
        assert_eq!(refused, Some(3), "three messages fit in 200,000 bytes, the fourth does not");
    });
}
