//! [`InLc`] for `qemu` LCs: busybox programs run in the guest through the agent channel.
//!
//! Each operation is one `Exec` request on a fresh connection (the channel is a virtio-serial
//! port with room for one host connection: holding it would lock out the LC backend's own
//! agent calls, e.g. the service's drain command). What runs and how its output is read:
//!
//! | operation            | in the guest                                   |
//! |----------------------|------------------------------------------------|
//! | addresses            | `ip -o -4 addr show dev IF`                    |
//! | add / remove address | `ip addr add\|del ADDR/PREFIX dev IF`          |
//! | announce (per frame) | `arping -U -c 1 -w 1 -I IF ADDR`               |
//! | HTTP GET             | `wget -S -q -O - http://ADDR:PORT/PATH`        |
//! | TCP connect          | `nc -w SECS ADDR PORT -e true` (busybox `nc`)  |
//! | busy connections     | `grep ':PORT … 0[13489B] ' /proc/net/tcp`      |
//!
//! busybox 1.35's `wget -T` crashes, so the GET's timeout is the agent's exec timeout; `-S`
//! prints the status line on stderr, so the check sees the real status and not only wget's
//! "2xx or not". busybox `arping` paces the frames of one run a second apart, so every frame
//! is its own `arping -c 1` run and the switcher keeps its interval (plus one agent round
//! trip per frame); the MAC is the guest NIC's own, whatever the caller passes.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use patchover_agent::{AgentClient, Request, Response};
use patchover_core::{Ipv4Cidr, MacAddr};

use super::{HttpAnswer, InLc, InLcError};
use crate::diag::one_line;
use crate::netns::BUSY_MASK;

/// What a program run in the guest left behind.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GuestOutput {
    /// Exit status, `None` if killed (by a signal or the timeout).
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
}

/// Runs a program in the guest. [`AgentChannel`] is the real one; anything that runs busybox
/// programs the same way (a test running busybox in a namespace) fits.
pub trait GuestExec: Send {
    fn exec(&self, argv: &[String], timeout: Duration) -> Result<GuestOutput, InLcError>;
    /// Proves the guest answers, without running anything.
    fn ping(&self) -> Result<(), InLcError>;
}

/// The agent channel of a VM (the host end of its virtio-serial port).
pub struct AgentChannel {
    pub socket: PathBuf,
}

/// Extra time the channel waits beyond a program's own timeout (connect, queueing behind
/// another host connection, the agent's poll).
const CHANNEL_SLACK: Duration = Duration::from_secs(3);

impl AgentChannel {
    fn connect(&self, timeout: Duration, program: &str) -> Result<AgentClient, InLcError> {
        AgentClient::connect_virtio(&self.socket, timeout).map_err(|source| InLcError::Agent {
            socket: self.socket.clone(),
            program: program.to_string(),
            source,
        })
    }
}

impl GuestExec for AgentChannel {
    fn exec(&self, argv: &[String], timeout: Duration) -> Result<GuestOutput, InLcError> {
        let program = argv.first().cloned().unwrap_or_default();
        let mut c = self.connect(timeout + CHANNEL_SLACK, &program)?;
        let req = Request::Exec {
            argv: argv.to_vec(),
            timeout_ms: timeout.as_millis().max(1) as u64,
        };
        let err = |source| InLcError::Agent {
            socket: self.socket.clone(),
            program: program.clone(),
            source,
        };
        match c.call(&req).map_err(err)? {
            Response::Exec {
                status,
                stdout,
                stderr,
                timed_out,
            } => Ok(GuestOutput {
                status,
                stdout,
                stderr,
                timed_out,
            }),
            other => Err(err(patchover_agent::AgentError::Protocol(format!(
                "expected an exec answer, got {other:?}"
            )))),
        }
    }

    fn ping(&self) -> Result<(), InLcError> {
        let mut c = self.connect(CHANNEL_SLACK, "ping")?;
        c.call(&Request::Ping)
            .map(|_| ())
            .map_err(|source| InLcError::Agent {
                socket: self.socket.clone(),
                program: "ping".into(),
                source,
            })
    }
}

/// A guest reached through its agent.
pub struct AgentLc {
    socket: PathBuf,
    exec: Box<dyn GuestExec>,
}

/// Timeout of the address and connection-count programs.
const QUICK: Duration = Duration::from_secs(5);

impl AgentLc {
    /// The guest behind the agent channel `socket`.
    pub fn new(socket: &Path) -> AgentLc {
        AgentLc::with_exec(
            socket,
            Box::new(AgentChannel {
                socket: socket.to_path_buf(),
            }),
        )
    }

    /// The same operations over another way of running guest programs; `socket` only names
    /// the guest in messages.
    pub fn with_exec(socket: &Path, exec: Box<dyn GuestExec>) -> AgentLc {
        AgentLc {
            socket: socket.to_path_buf(),
            exec,
        }
    }

    fn run(&self, argv: &[String], timeout: Duration) -> Result<GuestOutput, InLcError> {
        self.exec.exec(argv, timeout)
    }

    fn failed(&self, argv: &[String], out: &GuestOutput) -> InLcError {
        InLcError::Command {
            socket: self.socket.clone(),
            command: argv.join(" "),
            status: out.status,
            timed_out: out.timed_out,
            stderr: out.stderr.trim().to_string(),
        }
    }

    /// Runs `argv`; exit 0 or a stderr containing one of `fine` is success.
    fn run_ok(&self, argv: &[String], fine: &[&str]) -> Result<GuestOutput, InLcError> {
        let out = self.run(argv, QUICK)?;
        if out.status == Some(0) || (!out.timed_out && fine.iter().any(|f| out.stderr.contains(f)))
        {
            return Ok(out);
        }
        Err(self.failed(argv, &out))
    }
}

fn argv(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

impl InLc for AgentLc {
    fn describe(&self) -> String {
        format!("agent channel {}", self.socket.display())
    }

    fn prepare(&self, _iface: &str, _addresses: bool, _announce: bool) -> Result<(), InLcError> {
        self.exec.ping()
    }

    fn addresses(&self, iface: &str) -> Result<Vec<Ipv4Cidr>, InLcError> {
        let a = argv(&["ip", "-o", "-4", "addr", "show", "dev", iface]);
        let out = self.run_ok(&a, &[])?;
        parse_ip_addr(&out.stdout).map_err(|why| InLcError::Output {
            socket: self.socket.clone(),
            command: a.join(" "),
            why,
        })
    }

    fn add_address(&self, iface: &str, cidr: Ipv4Cidr) -> Result<(), InLcError> {
        let a = argv(&["ip", "addr", "add", &cidr.to_string(), "dev", iface]);
        self.run_ok(&a, &["File exists"]).map(|_| ())
    }

    fn del_address(&self, iface: &str, cidr: Ipv4Cidr) -> Result<(), InLcError> {
        let a = argv(&["ip", "addr", "del", &cidr.to_string(), "dev", iface]);
        self.run_ok(&a, &["Cannot assign requested address"])
            .map(|_| ())
    }

    fn announce(
        &self,
        iface: &str,
        _mac: MacAddr,
        ip: Ipv4Addr,
        count: u32,
        interval: Duration,
    ) -> Result<u32, InLcError> {
        // busybox arping paces its frames a second apart; one frame per call keeps the
        // switcher's interval and never holds the agent channel for long.
        let a = argv(&[
            "arping",
            "-U",
            "-c",
            "1",
            "-w",
            "1",
            "-I",
            iface,
            &ip.to_string(),
        ]);
        let mut sent = 0;
        for i in 0..count {
            let out = self.run(&a, QUICK)?;
            if out.status != Some(0) {
                return Err(self.failed(&a, &out));
            }
            sent += 1;
            if i + 1 < count {
                std::thread::sleep(interval);
            }
        }
        tracing::debug!(%ip, iface, sent, "gratuitous ARP sent by the guest");
        Ok(sent)
    }

    fn http_get(
        &self,
        addr: SocketAddr,
        path: &str,
        timeout: Duration,
    ) -> Result<HttpAnswer, InLcError> {
        let url = format!("http://{addr}{path}");
        let a = argv(&["wget", "-S", "-q", "-O", "-", &url]);
        let out = self.run(&a, timeout)?;
        wget_answer(&out).ok_or_else(|| InLcError::Http {
            addr,
            path: path.to_string(),
            source: std::io::Error::other(if out.timed_out {
                format!("no answer within {timeout:?}")
            } else {
                out.stderr.trim().to_string()
            }),
        })
    }

    fn https_get(
        &self,
        _addr: SocketAddr,
        _path: &str,
        _trust: &patchover_core::TlsTrust,
        _timeout: Duration,
    ) -> Result<HttpAnswer, InLcError> {
        Err(InLcError::NoHttps {
            lc: self.describe(),
        })
    }

    fn connect(&self, addr: SocketAddr, timeout: Duration) -> Result<(), InLcError> {
        // busybox nc: connects (within -w seconds), runs `true` on the connection and ends: exit
        // 0 only when the connection was accepted.
        let secs = timeout.as_secs_f64().ceil().max(1.0) as u64;
        let a = argv(&[
            "nc",
            "-w",
            &secs.to_string(),
            &addr.ip().to_string(),
            &addr.port().to_string(),
            "-e",
            "true",
        ]);
        let out = self.run(&a, timeout + Duration::from_secs(1))?;
        if out.status == Some(0) {
            return Ok(());
        }
        Err(InLcError::Connect {
            addr,
            source: std::io::Error::other(if out.timed_out {
                format!("no connection within {timeout:?}")
            } else {
                out.stderr.trim().to_string()
            }),
        })
    }

    fn busy_tcp_connections(&self, port: u16) -> Result<usize, InLcError> {
        // Only the service port's busy sockets leave the guest: a busy server has thousands of
        // TIME_WAIT sockets, and the drain polls this in the switch window. The states of the
        // pattern are those of BUSY_MASK (01 03 04 08 09 0B); the count below checks again.
        let pattern = format!(":{port:04X} [0-9A-F]*:[0-9A-F]* 0[13489B] ");
        let a = argv(&["grep", &pattern, "/proc/net/tcp"]);
        let out = self.run(&a, QUICK)?;
        // grep: 0 lines found, 1 none, 2 trouble.
        if !matches!(out.status, Some(0 | 1)) {
            return Err(self.failed(&a, &out));
        }
        Ok(count_proc_net_tcp(&out.stdout, port))
    }

    fn network_state(&self, iface: &str, _port: u16) -> String {
        // Two busybox runs (each an agent call, slow in a TCG guest); listening sockets are
        // not asked: the check made inside the standby already proved the service listens.
        let part = |label: &str, a: &[&str]| {
            let a = argv(a);
            let text = match self.run(&a, QUICK) {
                Ok(out) if out.status == Some(0) => one_line(&out.stdout),
                Ok(out) => self.failed(&a, &out).to_string(),
                Err(e) => e.to_string(),
            };
            format!("{label}: {text}")
        };
        [
            part(
                "addresses",
                &["ip", "-o", "-4", "addr", "show", "dev", iface],
            ),
            part("neighbours", &["ip", "neigh", "show", "dev", iface]),
        ]
        .join("; ")
    }
}

/// The addresses in `ip -o -4 addr show dev IF` output (busybox and iproute2 alike):
/// `2: eth0    inet 10.0.0.2/24 brd 10.0.0.255 scope global eth0\       valid_lft …`.
pub(crate) fn parse_ip_addr(out: &str) -> Result<Vec<Ipv4Cidr>, String> {
    let mut v = Vec::new();
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let mut words = line.split_whitespace();
        if !words.any(|w| w == "inet") {
            return Err(format!("no `inet` in {line:?}"));
        }
        let cidr = words
            .next()
            .ok_or_else(|| format!("no address after `inet` in {line:?}"))?;
        v.push(
            cidr.parse::<Ipv4Cidr>()
                .map_err(|e| format!("{cidr:?} in {line:?}: {e}"))?,
        );
    }
    Ok(v)
}

/// Counts the sockets of `/proc/net/tcp` lines whose local port is `port` and whose state is
/// busy ([`BUSY_MASK`]). Lines that are not socket entries (the header) are skipped.
pub(crate) fn count_proc_net_tcp(out: &str, port: u16) -> usize {
    out.lines()
        .filter(|line| {
            let mut w = line.split_whitespace();
            let (Some(sl), Some(local), Some(_remote), Some(st)) =
                (w.next(), w.next(), w.next(), w.next())
            else {
                return false;
            };
            if !sl.ends_with(':') {
                return false;
            }
            let local_port = local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            let state = u32::from_str_radix(st, 16).ok().filter(|s| *s < 32);
            matches!((local_port, state), (Some(p), Some(s)) if p == port && BUSY_MASK & (1 << s) != 0)
        })
        .count()
}

/// The answer in `wget -S -q -O -` output: the last status line busybox printed on stderr
/// (after redirects), the body on stdout. `None` if no HTTP answer came at all.
pub(crate) fn wget_answer(out: &GuestOutput) -> Option<HttpAnswer> {
    if out.timed_out {
        return None;
    }
    let status_line = out
        .stderr
        .lines()
        .map(str::trim)
        .rev()
        .find(|l| l.starts_with("HTTP/"))
        .map(str::to_string)
        .or_else(|| {
            // `wget: server returned error: HTTP/1.1 503 …` without -S output.
            out.stderr
                .lines()
                .find_map(|l| l.split_once("server returned error: "))
                .map(|(_, s)| s.trim().to_string())
        });
    match (status_line, out.status) {
        (Some(status_line), _) => Some(HttpAnswer {
            status_line,
            body: out.stdout.clone(),
        }),
        // Exit 0 without a status line: wget had a 2xx answer; say so.
        (None, Some(0)) => Some(HttpAnswer {
            status_line: "HTTP/1.1 200 (wget)".into(),
            body: out.stdout.clone(),
        }),
        (None, _) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_busybox_and_iproute2_address_lists() {
        // busybox 1.35, from a real `busybox ip -o -4 addr show dev lo`.
        let bb = "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever\n";
        assert_eq!(
            parse_ip_addr(bb).unwrap(),
            vec!["127.0.0.1/8".parse::<Ipv4Cidr>().unwrap()]
        );
        let two = "2: eth0    inet 10.99.0.11/24 brd 10.99.0.255 scope global eth0\\       valid_lft forever preferred_lft forever\n\
                   2: eth0    inet 10.99.0.10/24 scope global secondary eth0\\       valid_lft forever preferred_lft forever\n";
        assert_eq!(
            parse_ip_addr(two).unwrap(),
            vec![
                "10.99.0.11/24".parse::<Ipv4Cidr>().unwrap(),
                "10.99.0.10/24".parse().unwrap()
            ]
        );
        assert_eq!(parse_ip_addr("").unwrap(), vec![], "no address");
        assert!(parse_ip_addr("2: eth0 link/ether 02:00:00:00:00:01").is_err());
        assert!(parse_ip_addr("2: eth0 inet 10.0.0.300/24").is_err());
        assert!(parse_ip_addr("2: eth0 inet").is_err());
    }

    #[test]
    fn counts_busy_sockets_on_the_local_port_only() {
        // Port 8080 = 1F90. Header, a listener (0A), two established (01), one TIME_WAIT (06),
        // one CLOSE_WAIT (08), one established *to* a remote 8080 (not ours), one FIN_WAIT2
        // (05, done sending), one SYN_RECV (03).
        let t = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1234 1 0 100 0 0 10 0\n\
   1: 0B00630A:1F90 0300630A:C350 01 00000000:00000000 00:00000000 00000000     0        0 1235 1 0 20 4 30 10 -1\n\
   2: 0B00630A:1F90 0300630A:C351 01 00000000:00000000 00:00000000 00000000     0        0 1236 1 0 20 4 30 10 -1\n\
   3: 0B00630A:1F90 0300630A:C352 06 00000000:00000000 03:00000A3C 00000000     0        0 0 3 0\n\
   4: 0B00630A:1F90 0300630A:C353 08 00000000:00000000 00:00000000 00000000     0        0 1237 1 0 20 4 30 10 -1\n\
   5: 0B00630A:C354 0300630A:1F90 01 00000000:00000000 00:00000000 00000000     0        0 1238 1 0 20 4 30 10 -1\n\
   6: 0B00630A:1F90 0300630A:C355 05 00000000:00000000 00:00000000 00000000     0        0 0 3 0\n\
   7: 0B00630A:1F90 0300630A:C356 03 00000000:00000000 00:00000000 00000000     0        0 0 3 0\n";
        assert_eq!(count_proc_net_tcp(t, 8080), 4);
        assert_eq!(count_proc_net_tcp(t, 0xC354), 1);
        assert_eq!(count_proc_net_tcp(t, 80), 0);
        assert_eq!(count_proc_net_tcp("", 8080), 0);
        assert_eq!(count_proc_net_tcp("garbage 1F90 01\n", 8080), 0);
    }

    #[test]
    fn the_grep_pattern_keeps_exactly_the_busy_lines() {
        // The guest filters with grep; this checks the same pattern with a regex engine of
        // the same (POSIX basic) kind: busybox grep on the host.
        let t = "   1: 0B00630A:1F90 0300630A:C350 01 00000000:00000000 00:00000000 00000000 0 0 1\n\
   2: 0B00630A:1F90 0300630A:C352 06 00000000:00000000 03:00000A3C 00000000 0 0 0\n\
   3: 0B00630A:C354 0300630A:1F90 01 00000000:00000000 00:00000000 00000000 0 0 1\n\
   4: 0B00630A:1F90 0300630A:C353 0B 00000000:00000000 00:00000000 00000000 0 0 1\n\
   5: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1\n";
        let dir = std::env::temp_dir().join(format!("po-tcp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("tcp");
        std::fs::write(&f, t).unwrap();
        let Ok(out) = std::process::Command::new("busybox")
            .args(["grep", ":1F90 [0-9A-F]*:[0-9A-F]* 0[13489B] "])
            .arg(&f)
            .output()
        else {
            let _ = std::fs::remove_dir_all(&dir);
            panic!("busybox is needed (apt-get install busybox-static)");
        };
        let _ = std::fs::remove_dir_all(&dir);
        let kept = String::from_utf8_lossy(&out.stdout);
        let ids: Vec<&str> = kept
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        assert_eq!(ids, ["1:", "4:"]);
        assert_eq!(count_proc_net_tcp(&kept, 8080), 2);
    }

    fn out(status: Option<i32>, stdout: &str, stderr: &str) -> GuestOutput {
        GuestOutput {
            status,
            stdout: stdout.into(),
            stderr: stderr.into(),
            timed_out: false,
        }
    }

    #[test]
    fn wget_answers_carry_the_real_status() {
        // Captured from busybox 1.35 `wget -S -q -O -` against a Python http.server.
        let ok = out(
            Some(0),
            "{\"host\":\"lc-a\"}\n",
            "  HTTP/1.0 200 OK\n  Server: SimpleHTTP/0.6 Python/3.11.7\n  Content-Length: 16\n  \n",
        );
        let a = wget_answer(&ok).unwrap();
        assert_eq!(a.status(), Some(200));
        assert_eq!(a.body, "{\"host\":\"lc-a\"}\n");

        let not_found = out(
            Some(1),
            "",
            "  HTTP/1.0 404 File not found\nwget: server returned error: HTTP/1.0 404 File not found\n",
        );
        assert_eq!(wget_answer(&not_found).unwrap().status(), Some(404));

        // A redirect: the last status line is the answer.
        let redirected = out(
            Some(0),
            "x",
            "  HTTP/1.1 302 Found\n  Location: /v2\n  HTTP/1.1 200 OK\n",
        );
        assert_eq!(
            wget_answer(&redirected).unwrap().status_line,
            "HTTP/1.1 200 OK"
        );

        // Without -S output, wget's own error line still names the status.
        let bare = out(
            Some(1),
            "",
            "wget: server returned error: HTTP/1.1 503 Service Unavailable\n",
        );
        assert_eq!(wget_answer(&bare).unwrap().status(), Some(503));

        let refused = out(
            Some(1),
            "",
            "wget: can't connect to remote host (10.0.0.2): Connection refused\n",
        );
        assert_eq!(wget_answer(&refused), None);

        let mut slow = out(None, "", "");
        slow.timed_out = true;
        assert_eq!(wget_answer(&slow), None);
    }
}
