//! XEP-0352 Client State Indication: `<active/>` and `<inactive/>`
//! nonzas are accepted. Messages are delivered immediately in both states.

pub const NS: &str = "urn:xmpp:csi:0";
