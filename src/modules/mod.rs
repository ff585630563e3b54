//! Feature modules, one per protocol feature or XEP. Each lists the
//! specifications it implements in its header. Modules operate on a
//! [`Session`](crate::c2s::session::Session) and reach other accounts
//! only through the [`Router`](crate::router::Router) and the storage
//! traits; none touches a socket.

pub mod blocking;
pub mod carbons;
pub mod csi;
pub mod disco;
pub mod discovery;
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
