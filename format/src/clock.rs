//! Time as the hub and the node read it: the system clock in service, a clock a test sets
//! and advances (so tests of windows, timers and retention move time instead of waiting
//! for it).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// A source of wall-clock time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Microseconds since the Unix epoch.
    fn now_us(&self) -> i64;

    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64 {
        self.now_us().div_euclid(1000)
    }

    /// Seconds since the Unix epoch.
    fn now_s(&self) -> i64 {
        self.now_us().div_euclid(1_000_000)
    }
}

/// A shared clock.
pub type SharedClock = Arc<dyn Clock>;

/// The system's clock (0 if it reads before 1970).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_us(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    }
}

/// The system's clock, shared.
pub fn system() -> SharedClock {
    Arc::new(SystemClock)
}

/// A clock that moves only when told to (tests).
#[derive(Debug, Default)]
pub struct ManualClock {
    us: AtomicI64,
}

impl ManualClock {
    /// A clock reading `ms` milliseconds since the epoch.
    pub fn at_ms(ms: i64) -> Arc<ManualClock> {
        Arc::new(ManualClock {
            us: AtomicI64::new(ms.saturating_mul(1000)),
        })
    }

    /// Moves it forward.
    pub fn advance(&self, by: Duration) {
        let us = i64::try_from(by.as_micros()).unwrap_or(i64::MAX);
        self.us.fetch_add(us, Ordering::SeqCst);
    }

    /// Sets it to `ms` milliseconds since the epoch.
    pub fn set_ms(&self, ms: i64) {
        self.us.store(ms.saturating_mul(1000), Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_us(&self) -> i64 {
        self.us.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told() {
        let c = ManualClock::at_ms(1_500);
        assert_eq!((c.now_ms(), c.now_s(), c.now_us()), (1_500, 1, 1_500_000));
        c.advance(Duration::from_millis(600));
        assert_eq!((c.now_ms(), c.now_s()), (2_100, 2));
        c.set_ms(-1);
        assert_eq!((c.now_ms(), c.now_s()), (-1, -1));
    }

    #[test]
    fn the_system_clock_reads_the_present() {
        // After 2020-01-01 and before 2200.
        let s = SystemClock.now_s();
        assert!((1_577_836_800..7_258_118_400).contains(&s), "{s}");
    }
}
