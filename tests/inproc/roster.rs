//! RFC 6121 §2 roster management: get, set, remove, pushes to every
//! resource that asked for the roster, and the size limit.

use crate::harness::*;

const GET: &str = "<iq type='get' id='get'><query xmlns='jabber:iq:roster'/></iq>";

#[tokio::test(start_paused = true)]
async fn set_and_remove_are_pushed_to_interested_resources() {
    let mut w = World::new(&["alice", "alice/laptop", "alice/watch"]).await;
    w.run(&[
        send("alice", GET),
        expect("alice", "<iq type='result' id='get'><query xmlns='jabber:iq:roster' _exact=''/></iq>"),
        send("alice/laptop", GET),
        expect("alice/laptop", "<iq type='result' id='get'><query xmlns='jabber:iq:roster' _exact=''/></iq>"),
        send(
            "alice",
            "<iq type='set' id='s1'><query xmlns='jabber:iq:roster'><item jid='{bob}' name='Bob'><group>Friends</group></item></query></iq>",
        ),
        expect_all(
            "alice",
            &[
                "<iq type='result' id='s1' to='{alice}/phone'/>",
                "<iq type='set' to='{alice}/phone'><query xmlns='jabber:iq:roster'><item jid='{bob}' name='Bob' subscription='none'><group>Friends</group></item></query></iq>",
            ],
        ),
        expect(
            "alice/laptop",
            "<iq type='set' to='{alice}/laptop'><query xmlns='jabber:iq:roster'><item jid='{bob}' name='Bob' subscription='none' _absent='ask'><group>Friends</group></item></query></iq>",
        ),
        // The watch never asked for the roster: no pushes.
        silent("alice/watch"),
        send("alice/laptop", GET),
        expect(
            "alice/laptop",
            "<iq type='result' id='get'><query xmlns='jabber:iq:roster' _exact=''><item jid='{bob}' name='Bob' subscription='none'><group>Friends</group></item></query></iq>",
        ),
        // Renaming drops the group the new item does not list.
        send("alice/laptop", "<iq type='set' id='s2'><query xmlns='jabber:iq:roster'><item jid='{bob}' name='B'/></query></iq>"),
        expect_all(
            "alice/laptop",
            &[
                "<iq type='result' id='s2'/>",
                "<iq type='set'><query xmlns='jabber:iq:roster'><item jid='{bob}' name='B' _exact=''/></query></iq>",
            ],
        ),
        expect("alice", "<iq type='set'><query xmlns='jabber:iq:roster'><item jid='{bob}' name='B'/></query></iq>"),
        send("alice", "<iq type='set' id='rm'><query xmlns='jabber:iq:roster'><item jid='{bob}' subscription='remove'/></query></iq>"),
        expect_all(
            "alice",
            &[
                "<iq type='result' id='rm'/>",
                "<iq type='set'><query xmlns='jabber:iq:roster'><item jid='{bob}' subscription='remove'/></query></iq>",
            ],
        ),
        expect("alice/laptop", "<iq type='set'><query xmlns='jabber:iq:roster'><item jid='{bob}' subscription='remove'/></query></iq>"),
        send("alice", GET),
        expect("alice", "<iq type='result' id='get'><query xmlns='jabber:iq:roster' _exact=''/></iq>"),
    ])
    .await;
}

#[tokio::test(start_paused = true)]
async fn bad_sets_are_refused() {
    let mut w = World::on(Node::with(|c| c.roster.max_items = 1), &["alice"]).await;
    let err = |id: &str, cond: &str| {
        format!("<iq type='error' id='{id}'><error><{cond} xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>")
    };
    w.run(&[
        send("alice", "<iq type='set' id='self'><query xmlns='jabber:iq:roster'><item jid='{alice}'/></query></iq>"),
        expect("alice", &err("self", "not-allowed")),
        send(
            "alice",
            "<iq type='set' id='two'><query xmlns='jabber:iq:roster'><item jid='{bob}'/><item jid='{carol}'/></query></iq>",
        ),
        expect("alice", &err("two", "bad-request")),
        send("alice", "<iq type='set' id='gone'><query xmlns='jabber:iq:roster'><item jid='{bob}' subscription='remove'/></query></iq>"),
        expect("alice", &err("gone", "item-not-found")),
        send("alice", "<iq type='set' id='one'><query xmlns='jabber:iq:roster'><item jid='{bob}'/></query></iq>"),
        expect("alice", "<iq type='result' id='one'/>"),
        send("alice", "<iq type='set' id='full'><query xmlns='jabber:iq:roster'><item jid='{carol}'/></query></iq>"),
        expect("alice", &err("full", "resource-constraint")),
        // Changing an existing item needs no room.
        send("alice", "<iq type='set' id='again'><query xmlns='jabber:iq:roster'><item jid='{bob}' name='B'/></query></iq>"),
        expect("alice", "<iq type='result' id='again'/>"),
    ])
    .await;
}
