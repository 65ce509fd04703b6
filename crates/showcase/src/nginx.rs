//! `patchover demo --service nginx`: the main job on a real service. Debian's nginx, unmodified
//! (its own default site; no health page, drain or hand-off written for patchover), on a
//! Debian `ns` LC; its real pending updates (`bundle from-apt`) patched under load and rolled
//! back, for `--cycles` patch → rollback cycles. Two independent clients load it all along:
//! `wrk` twice (keep-alive, and `Connection: close`), whose counts are what people trust,
//! and the project's deadline client (`patchover load`: a request without a complete answer
//! within the deadline is failed, which wrk does not count). The report sums both; the
//! package versions before and after come from the LCs' dpkg status.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use patchover_net::Mode;
use serde_json::{Value, json};

use crate::debian_world::{self, Profile, World, WorldOptions};
use crate::demo::DemoOptions;
use crate::wrk::{Wrk, WrkConns, WrkCounts, WrkOptions, WrkRun};
use crate::{Context, ShowcaseError};

/// nginx's `[service]`: the profile docs/services.md shows ("nginx, stateless HTTP"). The
/// health check is GET / of Debian's default page; patchover proves which LC answered, so
/// the page need not say. nginx keeps nothing on an application disk (it has none here):
/// `stateless`, so a `seamless` switch (the demo's default) flips the host's NAT with no
/// hand-off and no drain, and the connections the old LC accepted finish there, for 5 s at
/// most (`stateless_drain_secs`): then the old LC is stopped with what is left (its nginx's
/// graceful stop closes them: a client sees the close, or a reset it retries on a new
/// connection), and the host forgets their tracked flows (`patchover_lc::flows`), so a client
/// port they used reaches the standby when it is reused (docs/services.md, "nginx"). The drain is
/// for a `readdress`/`path` switch, which holds new connections until the old LC has none:
/// nginx's own graceful reload (the old workers close their idle keep-alive connections and
/// finish the requests in flight, new workers serve on; idempotent; nothing to resume), since
/// wrk's keep-alive connections never end by themselves.
pub const NGINX_SERVICE: &str = r#"[service]
port = 80
health = { kind = "http", path = "/", status = 200, body = "Welcome to nginx" }
stateless = true
stateless_drain_secs = 5
drain = ["/usr/sbin/nginx", "-s", "reload"]
"#;

pub const NGINX: Profile = Profile {
    name: "nginx",
    image_packages: &["nginx-light"],
    update_packages: &["nginx", "nginx-light", "nginx-common"],
    service: NGINX_SERVICE,
    port: 80,
    load_path: "/",
    default_mode: Mode::Seamless,
};

/// One patch → rollback cycle under the three clients.
struct Cycle {
    patch: Value,
    rollback: Option<Value>,
    patch_s: f64,
    rollback_s: f64,
    keepalive: WrkRun,
    close: WrkRun,
    deadline: patchover_load::Summary,
    packages_after: BTreeMap<String, String>,
}

impl Cycle {
    fn ok(&self) -> bool {
        self.patch["outcome"] == "ok"
            && self.rollback.as_ref().is_some_and(|r| r["outcome"] == "ok")
    }

    fn failed(&self) -> u64 {
        self.keepalive.counts.failed() + self.close.counts.failed() + self.deadline.failed_total
    }

    /// The switches' `leftover_connections`: what the old LC still had when it was stopped.
    fn connections_cut(&self) -> u64 {
        let cut = |r: &Value| r["switch"]["leftover_connections"].as_u64().unwrap_or(0);
        cut(&self.patch) + self.rollback.as_ref().map_or(0, cut)
    }

    fn total(&self) -> u64 {
        self.keepalive.counts.total() + self.close.counts.total() + self.deadline.total
    }
}

pub fn run(a: &DemoOptions, json: bool) -> Result<bool, ShowcaseError> {
    let say = |s: &str| {
        if !json {
            eprintln!("demo (nginx): {s}");
        }
    };
    let mode = a.mode.unwrap_or(NGINX.default_mode);
    let o = WorldOptions {
        mode,
        sources: a.sources.clone(),
        all_updates: a.all_updates,
    };
    let w = debian_world::prepare(&a.dir, &NGINX, &o, &say)?;
    let result = cycles(&w, a, mode, &say);
    if !a.keep {
        debian_world::teardown(&a.dir);
    } else if !json {
        println!(
            "  LCs kept: PATCHOVER_CONFIG={} patchover lc list",
            w.config_path.display()
        );
    }
    let (before, done) = result?;
    let report = report(&w, a, mode, &before, &done)?;
    match json {
        true => println!("{}", serde_json::to_string_pretty(&report)?),
        false => print_text(&report),
    }
    Ok(report["good"] == true)
}

/// The cycles, stopping at the first that fails; the active LC's packages before the first.
type Cycles = (BTreeMap<String, String>, Vec<Cycle>);

fn cycles(
    w: &World,
    a: &DemoOptions,
    mode: Mode,
    say: &dyn Fn(&str),
) -> Result<Cycles, ShowcaseError> {
    let before = w.packages(0)?;
    let mut done: Vec<Cycle> = Vec::new();
    for i in 0..a.cycles.max(1) {
        if i > 0 {
            let mut env = crate::env(&w.config_path)?;
            patchover_app::patches::mark(&mut env.store, std::slice::from_ref(&w.bundle.id), true)?;
        }
        say(&format!(
            "cycle {} of {}: patching {} ({} mode) under wrk (keep-alive, close) and the deadline client, then rolling back",
            i + 1,
            a.cycles.max(1),
            w.active(),
            mode
        ));
        let c = cycle(w, a, mode)?;
        let ok = c.ok();
        done.push(c);
        if !ok {
            break;
        }
    }
    Ok((before, done))
}

/// Starts the three clients, patches, rolls back, stops the clients.
fn cycle(w: &World, a: &DemoOptions, mode: Mode) -> Result<Cycle, ShowcaseError> {
    let deadline = Duration::from_millis(a.deadline_ms.unwrap_or(2000));
    let url = format!("http://{}{}", w.service, NGINX.load_path);
    let mut cfg = patchover_load::LoadConfig::for_url(
        &url,
        a.rate,
        Duration::from_secs(3600),
        patchover_load::ConnMode::Mixed,
    )?;
    cfg.netns = Some(w.netns.clone());
    cfg.deadline = deadline;
    let stop = cfg.stop.clone();
    let deadline_client = std::thread::spawn(move || patchover_load::run(&cfg));
    let wo = WrkOptions {
        netns: Some(w.names.net.client_ns.clone()),
        url,
        connections: a.wrk_connections,
        timeout: deadline,
        delay_ms: (a.wrk_delay_ms > 0).then_some(a.wrk_delay_ms),
        dir: w.dir.clone(),
    };
    let keepalive = Wrk::start(&wo, WrkConns::Keepalive);
    let close = Wrk::start(&wo, WrkConns::Close);
    // Nothing returns between the clients' start and their stop.
    let work = match (&keepalive, &close) {
        (Ok(_), Ok(_)) => {
            std::thread::sleep(Duration::from_secs(2));
            let r = patch_and_roll_back(w, mode);
            std::thread::sleep(Duration::from_secs(1));
            r
        }
        _ => Err(ShowcaseError::Failed("wrk did not start".to_owned())),
    };
    stop.stop();
    let (keepalive, close) = (keepalive.and_then(Wrk::finish), close.and_then(Wrk::finish));
    let load = deadline_client
        .join()
        .map_err(|_| ShowcaseError::Failed("the deadline client's thread panicked".to_owned()))??;
    let (keepalive, close) = (keepalive?, close?);
    let mut c = work?;
    c.keepalive = keepalive;
    c.close = close;
    c.deadline = load.summary;
    Ok(c)
}

/// `patch`, the new LC's packages, `rollback` (not after a failed patch: nothing switched).
fn patch_and_roll_back(w: &World, mode: Mode) -> Result<Cycle, ShowcaseError> {
    let m = mode.to_string();
    let t = Instant::now();
    let patch = po(w, &["patch", w.active(), "--mode", &m])?;
    let patch_s = t.elapsed().as_secs_f64();
    let mut packages_after = BTreeMap::new();
    let mut rollback = None;
    let t = Instant::now();
    if patch["outcome"] == "ok" {
        packages_after = w.packages(1)?;
        rollback = Some(po(w, &["rollback", w.active(), "--mode", &m])?);
    }
    Ok(Cycle {
        patch,
        rollback,
        patch_s,
        rollback_s: t.elapsed().as_secs_f64(),
        keepalive: WrkRun::default(),
        close: WrkRun::default(),
        deadline: patchover_load::Summary::default(),
        packages_after,
    })
}

/// `patchover --json ARGS` against the world's config: its JSON report.
fn po(w: &World, args: &[&str]) -> Result<Value, ShowcaseError> {
    let out = Command::new(std::env::current_exe()?)
        .env("PATCHOVER_CONFIG", &w.config_path)
        .arg("--json")
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()?;
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("the report of `patchover {}`", args.join(" ")))
}

/// The report (JSON; the text form is printed from it).
fn report(
    w: &World,
    a: &DemoOptions,
    mode: Mode,
    before: &BTreeMap<String, String>,
    done: &[Cycle],
) -> Result<Value, ShowcaseError> {
    let (mut ka, mut close) = (WrkCounts::default(), WrkCounts::default());
    for c in done {
        ka.add(&c.keepalive.counts);
        close.add(&c.close.counts);
    }
    let samples: Vec<&patchover_load::Summary> = done.iter().map(|c| &c.deadline).collect();
    let dl = json!({
        "total": samples.iter().map(|s| s.total).sum::<u64>(),
        "failed": samples.iter().map(|s| s.failed_total).sum::<u64>(),
        "retried": samples.iter().map(|s| s.retried).sum::<u64>(),
        "max_ms": samples.iter().map(|s| s.latency.max_ms).fold(0.0, f64::max),
        "per_cycle": samples,
    });
    let requests_total: u64 = done.iter().map(Cycle::total).sum();
    let requests_failed: u64 = done.iter().map(Cycle::failed).sum();
    let after = done
        .first()
        .map(|c| c.packages_after.clone())
        .unwrap_or_default();
    let after_rollback = w.packages(0)?;
    let expected: BTreeMap<String, String> = w
        .bundle
        .updates
        .iter()
        .map(|u| (u.package.clone(), u.new.clone()))
        .collect();
    let cycles_ok = done.len() == a.cycles.max(1) as usize && done.iter().all(Cycle::ok);
    let versions_ok =
        done.iter().all(|c| c.packages_after == expected) && after_rollback == *before;
    let outcome = if cycles_ok { "ok" } else { "failed" };
    Ok(json!({
        "service": "nginx",
        "mode": mode.to_string(),
        "backend": "ns",
        "deadline_ms": a.deadline_ms.unwrap_or(2000),
        "cycles": done.len(),
        "cycles_asked": a.cycles.max(1),
        "outcome": outcome,
        "good": cycles_ok && versions_ok && requests_failed == 0,
        "requests_total": requests_total,
        "requests_failed": requests_failed,
        "wrk": {
            "keepalive": wrk_json(&ka, done, WrkConns::Keepalive),
            "close": wrk_json(&close, done, WrkConns::Close),
        },
        "deadline_client": dl,
        // What readdress/path cost keep-alive clients: each cut connection is one failed request.
        "keepalive_cuts_per_cycle": done.iter().map(|c| c.keepalive.counts.failed()).collect::<Vec<_>>(),
        // Connections the old LC still had when it was stopped (patch and rollback switches).
        "connections_cut_per_cycle": done.iter().map(Cycle::connections_cut).collect::<Vec<_>>(),
        "packages_before": before,
        "packages_after": after,
        "packages_after_rollback": after_rollback,
        "versions_ok": versions_ok,
        "bundle": w.bundle,
        "lcs": w.names.lcs,
        "setup_s": w.timings,
        "runs": done.iter().map(|c| json!({
            "patch": {"outcome": c.patch["outcome"], "s": c.patch_s, "pause_ms": c.patch["pause_ms"],
                      "switch": c.patch["switch"], "steps": c.patch["steps"], "error": c.patch["error"]},
            "rollback": c.rollback.as_ref().map(|r| json!({"outcome": r["outcome"], "s": c.rollback_s, "error": r["error"]})),
        })).collect::<Vec<_>>(),
    }))
}

/// wrk's summed counts for one kind of run, and each cycle's output verbatim.
fn wrk_json(counts: &WrkCounts, done: &[Cycle], conns: WrkConns) -> Value {
    let mut v = serde_json::to_value(counts).unwrap_or_default();
    v["failed"] = json!(counts.failed());
    let out: Vec<&str> = done
        .iter()
        .map(|c| match conns {
            WrkConns::Keepalive => c.keepalive.output.as_str(),
            WrkConns::Close => c.close.output.as_str(),
        })
        .collect();
    v["output"] = json!(out);
    v
}

fn print_text(r: &Value) {
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    println!(
        "patchover demo --service nginx ({} mode, {} of {} patch → rollback cycles): {}",
        r["mode"].as_str().unwrap_or("?"),
        r["cycles"],
        r["cycles_asked"],
        r["outcome"].as_str().unwrap_or("?")
    );
    println!(
        "  bundle             {}",
        r["bundle"]["title"].as_str().unwrap_or("?")
    );
    let empty = serde_json::Map::new();
    let before = r["packages_before"].as_object().unwrap_or(&empty);
    for (p, v) in r["packages_after"].as_object().unwrap_or(&empty) {
        println!(
            "  {p:<18} {} -> {} (after the rollback: {})",
            before.get(p).and_then(Value::as_str).unwrap_or("(new)"),
            v.as_str().unwrap_or("?"),
            r["packages_after_rollback"][p].as_str().unwrap_or("(none)")
        );
    }
    println!(
        "  requests           {} total, {} failed (wrk and the deadline client; deadline {} ms)",
        n(&r["requests_total"]),
        n(&r["requests_failed"]),
        r["deadline_ms"]
    );
    for (k, label) in [("keepalive", "keep-alive"), ("close", "Connection: close")] {
        let c = &r["wrk"][k];
        println!(
            "  wrk {label:<14} {} requests; socket errors connect {}, read {}, write {}, timeout {}; non-2xx/3xx {}",
            n(&c["requests"]),
            n(&c["connect"]),
            n(&c["read"]),
            n(&c["write"]),
            n(&c["timeout"]),
            n(&c["non_2xx_3xx"])
        );
    }
    let d = &r["deadline_client"];
    println!(
        "  deadline client    {} requests, {} failed, slowest {} ms",
        n(&d["total"]),
        n(&d["failed"]),
        d["max_ms"]
    );
    for (i, run) in r["runs"].as_array().into_iter().flatten().enumerate() {
        println!(
            "  cycle {:<3}          patch {} in {:.1} s (pause {} ms), rollback {} in {:.1} s{}",
            i + 1,
            run["patch"]["outcome"].as_str().unwrap_or("?"),
            run["patch"]["s"].as_f64().unwrap_or(0.0),
            run["patch"]["pause_ms"],
            run["rollback"]["outcome"].as_str().unwrap_or("not run"),
            run["rollback"]["s"].as_f64().unwrap_or(0.0),
            match run["patch"]["error"]
                .as_str()
                .or(run["rollback"]["error"].as_str())
            {
                Some(e) => format!(": {e}"),
                None => String::new(),
            }
        );
    }
    println!(
        "{}",
        if r["good"] == true {
            "0 failed: MET"
        } else {
            "MISSED"
        }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The nginx profile docs/services.md shows is the one the demo runs, and the demo's
    /// config with it loads.
    #[test]
    fn the_nginx_profile_is_the_documented_one_and_loads() {
        let doc = include_str!("../../../docs/services.md");
        assert!(
            doc.contains(NGINX_SERVICE),
            "docs/services.md lacks:\n{NGINX_SERVICE}"
        );
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let names = crate::debian_world::Names::of_this_process();
        let sys = [d.join("a"), d.join("b")];
        for mode in [Mode::Readdress, Mode::Seamless] {
            let path =
                crate::debian_world::write_config(d, &NGINX, mode, &names, &d.join("k.pub"), &sys)
                    .unwrap();
            let text = std::fs::read_to_string(&path).unwrap();
            let host = patchover_core::HostFacts {
                cpus: 2,
                memory_mib: 4096,
            };
            let c = patchover_core::Config::parse(&path, &text, &host).unwrap();
            assert!(matches!(
                &c.service.health,
                Some(patchover_core::HealthProbe::Http { path, status: 200, body: Some(b), .. })
                    if path == "/" && b == "Welcome to nginx"
            ));
            assert!(c.service.restart.is_empty() && c.service.resume.is_empty());
            assert_eq!(c.service.drain, ["/usr/sbin/nginx", "-s", "reload"]);
            assert!(c.service.stateless);
            assert_eq!(c.lcs.len(), 2);
        }
    }
}
