//! chatd: an XMPP messaging server for phone-number accounts.
//!
//! # Layout
//! - [`protocol`]: pure XML framing, stanzas, JIDs, phone numbers (no IO).
//! - [`c2s`]: client connections: transports, negotiation, SASL, login
//!   guards, the connection loop. Nothing below it depends on it.
//! - [`session`]: a bound session, the context every module handler gets.
//! - [`router`]: where a stanza goes (live session, offline queue); the
//!   only way to other sessions, and the seam for a multi-node backend.
//! - [`hooks`]: the module registry: stanza stages, iq handlers, nonzas,
//!   disco features, lifecycle hooks.
//! - [`modules`]: one module per feature or XEP.
//! - [`storage`]: storage traits, the fjall engine, the in-memory engine.
//! - [`accounts`], [`admin`]: credentials and the admin interface.
//! - [`http`], [`media`]: the HTTPS listener and the media service
//!   (XEP-0363 uploads, storage tiers).
//! - [`config`], [`server`]: configuration and assembly.

pub mod accounts;
pub mod admin;
pub mod api;
pub mod c2s;
pub mod cluster;
pub mod config;
pub mod fuzz;
pub mod hooks;
pub mod http;
pub mod media;
pub mod modules;
pub mod protocol;
pub mod router;
pub mod server;
pub mod session;
pub mod storage;
pub mod tls;
