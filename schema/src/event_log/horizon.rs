//! The safe read horizon: the highest position below which no event can still appear.
//!
//! Positions are allocated when a row is inserted, not when it commits, so position 7 can
//! become visible after position 8. A reader that moved its checkpoint past 8 would never see
//! 7 (the lost-event bug of sequence-ordered logs). The database gives each reader a
//! [`Watermark`]: the highest position allocated so far, then the next transaction id to be
//! assigned, then the oldest transaction still running. Every position up to `allocated`
//! belongs to a transaction whose id is below `next_xid` (the log assigns a transaction id
//! before allocating; see the migration). Once a later reading's `oldest_running` reaches
//! that `next_xid`, all of those transactions have ended and every position up to
//! `allocated` is settled.
//!
//! This module is the bookkeeping of those candidates, with no I/O.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// One reading of `event_log_watermark()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watermark {
    /// Highest position handed out so far (0 when none).
    pub allocated: i64,
    /// Next transaction id to be assigned, read after `allocated`.
    pub next_xid: i64,
    /// Oldest transaction id still running, read after `next_xid`.
    pub oldest_running: i64,
}

/// Candidates kept before they are merged; each poll adds at most one.
const MAX_PENDING: usize = 256;

#[derive(Debug, Clone)]
struct Candidate {
    allocated: i64,
    settled_when_oldest_reaches: i64,
    seen_at: Instant,
}

/// Tracks the safe horizon for one reader.
#[derive(Debug, Clone, Default)]
pub struct Horizon {
    safe: i64,
    allocated: i64,
    pending: VecDeque<Candidate>,
}

impl Horizon {
    /// Starts with everything up to `safe` known settled (a checkpoint, or 0).
    pub fn new(safe: i64) -> Self {
        Self {
            safe,
            allocated: safe,
            pending: VecDeque::new(),
        }
    }

    /// Every position up to this one is settled and may be read.
    pub fn safe(&self) -> i64 {
        self.safe
    }

    /// Positions allocated but not yet known to be settled: the lag that in-flight
    /// transactions (including unrelated long ones) impose on this reader.
    pub fn blocked_positions(&self) -> i64 {
        (self.allocated - self.safe).max(0)
    }

    /// How long the oldest unsettled candidate has waited.
    pub fn blocked_for(&self, now: Instant) -> Duration {
        self.pending
            .front()
            .map_or(Duration::ZERO, |c| now.saturating_duration_since(c.seen_at))
    }

    /// True when positions are allocated that are not yet settled: the reader should look
    /// again soon rather than wait for a notification.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Folds in a new watermark and returns the (possibly advanced) safe horizon.
    pub fn observe(&mut self, w: Watermark, now: Instant) -> i64 {
        self.allocated = self.allocated.max(w.allocated);
        if w.allocated > self.safe {
            let newer = self
                .pending
                .back()
                .is_none_or(|last| w.allocated > last.allocated);
            if newer {
                let candidate = Candidate {
                    allocated: w.allocated,
                    settled_when_oldest_reaches: w.next_xid,
                    seen_at: now,
                };
                if self.pending.len() >= MAX_PENDING {
                    // Merging into the newest candidate is safe: it waits for a later id,
                    // so it settles no earlier than either would have.
                    let last = self
                        .pending
                        .back_mut()
                        .expect("pending is full, so non-empty");
                    last.allocated = candidate.allocated;
                    last.settled_when_oldest_reaches = candidate.settled_when_oldest_reaches;
                } else {
                    self.pending.push_back(candidate);
                }
            }
        }
        while let Some(front) = self.pending.front() {
            if w.oldest_running >= front.settled_when_oldest_reaches {
                self.safe = self.safe.max(front.allocated);
                self.pending.pop_front();
            } else {
                break;
            }
        }
        self.safe
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(allocated: i64, oldest_running: i64, next_xid: i64) -> Watermark {
        Watermark {
            allocated,
            next_xid,
            oldest_running,
        }
    }

    #[test]
    fn settles_at_once_when_nothing_is_in_flight() {
        let mut h = Horizon::new(0);
        // oldest_running == next_xid: no transaction running.
        assert_eq!(h.observe(w(10, 100, 100), Instant::now()), 10);
        assert!(!h.has_pending());
    }

    #[test]
    fn waits_for_transactions_running_at_the_snapshot() {
        let now = Instant::now();
        let mut h = Horizon::new(0);
        // Transaction 95 is running: positions up to 10 are not settled.
        assert_eq!(h.observe(w(10, 95, 100), now), 0);
        assert_eq!(h.blocked_positions(), 10);
        // 95 still running, new allocations meanwhile.
        assert_eq!(h.observe(w(14, 95, 103), now), 0);
        // 95 ended; the oldest running is now 101 (started after the first snapshot).
        assert_eq!(h.observe(w(15, 101, 104), now), 10);
        // 101 and 102 ended.
        assert_eq!(h.observe(w(15, 104, 104), now), 15);
        assert_eq!(h.blocked_positions(), 0);
    }

    #[test]
    fn a_long_transaction_elsewhere_delays_but_never_skips() {
        let t0 = Instant::now();
        let mut h = Horizon::new(0);
        for i in 1..=1000 {
            // Transaction 50 never ends; many others come and go.
            h.observe(w(i, 50, 100 + i), t0);
            assert_eq!(h.safe(), 0);
        }
        assert_eq!(h.blocked_positions(), 1000);
        assert!(h.blocked_for(t0 + Duration::from_secs(3)) >= Duration::from_secs(3));
        // Bounded memory while blocked.
        assert!(h.pending.len() <= MAX_PENDING);
        // 50 ends while 1090 is running: the horizon advances, but not to positions that
        // 1090 may still hold.
        h.observe(w(1000, 1090, 1101), t0);
        assert!(h.safe() > 0 && h.safe() < 1000, "safe = {}", h.safe());
        h.observe(w(1000, 1101, 1101), t0);
        assert_eq!(h.safe(), 1000);
    }

    #[test]
    fn never_moves_backwards() {
        let mut h = Horizon::new(40);
        assert_eq!(h.observe(w(30, 10, 10), Instant::now()), 40);
        assert_eq!(h.observe(w(50, 10, 12), Instant::now()), 40);
        assert_eq!(h.observe(w(50, 12, 12), Instant::now()), 50);
    }
}
