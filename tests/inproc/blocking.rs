//! XEP-0191 blocking: the list is pushed to every session, and nothing
//! passes between the blocker and the blocked in either direction.

use crate::harness::*;

#[tokio::test(start_paused = true)]
async fn blocked_contacts_are_cut_off_both_ways_until_unblocked() {
    let node = Node::new();
    node.befriend("alice", "bob");
    let mut w = World::on(node, &["alice", "alice/laptop", "bob"]).await;
    w.run(&[
        online("bob"),
        online("alice"),
        expect("alice", "<presence from='{bob}/phone'/>"),
        expect("bob", "<presence from='{alice}/phone'/>"),
        send("alice", "<iq type='set' id='b1'><block xmlns='urn:xmpp:blocking'><item jid='{bob}'/></block></iq>"),
        expect_all(
            "alice",
            &[
                "<iq type='result' id='b1'/>",
                "<iq type='set' to='{alice}/phone'><block xmlns='urn:xmpp:blocking'><item jid='{bob}'/></block></iq>",
            ],
        ),
        expect("alice/laptop", "<iq type='set' to='{alice}/laptop'><block xmlns='urn:xmpp:blocking'><item jid='{bob}'/></block></iq>"),
        // Bob sees alice go offline.
        expect("bob", "<presence type='unavailable' from='{alice}/phone'/>"),
        send("alice", "<iq type='get' id='bl'><blocklist xmlns='urn:xmpp:blocking'/></iq>"),
        expect("alice", "<iq type='result' id='bl'><blocklist xmlns='urn:xmpp:blocking' _exact=''><item jid='{bob}'/></blocklist></iq>"),
        // Bob's messages and presence are dropped; he learns only that
        // alice is unavailable, as for a number that is not registered.
        send("bob", "<message type='chat' to='{alice}' id='x1'><body>hello?</body></message>"),
        expect(
            "bob",
            "<message type='error' id='x1'><error><service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>",
        ),
        send("bob", "<presence><status>look at me</status></presence>"),
        expect("bob", "<presence from='{bob}/phone'><status>look at me</status></presence>"),
        silent("alice"),
        silent("alice/laptop"),
        // Alice cannot write to bob either, and is told why.
        send("alice", "<message type='chat' to='{bob}' id='x2'><body>hi</body></message>"),
        expect(
            "alice",
            "<message type='error' id='x2'><error type='modify'><not-acceptable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/><blocked xmlns='urn:xmpp:blocking:errors'/></error></message>",
        ),
        silent("bob"),
        send("alice", "<iq type='set' id='u1'><unblock xmlns='urn:xmpp:blocking'><item jid='{bob}'/></unblock></iq>"),
        expect_all(
            "alice",
            &[
                "<iq type='result' id='u1'/>",
                "<iq type='set'><unblock xmlns='urn:xmpp:blocking'><item jid='{bob}'/></unblock></iq>",
            ],
        ),
        expect("alice/laptop", "<iq type='set'><unblock xmlns='urn:xmpp:blocking'><item jid='{bob}'/></unblock></iq>"),
        send("bob", "<message type='chat' to='{alice}/phone' id='x3'><body>back</body></message>"),
        expect("alice", "<message from='{bob}/phone' id='x3'><body>back</body></message>"),
        send("alice", "<iq type='get' id='bl2'><blocklist xmlns='urn:xmpp:blocking'/></iq>"),
        expect("alice", "<iq type='result' id='bl2'><blocklist xmlns='urn:xmpp:blocking' _exact=''/></iq>"),
    ])
    .await;
}
