//! Feature modules, one per protocol feature or XEP. Each exports a
//! [`Module`] that names the specifications it implements and registers
//! its handlers (see [`crate::hooks`]); [`ALL`] is the list the server
//! loads. Modules operate on a
//! [`Session`](crate::session::Session) and reach other accounts
//! only through the [`Router`](crate::router::Router) and the storage
//! traits; none touches a socket.

use crate::hooks::Module;

/// Declares the feature modules: each name is a file under `modules/`
/// exporting `MODULE`, loaded in this order (which is also the order of
/// their disco features). Adding a feature is one file and one line here.
macro_rules! modules {
    ($($m:ident),* $(,)?) => {
        $(pub mod $m;)*
        /// Every module the server loads, in registration order.
        pub const ALL: &[&Module] = &[$(&$m::MODULE),*];
    };
}

modules!(
    iq, disco, ping, version, message, offline, presence, roster, csi, carbons, blocking, privacy, contacts, pep,
    register, upload, groups,
);

/// XEP-0198 stream management: part of every stream, driven by the
/// connection rather than registered (it counts every stanza).
pub mod sm;
/// RFC 6121 subscription transitions, as pure functions (used by
/// `presence`).
pub mod subscription;
