//! RFC 6121 presence: broadcast to subscribers, probes, unavailable,
//! the subscription handshake over the roster, and XEP-0352 holding
//! presence for inactive clients.

use crate::harness::*;

#[tokio::test(start_paused = true)]
async fn initial_presence_reaches_contacts_and_probes_answer() {
    let node = Node::new();
    node.befriend("alice", "bob");
    let mut w = World::on(node, &["alice", "bob", "carol"]).await;
    w.run(&[
        online("bob"),
        online("carol"),
        send("alice", "<presence><status>here</status></presence>"),
        expect("alice", "<presence from='{alice}/phone'><status>here</status></presence>"),
        // The probe of alice's contacts is answered from the router's view of live sessions.
        expect("alice", "<presence from='{bob}/phone'/>"),
        expect("bob", "<presence from='{alice}/phone' _absent='to'><status>here</status></presence>"),
        silent("carol"),
        // Later updates go to contacts only.
        send("alice", "<presence><show>away</show></presence>"),
        expect("alice", "<presence from='{alice}/phone'><show>away</show></presence>"),
        expect("bob", "<presence from='{alice}/phone'><show>away</show></presence>"),
        silent("carol"),
    ])
    .await;
}

#[tokio::test(start_paused = true)]
async fn unavailable_reaches_contacts_when_sent_or_when_the_link_drops() {
    let node = Node::new();
    node.befriend("alice", "bob");
    node.befriend("carol", "bob");
    let mut w = World::on(node, &["alice", "bob", "carol"]).await;
    w.run(&[
        online("bob"),
        online("alice"),
        expect("alice", "<presence from='{bob}/phone'/>"),
        expect("bob", "<presence from='{alice}/phone'/>"),
        online("carol"),
        expect("carol", "<presence from='{bob}/phone'/>"),
        expect("bob", "<presence from='{carol}/phone'/>"),
        send("alice", "<presence type='unavailable'/>"),
        expect("bob", "<presence type='unavailable' from='{alice}/phone'/>"),
        silent("alice"),
        // Without stream management a broken link ends the session.
        drop_link("carol"),
        expect("bob", "<presence type='unavailable' from='{carol}/phone'/>"),
    ])
    .await;
}

#[tokio::test(start_paused = true)]
async fn subscription_handshake_updates_both_rosters_and_presence() {
    let mut w = World::new(&["alice", "bob"]).await;
    w.run(&[
        send("alice", "<iq type='get' id='r'><query xmlns='jabber:iq:roster'/></iq>"),
        expect("alice", "<iq type='result' id='r'><query xmlns='jabber:iq:roster' _exact=''/></iq>"),
        send("bob", "<iq type='get' id='r'><query xmlns='jabber:iq:roster'/></iq>"),
        expect("bob", "<iq type='result' id='r'><query xmlns='jabber:iq:roster' _exact=''/></iq>"),
        online("alice"),
        online("bob"),
        // Strangers: no presence crosses yet.
        silent("alice"),
        send("alice", "<presence type='subscribe' to='{bob}'/>"),
        expect(
            "alice",
            "<iq type='set'><query xmlns='jabber:iq:roster'><item jid='{bob}' subscription='none' ask='subscribe'/></query></iq>",
        ),
        expect("bob", "<presence type='subscribe' from='{alice}' to='{bob}'/>"),
        // A request already pending is not delivered twice.
        send("alice", "<presence type='subscribe' to='{bob}'/>"),
        silent("bob"),
        send("bob", "<presence type='subscribed' to='{alice}'/>"),
        expect("bob", "<iq type='set'><query xmlns='jabber:iq:roster'><item jid='{alice}' subscription='from'/></query></iq>"),
        expect(
            "alice",
            "<iq type='set'><query xmlns='jabber:iq:roster'><item jid='{bob}' subscription='to' _absent='ask'/></query></iq>",
        ),
        expect("alice", "<presence type='subscribed' from='{bob}' to='{alice}'/>"),
        expect("alice", "<presence from='{bob}/phone'/>"),
        // One way only: bob does not see alice.
        send("alice", "<presence><status>one-way</status></presence>"),
        expect("alice", "<presence from='{alice}/phone'><status>one-way</status></presence>"),
        silent("bob"),
        send("bob", "<presence><status>visible</status></presence>"),
        expect("bob", "<presence from='{bob}/phone'><status>visible</status></presence>"),
        expect("alice", "<presence from='{bob}/phone'><status>visible</status></presence>"),
        // Unsubscribing stops it, and bob's presence is withdrawn.
        send("alice", "<presence type='unsubscribe' to='{bob}'/>"),
        expect("alice", "<iq type='set'><query xmlns='jabber:iq:roster'><item jid='{bob}' subscription='none'/></query></iq>"),
        expect("bob", "<iq type='set'><query xmlns='jabber:iq:roster'><item jid='{alice}' subscription='none'/></query></iq>"),
        expect("bob", "<presence type='unsubscribe' from='{alice}'/>"),
        expect("alice", "<presence type='unavailable' from='{bob}/phone'/>"),
        send("bob", "<presence><status>after</status></presence>"),
        expect("bob", "<presence from='{bob}/phone'><status>after</status></presence>"),
        silent("alice"),
    ])
    .await;
}

#[tokio::test(start_paused = true)]
async fn requests_wait_for_offline_accounts_and_pre_approval_answers_at_once() {
    let mut w = World::new(&["alice", "bob"]).await;
    w.run(&[
        online("alice"),
        online("bob"),
        // Carol is offline: her request waits for her next initial presence.
        send("alice", "<presence type='subscribe' to='{carol}'/>"),
        login("carol"),
        silent("carol"),
        online("carol"),
        expect("carol", "<presence type='subscribe' from='{alice}' to='{carol}'/>"),
        // Bob pre-approves alice: nothing is sent until she asks, and then
        // the server answers for him without asking him.
        send("bob", "<presence type='subscribed' to='{alice}'/>"),
        silent("alice"),
        send("alice", "<presence type='subscribe' to='{bob}'/>"),
        expect("alice", "<presence type='subscribed' from='{bob}' to='{alice}'/>"),
        expect("alice", "<presence from='{bob}/phone'/>"),
        silent("bob"),
    ])
    .await;
}

#[tokio::test(start_paused = true)]
async fn inactive_clients_get_messages_now_and_presence_on_activation() {
    let node = Node::new();
    node.befriend("alice", "bob");
    let mut w = World::on(node, &["alice", "bob"]).await;
    w.run(&[
        online("alice"),
        online("bob"),
        expect("bob", "<presence from='{alice}/phone'/>"),
        expect("alice", "<presence from='{bob}/phone'/>"),
        send("alice", "<inactive xmlns='urn:xmpp:csi:0'/>"),
        send("bob", "<presence><status>one</status></presence>"),
        send("bob", "<presence><status>two</status></presence>"),
        expect("bob", "<presence from='{bob}/phone'><status>one</status></presence>"),
        expect("bob", "<presence from='{bob}/phone'><status>two</status></presence>"),
        send("bob", "<message type='chat' to='{alice}' id='m1'><body>now</body></message>"),
        expect("alice", "<message type='chat' from='{bob}/phone' id='m1'><body>now</body></message>"),
        advance(600),
        silent("alice"),
        // Only the latest presence is kept for an inactive client.
        send("alice", "<active xmlns='urn:xmpp:csi:0'/>"),
        expect("alice", "<presence from='{bob}/phone'><status>two</status></presence>"),
        silent("alice"),
    ])
    .await;
}
