//! AFL++ target: see `chatd::fuzz::sasl`.
fn main() {
    afl::fuzz!(|data: &[u8]| chatd::fuzz::sasl(data));
}
