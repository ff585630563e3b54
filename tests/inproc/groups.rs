//! Groups: creation, who may manage, adding members, and durable fan-out
//! to online and offline members.

use crate::harness::*;

const CREATE: &str = "<iq type='set' id='mk' to='{groups}'><create xmlns='urn:chatd:groups:0' subject='Family'><member jid='{bob}'/></create></iq>";

fn forbidden(id: &str) -> String {
    format!("<iq type='error' id='{id}'><error><forbidden xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>")
}

#[tokio::test(start_paused = true)]
async fn create_add_and_fan_out() {
    let mut w = World::new(&["alice", "bob", "carol"]).await;
    w.run(&[
        online("alice"),
        online("bob"),
        online("carol"),
        send("alice", CREATE),
        expect_all(
            "alice",
            &[
                "<iq type='result' id='mk'><group xmlns='urn:chatd:groups:0' jid='{$g}'/></iq>",
                "<message from='{$g}' type='normal'><x xmlns='urn:chatd:groups:0'><event type='created' actor='{alice}' subject='Family'/></x></message>",
            ],
        ),
        expect("bob", "<message from='{$g}'><x xmlns='urn:chatd:groups:0'><event type='created' actor='{alice}'/></x></message>"),
        expect("bob", "<message from='{alice}'><x xmlns='jabber:x:conference' jid='{$g}' reason='Family'/></message>"),
        silent("carol"),
        // Every member gets the message, the sender's account included.
        send("alice", "<message type='groupchat' to='{$g}' id='g1'><body>hello</body></message>"),
        expect(
            "bob",
            "<message type='groupchat' from='{$g}/{alice.num}' to='{bob}' id='g1'><body>hello</body><stanza-id xmlns='urn:xmpp:sid:0' by='{$g}'/></message>",
        ),
        expect("alice", "<message type='groupchat' from='{$g}/{alice.num}' id='g1'><body>hello</body></message>"),
        // Outsiders can neither post nor read; members cannot manage.
        send("carol", "<message type='groupchat' to='{$g}' id='c1'><body>let me in</body></message>"),
        expect("carol", "<message type='error' id='c1'><error><forbidden xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>"),
        send("carol", "<iq type='get' id='ci' to='{$g}'><info xmlns='urn:chatd:groups:0'/></iq>"),
        expect("carol", &forbidden("ci")),
        send("bob", "<iq type='set' id='ba' to='{$g}'><add xmlns='urn:chatd:groups:0'><member jid='{carol}'/></add></iq>"),
        expect("bob", &forbidden("ba")),
        send("bob", "<iq type='set' id='bs' to='{$g}'><subject xmlns='urn:chatd:groups:0'>Mine</subject></iq>"),
        expect("bob", &forbidden("bs")),
        // The admin adds carol: everyone hears of it, carol is invited.
        send("alice", "<iq type='set' id='add' to='{$g}'><add xmlns='urn:chatd:groups:0'><member jid='{carol}'/></add></iq>"),
        expect_all(
            "alice",
            &[
                "<iq type='result' id='add'/>",
                "<message from='{$g}'><x xmlns='urn:chatd:groups:0'><event type='added' actor='{alice}' member='{carol}'/></x></message>",
            ],
        ),
        expect("bob", "<message from='{$g}'><x xmlns='urn:chatd:groups:0'><event type='added' member='{carol}'/></x></message>"),
        expect("carol", "<message from='{$g}'><x xmlns='urn:chatd:groups:0'><event type='added' member='{carol}'/></x></message>"),
        expect("carol", "<message from='{alice}'><x xmlns='jabber:x:conference' jid='{$g}'/></message>"),
        send("carol", "<iq type='get' id='info' to='{$g}'><info xmlns='urn:chatd:groups:0'/></iq>"),
        expect(
            "carol",
            "<iq type='result' id='info'><info xmlns='urn:chatd:groups:0' jid='{$g}' subject='Family' _exact=''><member jid='{alice}' role='admin'/><member jid='{bob}' role='member'/><member jid='{carol}' role='member'/></info></iq>",
        ),
        send("carol", "<message type='groupchat' to='{$g}' id='c2'><body>thanks</body></message>"),
        expect("alice", "<message type='groupchat' from='{$g}/{carol.num}' id='c2'/>"),
        expect("bob", "<message type='groupchat' from='{$g}/{carol.num}' id='c2'/>"),
        expect("carol", "<message type='groupchat' from='{$g}/{carol.num}' id='c2'/>"),
        // A removed member hears of it and of nothing after.
        send("alice", "<iq type='set' id='rm' to='{$g}'><remove xmlns='urn:chatd:groups:0'><member jid='{bob}'/></remove></iq>"),
        expect_all(
            "alice",
            &[
                "<iq type='result' id='rm'/>",
                "<message from='{$g}'><x xmlns='urn:chatd:groups:0'><event type='removed' member='{bob}'/></x></message>",
            ],
        ),
        expect("bob", "<message from='{$g}'><x xmlns='urn:chatd:groups:0'><event type='removed' member='{bob}'/></x></message>"),
        expect("carol", "<message from='{$g}'><x xmlns='urn:chatd:groups:0'><event type='removed' member='{bob}'/></x></message>"),
        send("alice", "<message type='groupchat' to='{$g}' id='g2'><body>bob is gone</body></message>"),
        expect("carol", "<message type='groupchat' id='g2'/>"),
        expect("alice", "<message type='groupchat' id='g2'/>"),
        silent("bob"),
    ])
    .await;
}

#[tokio::test(start_paused = true)]
async fn offline_members_get_everything_in_order_at_login() {
    let mut w = World::new(&["alice", "bob"]).await;
    w.run(&[
        online("alice"),
        send("alice", CREATE),
        expect_all(
            "alice",
            &[
                "<iq type='result' id='mk'><group xmlns='urn:chatd:groups:0' jid='{$g}'/></iq>",
                "<message from='{$g}'><x xmlns='urn:chatd:groups:0'><event type='created'/></x></message>",
            ],
        ),
        send("alice", "<message type='groupchat' to='{$g}' id='g1'><body>one</body></message>"),
        send("alice", "<message type='groupchat' to='{$g}' id='g2'><body>two</body></message>"),
        expect("alice", "<message type='groupchat' id='g1'/>"),
        expect("alice", "<message type='groupchat' id='g2'/>"),
        check("bob has four messages queued", |n| n.queued("bob") == 4),
        // Bob's device was connected but not available: it gets it all
        // with its initial presence, stamped with when it was accepted.
        online("bob"),
        expect("bob", "<message from='{$g}'><x xmlns='urn:chatd:groups:0'><event type='created'/></x><delay xmlns='urn:xmpp:delay' from='{domain}'/></message>"),
        expect("bob", "<message from='{alice}'><x xmlns='jabber:x:conference' jid='{$g}'/><delay xmlns='urn:xmpp:delay'/></message>"),
        expect("bob", "<message type='groupchat' id='g1'><body>one</body><delay xmlns='urn:xmpp:delay'/></message>"),
        expect("bob", "<message type='groupchat' id='g2'><body>two</body><delay xmlns='urn:xmpp:delay'/></message>"),
        // Confirmed (the harness answers the server's ping): deleted.
        silent("bob"),
        check("bob's queue is empty once he confirmed", |n| n.queued("bob") == 0),
    ])
    .await;
}

#[tokio::test(start_paused = true)]
async fn accounts_that_refuse_direct_adds_are_invited_and_join_by_accepting() {
    let mut w = World::new(&["alice", "bob", "carol"]).await;
    w.run(&[
        online("alice"),
        online("bob"),
        online("carol"),
        send("bob", "<iq type='set' id='p'><privacy xmlns='urn:chatd:privacy:0' groups='nobody'/></iq>"),
        expect("bob", "<iq type='result' id='p'><privacy xmlns='urn:chatd:privacy:0' groups='nobody'/></iq>"),
        send("alice", CREATE),
        // Bob is named in the answer as invited, not made a member.
        expect_all(
            "alice",
            &[
                "<iq type='result' id='mk'><group xmlns='urn:chatd:groups:0' jid='{$g}'><invited><member jid='{bob}'/></invited></group></iq>",
                "<message from='{$g}'><x xmlns='urn:chatd:groups:0'><event type='created'/></x></message>",
            ],
        ),
        expect("bob", "<message from='{alice}'><x xmlns='jabber:x:conference' jid='{$g}'/></message>"),
        silent("bob"),
        send("alice", "<iq type='get' id='i1' to='{$g}'><info xmlns='urn:chatd:groups:0'/></iq>"),
        expect("alice", "<iq type='result' id='i1'><info xmlns='urn:chatd:groups:0' _exact=''><member jid='{alice}'/></info></iq>"),
        // An invitation allows only accepting or declining it.
        send("bob", "<iq type='get' id='bi' to='{$g}'><info xmlns='urn:chatd:groups:0'/></iq>"),
        expect("bob", &forbidden("bi")),
        send("carol", "<iq type='set' id='cj' to='{$g}'><join xmlns='urn:chatd:groups:0'/></iq>"),
        expect("carol", &forbidden("cj")),
        send("bob", "<iq type='set' id='bj' to='{$g}'><join xmlns='urn:chatd:groups:0'/></iq>"),
        expect_all(
            "bob",
            &[
                "<iq type='result' id='bj'><info xmlns='urn:chatd:groups:0' jid='{$g}'><member jid='{bob}' role='member'/></info></iq>",
                "<message from='{$g}'><x xmlns='urn:chatd:groups:0'><event type='joined' member='{bob}'/></x></message>",
            ],
        ),
        expect("alice", "<message from='{$g}'><x xmlns='urn:chatd:groups:0'><event type='joined' member='{bob}'/></x></message>"),
        // Now a member: reading works, managing does not.
        send("bob", "<iq type='get' id='bi2' to='{$g}'><info xmlns='urn:chatd:groups:0'/></iq>"),
        expect("bob", "<iq type='result' id='bi2'><info xmlns='urn:chatd:groups:0'/></iq>"),
        send("bob", "<iq type='set' id='bp' to='{$g}'><promote xmlns='urn:chatd:groups:0'><member jid='{bob}'/></promote></iq>"),
        expect("bob", &forbidden("bp")),
    ])
    .await;
}
