//! AFL++ target: see `chatd::fuzz::sasl`.
//! rsasl runs behind chatd's own catch_unwind here, so the abort-on-panic
//! hook stays off: only a panic escaping chatd is a crash.
fn main() {
    afl::fuzz_nohook!(|data: &[u8]| chatd::fuzz::sasl(data));
}
