//! AFL++ target: see `chatd::fuzz::framer`.
fn main() {
    afl::fuzz!(|data: &[u8]| chatd::fuzz::framer(data));
}
