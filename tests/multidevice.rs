//! Several devices per account, and what is stored: carbons (XEP-0280),
//! client state indication (XEP-0352), receipts and markers stored for an
//! offline sender, chat states live only, bare-JID delivery to every
//! device, and "first device to acknowledge deletes the stored copy".

mod common;

use common::{Client, TestServer};

const A: &str = "15550000001";
const B: &str = "15550000002";

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap()
}

fn users() -> Vec<(&'static str, &'static str)> {
    vec![("+15550000001", "pa"), ("+15550000002", "pb")]
}

fn body(e: &chatd::protocol::Element) -> String {
    e.child("body", chatd::protocol::ns::CLIENT).map(|b| b.text()).unwrap_or_default()
}

#[test]
fn carbons_copy_sent_and_received_to_other_devices() {
    let srv = TestServer::start("carbons", "", &users());
    rt().block_on(async {
        let mut phone = Client::login(srv.port, A, "pa", "phone", true).await;
        let mut desk = Client::login(srv.port, A, "pa", "desk", true).await;
        let mut b = Client::login(srv.port, B, "pb", "phone", true).await;
        let r = desk.iq("c", "<iq type='set' id='c'><enable xmlns='urn:xmpp:carbons:2'/></iq>").await;
        assert_eq!(r.attr("type"), Some("result"));
        // Sent from the phone: the desktop gets a <sent/> carbon.
        phone.send(&format!("<message type='chat' to='{B}@localhost'><body>from phone</body></message>")).await;
        let c = desk.expect(5, |e| e.to_xml().contains("urn:xmpp:carbons:2")).await.expect("sent carbon");
        assert!(c.to_xml().contains("<sent") && c.to_xml().contains("from phone"), "{}", c.to_xml());
        b.expect(5, |e| body(e) == "from phone").await.expect("delivered");
        // Addressed to the phone's full JID: the desktop gets a <received/> carbon.
        b.send(&format!("<message type='chat' to='{A}@localhost/phone'><body>to phone</body></message>")).await;
        phone.expect(5, |e| body(e) == "to phone").await.expect("delivered to phone");
        let c = desk.expect(5, |e| e.to_xml().contains("urn:xmpp:carbons:2")).await.expect("received carbon");
        assert!(c.to_xml().contains("<received") && c.to_xml().contains("to phone"));
        // <private/> opts out.
        phone.send(&format!("<message type='chat' to='{B}@localhost'><body>secret</body><private xmlns='urn:xmpp:carbons:2'/></message>")).await;
        b.expect(5, |e| body(e) == "secret").await.expect("delivered");
        let got = desk.drain(1).await;
        assert!(!got.iter().any(|e| e.to_xml().contains("secret")));
        // A bare-JID message reaches both devices directly.
        b.send(&format!("<message type='chat' to='{A}@localhost'><body>to both</body></message>")).await;
        phone.expect(5, |e| body(e) == "to both").await.expect("phone");
        desk.expect(5, |e| body(e) == "to both").await.expect("desk");
    });
}

#[test]
fn receipts_are_stored_chat_states_are_not() {
    let srv = TestServer::start("receipts", "", &users());
    rt().block_on(async {
        let mut a = Client::login(srv.port, A, "pa", "phone", true).await;
        let mut b = Client::login(srv.port, B, "pb", "phone", true).await;
        a.send(&format!("<message type='chat' id='m1' to='{B}@localhost'><body>hi</body><request xmlns='urn:xmpp:receipts'/></message>")).await;
        b.expect(5, |e| body(e) == "hi").await.expect("delivered");
        // A goes offline before the receipt and the read marker come back.
        a.send("</stream:stream>").await;
        drop(a);
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        b.send(&format!("<message type='chat' to='{A}@localhost'><received xmlns='urn:xmpp:receipts' id='m1'/></message>")).await;
        b.send(&format!("<message type='chat' to='{A}@localhost'><displayed xmlns='urn:xmpp:chat-markers:0' id='m1'/></message>")).await;
        b.send(&format!("<message type='chat' to='{A}@localhost'><composing xmlns='http://jabber.org/protocol/chatstates'/></message>")).await;
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let mut a = Client::login(srv.port, A, "pa", "phone", true).await;
        let got = a.drain(2).await;
        let xml: Vec<String> = got.iter().map(|e| e.to_xml()).collect();
        assert!(xml.iter().any(|x| x.contains("urn:xmpp:receipts") && x.contains("urn:xmpp:delay")), "receipt not stored: {xml:?}");
        assert!(xml.iter().any(|x| x.contains("urn:xmpp:chat-markers:0")), "marker not stored");
        assert!(!xml.iter().any(|x| x.contains("composing")), "chat state was stored");
    });
}

#[test]
fn inactive_clients_get_messages_now_and_presence_later() {
    let srv = TestServer::start("csi", "", &users());
    rt().block_on(async {
        let mut a = Client::login(srv.port, A, "pa", "phone", true).await;
        let mut b = Client::login(srv.port, B, "pb", "phone", true).await;
        // Mutual subscription so presence flows.
        a.send(&format!("<presence type='subscribe' to='{B}@localhost'/>")).await;
        b.expect(5, |e| e.attr("type") == Some("subscribe")).await.expect("request");
        b.send(&format!("<presence type='subscribed' to='{A}@localhost'/>")).await;
        let _ = a.drain(1).await;
        a.send("<inactive xmlns='urn:xmpp:csi:0'/>").await;
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        b.send("<presence><status>one</status></presence>").await;
        b.send("<presence><status>two</status></presence>").await;
        b.send(&format!("<message type='chat' to='{A}@localhost'><composing xmlns='http://jabber.org/protocol/chatstates'/></message>")).await;
        b.send(&format!("<message type='chat' to='{A}@localhost'><body>urgent</body></message>")).await;
        let m = a.expect(5, |e| e.local_name() == "message").await.expect("message while inactive");
        assert_eq!(body(&m), "urgent", "the message must not wait behind held stanzas");
        let held = a.drain(1).await;
        assert!(!held.iter().any(|e| e.local_name() == "presence"), "presence was not held back");
        a.send("<active xmlns='urn:xmpp:csi:0'/>").await;
        let flushed = a.drain(1).await;
        let pres: Vec<String> = flushed.iter().filter(|e| e.local_name() == "presence").map(|e| e.to_xml()).collect();
        assert_eq!(pres.len(), 1, "presence coalesced to the latest: {pres:?}");
        assert!(pres[0].contains("two"));
        assert!(flushed.iter().any(|e| e.to_xml().contains("composing")));
    });
}

#[test]
fn first_device_to_ack_deletes_the_stored_copy() {
    let srv = TestServer::start("multiack", "", &users());
    rt().block_on(async {
        let mut b = Client::login(srv.port, B, "pb", "phone", true).await;
        // A's phone acknowledges with stream management; the desktop never acks.
        let mut phone = Client::login(srv.port, A, "pa", "phone", false).await;
        phone.send("<enable xmlns='urn:xmpp:sm:3'/>").await;
        phone.expect(5, |e| e.local_name() == "enabled").await.expect("enabled");
        phone.send("<presence/>").await;
        let mut desk = Client::login(srv.port, A, "pa", "desk", true).await;
        b.send(&format!("<message type='chat' to='{A}@localhost'><body>once</body></message>")).await;
        desk.expect(5, |e| body(e) == "once").await.expect("desk got it");
        // Acknowledge every stanza the phone received since <enable/>.
        let got = phone.drain(2).await;
        assert!(got.iter().any(|e| body(e) == "once"), "phone got it");
        let h = got
            .iter()
            .filter(|e| e.ns == chatd::protocol::ns::CLIENT && matches!(e.local_name(), "message" | "presence" | "iq"))
            .count();
        phone.send(&format!("<a xmlns='urn:xmpp:sm:3' h='{h}'/>")).await;
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        drop(desk);
        drop(phone);
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let mut again = Client::login(srv.port, A, "pa", "tablet", true).await;
        let got = again.drain(2).await;
        assert!(!got.iter().any(|e| body(e) == "once"), "acknowledged by one device, yet redelivered");
    });
}
