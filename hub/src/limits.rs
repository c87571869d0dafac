//! Rate limits per node on the write routes: a token bucket per node, refilled over time.
//!
//! A node token writes registrations, reports, telemetry and feedback. One stolen or broken
//! node could otherwise write as fast as the hub answers, filling the database and waking the
//! fleet. Admin tokens are not limited (they are the operator's), nor are reads.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// Writes a node may make at once.
pub(crate) const BURST: f64 = 120.0;

/// Writes per second a node's bucket regains.
pub(crate) const PER_SECOND: f64 = 5.0;

/// One bucket: writes left, and when it was last topped up.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    left: f64,
    at: Instant,
}

/// The buckets, one per node that has written (bounded by the nodes that hold tokens: only
/// callers with a valid node token reach it).
#[derive(Debug, Default)]
pub(crate) struct RateLimits {
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimits {
    /// Takes one write from `node`'s bucket at `now`; `false` when it is empty.
    pub(crate) fn allow(&self, node: &str, now: Instant) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let bucket = buckets.entry(node.to_owned()).or_insert(Bucket {
            left: BURST,
            at: now,
        });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.left = (bucket.left + elapsed * PER_SECOND).min(BURST);
        bucket.at = now;
        if bucket.left >= 1.0 {
            bucket.left -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_then_the_refill_rate_per_node() {
        let limits = RateLimits::default();
        let t0 = Instant::now();
        let allowed = (0..200).filter(|_| limits.allow("a", t0)).count();
        assert_eq!(allowed, BURST as usize);
        assert!(limits.allow("b", t0), "another node has its own bucket");
        // A second later: five more writes.
        let t1 = t0 + Duration::from_secs(1);
        let allowed = (0..20).filter(|_| limits.allow("a", t1)).count();
        assert_eq!(allowed, PER_SECOND as usize);
        // Idle for long: full again, never more than the burst.
        let t2 = t1 + Duration::from_secs(3600);
        let allowed = (0..200).filter(|_| limits.allow("a", t2)).count();
        assert_eq!(allowed, BURST as usize);
    }
}
