//! Feature modules, one per protocol feature or XEP. Each exports a
//! [`Module`] that names the specifications it implements and registers
//! its handlers (see [`crate::hooks`]); [`ALL`] is the list the server
//! loads. Modules operate on a
//! [`Session`](crate::c2s::session::Session) and reach other accounts
//! only through the [`Router`](crate::router::Router) and the storage
//! traits; none touches a socket.

use crate::hooks::Module;

pub mod blocking;
pub mod carbons;
pub mod contacts;
pub mod csi;
pub mod disco;
pub mod groups;
pub mod iq;
pub mod message;
pub mod offline;
pub mod pep;
pub mod ping;
pub mod presence;
pub mod privacy;
pub mod register;
pub mod roster;
pub mod sm;
pub mod subscription;
pub mod upload;
pub mod version;

/// Every module the server loads, in registration order (which is also
/// the order of their disco features). Adding a feature is one file and
/// one line here.
pub const ALL: &[&Module] = &[
    &iq::MODULE,
    &disco::MODULE,
    &ping::MODULE,
    &version::MODULE,
    &message::MODULE,
    &offline::MODULE,
    &presence::MODULE,
    &roster::MODULE,
    &csi::MODULE,
    &carbons::MODULE,
    &blocking::MODULE,
    &privacy::MODULE,
    &contacts::MODULE,
    &pep::MODULE,
    &register::MODULE,
    &upload::MODULE,
    &groups::MODULE,
];
