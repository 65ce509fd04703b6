//! The page from a recorded run (a journal as the store gives it) and recorded samples.

use patchover_app::runs::RunDetail;
use patchover_load::{Outcome, Sample};
use patchover_store::{RunRow, StepRow};
use serde_json::json;

use super::*;

const T0: i64 = 1_700_000_000_000;

fn step(seq: i64, step: &str, state: &str, at: i64, detail: Option<serde_json::Value>) -> StepRow {
    StepRow {
        seq,
        step: step.into(),
        state: state.into(),
        at_ms: T0 + at,
        detail,
    }
}

/// A patch run of four steps, the switch from 3.0 s to 3.2 s holding connections 40 ms.
pub(crate) fn recorded_run() -> RunDetail {
    let steps = vec![
        step(1, "standby_search", "started", 0, None),
        step(2, "standby_search", "done", 100, None),
        step(3, "copy_system_disk", "started", 100, None),
        step(4, "copy_system_disk", "done", 2500, None),
        step(5, "boot_standby", "started", 2500, None),
        step(6, "boot_standby", "done", 3000, None),
        step(7, "switch", "started", 3000, None),
        step(8, "switch", "done", 3200, Some(json!({"pause_ms": 40.0}))),
    ];
    RunDetail {
        run: RunRow {
            id: 3,
            lc: "lc<1>".into(),
            standby: Some("lc2".into()),
            mode: "readdress".into(),
            dry_run: false,
            state: "switch:done".into(),
            started_ms: T0,
            ended_ms: Some(T0 + 3300),
            outcome: Some("ok".into()),
            report: Some(json!({"pause_ms": 40.0})),
        },
        steps,
    }
}

/// A request every 10 ms from 1 s before the run to 5 s into it; two fail in the switch.
pub(crate) fn recorded_samples() -> Vec<Sample> {
    (0..600u64)
        .map(|i| {
            let due_us = i * 10_000;
            let in_switch = (4_000_000..4_020_000).contains(&due_us);
            Sample {
                due_us,
                latency_us: if in_switch {
                    2_000_000
                } else {
                    800 + i % 7 * 100
                },
                outcome: if in_switch {
                    Outcome::Timeout
                } else {
                    Outcome::Ok
                },
                retried: false,
            }
        })
        .collect()
}

#[test]
fn a_page_has_the_timeline_its_steps_the_latency_plot_and_the_switch() {
    let run = recorded_run();
    let samples = recorded_samples();
    let load = Load {
        started_unix_ms: (T0 - 1000) as f64,
        samples: &samples,
        deadline_ms: Some(2000.0),
    };
    let h = page(&run, Some(&load)).unwrap();
    assert!(h.starts_with("<!doctype html>"));
    assert_eq!(h.matches("<svg id=\"timeline\"").count(), 1);
    assert_eq!(h.matches("<svg id=\"latency\"").count(), 1);
    assert_eq!(h.matches("class=\"step\"").count(), 4);
    assert_eq!(h.matches("class=\"failed\"").count(), 2);
    assert!(h.contains("id=\"timeline-switch\" class=\"switch\""));
    assert!(h.contains("id=\"latency-switch\" class=\"switch\""));
    assert!(h.contains("new connections held 40.0 ms"));
    // What the store holds is escaped; nothing is fetched from elsewhere.
    assert!(h.contains("lc&lt;1&gt;") && !h.contains("lc<1>"));
    for external in ["http://", "https://", "src=", "<link", "<script"] {
        let n = h.matches(external).count();
        // The SVG namespace is a name, not a fetch.
        let allowed = if external == "http://" {
            h.matches("xmlns=\"http://www.w3.org/2000/svg\"").count()
        } else {
            0
        };
        assert_eq!(n, allowed, "{external}");
    }
}

#[test]
fn the_failed_marks_sit_inside_the_switch_window() {
    let run = recorded_run();
    let samples = recorded_samples();
    let load = Load {
        started_unix_ms: (T0 - 1000) as f64,
        samples: &samples,
        deadline_ms: None,
    };
    let h = page(&run, Some(&load)).unwrap();
    let attr = |tag: &str, name: &str| -> f64 {
        let at = tag.find(&format!(" {name}=\"")).unwrap() + name.len() + 3;
        tag[at..].split('"').next().unwrap().parse().unwrap()
    };
    let sw = &h[h.find("id=\"latency-switch\"").unwrap()..];
    let (x, w) = (attr(sw, "x"), attr(sw, "width"));
    let mut n = 0;
    for (i, _) in h.match_indices("<circle class=\"failed\"") {
        let cx = attr(&h[i..], "cx");
        assert!(cx >= x && cx <= x + w, "{cx} not in {x}..{}", x + w);
        n += 1;
    }
    assert_eq!(n, 2);
}

#[test]
fn without_a_load_only_the_timeline() {
    let h = page(&recorded_run(), None).unwrap();
    assert!(h.contains("<svg id=\"timeline\""));
    assert!(!h.contains("id=\"latency\""));
    assert!(h.contains("No load ran"));
}
