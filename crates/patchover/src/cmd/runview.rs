//! How a patch run shows while it goes: its steps and its disk copies' bytes, rate and ETA. The
//! same typed events come from the orchestrator in this process or from the daemon's event
//! stream, and show the same way:
//!
//! - `--json`: one JSON line per event on stderr (stdout keeps the run's one report);
//! - stderr a terminal: a spinner on the current step and a bar per disk copy (indicatif);
//! - otherwise (a pipe, a file, the journal): plain lines, a copy's at most one each
//!   [`LINE_EVERY`] or each tenth of it, never an escape code.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{HumanBytes, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use patchover_orchestrator::Event;
use patchover_orchestrator::progress::{ProgressEvent, ProgressSink};
use serde_json::json;

use super::Ctx;

/// The longest a copy goes without a plain line.
pub const LINE_EVERY: Duration = Duration::from_secs(2);

/// How the events show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    Json,
    Bars,
    Lines,
    /// `--quiet`: nothing while the run goes.
    Quiet,
}

impl Style {
    pub fn of(json: bool, quiet: bool, terminal: bool) -> Style {
        match (json, quiet, terminal) {
            (true, _, _) => Style::Json,
            (_, true, _) => Style::Quiet,
            (_, _, true) => Style::Bars,
            _ => Style::Lines,
        }
    }
}

/// Shows one run's events (from any thread: the application disk's copy reports from its own).
pub struct RunView {
    style: Style,
    out: Mutex<Box<dyn Write + Send>>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    multi: Option<MultiProgress>,
    spinner: Option<ProgressBar>,
    bars: HashMap<String, ProgressBar>,
    /// Per copy: when its last line went, and the tenth it was in.
    lines: HashMap<String, (Instant, u64)>,
}

impl RunView {
    /// For this process's stderr.
    pub fn new(ctx: &Ctx) -> Arc<RunView> {
        let style = Style::of(ctx.json, ctx.quiet, std::io::stderr().is_terminal());
        Arc::new(RunView::with(style, Box::new(std::io::stderr())))
    }

    /// `out` takes the lines and JSON lines (bars draw on stderr).
    pub fn with(style: Style, out: Box<dyn Write + Send>) -> RunView {
        RunView::drawn_on(style, out, ProgressDrawTarget::stderr())
    }

    /// [`RunView::with`], the bars drawn on `target`.
    fn drawn_on(style: Style, out: Box<dyn Write + Send>, target: ProgressDrawTarget) -> RunView {
        let mut state = State::default();
        if style == Style::Bars {
            let multi = MultiProgress::with_draw_target(target);
            let spinner = multi.add(ProgressBar::new_spinner());
            spinner.enable_steady_tick(Duration::from_millis(120));
            state.multi = Some(multi);
            state.spinner = Some(spinner);
        }
        RunView {
            style,
            out: Mutex::new(out),
            state: Mutex::new(state),
        }
    }

    /// The sink the orchestrator's copies report to.
    pub fn sink(self: &Arc<Self>) -> ProgressSink {
        let v = self.clone();
        Arc::new(move |p: &ProgressEvent| v.progress(p))
    }

    fn line(&self, s: &str) {
        let mut o = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(o, "{s}");
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A step started, ended or failed.
    pub fn step(&self, e: &Event) {
        match self.style {
            Style::Json => self.line(&json!({"event": "step", "data": e}).to_string()),
            Style::Quiet => {}
            Style::Bars | Style::Lines => {
                let st = self.state();
                if e.state == "started" {
                    if let Some(s) = &st.spinner {
                        s.set_message(format!("run {} {}", e.run_id, e.step));
                    }
                    return;
                }
                let text = step_line(e);
                match &st.multi {
                    Some(m) => {
                        let _ = m.println(text);
                    }
                    None => {
                        drop(st);
                        self.line(&text);
                    }
                }
            }
        }
    }

    /// A copy's bytes.
    pub fn progress(&self, p: &ProgressEvent) {
        match self.style {
            Style::Json => {
                let mut v = json!({"event": "progress"});
                if let (Some(o), Ok(serde_json::Value::Object(p))) =
                    (v.as_object_mut(), serde_json::to_value(p))
                {
                    o.extend(p);
                }
                self.line(&v.to_string());
            }
            Style::Quiet => {}
            Style::Bars => self.bar(p),
            Style::Lines => {
                if self.line_due(p) {
                    self.line(&progress_line(p));
                }
            }
        }
    }

    /// Whether a plain line for `p` is due: the copy's first, its last, a new tenth, or
    /// [`LINE_EVERY`] since the last.
    fn line_due(&self, p: &ProgressEvent) -> bool {
        let tenth = p.bytes.saturating_mul(10).checked_div(p.total).unwrap_or(0);
        let mut st = self.state();
        let due = match st.lines.get(&p.step) {
            None => true,
            Some((t, last)) => p.is_done() || tenth > *last || t.elapsed() >= LINE_EVERY,
        };
        if due {
            st.lines.insert(p.step.clone(), (Instant::now(), tenth));
        }
        due
    }

    fn bar(&self, p: &ProgressEvent) {
        let mut st = self.state();
        let State { multi, bars, .. } = &mut *st;
        let Some(multi) = multi else { return };
        let b = bars.entry(p.step.clone()).or_insert_with(|| {
            let b = multi.add(ProgressBar::new(p.total));
            b.set_style(
                ProgressStyle::with_template("{prefix:18} {bar:30} {bytes}/{total_bytes} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b.set_prefix(p.step.clone());
            b
        });
        b.set_length(p.total.max(p.bytes));
        b.set_position(p.bytes);
        b.set_message(rate_eta(p));
        if p.is_done() {
            b.finish();
        }
    }

    /// For a run that went through the daemon: one event of its stream.
    pub fn streamed(&self, kind: &str, e: &serde_json::Value) {
        match kind {
            "step" => match serde_json::from_value::<Event>(e.clone()) {
                Ok(e) => self.step(&e),
                Err(err) => tracing::debug!(error = %err, "an unreadable step event"),
            },
            "progress" => match serde_json::from_value::<ProgressEvent>(e.clone()) {
                Ok(p) => self.progress(&p),
                Err(err) => tracing::debug!(error = %err, "an unreadable progress event"),
            },
            _ if self.style == Style::Json => {
                self.line(&json!({"event": kind, "data": e}).to_string())
            }
            _ => {}
        }
    }

    /// The run ended: the bars go.
    pub fn finish(&self) {
        let mut st = self.state();
        for (_, b) in st.bars.drain() {
            b.finish_and_clear();
        }
        if let Some(s) = st.spinner.take() {
            s.finish_and_clear();
        }
    }
}

/// `run 3 install_patches    done (120 ms): why`.
fn step_line(e: &Event) -> String {
    let detail = e.detail.as_ref();
    let ms = detail
        .and_then(|d| d.get("ms"))
        .and_then(|m| m.as_f64())
        .map_or(String::new(), |ms| format!(" ({ms:.0} ms)"));
    let err = detail
        .and_then(|d| d.get("error"))
        .and_then(|m| m.as_str())
        .map_or(String::new(), |m| format!(": {m}"));
    format!("run {} {:<18} {}{ms}{err}", e.run_id, e.step, e.state)
}

/// `12.5 MiB/s, ETA 3 s`.
fn rate_eta(p: &ProgressEvent) -> String {
    let eta = p
        .eta_secs
        .map_or(String::new(), |s| format!(", ETA {s:.0} s"));
    format!("{}/s{eta}", HumanBytes(p.rate as u64))
}

/// `run 3 copy_app_disk      120.00 MiB of 300.00 MiB (40%), 55.20 MiB/s, ETA 3 s`.
fn progress_line(p: &ProgressEvent) -> String {
    let of = match p.total {
        0 => String::new(),
        t => format!(
            " of {} ({}%)",
            HumanBytes(t),
            p.bytes.saturating_mul(100) / t
        ),
    };
    format!(
        "run {} {:<18} {}{of}, {}",
        p.run_id,
        p.step,
        HumanBytes(p.bytes),
        rate_eta(p)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Write` the test reads back.
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl Buf {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    fn at(bytes: u64) -> ProgressEvent {
        ProgressEvent {
            run_id: 4,
            step: "copy_app_disk".into(),
            bytes,
            total: 1000,
            rate: 2_000_000.0,
            eta_secs: Some(1.5),
        }
    }

    fn view(style: Style) -> (RunView, Buf) {
        let buf = Buf::default();
        (RunView::with(style, Box::new(buf.clone())), buf)
    }

    /// Plain lines: the first, one per new tenth, the last; no escape code anywhere.
    #[test]
    fn lines_go_each_tenth_and_carry_no_escape_codes() {
        let (v, buf) = view(Style::Lines);
        for b in [0, 20, 50, 120, 150, 990, 1000] {
            v.progress(&at(b));
        }
        v.step(&Event {
            run_id: 4,
            step: "copy_app_disk".into(),
            state: "done".into(),
            detail: Some(json!({"ms": 12.0})),
        });
        let text = buf.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert!(lines[1].contains("120 B of 1000 B (12%)"), "{text}");
        assert!(lines[3].contains("(100%)") && lines[3].contains("1.91 MiB/s, ETA 2 s"));
        assert_eq!(lines[4], "run 4 copy_app_disk      done (12 ms)");
        assert!(!text.contains('\x1b'), "{text:?}");
    }

    /// JSON: one flat object per progress event, the step events under `data`.
    #[test]
    fn json_lines_are_flat_progress_events() {
        let (v, buf) = view(Style::Json);
        v.progress(&at(500));
        v.streamed("progress", &serde_json::to_value(at(1000)).unwrap());
        v.streamed("run", &json!({"run_id": 4}));
        let text = buf.text();
        let evs: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(evs.len(), 3, "{text}");
        assert_eq!(evs[0]["event"], "progress");
        assert_eq!(
            (
                evs[0]["step"].as_str(),
                evs[0]["bytes"].as_u64(),
                evs[0]["total"].as_u64()
            ),
            (Some("copy_app_disk"), Some(500), Some(1000))
        );
        assert_eq!(evs[0]["eta_secs"], 1.5);
        assert_eq!(evs[1]["bytes"], 1000);
        assert_eq!(evs[2], json!({"event": "run", "data": {"run_id": 4}}));
    }

    /// A terminal: the spinner names the current step, each copy has its bar, sized to the
    /// total (or the bytes, when more came), finished at the end; the run's end clears them.
    #[test]
    fn bars_follow_each_copy_and_the_current_step() {
        let v = RunView::drawn_on(
            Style::Bars,
            Box::new(Buf::default()),
            ProgressDrawTarget::hidden(),
        );
        v.step(&Event {
            run_id: 4,
            step: "install_patches".into(),
            state: "started".into(),
            detail: None,
        });
        v.progress(&at(500));
        {
            let st = v.state();
            let spinner = st.spinner.as_ref().unwrap();
            assert_eq!(spinner.message(), "run 4 install_patches");
            let b = &st.bars["copy_app_disk"];
            assert_eq!((b.position(), b.length()), (500, Some(1000)));
            assert_eq!(b.message(), "1.91 MiB/s, ETA 2 s");
            assert!(!b.is_finished());
        }
        v.progress(&ProgressEvent {
            total: 1200,
            ..at(1200)
        });
        assert!(v.state().bars["copy_app_disk"].is_finished());
        v.finish();
        let st = v.state();
        assert!(st.bars.is_empty() && st.spinner.is_none());
    }

    #[test]
    fn quiet_shows_nothing() {
        let (v, buf) = view(Style::Quiet);
        v.progress(&at(1000));
        assert!(buf.text().is_empty());
        assert_eq!(Style::of(false, false, true), Style::Bars);
        assert_eq!(Style::of(false, false, false), Style::Lines);
        assert_eq!(Style::of(true, false, true), Style::Json);
    }
}
