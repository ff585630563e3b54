//! HTTP APIs served on the `--http` listener next to media: account
//! registration by SMS code.

pub mod accounts;
pub mod limit;
pub mod sms;

use serde::{Deserialize, Serialize};

/// `[api]` settings.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Reverse proxies (addresses or CIDR networks) whose
    /// `X-Forwarded-For` header names the client. From anyone else the
    /// header is ignored and the TCP peer is the client.
    pub trusted_proxies: Vec<String>,
}
