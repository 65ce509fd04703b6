//! `wrk` (Debian's package) as a second, independent load client for the real-service demos.
//!
//! wrk is what people measure web servers with, so its counts are what a reader trusts; it
//! does not count a request that hangs before its `--timeout` check and does not retry, which
//! is why the demos run the project's deadline client beside it. A run is started with a long
//! duration and ended with `SIGINT` once the work under load is done: wrk then stops its
//! threads and prints its usual summary, which is kept verbatim and parsed here.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde::Serialize;

use crate::{Context, ShowcaseError};

/// How one wrk run uses its connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WrkConns {
    /// HTTP/1.1 keep-alive: each connection carries request after request.
    #[default]
    Keepalive,
    /// `-H 'Connection: close'`: a new connection for every request.
    Close,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct WrkOptions {
    /// The client's network namespace (`ip netns exec NAME`), or `None` for this one.
    pub netns: Option<String>,
    pub url: String,
    pub connections: u32,
    /// A request without an answer this long is a timeout (wrk's `--timeout`, whole seconds:
    /// rounded up).
    pub timeout: Duration,
    /// A pause between a connection's answer and its next request (wrk's Lua `delay()`), so
    /// the load leaves the machine room for the cycle; `None`: as fast as wrk can.
    pub delay_ms: Option<u32>,
    /// Where the delay script is written.
    pub dir: PathBuf,
}

/// wrk's counts, parsed from its summary (the names are wrk's own).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct WrkCounts {
    /// Completed requests (`N requests in …`); non-2xx/3xx answers are among them.
    pub requests: u64,
    /// `Socket errors: connect C, read R, write W, timeout T` (absent: all 0).
    pub connect: u64,
    pub read: u64,
    pub write: u64,
    pub timeout: u64,
    /// `Non-2xx or 3xx responses: N` (absent: 0).
    pub non_2xx_3xx: u64,
}

impl WrkCounts {
    /// Requests that failed: every socket error and every non-2xx/3xx answer.
    pub fn failed(&self) -> u64 {
        self.connect + self.read + self.write + self.timeout + self.non_2xx_3xx
    }

    /// Requests tried: the completed ones and those a socket error ended.
    pub fn total(&self) -> u64 {
        self.requests + self.connect + self.read + self.write + self.timeout
    }

    pub fn add(&mut self, o: &WrkCounts) {
        self.requests += o.requests;
        self.connect += o.connect;
        self.read += o.read;
        self.write += o.write;
        self.timeout += o.timeout;
        self.non_2xx_3xx += o.non_2xx_3xx;
    }

    /// Parses wrk's summary; `None` when it has no `requests in` line (wrk did not run).
    pub fn parse(out: &str) -> Option<WrkCounts> {
        let mut c = WrkCounts::default();
        let mut seen = false;
        for line in out.lines().map(str::trim) {
            if let Some((n, _)) = line.split_once(" requests in ") {
                c.requests = n.trim().parse().ok()?;
                seen = true;
            } else if let Some(rest) = line.strip_prefix("Socket errors:") {
                for part in rest.split(',') {
                    let (k, v) = part.trim().split_once(' ')?;
                    let v: u64 = v.trim().parse().ok()?;
                    match k {
                        "connect" => c.connect = v,
                        "read" => c.read = v,
                        "write" => c.write = v,
                        "timeout" => c.timeout = v,
                        _ => return None,
                    }
                }
            } else if let Some(n) = line.strip_prefix("Non-2xx or 3xx responses:") {
                c.non_2xx_3xx = n.trim().parse().ok()?;
            }
        }
        seen.then_some(c)
    }
}

/// One finished run: its counts and its output as wrk printed it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WrkRun {
    pub conns: WrkConns,
    #[serde(flatten)]
    pub counts: WrkCounts,
    pub output: String,
}

/// A wrk process under way.
pub struct Wrk {
    conns: WrkConns,
    child: Child,
}

impl Wrk {
    /// Starts wrk (for at most an hour; [`Wrk::finish`] ends it).
    pub fn start(o: &WrkOptions, conns: WrkConns) -> Result<Wrk, ShowcaseError> {
        let mut cmd = match &o.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "wrk"]);
                c
            }
            None => Command::new("wrk"),
        };
        cmd.args(["-t1", "-d3600s"])
            .arg(format!("-c{}", o.connections))
            // wrk takes whole seconds (`2s`), not milliseconds.
            .arg(format!(
                "--timeout={}s",
                o.timeout.as_millis().div_ceil(1000).max(1)
            ));
        if conns == WrkConns::Close {
            cmd.args(["-H", "Connection: close"]);
        }
        if let Some(ms) = o.delay_ms {
            cmd.arg("-s").arg(delay_script(&o.dir, ms)?);
        }
        let child = cmd
            .arg(&o.url)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting wrk (Debian's package `wrk`: scripts/install-deps installs it)")?;
        Ok(Wrk { conns, child })
    }

    /// Ends the run (`SIGINT`: wrk prints its summary) and reads its counts.
    pub fn finish(mut self) -> Result<WrkRun, ShowcaseError> {
        // `ip netns exec` execs wrk: the child is wrk itself.
        // SAFETY: a plain kill(2) of our own child's pid, which has not been waited for.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        let mut output = String::new();
        let mut err = String::new();
        if let Some(mut o) = self.child.stdout.take() {
            o.read_to_string(&mut output)?;
        }
        if let Some(mut e) = self.child.stderr.take() {
            e.read_to_string(&mut err)?;
        }
        self.child.wait()?;
        let counts = WrkCounts::parse(&output).ok_or_else(|| {
            ShowcaseError::Failed(format!(
                "wrk ({:?}) printed no summary: {}{}",
                self.conns,
                output.trim(),
                err.trim()
            ))
        })?;
        Ok(WrkRun {
            conns: self.conns,
            counts,
            output,
        })
    }
}

/// The Lua script that makes each connection wait `ms` between an answer and its next request.
fn delay_script(dir: &Path, ms: u32) -> Result<PathBuf, ShowcaseError> {
    let path = dir.join(format!("wrk-delay-{ms}ms.lua"));
    std::fs::write(&path, format!("function delay()\n  return {ms}\nend\n"))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// wrk 4.1's summary (Debian's package), with every counter line present.
    const WITH_ERRORS: &str = "Running 60m test @ http://10.79.3.10/
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.05ms    2.21ms  36.44ms   96.80%
    Req/Sec     1.42k   190.00     1.75k    72.00%
  28461 requests in 20.04s, 23.04MB read
  Socket errors: connect 0, read 4, write 1, timeout 2
  Non-2xx or 3xx responses: 3
Requests/sec:   1420.21
Transfer/sec:      1.15MB
";

    #[test]
    fn the_summary_is_parsed_with_every_counter() {
        let c = WrkCounts::parse(WITH_ERRORS).unwrap();
        assert_eq!(
            c,
            WrkCounts {
                requests: 28461,
                connect: 0,
                read: 4,
                write: 1,
                timeout: 2,
                non_2xx_3xx: 3
            }
        );
        assert_eq!(c.failed(), 10);
        assert_eq!(c.total(), 28468);
    }

    /// wrk prints the error lines only when a counter is not 0.
    #[test]
    fn a_clean_summary_has_no_failure() {
        let clean: String = WITH_ERRORS
            .lines()
            .filter(|l| !l.contains("errors") && !l.contains("Non-2xx"))
            .map(|l| format!("{l}\n"))
            .collect();
        let c = WrkCounts::parse(&clean).unwrap();
        assert_eq!((c.requests, c.failed()), (28461, 0));
    }

    #[test]
    fn no_summary_or_a_garbled_counter_is_not_a_result() {
        assert_eq!(
            WrkCounts::parse("unable to connect to 10.79.3.10:80 Connection refused\n"),
            None
        );
        let bad = WITH_ERRORS.replace("read 4", "read four");
        assert_eq!(WrkCounts::parse(&bad), None);
    }

    /// The real wrk against a real server on loopback, ended by SIGINT as the demo ends it:
    /// its summary is read in both connection modes.
    #[test]
    fn a_real_wrk_run_is_ended_and_counted() {
        if Command::new("wrk").arg("--version").output().is_err() {
            panic!("wrk is not installed: run scripts/install-deps");
        }
        let srv =
            patchover_load::server::RefServer::start(None, "127.0.0.1:0".parse().unwrap(), "v1")
                .unwrap();
        let dir = tempfile::tempdir().unwrap();
        for conns in [WrkConns::Keepalive, WrkConns::Close] {
            let o = WrkOptions {
                netns: None,
                url: format!("http://{}/version", srv.addr),
                connections: 2,
                timeout: Duration::from_secs(2),
                delay_ms: Some(1),
                dir: dir.path().to_owned(),
            };
            let w = Wrk::start(&o, conns).unwrap();
            std::thread::sleep(Duration::from_millis(1500));
            let r = w.finish().unwrap();
            assert!(r.counts.requests > 20, "{conns:?}: {}", r.output);
            assert!(r.output.contains("requests in"), "{}", r.output);
            assert_eq!(r.counts.failed(), 0, "{}", r.output);
        }
        srv.stop();
    }
}
