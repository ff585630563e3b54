//! The short fuzzing pass CI runs: every committed corpus entry and every
//! crash ever found (`fuzz/regressions/`) through its target, then a few
//! thousand mutations of the corpus (bit flips, byte edits, splices),
//! bounded in count and time. The long coverage-guided runs use the same
//! targets through cargo-afl (`fuzz/README.md`).

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 4] = [
    ("framer", chatd::fuzz::framer),
    ("sasl", chatd::fuzz::sasl),
    ("jid", chatd::fuzz::jid),
    ("phone", chatd::fuzz::phone),
];

fn files(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut paths: Vec<_> = rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_file()).collect();
    paths.sort();
    paths.into_iter().filter_map(|p| std::fs::read(&p).ok().map(|d| (p, d))).collect()
}

fn inputs(dir: &Path) -> Vec<Vec<u8>> {
    files(dir).into_iter().map(|(_, d)| d).collect()
}

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Bytes that matter to the parsers, favoured by the mutator.
const INTERESTING: &[u8] = b"<>/='\"&;#:![]?xX0\x01\n\r\t,@ +-";

fn mutate(rng: &mut Rng, corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut d = corpus[rng.below(corpus.len())].clone();
    for _ in 0..1 + rng.below(8) {
        let len = d.len();
        match rng.below(6) {
            0 if len > 0 => {
                let i = rng.below(len);
                d[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                d[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            2 => {
                let i = rng.below(len + 1);
                d.insert(i, INTERESTING[rng.below(INTERESTING.len())]);
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let n = rng.below(len - i + 1);
                d.drain(i..i + n.min(16));
            }
            4 => {
                let other = &corpus[rng.below(corpus.len())];
                let (a, b) = (rng.below(other.len() + 1), rng.below(other.len() + 1));
                let (a, b) = (a.min(b), a.max(b));
                let i = rng.below(len + 1);
                d.splice(i..i, other[a..b].iter().copied());
            }
            _ if len > 0 => {
                let (a, b) = (rng.below(len), rng.below(len));
                let (a, b) = (a.min(b), a.max(b));
                let chunk = d[a..b].to_vec();
                let i = rng.below(len + 1);
                d.splice(i..i, chunk);
            }
            _ => {}
        }
        d.truncate(64 * 1024);
    }
    d
}

#[test]
fn corpus_regressions_and_mutations() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let per_target: usize = std::env::var("FUZZ_MUTATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(3000);
    let budget = Duration::from_secs(60);
    for (name, target) in TARGETS {
        let corpus = inputs(&root.join("corpus").join(name));
        assert!(!corpus.is_empty(), "no corpus for {name}");
        for dir in ["corpus", "regressions"] {
            for (path, input) in files(&root.join(dir).join(name)) {
                eprintln!("replaying {}", path.display());
                target(&input);
            }
        }
        // Counts every panic, including one some code path might catch:
        // none is expected.
        static PANICS: AtomicUsize = AtomicUsize::new(0);
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {
            PANICS.fetch_add(1, Ordering::Relaxed);
        }));
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ name.len() as u64);
        let start = Instant::now();
        let mut ran = 0;
        while ran < per_target && start.elapsed() < budget {
            let input = mutate(&mut rng, &corpus);
            let before = PANICS.load(Ordering::Relaxed);
            if std::panic::catch_unwind(|| target(&input)).is_err() || PANICS.load(Ordering::Relaxed) != before {
                std::panic::set_hook(hook);
                target(&input);
                panic!("{name} failed on {:?}", String::from_utf8_lossy(&input));
            }
            ran += 1;
        }
        std::panic::set_hook(hook);
        eprintln!("{name}: {} corpus entries, {ran} mutations in {:?}", corpus.len(), start.elapsed());
    }
}
