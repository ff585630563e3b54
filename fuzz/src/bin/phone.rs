//! AFL++ target: see `chatd::fuzz::phone`.
fn main() {
    afl::fuzz!(|data: &[u8]| chatd::fuzz::phone(data));
}
