//! chatd: an XMPP messaging server for phone-number accounts.
pub mod protocol;
pub mod storage;
