//! What is stored and when it is deleted: the delivery rule seen from
//! clients (ARCHITECTURE.md, "The delivery rule").

use crate::harness::*;

#[tokio::test(start_paused = true)]
async fn receipts_are_stored_and_chat_states_are_not() {
    let mut w = World::new(&["alice", "bob"]).await;
    w.run(&[
        online("alice"),
        // Bob's device is connected but not available yet.
        send("alice", "<message type='chat' to='{bob}' id='c1'><composing xmlns='http://jabber.org/protocol/chatstates'/></message>"),
        check("a chat state alone is not stored", |n| n.queued("bob") == 0),
        send("alice", "<message type='chat' to='{bob}' id='m1'><body>hi</body></message>"),
        send("alice", "<message to='{bob}' id='r1'><received xmlns='urn:xmpp:receipts' id='x'/></message>"),
        check("the message and the receipt are stored", |n| n.queued("bob") == 2),
        online("bob"),
        expect("bob", "<message id='m1' from='{alice}/phone'><body>hi</body><stanza-id xmlns='urn:xmpp:sid:0' by='{bob}'/><delay xmlns='urn:xmpp:delay'/></message>"),
        expect("bob", "<message id='r1'><received xmlns='urn:xmpp:receipts' id='x'/><delay xmlns='urn:xmpp:delay'/></message>"),
        silent("bob"),
        check("confirmed by the answer to the server's ping, both are deleted", |n| n.queued("bob") == 0),
    ])
    .await;
}

#[tokio::test(start_paused = true)]
async fn the_first_device_to_acknowledge_deletes_the_stored_copy() {
    let mut w = World::new(&["alice", "alice/laptop", "bob"]).await;
    w.run(&[
        online("alice"),
        online("alice/laptop"),
        expect("alice", "<presence from='{alice}/laptop'/>"),
        expect("alice/laptop", "<presence from='{alice}/phone'/>"),
        online("bob"),
        manual("alice"),
        manual("alice/laptop"),
        send("alice", "<enable xmlns='urn:xmpp:sm:3'/>"),
        expect("alice", "<enabled xmlns='urn:xmpp:sm:3'/>"),
        send("alice/laptop", "<enable xmlns='urn:xmpp:sm:3'/>"),
        expect("alice/laptop", "<enabled xmlns='urn:xmpp:sm:3'/>"),
        send("bob", "<message type='chat' to='{alice}' id='m1'><body>to both</body></message>"),
        expect("alice", "<message id='m1'><stanza-id xmlns='urn:xmpp:sid:0' id='{$sid}'/></message>"),
        expect("alice", "<r xmlns='urn:xmpp:sm:3'/>"),
        expect("alice/laptop", "<message id='m1'><stanza-id xmlns='urn:xmpp:sid:0' id='{$sid}'/></message>"),
        expect("alice/laptop", "<r xmlns='urn:xmpp:sm:3'/>"),
        check("one stored copy for the account", |n| n.queued("alice") == 1),
        send("alice/laptop", "<a xmlns='urn:xmpp:sm:3' h='1'/>"),
        check("the laptop's ack deleted it", |n| n.queued("alice") == 0),
        // The phone's later ack finds nothing to delete and is fine.
        send("alice", "<a xmlns='urn:xmpp:sm:3' h='1'/><r xmlns='urn:xmpp:sm:3'/>"),
        expect("alice", "<a xmlns='urn:xmpp:sm:3' h='0'/>"),
    ])
    .await;
}

#[tokio::test(start_paused = true)]
async fn unacknowledged_messages_come_again_at_the_next_login_with_their_id() {
    let mut w = World::new(&["alice", "bob"]).await;
    w.run(&[
        online("alice"),
        online("bob"),
        manual("bob"),
        send("bob", "<enable xmlns='urn:xmpp:sm:3'/>"),
        expect("bob", "<enabled xmlns='urn:xmpp:sm:3'/>"),
        send("alice", "<message type='chat' to='{bob}' id='m1'><body>once</body></message>"),
        expect("bob", "<message id='m1'><body>once</body><stanza-id xmlns='urn:xmpp:sid:0' id='{$sid}'/></message>"),
        expect("bob", "<r xmlns='urn:xmpp:sm:3'/>"),
        // Received but never acknowledged: the broken link loses nothing.
        drop_link("bob"),
        login("bob"),
        online("bob"),
        expect("bob", "<message id='m1'><body>once</body><stanza-id xmlns='urn:xmpp:sid:0' id='{$sid}'/><delay xmlns='urn:xmpp:delay'/></message>"),
        silent("bob"),
        check("acknowledged this time", |n| n.queued("bob") == 0),
    ])
    .await;
}
