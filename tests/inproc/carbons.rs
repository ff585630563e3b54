//! XEP-0280 carbons: a device sees what the account's other devices send
//! and receive by full JID, unless a message is marked private.

use crate::harness::*;

#[tokio::test(start_paused = true)]
async fn other_devices_get_sent_and_received_copies() {
    let mut w = World::new(&["alice", "alice/laptop", "bob"]).await;
    let enable = "<iq type='set' id='cc'><enable xmlns='urn:xmpp:carbons:2'/></iq>";
    w.run(&[
        online("alice"),
        online("alice/laptop"),
        expect("alice/laptop", "<presence from='{alice}/phone'/>"),
        expect("alice", "<presence from='{alice}/laptop'/>"),
        online("bob"),
        send("alice", enable),
        expect("alice", "<iq type='result' id='cc'/>"),
        send("alice/laptop", enable),
        expect("alice/laptop", "<iq type='result' id='cc'/>"),
        // Received by the phone, copied to the laptop.
        send("bob", "<message type='chat' to='{alice}/phone' id='m1'><body>to your phone</body></message>"),
        expect("alice", "<message type='chat' from='{bob}/phone' id='m1'><body>to your phone</body></message>"),
        expect(
            "alice/laptop",
            "<message from='{alice}' to='{alice}/laptop' type='chat'><received xmlns='urn:xmpp:carbons:2'><forwarded xmlns='urn:xmpp:forward:0'><message xmlns='jabber:client' from='{bob}/phone' to='{alice}/phone' id='m1'><body>to your phone</body></message></forwarded></received></message>",
        ),
        silent("bob"),
        // Sent from the phone, copied to the laptop.
        send("alice", "<message type='chat' to='{bob}' id='m2'><body>from my phone</body></message>"),
        expect("bob", "<message type='chat' from='{alice}/phone' id='m2'><body>from my phone</body></message>"),
        expect(
            "alice/laptop",
            "<message from='{alice}' to='{alice}/laptop'><sent xmlns='urn:xmpp:carbons:2'><forwarded xmlns='urn:xmpp:forward:0'><message xmlns='jabber:client' from='{alice}/phone' to='{bob}' id='m2'><body>from my phone</body></message></forwarded></sent></message>",
        ),
        silent("alice"),
        // Private messages are not copied.
        send("alice", "<message type='chat' to='{bob}' id='m3'><body>secret</body><private xmlns='urn:xmpp:carbons:2'/></message>"),
        expect("bob", "<message id='m3'><body>secret</body></message>"),
        silent("alice/laptop"),
        // A device that disabled carbons gets no copies.
        send("alice/laptop", "<iq type='set' id='cd'><disable xmlns='urn:xmpp:carbons:2'/></iq>"),
        expect("alice/laptop", "<iq type='result' id='cd'/>"),
        send("alice", "<message type='chat' to='{bob}' id='m4'><body>again</body></message>"),
        expect("bob", "<message id='m4'/>"),
        silent("alice/laptop"),
    ])
    .await;
}
