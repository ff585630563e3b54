//! AFL++ target: see `chatd::fuzz::jid`.
fn main() {
    afl::fuzz!(|data: &[u8]| chatd::fuzz::jid(data));
}
