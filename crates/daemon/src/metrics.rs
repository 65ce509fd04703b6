//! Prometheus metrics on the `prometheus-client` crate, rendered at `/metrics`.
//!
//! Three sources, one registry per scrape:
//! - **counters** the daemon's own code paths increment ([`COUNTERS`]): the HTTP layer on
//!   each request, the monitor loop after each round, the approval handler on each decision;
//! - **runs**, from the store's run journal, wherever they were started (the daemon, the
//!   CLI with `--direct`, a run recovered at start): each ended run is *ingested* once
//!   ([`Metrics::ingest`]) into histograms (switch pause, freeze, each step, the whole cycle)
//!   and counters (runs by outcome, bytes, held connections). Ingesting, not recomputing at
//!   every scrape: an ended run never changes, so each scrape reads only the ids of ended
//!   runs and the journal of the new ones, and the daemon's own runs need no second path;
//!   after a restart the store is ingested again, so the figures cover the store's history;
//! - **gauges** of what is true now ([`Gauges`]: LC state and role, runs in progress,
//!   pending and approved patches, feed polls, open challenges), read at the scrape.
//!
//! `prometheus-client` writes OpenMetrics (`application/openmetrics-text`), which Prometheus
//! asks for; other clients (curl, `promtool check metrics`) get the classic text format
//! 0.0.4, which differs in two points that [`to_text_004`] makes: a counter's `HELP` and
//! `TYPE` lines name it with its `_total` suffix, and there is no `# EOF` line.

use std::collections::BTreeSet;
use std::sync::Mutex;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

/// `(name, help, label names)` of every counter the daemon increments itself or from ingested
/// runs; the names are the exposed ones, with their `_total`.
pub const COUNTERS: &[(&str, &str, &[&str])] = &[
    (
        "patchover_http_requests_total",
        "API requests by route and status",
        &["route", "status"],
    ),
    (
        "patchover_runs_total",
        "Patch and rollback runs by outcome (ok, dry-run, failed, rolled-back, switched, handed-back, hand-back-failed, refused)",
        &["outcome"],
    ),
    (
        "patchover_bytes_copied_total",
        "Bytes copied from active to standby disks",
        &[],
    ),
    (
        "patchover_bytes_replayed_total",
        "Bytes replayed from the write history onto standby disks",
        &[],
    ),
    (
        "patchover_switch_held_syns_total",
        "New connections held (not refused) during switch windows",
        &[],
    ),
    (
        "patchover_switch_leftover_connections_total",
        "Connections still open on the old LC when its drain deadline passed (cut)",
        &[],
    ),
    (
        "patchover_feed_polls_total",
        "Feed polls by result (fetched, not-modified, backoff, failed)",
        &["result"],
    ),
    ("patchover_feed_errors_total", "Feed polls that failed", &[]),
    ("patchover_mails_sent_total", "Notices mailed", &[]),
    (
        "patchover_mail_errors_total",
        "Notices that could not be mailed",
        &[],
    ),
    (
        "patchover_approvals_total",
        "Approval decisions by result (accepted, refused)",
        &["result"],
    ),
    (
        "patchover_events_total",
        "Events published on the event stream",
        &[],
    ),
    (
        "patchover_connections_refused_total",
        "Connections answered 503 and closed because their listener held max_connections",
        &[],
    ),
    (
        "patchover_connections_timed_out_total",
        "Connections closed by a deadline, by phase (head: a request head not whole in time; idle: no request after an answer)",
        &["phase"],
    ),
];

/// Bucket bounds, in seconds.
const PAUSE_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const STEP_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];
const RUN_BUCKETS: &[f64] = &[
    1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

type Labels = Vec<(&'static str, String)>;
type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

fn pause_histogram() -> Histogram {
    Histogram::new(PAUSE_BUCKETS.iter().copied())
}
fn step_histogram() -> Histogram {
    Histogram::new(STEP_BUCKETS.iter().copied())
}
fn run_histogram() -> Histogram {
    Histogram::new(RUN_BUCKETS.iter().copied())
}

/// The histograms of ingested runs.
struct RunHistograms {
    pause: Histograms,
    freeze: Histograms,
    step: Histograms,
    run: Histograms,
}

impl RunHistograms {
    fn new() -> RunHistograms {
        let h = RunHistograms {
            pause: Family::new_with_constructor(pause_histogram),
            freeze: Family::new_with_constructor(pause_histogram),
            step: Family::new_with_constructor(step_histogram),
            run: Family::new_with_constructor(run_histogram),
        };
        // The unlabelled ones are exposed (count 0) before the first run.
        let _ = h.pause.get_or_create(&Vec::new());
        let _ = h.freeze.get_or_create(&Vec::new());
        h
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "patchover_switch_pause_seconds",
            "Time new connections were held at a run's network switch",
            self.pause.clone(),
        );
        r.register(
            "patchover_freeze_seconds",
            "Time the active LC was frozen for the application disk's cut",
            self.freeze.clone(),
        );
        r.register(
            "patchover_step_seconds",
            "Duration of each run step, from the journal's start to its end",
            self.step.clone(),
        );
        r.register(
            "patchover_run_seconds",
            "Duration of a whole run (kind: patch or rollback) by outcome",
            self.run.clone(),
        );
    }
}

/// What one ended run contributes, as the store's journal and report say it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunFigures {
    pub id: i64,
    /// `patch` or `rollback`.
    pub kind: String,
    pub outcome: String,
    /// Each journaled step's duration in seconds (started to done or failed).
    pub steps: Vec<(String, f64)>,
    /// From the run's opening to its end.
    pub seconds: f64,
    pub bytes_copied: u64,
    pub bytes_replayed: u64,
    pub freeze_s: Option<f64>,
    pub pause_s: Option<f64>,
    pub held_syns: u64,
    pub leftover_connections: u64,
}

/// What is true at the scrape, read by the dispatcher from the store and the backends.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Gauges {
    /// `(lc, state, role)` of every LC.
    pub lcs: Vec<(String, String, String)>,
    pub runs_in_progress: i64,
    /// Imported, not applied, not marked.
    pub patches_pending: i64,
    /// Marked to be applied at the next run.
    pub patches_approved: i64,
    /// `(feed, unix seconds)` of each feed's last successful poll.
    pub feed_last_success: Vec<(String, f64)>,
    /// Challenges neither used nor expired.
    pub challenges_open: i64,
}

impl Gauges {
    fn register(&self, r: &mut Registry) {
        let lc = Family::<Labels, Gauge>::default();
        for (id, state, role) in &self.lcs {
            lc.get_or_create(&vec![
                ("lc", id.clone()),
                ("state", state.clone()),
                ("role", role.clone()),
            ])
            .set(1);
        }
        r.register(
            "patchover_lc_state",
            "One series per LC with its backend state and resource-table role (value 1)",
            lc,
        );
        r.register(
            "patchover_runs_in_progress",
            "Runs journaled and not ended (started by the daemon or the CLI)",
            gauge(self.runs_in_progress),
        );
        let patches = Family::<Labels, Gauge>::default();
        patches
            .get_or_create(&vec![("state", "pending".into())])
            .set(self.patches_pending);
        patches
            .get_or_create(&vec![("state", "approved".into())])
            .set(self.patches_approved);
        r.register(
            "patchover_patches",
            "Patches in the patch table: pending (not applied, not marked), approved (marked for the next run)",
            patches,
        );
        let feeds = Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        for (feed, at) in &self.feed_last_success {
            feeds.get_or_create(&vec![("feed", feed.clone())]).set(*at);
        }
        r.register(
            "patchover_feed_last_success_timestamp_seconds",
            "Unix time of each feed's last successful poll",
            feeds,
        );
        r.register(
            "patchover_approval_challenges_open",
            "Approval challenges neither used nor expired",
            gauge(self.challenges_open),
        );
    }
}

fn gauge(v: i64) -> Gauge {
    let g = Gauge::default();
    g.set(v);
    g
}

/// The daemon's metrics: counters, and the histograms of the runs ingested so far.
pub struct Metrics {
    counters: Vec<(&'static str, Family<Labels, Counter<f64>>)>,
    runs: RunHistograms,
    ingested: Mutex<BTreeSet<i64>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        let counters = COUNTERS
            .iter()
            .map(|(name, _, labels)| {
                let f = Family::<Labels, Counter<f64>>::default();
                if labels.is_empty() {
                    // Unlabelled counters are exposed at 0 before anything happens.
                    let _ = f.get_or_create(&Vec::new());
                }
                (*name, f)
            })
            .collect();
        Metrics {
            counters,
            runs: RunHistograms::new(),
            ingested: Mutex::new(BTreeSet::new()),
        }
    }
}

fn registered(name: &str) -> &'static (&'static str, &'static str, &'static [&'static str]) {
    COUNTERS
        .iter()
        .find(|m| m.0 == name)
        .unwrap_or_else(|| panic!("metric {name} is not in metrics::COUNTERS"))
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics::default()
    }

    fn family(&self, name: &str) -> &Family<Labels, Counter<f64>> {
        let m = registered(name);
        &self
            .counters
            .iter()
            .find(|(n, _)| *n == m.0)
            .expect("every counter has a family")
            .1
    }

    fn labels(name: &str, values: &[&str]) -> Labels {
        let m = registered(name);
        assert_eq!(m.2.len(), values.len(), "labels of {name}");
        m.2.iter()
            .zip(values)
            .map(|(k, v)| (*k, (*v).to_owned()))
            .collect()
    }

    /// Adds `v` to a counter. Panics on an unregistered name or a wrong label count (a
    /// programming error caught by the tests).
    pub fn add(&self, name: &'static str, labels: &[&str], v: f64) {
        let l = Self::labels(name, labels);
        self.family(name).get_or_create(&l).inc_by(v);
    }

    pub fn inc(&self, name: &'static str, labels: &[&str]) {
        self.add(name, labels, 1.0);
    }

    /// The value of one counter series (for tests).
    pub fn get(&self, name: &str, labels: &[&str]) -> f64 {
        let l = Self::labels(name, labels);
        self.family(name).get_or_create(&l).get()
    }

    /// Whether run `id` was ingested already.
    pub fn ingested(&self, id: i64) -> bool {
        self.lock().contains(&id)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<i64>> {
        self.ingested.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one ended run, once: a run already ingested is left alone (two scrapes may
    /// race for the same run).
    pub fn ingest(&self, r: &RunFigures) {
        if !self.lock().insert(r.id) {
            return;
        }
        self.inc("patchover_runs_total", &[&r.outcome]);
        for (step, s) in &r.steps {
            self.runs
                .step
                .get_or_create(&vec![("step", step.clone())])
                .observe(*s);
        }
        self.runs
            .run
            .get_or_create(&vec![
                ("kind", r.kind.clone()),
                ("outcome", r.outcome.clone()),
            ])
            .observe(r.seconds);
        if let Some(s) = r.freeze_s {
            self.runs.freeze.get_or_create(&Vec::new()).observe(s);
        }
        if let Some(s) = r.pause_s {
            self.runs.pause.get_or_create(&Vec::new()).observe(s);
        }
        self.add("patchover_bytes_copied_total", &[], r.bytes_copied as f64);
        self.add(
            "patchover_bytes_replayed_total",
            &[],
            r.bytes_replayed as f64,
        );
        self.add("patchover_switch_held_syns_total", &[], r.held_syns as f64);
        self.add(
            "patchover_switch_leftover_connections_total",
            &[],
            r.leftover_connections as f64,
        );
    }

    /// The OpenMetrics text: counters, run histograms, and `gauges` with the build's version.
    pub fn render(&self, gauges: &Gauges) -> String {
        let mut r = Registry::default();
        for ((name, help, _), (_, family)) in COUNTERS.iter().zip(&self.counters) {
            // The crate adds `_total` to a counter's samples itself.
            let base = name.strip_suffix("_total").unwrap_or(name);
            r.register(base, *help, family.clone());
        }
        self.runs.register(&mut r);
        gauges.register(&mut r);
        let build = Family::<Labels, Gauge>::default();
        build
            .get_or_create(&vec![("version", env!("CARGO_PKG_VERSION").to_owned())])
            .set(1);
        r.register(
            "patchover_build_info",
            "The running patchover's version (value 1)",
            build,
        );
        let mut out = String::new();
        encode(&mut out, &r).expect("writing to a String does not fail");
        out
    }
}

/// The classic text format (0.0.4) of an OpenMetrics text: counters' `HELP` and `TYPE`
/// lines take the samples' `_total` name, and the `# EOF` line goes.
pub fn to_text_004(openmetrics: &str) -> String {
    let counters: BTreeSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 64 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let head = ["# HELP ", "# TYPE "]
            .into_iter()
            .find(|p| line.starts_with(p));
        match head {
            Some(p) => {
                let rest = &line[p.len()..];
                let name = rest.split(' ').next().unwrap_or("");
                if counters.contains(name) {
                    out.push_str(p);
                    out.push_str(name);
                    out.push_str("_total");
                    out.push_str(&rest[name.len()..]);
                } else {
                    out.push_str(line);
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures() -> RunFigures {
        RunFigures {
            id: 7,
            kind: "patch".into(),
            outcome: "ok".into(),
            steps: vec![("copy_system_disk".into(), 1.5), ("switch".into(), 0.2)],
            seconds: 12.0,
            bytes_copied: 4096,
            bytes_replayed: 512,
            freeze_s: Some(0.02),
            pause_s: Some(0.03),
            held_syns: 3,
            leftover_connections: 0,
        }
    }

    fn gauges() -> Gauges {
        Gauges {
            lcs: vec![
                ("lc1".into(), "running".into(), "active".into()),
                ("lc2".into(), "stopped".into(), "standby".into()),
            ],
            runs_in_progress: 1,
            patches_pending: 2,
            patches_approved: 1,
            feed_last_success: vec![("main".into(), 1_700_000_000.5)],
            challenges_open: 1,
        }
    }

    #[test]
    fn an_ingested_run_lands_in_histograms_once() {
        let m = Metrics::new();
        m.ingest(&figures());
        m.ingest(&figures());
        m.inc("patchover_http_requests_total", &["/v1/lcs", "200"]);
        let empty = Metrics::new().render(&Gauges::default());
        assert!(
            empty.contains("patchover_switch_pause_seconds_count 0\n"),
            "{empty}"
        );
        let t = m.render(&gauges());
        for line in [
            "patchover_runs_total{outcome=\"ok\"} 1.0\n",
            "patchover_switch_pause_seconds_count 1\n",
            "patchover_switch_pause_seconds_sum 0.03\n",
            "patchover_switch_pause_seconds_bucket{le=\"0.05\"} 1\n",
            "patchover_switch_pause_seconds_bucket{le=\"0.025\"} 0\n",
            "patchover_freeze_seconds_count 1\n",
            "patchover_step_seconds_sum{step=\"copy_system_disk\"} 1.5\n",
            "patchover_step_seconds_count{step=\"switch\"} 1\n",
            "patchover_run_seconds_count{kind=\"patch\",outcome=\"ok\"} 1\n",
            "patchover_bytes_copied_total 4096.0\n",
            "patchover_switch_held_syns_total 3.0\n",
            "patchover_mails_sent_total 0.0\n",
            "patchover_lc_state{lc=\"lc2\",state=\"stopped\",role=\"standby\"} 1\n",
            "patchover_runs_in_progress 1\n",
            "patchover_patches{state=\"pending\"} 2\n",
            "patchover_feed_last_success_timestamp_seconds{feed=\"main\"} 1700000000.5\n",
            "patchover_approval_challenges_open 1\n",
            "# TYPE patchover_switch_pause_seconds histogram\n",
        ] {
            assert!(t.contains(line), "{line} not in\n{t}");
        }
        assert!(t.contains(&format!(
            "patchover_build_info{{version=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        )));
        assert!(m.ingested(7) && !m.ingested(8));
        assert_eq!(m.get("patchover_bytes_replayed_total", &[]), 512.0);
    }

    #[test]
    fn the_004_text_names_counters_with_total_and_has_no_eof() {
        let m = Metrics::new();
        m.ingest(&figures());
        let om = m.render(&Gauges::default());
        assert!(om.contains("# TYPE patchover_runs counter\n"), "{om}");
        assert!(om.ends_with("# EOF\n"));
        let t = to_text_004(&om);
        assert!(t.contains("# TYPE patchover_runs_total counter\n"), "{t}");
        assert!(t.contains("# HELP patchover_runs_total Patch"), "{t}");
        assert!(t.contains("# TYPE patchover_run_seconds histogram\n"));
        assert!(!t.contains("# EOF"));
        assert_eq!(t.lines().count(), om.lines().count() - 1);
    }

    /// No counter is left without a code path that increments it (Firecracker's "no unused
    /// metric" rule): each name appears outside the list in this crate or in the binary's
    /// daemon file.
    #[test]
    fn every_counter_is_incremented_somewhere() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut code = String::new();
        for f in [
            "src/server.rs",
            "src/slow.rs",
            "../patchover/src/cmd/serve.rs",
        ] {
            code.push_str(&std::fs::read_to_string(root.join(f)).unwrap());
        }
        let own = std::fs::read_to_string(root.join("src/metrics.rs")).unwrap();
        let start = own.find("impl Metrics {").unwrap();
        let end = own.find("#[cfg(test)]").unwrap();
        code.push_str(&own[start..end]);
        for (name, _, _) in COUNTERS {
            assert!(
                code.contains(&format!("\"{name}\"")),
                "{name} is never incremented"
            );
        }
    }

    #[test]
    #[should_panic(expected = "not in metrics::COUNTERS")]
    fn unregistered_names_panic() {
        Metrics::new().inc("patchover_nope", &[]);
    }
}
