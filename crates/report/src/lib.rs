//! A run's story as one self-contained HTML page (`patchover runs show RUN --html FILE`,
//! `patchover demo --report FILE`): no external URL, inline CSS and SVG.
//!
//! - `#timeline`: the run's steps on a time line, from the journal (`started` to `done` or
//!   `failed` lines; [`patchover_app::runs::RunDetail::spans`]), one `.step` mark each;
//! - `#latency`: when a load ran, every request of the project's load client
//!   ([`patchover_load::Sample`]) by its due time and latency, a `.failed` mark on each failed
//!   one, on the journal's clock (the load's start on the wall clock places it);
//! - the switch step's window is marked on both (`.switch`), with its pause.
//!
//! The plots are drawn with `plotters` (SVG backend, to a `String`). Plotters gives its
//! elements no ids or classes, so each plot's root `<svg>` gets its id and the marks a reader
//! (or a test) looks for are transparent elements laid over what plotters drew, at the same
//! pixels (`ChartContext::backend_coord`), each with a `<title>` (a tooltip: the step and its
//! duration, a request's outcome and latency).

use std::fmt::Write;

use patchover_app::runs::{RunDetail, StepSpan};
use patchover_load::{Outcome, Sample};
use plotters::coord::Shift;
use plotters::coord::ranged1d::Ranged;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

/// The requests a load client made while the run went, and when it started.
#[derive(Debug, Clone, Copy)]
pub struct Load<'a> {
    /// Request 0's due time on the wall clock (unix ms; `LoadReport::started_unix_ms`).
    pub started_unix_ms: f64,
    pub samples: &'a [Sample],
    /// A request that took this long counted as failed (drawn as a line), if known.
    pub deadline_ms: Option<f64>,
}

/// Drawing a plot failed (plotters' SVG backend writes to a `String`; this is a bug).
#[derive(Debug, thiserror::Error)]
#[error("drawing the {what} plot: {msg}")]
pub struct ReportError {
    what: &'static str,
    msg: String,
}

fn draw_err<E: std::fmt::Debug>(what: &'static str) -> impl Fn(E) -> ReportError {
    move |e| ReportError {
        what,
        msg: format!("{e:?}"),
    }
}

const WIDTH: u32 = 1200;
const STEP_OK: RGBColor = RGBColor(0x3a, 0x7d, 0xc9);
const STEP_FAILED: RGBColor = RGBColor(0xd0, 0x30, 0x30);
const SWITCH: RGBColor = RGBColor(0xf0, 0x9a, 0x20);

/// The page for `run`, with `load`'s requests when a load ran.
pub fn page(run: &RunDetail, load: Option<&Load<'_>>) -> Result<String, ReportError> {
    let spans = run.spans();
    let clock = Clock::of(run);
    let switch = spans.iter().find(|s| s.step == "switch").cloned();
    let pause = run.pause_ms();
    let timeline = timeline_svg(&spans, &clock, switch.as_ref(), pause)?;
    let latency = match load {
        Some(l) if !l.samples.is_empty() => Some(latency_svg(l, &clock, switch.as_ref(), pause)?),
        _ => None,
    };
    let mut h = String::new();
    head(&mut h, run);
    summary(&mut h, run, load);
    let _ = write!(
        h,
        "<section><h2>Steps</h2><p class=\"legend\">Each step from its journal's start to its end \
         (blue: done, red: failed); orange: the switch.</p>{timeline}</section>"
    );
    match latency {
        Some(svg) => {
            let _ = write!(
                h,
                "<section><h2>Requests around the switch</h2><p class=\"legend\">Every request \
                 of the load by its due time and latency (log scale); red crosses failed; \
                 orange: the switch.</p>{svg}</section>"
            );
        }
        None => h.push_str("<p class=\"noload\">No load ran with this run.</p>"),
    }
    steps_table(&mut h, &spans, &clock);
    h.push_str("</body></html>\n");
    Ok(h)
}

/// Writes `html` to `path` whole or not at all (a temporary file beside it, renamed).
pub fn write(path: &std::path::Path, html: &str) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, html)
        .and_then(|()| std::fs::rename(&tmp, path))
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
}

/// The journal's clock, in seconds from the run's opening.
struct Clock {
    start_ms: f64,
    end_s: f64,
}

impl Clock {
    fn of(run: &RunDetail) -> Clock {
        let start_ms = run.run.started_ms as f64;
        let last = run.steps.last().map_or(start_ms, |s| s.at_ms as f64);
        let end = run.run.ended_ms.map_or(last, |e| e as f64).max(last);
        Clock {
            start_ms,
            end_s: ((end - start_ms) / 1000.0).max(0.001),
        }
    }
    fn s(&self, unix_ms: f64) -> f64 {
        (unix_ms - self.start_ms) / 1000.0
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const CSS: &str = "body{font-family:sans-serif;margin:24px;color:#222;background:#fff}\
h1{font-size:22px}h2{font-size:18px;margin-top:28px}\
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}\
td.num{text-align:right}.legend{color:#555;font-size:13px}\
tr.failed td{color:#b00}svg{display:block;border:1px solid #eee}";

fn head(h: &mut String, run: &RunDetail) {
    let r = &run.run;
    let _ = write!(
        h,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>patchover run {id}</title><style>{CSS}</style></head><body>\
         <h1 id=\"title\">patchover run {id}: {kind} of {lc}</h1>",
        id = r.id,
        kind = run.kind(),
        lc = esc(&r.lc),
    );
}

fn summary(h: &mut String, run: &RunDetail, load: Option<&Load<'_>>) {
    let r = &run.run;
    let ms = |v: Option<f64>| v.map_or("—".to_owned(), |v| format!("{v:.1} ms"));
    let mut rows = vec![
        (
            "outcome",
            r.outcome.clone().unwrap_or_else(|| "not ended".into()),
        ),
        (
            "LC → standby",
            format!("{} → {}", r.lc, r.standby.as_deref().unwrap_or("—")),
        ),
        ("switch mode", r.mode.clone()),
        ("pause", ms(run.pause_ms())),
        ("freeze", ms(run.freeze_ms())),
        ("steps", run.spans().len().to_string()),
    ];
    if let Some(l) = load {
        let failed = l
            .samples
            .iter()
            .filter(|s| s.outcome != Outcome::Ok)
            .count();
        rows.push(("requests", format!("{} ({failed} failed)", l.samples.len())));
    }
    h.push_str("<table id=\"summary\">");
    for (k, v) in rows {
        let _ = write!(h, "<tr><th>{}</th><td>{}</td></tr>", esc(k), esc(&v));
    }
    h.push_str("</table>");
}

fn steps_table(h: &mut String, spans: &[StepSpan], clock: &Clock) {
    h.push_str("<h2>Journal</h2><table id=\"steps\"><tr><th>step</th><th>start</th><th>duration</th><th>result</th></tr>");
    for s in spans {
        let _ = write!(
            h,
            "<tr class=\"{c}\"><td>{n}</td><td class=\"num\">+{t:.3} s</td><td class=\"num\">{d} ms</td><td>{c}</td></tr>",
            c = if s.ok { "done" } else { "failed" },
            n = esc(&s.step),
            t = clock.s(s.start_ms as f64),
            d = s.end_ms - s.start_ms,
        );
    }
    h.push_str("</table>");
}

/// A transparent rectangle over the data rectangle `(x0, y0)–(x1, y1)`, with an id or class
/// and a tooltip.
fn overlay_rect(
    px: impl Fn((f64, f64)) -> (i32, i32),
    attrs: &str,
    (x0, y0, x1, y1): (f64, f64, f64, f64),
    title: &str,
) -> String {
    let (px0, py0) = px((x0, y1));
    let (px1, py1) = px((x1, y0));
    format!(
        "<rect {attrs} x=\"{px0}\" y=\"{py0}\" width=\"{w}\" height=\"{h}\" fill=\"transparent\"><title>{t}</title></rect>",
        w = (px1 - px0).max(1),
        h = (py1 - py0).max(1),
        t = esc(title),
    )
}

/// The plot's root `<svg>` with `id`, and `overlay` laid over what plotters drew.
fn finish(svg: String, id: &str, overlay: &str) -> String {
    let svg = svg.replacen("<svg ", &format!("<svg id=\"{id}\" class=\"plot\" "), 1);
    match svg.rfind("</svg>") {
        Some(end) => format!(
            "{}<g class=\"marks\">{overlay}</g>{}",
            &svg[..end],
            &svg[end..]
        ),
        None => svg,
    }
}

type Plot<'a, 'b, Y> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, Y>>;

/// The switch window `x` (seconds) over the plot's height `y`: an orange band, and its mark.
fn switch_band<Y: Ranged<ValueType = f64>>(
    chart: &mut Plot<'_, '_, Y>,
    id: &str,
    (x0, x1): (f64, f64),
    (y0, y1): (f64, f64),
    pause: Option<f64>,
) -> Result<String, ReportError> {
    let wide = x1.max(x0 + 0.01);
    chart
        .draw_series([Rectangle::new(
            [(x0, y0), (wide, y1)],
            SWITCH.mix(0.35).filled(),
        )])
        .map_err(draw_err("switch"))?;
    let title = match pause {
        Some(p) => format!("switch (new connections held {p:.1} ms)"),
        None => "switch".to_owned(),
    };
    Ok(overlay_rect(
        |p| chart.backend_coord(&p),
        &format!("id=\"{id}\" class=\"switch\""),
        (x0, y0, wide, y1),
        &title,
    ))
}

/// The switch step's span on the clock, if the run has one.
fn window(switch: Option<&StepSpan>, clock: &Clock) -> Option<(f64, f64)> {
    switch.map(|sw| (clock.s(sw.start_ms as f64), clock.s(sw.end_ms as f64)))
}

/// One step's bar in row `row` (from the bottom), its name left of the plot, and its mark.
fn step_bar(
    root: &DrawingArea<SVGBackend<'_>, Shift>,
    chart: &mut Plot<'_, '_, RangedCoordf64>,
    s: &StepSpan,
    row: f64,
    x: (f64, f64),
) -> Result<String, ReportError> {
    let err = draw_err("timeline");
    let color = if s.ok { STEP_OK } else { STEP_FAILED };
    let (y0, y1) = (row + 0.15, row + 0.85);
    chart
        .draw_series([Rectangle::new([(x.0, y0), (x.1, y1)], color.filled())])
        .map_err(&err)?;
    let (lx, ly) = chart.backend_coord(&(0.0, row + 0.5));
    root.draw(&Text::new(
        s.step.clone(),
        (lx - 165, ly - 7),
        ("sans-serif", 14).into_font(),
    ))
    .map_err(&err)?;
    let result = if s.ok { "done" } else { "failed" };
    let title = format!("{}: {} ms ({result})", s.step, s.end_ms - s.start_ms);
    Ok(overlay_rect(
        |p| chart.backend_coord(&p),
        &format!("class=\"step\" data-step=\"{}\"", esc(&s.step)),
        (x.0, y0, x.1, y1),
        &title,
    ))
}

fn timeline_svg(
    spans: &[StepSpan],
    clock: &Clock,
    switch: Option<&StepSpan>,
    pause: Option<f64>,
) -> Result<String, ReportError> {
    let err = draw_err("timeline");
    let n = spans.len().max(1);
    let mut svg = String::new();
    let mut overlay = String::new();
    {
        let size = (WIDTH, 70 + 26 * n as u32);
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE).map_err(&err)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(170)
            .build_cartesian_2d(0f64..clock.end_s * 1.02, 0f64..n as f64)
            .map_err(&err)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(0)
            .x_desc("seconds from the run's start")
            .draw()
            .map_err(&err)?;
        if let Some(x) = window(switch, clock) {
            let id = "timeline-switch";
            overlay += &switch_band(&mut chart, id, x, (0.0, n as f64), pause)?;
        }
        for (i, s) in spans.iter().enumerate() {
            let x0 = clock.s(s.start_ms as f64);
            let x1 = clock.s(s.end_ms as f64).max(x0 + clock.end_s / 500.0);
            overlay += &step_bar(&root, &mut chart, s, (n - 1 - i) as f64, (x0, x1))?;
        }
        root.present().map_err(&err)?;
    }
    Ok(finish(svg, "timeline", &overlay))
}

/// Each sample's (seconds on the run's clock, latency in ms, outcome).
fn points(load: &Load<'_>, clock: &Clock) -> Vec<(f64, f64, Outcome)> {
    load.samples
        .iter()
        .map(|s| {
            let at = load.started_unix_ms + s.due_us as f64 / 1000.0;
            let ms = (s.latency_us as f64 / 1000.0).max(0.01);
            (clock.s(at), ms, s.outcome)
        })
        .collect()
}

/// Every sample as a point (a red cross when it failed, with its mark).
fn draw_samples<Y: Ranged<ValueType = f64>>(
    chart: &mut Plot<'_, '_, Y>,
    pts: &[(f64, f64, Outcome)],
) -> Result<String, ReportError> {
    let err = draw_err("latency");
    let ok = |p: &&(f64, f64, Outcome)| p.2 == Outcome::Ok;
    let dot = |p: &(f64, f64, Outcome)| Circle::new((p.0, p.1), 2, STEP_OK.mix(0.6).filled());
    chart
        .draw_series(pts.iter().filter(ok).map(dot))
        .map_err(&err)?;
    let cross = |p: &(f64, f64, Outcome)| Cross::new((p.0, p.1), 5, STEP_FAILED.stroke_width(2));
    let failed: Vec<_> = pts.iter().filter(|p| !ok(p)).collect();
    chart
        .draw_series(failed.iter().map(|p| cross(p)))
        .map_err(&err)?;
    let mut overlay = String::new();
    for (t, ms, outcome) in failed {
        let (x, y) = chart.backend_coord(&(*t, *ms));
        let _ = write!(
            overlay,
            "<circle class=\"failed\" cx=\"{x}\" cy=\"{y}\" r=\"6\" fill=\"transparent\"><title>{outcome:?} after {ms:.1} ms at +{t:.3} s</title></circle>"
        );
    }
    Ok(overlay)
}

fn latency_svg(
    load: &Load<'_>,
    clock: &Clock,
    switch: Option<&StepSpan>,
    pause: Option<f64>,
) -> Result<String, ReportError> {
    let err = draw_err("latency");
    let pts = points(load, clock);
    let (t0, t1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| {
        (a.min(p.0 - 0.5), b.max(p.0 + 0.5))
    });
    let deadline = load.deadline_ms.unwrap_or(1.0);
    let top = pts.iter().map(|p| p.1).fold(deadline, f64::max) * 1.5;
    let mut svg = String::new();
    let mut overlay = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(&err)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(t0..t1, (0.01f64..top).log_scale())
            .map_err(&err)?;
        chart
            .configure_mesh()
            .x_desc("seconds from the run's start (request due time)")
            .y_desc("latency, ms")
            .draw()
            .map_err(&err)?;
        if let Some(x) = window(switch, clock) {
            overlay += &switch_band(&mut chart, "latency-switch", x, (0.01, top), pause)?;
        }
        if let Some(d) = load.deadline_ms {
            let line = LineSeries::new([(t0, d), (t1, d)], STEP_FAILED.mix(0.5));
            chart.draw_series(line).map_err(&err)?;
        }
        overlay += &draw_samples(&mut chart, &pts)?;
        root.present().map_err(&err)?;
    }
    Ok(finish(svg, "latency", &overlay))
}

#[cfg(test)]
mod tests;
