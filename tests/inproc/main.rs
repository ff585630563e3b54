//! In-process tests: each builds a server on the memory stores inside the
//! test process and drives it through the real connection task over
//! in-memory streams, with tables of stanzas sent and expected (see
//! [`harness`]). Time is paused, so timeouts cost no real time; the whole
//! binary runs in seconds.

#[path = "../common/mod.rs"]
mod common;
mod harness;

mod blocking;
mod carbons;
mod groups;
mod matcher;
mod messages;
mod presence;
mod roster;
mod sm;
