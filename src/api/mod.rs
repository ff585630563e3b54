//! HTTP APIs served on the `--http` listener next to media: account
//! registration by SMS code.

pub mod accounts;
pub mod sms;
