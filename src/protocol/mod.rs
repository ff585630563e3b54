//! The pure protocol layer: XML framing, element trees, JIDs, phone
//! numbers and stanza builders.
//!
//! **Architecture invariant:** nothing under `protocol` does IO, spawns
//! tasks or knows about sessions; everything here is a function of its
//! input, so it is unit-tested and fuzzed without a socket.

pub mod element;
pub mod framer;
pub mod jid;
pub mod ns;
pub mod phone;
pub mod stanza;

pub use element::{Element, Node};
pub use framer::{Frame, FrameError, Framer};
pub use jid::Jid;
