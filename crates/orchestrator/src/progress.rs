//! How far a run's disk copies are. Each copy reports its bytes to a [`Meter`] (the disk
//! copier's `Progress`), which turns them into typed [`ProgressEvent`]s with a rate and an ETA,
//! at most one each [`EVERY`] plus the last, for whoever renders them: the CLI (a bar, lines or
//! JSON) and the daemon's event stream. The orchestrator renders nothing.
//!
//! A copy reports from its own threads (the application disk's copy goes on in the background
//! while later steps run), so the sink is `Send + Sync`, unlike the step events' callback.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::step::Step;

/// Where progress events go.
pub type ProgressSink = Arc<dyn Fn(&ProgressEvent) + Send + Sync>;

/// A sink that drops every event (recovery, which copies nothing; tests).
pub fn no_progress() -> ProgressSink {
    Arc::new(|_: &ProgressEvent| {})
}

/// How far one disk copy of a run is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgressEvent {
    pub run_id: i64,
    /// The step whose copy this is (`copy_system_disk`, `copy_app_disk`); the application
    /// disk's copy goes on while later steps run.
    pub step: String,
    /// Bytes copied so far: never fewer than in an earlier event of the same copy.
    pub bytes: u64,
    /// The bytes the copy counted in the source before it began; 0 when it did not count.
    pub total: u64,
    /// Bytes per second since the copy began.
    pub rate: f64,
    /// Seconds left at that rate, when the total is known and the rate is not 0.
    pub eta_secs: Option<f64>,
}

impl ProgressEvent {
    /// Whether this is the copy's last event (all the bytes counted are copied).
    pub fn is_done(&self) -> bool {
        self.total > 0 && self.bytes >= self.total
    }
}

/// The shortest time between two events of one copy (the last one is always sent).
pub const EVERY: Duration = Duration::from_millis(500);

/// One copy's meter: what the copier reports of its bulk copy, as events to the run's sink.
/// The bulk copy ends at the first replay round: its last event then says that what it
/// copied is the total (files the count saw may have gone since).
pub(crate) struct Meter {
    run_id: i64,
    step: Step,
    sink: ProgressSink,
    started: Mutex<Instant>,
    total: AtomicU64,
    /// The most bytes reported (the copier's workers report out of order).
    high: AtomicU64,
    /// The bulk copy ended (replay rounds copy again; they are not its progress).
    ended: AtomicBool,
    /// When the last event went, with how many bytes of which total.
    last: Mutex<Option<(Instant, u64, u64)>>,
}

impl Meter {
    pub(crate) fn new(run_id: i64, step: Step, sink: ProgressSink) -> Meter {
        Meter {
            run_id,
            step,
            sink,
            started: Mutex::new(Instant::now()),
            total: AtomicU64::new(0),
            high: AtomicU64::new(0),
            ended: AtomicBool::new(false),
            last: Mutex::new(None),
        }
    }

    /// Sends the event for `bytes` now if one is due: a `forced` one unless it would repeat
    /// the last, else the copy's last or one [`EVERY`] after the last.
    fn send(&self, bytes: u64, forced: bool) {
        let mut last = lock(&self.last);
        let total = match self.total.load(Ordering::SeqCst) {
            0 => 0,
            t => t.max(bytes),
        };
        let go = match *last {
            None => true,
            Some((_, b, t)) if forced => (b, t) != (bytes, total),
            Some((_, b, _)) if bytes <= b => false,
            Some((at, _, _)) => (total > 0 && bytes >= total) || at.elapsed() >= EVERY,
        };
        if !go {
            return;
        }
        *last = Some((Instant::now(), bytes, total));
        let secs = lock(&self.started).elapsed().as_secs_f64().max(1e-3);
        let rate = bytes as f64 / secs;
        (self.sink)(&ProgressEvent {
            run_id: self.run_id,
            step: self.step.as_str().to_owned(),
            bytes,
            total,
            rate,
            eta_secs: (total > 0 && rate > 0.0).then(|| total.saturating_sub(bytes) as f64 / rate),
        });
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl patchover_lc::Progress for Meter {
    /// The total is known: the copy begins (an event with 0 bytes says so).
    fn scanned(&self, bytes: u64, _files: u64) {
        self.total.store(bytes, Ordering::SeqCst);
        *lock(&self.started) = Instant::now();
        self.send(0, true);
    }

    fn copied(&self, bytes: u64, _files: u64) {
        if self.ended.load(Ordering::SeqCst) {
            return;
        }
        let high = self.high.fetch_max(bytes, Ordering::SeqCst).max(bytes);
        self.send(high, false);
    }

    /// The first round ends the bulk copy: its bytes are the total.
    fn replayed(&self, _round: u64, _history_entries: u64, _bytes: u64) {
        if self.ended.swap(true, Ordering::SeqCst) {
            return;
        }
        let high = self.high.load(Ordering::SeqCst);
        self.total.store(high, Ordering::SeqCst);
        self.send(high, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use patchover_lc::Progress;

    fn meter() -> (Meter, Arc<Mutex<Vec<ProgressEvent>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let sink: ProgressSink =
            Arc::new(move |e: &ProgressEvent| s.lock().unwrap().push(e.clone()));
        (Meter::new(7, Step::CopyAppDisk, sink), seen)
    }

    /// Reports out of order and faster than EVERY: the first, then only the last, with bytes
    /// never going back.
    #[test]
    fn events_are_spaced_monotonic_and_end_at_the_total() {
        let (m, seen) = meter();
        m.scanned(1000, 3);
        m.copied(300, 1);
        m.copied(600, 2);
        m.copied(400, 1);
        m.copied(1000, 3);
        // The first round ends the bulk copy: no repeat of the last event, and what the
        // rounds copy is not the bulk's.
        m.replayed(1, 0, 0);
        m.copied(1200, 4);
        let seen = seen.lock().unwrap();
        let bytes: Vec<u64> = seen.iter().map(|e| e.bytes).collect();
        assert_eq!(bytes, [0, 1000], "{seen:?}");
        let last = seen.last().unwrap();
        assert_eq!(
            (last.run_id, last.step.as_str(), last.total),
            (7, "copy_app_disk", 1000)
        );
        assert!(last.is_done());
        assert_eq!(last.eta_secs, Some(0.0));
        assert!(last.rate > 0.0);
    }

    /// After EVERY an event goes; its ETA is what is left at the rate so far.
    #[test]
    fn an_event_after_the_interval_has_a_rate_and_an_eta() {
        let (m, seen) = meter();
        m.scanned(1000, 3);
        std::thread::sleep(EVERY);
        m.copied(250, 1);
        let seen = seen.lock().unwrap();
        let e = &seen[1];
        assert_eq!(e.bytes, 250);
        let eta = e.eta_secs.unwrap();
        assert!((eta - 750.0 / e.rate).abs() < 1e-9, "{e:?}");
        assert!(!e.is_done());
    }

    /// A copier that counted nothing first: no total, no ETA, until the bulk copy ends.
    #[test]
    fn without_a_total_there_is_no_eta_until_the_end() {
        let (m, seen) = meter();
        m.copied(10, 1);
        m.replayed(1, 0, 0);
        let seen = seen.lock().unwrap();
        assert_eq!((seen[0].total, seen[0].eta_secs), (0, None));
        assert!(!seen[0].is_done());
        assert_eq!((seen[1].bytes, seen[1].total), (10, 10));
        assert!(seen[1].is_done());
    }

    /// Files the count saw went before they were copied: the end says what was copied.
    #[test]
    fn a_bulk_copy_that_found_less_than_it_counted_ends_at_what_it_copied() {
        let (m, seen) = meter();
        m.scanned(1000, 3);
        m.copied(700, 2);
        m.replayed(1, 0, 0);
        let seen = seen.lock().unwrap();
        let last = seen.last().unwrap();
        assert_eq!((last.bytes, last.total), (700, 700));
    }
}
