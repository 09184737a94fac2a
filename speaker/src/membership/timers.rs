//! foca's timers: queued by deadline and fired when due, on the driver's loop.

use std::cmp::Reverse;

use foca::Timer;
use tokio::time::Instant;

use super::driver::Driver;
use super::identity::NodeId;

/// A timer foca asked for, due at `at`; `seq` keeps equal deadlines in request order.
pub(super) struct Scheduled {
    pub(super) at: Instant,
    seq: u64,
    timer: Timer<NodeId>,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

impl Driver {
    pub(super) fn fire_due_timers(&mut self) {
        let now = Instant::now();
        while self.timers.peek().is_some_and(|Reverse(s)| s.at <= now) {
            let Some(Reverse(scheduled)) = self.timers.pop() else {
                break;
            };
            let result = self.foca.handle_timer(scheduled.timer, &mut self.runtime);
            self.check(result, "handling a timer");
            // Timers foca schedules now must be ordered after the ones still queued.
            self.schedule();
        }
    }

    pub(super) fn schedule(&mut self) {
        let now = Instant::now();
        while let Some((after, timer)) = self.runtime.to_schedule() {
            self.timer_seq += 1;
            self.timers.push(Reverse(Scheduled {
                at: now + after,
                seq: self.timer_seq,
                timer,
            }));
        }
    }
}

pub(super) async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
