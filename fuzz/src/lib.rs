//! Fuzzing on stable Rust: every decoder that reads bytes from outside (requests, capsules,
//! manifests, signed metadata, telemetry, images) is run on mutations of real inputs, and
//! must answer with an error or a value, never a panic.
//!
//! cargo-fuzz needs a nightly toolchain, which CI's machines do not have; proptest's runner
//! works on stable. The inputs are [`mutated`] seeds: a real input (a fixture's request, a
//! capsule's manifest, signed metadata, a PNG) with up to eight edits (a byte flipped,
//! inserted or deleted, a cut, a span repeated), so most cases get past the magic numbers and
//! length prefixes into the parsers. A failing case is shrunk and its seed kept in
//! `fuzz/regressions.txt`, which every later run replays first.
//!
//! `tests/targets.rs` holds one test per target. CI runs [`cases`] cases each (a short
//! run); `CAPSULE_FUZZ_CASES=N cargo test -p capsule-fuzz --release -- --nocapture` runs
//! longer and prints executions and time per target (what docs/security.md reports).

use proptest::prelude::*;
use proptest::sample::Index;

/// One edit of a seed.
#[derive(Debug, Clone)]
enum Edit {
    /// XOR the byte at the index with a non-zero mask.
    Flip(Index, u8),
    /// Insert a byte before the index.
    Insert(Index, u8),
    /// Delete the byte at the index.
    Delete(Index),
    /// Cut everything from the index on.
    Truncate(Index),
    /// Repeat the span from the index, up to 64 bytes long, after itself.
    Repeat(Index, u8),
    /// Set the byte at the index to an extreme value (0x00, 0x7f, 0x80 or 0xff).
    Extreme(Index, u8),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<Index>(), 1..=255u8).prop_map(|(i, m)| Edit::Flip(i, m)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Edit::Insert(i, b)),
        any::<Index>().prop_map(Edit::Delete),
        any::<Index>().prop_map(Edit::Truncate),
        (any::<Index>(), 1..=64u8).prop_map(|(i, n)| Edit::Repeat(i, n)),
        (any::<Index>(), 0..4u8).prop_map(|(i, k)| Edit::Extreme(i, k)),
    ]
}

fn apply(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        if bytes.is_empty() {
            if let Edit::Insert(_, b) = e {
                bytes.push(*b);
            }
            continue;
        }
        match *e {
            Edit::Flip(i, m) => {
                let i = i.index(bytes.len());
                bytes[i] ^= m;
            }
            Edit::Insert(i, b) => {
                let i = i.index(bytes.len() + 1);
                bytes.insert(i, b);
            }
            Edit::Delete(i) => {
                let i = i.index(bytes.len());
                bytes.remove(i);
            }
            Edit::Truncate(i) => {
                let i = i.index(bytes.len());
                bytes.truncate(i);
            }
            Edit::Repeat(i, n) => {
                let start = i.index(bytes.len());
                let end = (start + usize::from(n)).min(bytes.len());
                let span = bytes[start..end].to_vec();
                bytes.splice(end..end, span);
            }
            Edit::Extreme(i, k) => {
                let i = i.index(bytes.len());
                bytes[i] = [0x00, 0x7f, 0x80, 0xff][usize::from(k)];
            }
        }
    }
    bytes
}

/// One of `seeds` (a real input each), with up to eight edits; now and then random bytes.
pub fn mutated(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let count = seeds.len().max(1);
    prop_oneof![
        9 => (0..count, proptest::collection::vec(edit(), 0..8)).prop_map(move |(i, edits)| {
            apply(seeds.get(i).cloned().unwrap_or_default(), &edits)
        }),
        1 => proptest::collection::vec(any::<u8>(), 0..256),
    ]
}

/// Cases per target: `CAPSULE_FUZZ_CASES`, else `default` (CI's short run).
pub fn cases(default: u32) -> u32 {
    std::env::var("CAPSULE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// proptest's settings for a target: [`cases`] cases, failures kept for replay, no forking.
pub fn config(default_cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases: cases(default_cases),
        max_shrink_iters: 2048,
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::Direct("regressions.txt"),
        )),
        ..ProptestConfig::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    /// The edits keep most of a seed: mutated inputs start like the seed far more often
    /// than not (the point of seeding).
    #[test]
    fn mutations_stay_close_to_their_seeds() {
        let seed = b"\0asm\x01\0\0\0 and the rest of a module".to_vec();
        let strategy = mutated(vec![seed.clone()]);
        let mut runner = TestRunner::deterministic();
        let mut same_start = 0;
        for _ in 0..1000 {
            let value = strategy
                .new_tree(&mut runner)
                .map(|t| t.current())
                .unwrap_or_default();
            same_start += usize::from(value.starts_with(b"\0asm"));
        }
        assert!(same_start > 500, "{same_start} of 1000");
    }
}
