//! XEP-0198 stream management and connection liveness under paused time:
//! acks, resumption after a broken link, the resumption window, and
//! server pings.

use crate::harness::*;

#[tokio::test(start_paused = true)]
async fn acks_count_stanzas_and_delete_what_the_client_confirmed() {
    let mut w = World::new(&["alice", "bob"]).await;
    w.run(&[
        online("alice"),
        online("bob"),
        manual("alice"),
        send("alice", "<enable xmlns='urn:xmpp:sm:3'/>"),
        expect("alice", "<enabled xmlns='urn:xmpp:sm:3' _absent='id resume'/>"),
        send("alice", "<r xmlns='urn:xmpp:sm:3'/>"),
        expect("alice", "<a xmlns='urn:xmpp:sm:3' h='0'/>"),
        send("alice", "<message type='chat' to='{bob}' id='a1'><body>one</body></message>"),
        send("alice", "<r xmlns='urn:xmpp:sm:3'/>"),
        expect("alice", "<a xmlns='urn:xmpp:sm:3' h='1'/>"),
        expect("bob", "<message from='{alice}/phone' id='a1'/>"),
        send("bob", "<message type='chat' to='{alice}' id='b1'><body>reply</body></message>"),
        expect("alice", "<message from='{bob}/phone' id='b1'><body>reply</body></message>"),
        expect("alice", "<r xmlns='urn:xmpp:sm:3'/>"),
        check("the reply stays stored until alice acknowledges it", |n| n.queued("alice") == 1),
        send("alice", "<a xmlns='urn:xmpp:sm:3' h='1'/>"),
        send("alice", "<r xmlns='urn:xmpp:sm:3'/>"),
        expect("alice", "<a xmlns='urn:xmpp:sm:3' h='1'/>"),
        check("acknowledged, the reply is deleted", |n| n.queued("alice") == 0),
        // Acknowledging more than was sent is a protocol error.
        send("alice", "<a xmlns='urn:xmpp:sm:3' h='5'/>"),
        closed("alice", Some("undefined-condition")),
    ])
    .await;
}

#[tokio::test(start_paused = true)]
async fn resumption_resends_exactly_what_was_not_handled() {
    let node = Node::with(|c| c.limits.resume_timeout_secs = 60);
    node.befriend("alice", "bob");
    let mut w = World::on(node, &["alice", "bob"]).await;
    w.run(&[
        online("bob"),
        online("alice"),
        expect("alice", "<presence from='{bob}/phone'/>"),
        expect("bob", "<presence from='{alice}/phone'/>"),
        manual("alice"),
        send("alice", "<enable xmlns='urn:xmpp:sm:3' resume='true'/>"),
        expect("alice", "<enabled xmlns='urn:xmpp:sm:3' resume='true' max='60' id='{any}'/>"),
        send("bob", "<message type='chat' to='{alice}' id='m1'><body>first</body></message>"),
        expect("alice", "<message id='m1'/>"),
        expect("alice", "<r xmlns='urn:xmpp:sm:3'/>"),
        drop_link("alice"),
        // The session is parked, not ended: bob sees no unavailable.
        silent("bob"),
        send("bob", "<message type='chat' to='{alice}' id='m2'><body>while away</body></message>"),
        advance(30),
        resume("alice", true),
        // Alice had handled m1 (h=1): only m2 comes again.
        expect("alice", "<message from='{bob}/phone' id='m2'><body>while away</body></message>"),
        expect("alice", "<r xmlns='urn:xmpp:sm:3'/>"),
        send("alice", "<a xmlns='urn:xmpp:sm:3' h='2'/>"),
        send("alice", "<message type='chat' to='{bob}' id='a1'><body>back</body></message>"),
        expect("bob", "<message from='{alice}/phone' id='a1'/>"),
        check("both messages were acknowledged", |n| n.queued("alice") == 0),
        silent("alice"),
    ])
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_parked_session_ends_when_the_window_expires() {
    let node = Node::with(|c| c.limits.resume_timeout_secs = 60);
    node.befriend("alice", "bob");
    let mut w = World::on(node, &["alice", "bob"]).await;
    w.run(&[
        online("bob"),
        online("alice"),
        expect("alice", "<presence from='{bob}/phone'/>"),
        expect("bob", "<presence from='{alice}/phone'/>"),
        send("alice", "<enable xmlns='urn:xmpp:sm:3' resume='true'/>"),
        expect("alice", "<enabled xmlns='urn:xmpp:sm:3' resume='true'/>"),
        drop_link("alice"),
        advance(55),
        silent("bob"),
        advance(5),
        expect("bob", "<presence type='unavailable' from='{alice}/phone'/>"),
        resume("alice", false),
        // What arrives now waits in the store for the next login.
        send("bob", "<message type='chat' to='{alice}' id='m1'><body>too late</body></message>"),
        check("the message is stored", |n| n.queued("alice") == 1),
        login("alice"),
        online("alice"),
        expect("alice", "<presence from='{bob}/phone'/>"),
        expect(
            "alice",
            "<message from='{bob}/phone' id='m1'><body>too late</body><delay xmlns='urn:xmpp:delay'/></message>",
        ),
    ])
    .await;
}

#[tokio::test(start_paused = true)]
async fn silent_clients_are_pinged_and_dropped() {
    let node = Node::with(|c| {
        c.limits.ping_interval_secs = 60;
        c.limits.ping_timeout_secs = 30;
    });
    let mut w = World::on(node, &["alice", "bob"]).await;
    w.run(&[
        manual("alice"),
        advance(50),
        silent("alice"),
        expect(
            "alice",
            "<iq type='get' from='{domain}' to='{alice}/phone' id='{$ping}'><ping xmlns='urn:xmpp:ping'/></iq>",
        ),
        send("alice", "<iq type='result' id='{$ping}' to='{domain}'/>"),
        // Answered: the next ping comes a full interval later.
        advance(50),
        silent("alice"),
        expect("alice", "<iq type='get'><ping xmlns='urn:xmpp:ping'/></iq>"),
        // Unanswered: the connection ends after the timeout.
        advance(20),
        silent("alice"),
        closed("alice", Some("connection-timeout")),
        // Bob answered every ping by himself and is still there.
        send("bob", "<iq type='get' id='p' to='{domain}'><ping xmlns='urn:xmpp:ping'/></iq>"),
        expect("bob", "<iq type='result' id='p'/>"),
    ])
    .await;
}
