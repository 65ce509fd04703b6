//! Prometheus metrics, registered in one place ([`REGISTRY`]) and rendered in the text
//! exposition format at `/metrics`.
//!
//! Every metric is a counter (summaries are a `_sum`/`_count` pair of counters), incremented
//! by the code path it describes: the run driver on a run's end, the monitor loop after each
//! round, the approval handler on each decision, the HTTP layer on each request. A test
//! checks that nothing registered is left unused and that the values follow what was done.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// `(name, help, label names)`; every name here ends up in `/metrics`.
pub const REGISTRY: &[(&str, &str, &[&str])] = &[
    (
        "patchover_http_requests_total",
        "API requests by route and status.",
        &["route", "status"],
    ),
    (
        "patchover_runs_total",
        "Patch runs by outcome (ok, dry-run, failed, rolled-back, handed-back, hand-back-failed, refused).",
        &["outcome"],
    ),
    (
        "patchover_step_seconds_sum",
        "Time spent in each run step.",
        &["step"],
    ),
    (
        "patchover_step_seconds_count",
        "Run steps finished.",
        &["step"],
    ),
    (
        "patchover_bytes_copied_total",
        "Bytes copied from active to standby disks.",
        &[],
    ),
    (
        "patchover_bytes_replayed_total",
        "Bytes replayed from the write history onto standby disks.",
        &[],
    ),
    (
        "patchover_freeze_seconds_sum",
        "Time the active LC was frozen for the disk cut.",
        &[],
    ),
    ("patchover_freeze_seconds_count", "Freeze windows.", &[]),
    (
        "patchover_switch_pause_seconds_sum",
        "Time the service was paused at network switches.",
        &[],
    ),
    (
        "patchover_switch_pause_seconds_count",
        "Network switches.",
        &[],
    ),
    (
        "patchover_switch_held_syns_total",
        "New connections held (not refused) during switch windows.",
        &[],
    ),
    (
        "patchover_switch_leftover_connections_total",
        "Connections still open on the old LC when its drain deadline passed (cut).",
        &[],
    ),
    (
        "patchover_feed_polls_total",
        "Feed polls by result (fetched, not-modified, backoff, failed).",
        &["result"],
    ),
    (
        "patchover_feed_errors_total",
        "Feed polls that failed.",
        &[],
    ),
    ("patchover_mails_sent_total", "Notices mailed.", &[]),
    (
        "patchover_mail_errors_total",
        "Notices that could not be mailed.",
        &[],
    ),
    (
        "patchover_approvals_total",
        "Approval decisions by result (accepted, refused).",
        &["result"],
    ),
    (
        "patchover_events_total",
        "Events published on the event stream.",
        &[],
    ),
    (
        "patchover_connections_refused_total",
        "Connections answered 503 and closed because their listener held max_connections.",
        &[],
    ),
    (
        "patchover_connections_timed_out_total",
        "Connections closed by a deadline, by phase (head: a request head not whole in time; idle: no request after an answer).",
        &["phase"],
    ),
];

/// The daemon's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    values: Mutex<BTreeMap<(&'static str, Vec<String>), f64>>,
}

fn registered(name: &str) -> &'static (&'static str, &'static str, &'static [&'static str]) {
    REGISTRY
        .iter()
        .find(|m| m.0 == name)
        .unwrap_or_else(|| panic!("metric {name} is not in metrics::REGISTRY"))
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics::default()
    }

    /// Adds `v` to a counter. Panics on an unregistered name or a wrong label count (a
    /// programming error caught by the tests).
    pub fn add(&self, name: &'static str, labels: &[&str], v: f64) {
        let m = registered(name);
        assert_eq!(m.2.len(), labels.len(), "labels of {name}");
        let key = (m.0, labels.iter().map(|s| (*s).to_owned()).collect());
        *self
            .values
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_default() += v;
    }

    pub fn inc(&self, name: &'static str, labels: &[&str]) {
        self.add(name, labels, 1.0);
    }

    /// One run's end.
    pub fn run_finished(&self, r: &RunFigures<'_>) {
        self.inc("patchover_runs_total", &[r.outcome]);
        for (step, ms) in r.steps {
            self.add("patchover_step_seconds_sum", &[step], ms / 1000.0);
            self.inc("patchover_step_seconds_count", &[step]);
        }
        self.add("patchover_bytes_copied_total", &[], r.bytes_copied as f64);
        self.add(
            "patchover_bytes_replayed_total",
            &[],
            r.bytes_replayed as f64,
        );
        if let Some(ms) = r.freeze_ms {
            self.add("patchover_freeze_seconds_sum", &[], ms / 1000.0);
            self.inc("patchover_freeze_seconds_count", &[]);
        }
        if let Some((held, leftover)) = r.switch_counts {
            self.add("patchover_switch_held_syns_total", &[], held as f64);
            self.add(
                "patchover_switch_leftover_connections_total",
                &[],
                leftover as f64,
            );
        }
        if let Some(ms) = r.pause_ms {
            self.add("patchover_switch_pause_seconds_sum", &[], ms / 1000.0);
            self.inc("patchover_switch_pause_seconds_count", &[]);
        }
    }

    /// The value of one series (for tests and `/v1/status`).
    pub fn get(&self, name: &str, labels: &[&str]) -> f64 {
        let v = self.values.lock().unwrap_or_else(|e| e.into_inner());
        v.iter()
            .find(|((n, l), _)| {
                *n == name && l.iter().map(String::as_str).eq(labels.iter().copied())
            })
            .map_or(0.0, |(_, v)| *v)
    }

    /// The text exposition format. Unlabelled counters are always present (at 0).
    pub fn render(&self) -> String {
        let v = self.values.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        for (name, help, labels) in REGISTRY {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            if labels.is_empty() {
                let x = v.get(&(*name, Vec::new())).copied().unwrap_or(0.0);
                let _ = writeln!(out, "{name} {x}");
                continue;
            }
            for ((n, lv), x) in v.iter() {
                if n != name {
                    continue;
                }
                let pairs: Vec<String> = labels
                    .iter()
                    .zip(lv)
                    .map(|(k, val)| format!("{k}=\"{}\"", escape(val)))
                    .collect();
                let _ = writeln!(out, "{name}{{{}}} {x}", pairs.join(","));
            }
        }
        out
    }
}

/// What a finished run contributes.
pub struct RunFigures<'a> {
    pub outcome: &'a str,
    pub steps: &'a [(String, f64)],
    pub bytes_copied: u64,
    pub bytes_replayed: u64,
    pub freeze_ms: Option<f64>,
    pub pause_ms: Option<f64>,
    /// From the switch report: (SYNs held, connections left over at the drain deadline).
    pub switch_counts: Option<(u64, u64)>,
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_figures_land_in_the_text() {
        let m = Metrics::new();
        m.run_finished(&RunFigures {
            outcome: "ok",
            steps: &[("copy-system".into(), 1500.0)],
            bytes_copied: 4096,
            bytes_replayed: 512,
            freeze_ms: Some(20.0),
            pause_ms: Some(30.0),
            switch_counts: Some((3, 0)),
        });
        m.inc("patchover_http_requests_total", &["/v1/lcs", "200"]);
        let t = m.render();
        assert!(
            t.contains("patchover_runs_total{outcome=\"ok\"} 1\n"),
            "{t}"
        );
        assert!(t.contains("patchover_step_seconds_sum{step=\"copy-system\"} 1.5\n"));
        assert!(t.contains("patchover_bytes_copied_total 4096\n"));
        assert!(t.contains("patchover_freeze_seconds_count 1\n"));
        assert!(t.contains("patchover_mails_sent_total 0\n"));
        assert!(t.contains("patchover_switch_held_syns_total 3\n"));
        assert_eq!(m.get("patchover_switch_pause_seconds_sum", &[]), 0.03);
        for (name, _, _) in REGISTRY {
            assert!(t.contains(&format!("# TYPE {name} counter")));
        }
    }

    /// No registered metric is left without a code path that increments it (Firecracker's
    /// "no unused metric" rule): each name appears outside the registry in this crate or in
    /// the binary's daemon file.
    #[test]
    fn every_registered_metric_is_incremented_somewhere() {
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
        // This file's code outside the registry and the tests.
        let start = own.find("impl Metrics {").unwrap();
        let end = own.find("#[cfg(test)]").unwrap();
        code.push_str(&own[start..end]);
        for (name, _, _) in REGISTRY {
            assert!(
                code.contains(&format!("\"{name}\"")),
                "{name} is never incremented"
            );
        }
    }

    #[test]
    #[should_panic(expected = "not in metrics::REGISTRY")]
    fn unregistered_names_panic() {
        Metrics::new().inc("patchover_nope", &[]);
    }
}
