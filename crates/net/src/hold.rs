//! Holding new connection attempts during a switch window.
//!
//! In `path` and `readdress` mode the service has a short pause: the old LC finishes what it
//! accepted while nobody may start anything new on it. A SYN that is dropped in that pause costs
//! its client a 1 s retransmission (and a failed request under a 1 s deadline); a SYN that reaches
//! the old LC starts a connection that is cut by the switch. So SYNs to the service are *held*:
//! a netfilter rule hands them to an NFQUEUE that this module reads, keeps the packets in the
//! kernel's queue, and accepts them all once the new path is up. Re-injected SYNs continue through
//! the bridge's forwarding decision, which by then points at the standby.
//!
//! Why NFQUEUE through `iptables-nft` and bridge netfilter: this kernel has neither nftables'
//! native `queue` expression (`CONFIG_NFT_QUEUE`) nor the `plug` qdisc, but has the xtables
//! NFQUEUE target and `br_netfilter`. The rule is installed with `--queue-bypass` and the queue
//! with fail-open: if patchover dies while holding, the kernel lets SYNs through instead of
//! dropping them, so a crash never blackholes the service.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::netns::{NetnsError, command_in, enter_netns, in_netns};

/// Holding or releasing SYNs failed.
#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    #[error("SYN hold")]
    Netns(#[from] NetnsError),
    #[error("SYN hold: cannot bind NFQUEUE {queue} (is another switch holding it?)")]
    Queue {
        queue: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("SYN hold: cannot run iptables-nft; install the iptables package")]
    Spawn(#[source] std::io::Error),
    #[error("SYN hold: iptables-nft {action} failed ({status}): {stderr}")]
    Rule {
        action: &'static str,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("SYN hold: cannot set bridge netfilter ({path})")]
    Sysctl {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("SYN hold: the queue reader thread failed")]
    Reader(#[source] std::io::Error),
}

const HOLDING: u8 = 0;
const PASSING: u8 = 1;
const FINISH: u8 = 2;

const BRNF: &str = "/proc/sys/net/bridge/bridge-nf-call-iptables";

/// What a hold did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldStats {
    /// SYNs that were held and released.
    pub held: usize,
    /// When held SYNs were let go (the end of the pause; removing the rule comes after).
    pub released_at: Instant,
}

/// An active hold of new TCP connections to `service:port`. Dropping it releases everything.
pub struct SynHold {
    netns: Option<PathBuf>,
    rule: Vec<String>,
    state: Arc<AtomicU8>,
    held: Arc<AtomicUsize>,
    reader: Option<JoinHandle<std::io::Result<()>>>,
    prev_brnf: Option<String>,
    rule_installed: bool,
}

impl SynHold {
    /// Starts holding SYNs to `service:port` that enter the bridges (and routing) of `netns`.
    /// Released packets get firewall mark `mark`, so rules installed before the pause can act
    /// on exactly them (readdress rewrites their stale destination MAC).
    pub fn start(
        netns: Option<&Path>,
        service: Ipv4Addr,
        port: u16,
        queue: u16,
        mark: Option<u32>,
    ) -> Result<SynHold, HoldError> {
        let state = Arc::new(AtomicU8::new(HOLDING));
        let held = Arc::new(AtomicUsize::new(0));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let reader = {
            let netns = netns.map(Path::to_path_buf);
            let state = state.clone();
            let held = held.clone();
            std::thread::Builder::new()
                .name("po-synhold".into())
                .spawn(move || reader(netns, queue, mark, state, held, ready_tx))
                .map_err(HoldError::Reader)?
        };
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = reader.join();
                return Err(e);
            }
            Err(_) => {
                let r = reader.join();
                return Err(HoldError::Reader(match r {
                    Ok(Err(e)) => e,
                    _ => std::io::Error::other("queue reader ended early"),
                }));
            }
        }
        let mut hold = SynHold {
            netns: netns.map(Path::to_path_buf),
            rule: vec![
                "PREROUTING".into(),
                "-d".into(),
                format!("{service}/32"),
                "-p".into(),
                "tcp".into(),
                "--dport".into(),
                port.to_string(),
                "--syn".into(),
                "-m".into(),
                "comment".into(),
                "--comment".into(),
                "patchover-hold".into(),
                "-j".into(),
                "NFQUEUE".into(),
                "--queue-num".into(),
                queue.to_string(),
                "--queue-bypass".into(),
            ],
            state,
            held,
            reader: Some(reader),
            prev_brnf: None,
            rule_installed: false,
        };
        hold.prev_brnf = in_netns(netns, || {
            let prev = std::fs::read_to_string(BRNF).ok();
            std::fs::write(BRNF, "1").map(|_| prev)
        })?
        .map_err(|source| HoldError::Sysctl { path: BRNF, source })?;
        hold.iptables("-I")?;
        hold.rule_installed = true;
        Ok(hold)
    }

    fn iptables(&self, action: &'static str) -> Result<(), HoldError> {
        let mut cmd = command_in(self.netns.as_deref(), "iptables-nft")?;
        cmd.args(["-w", "-t", "mangle", action]).args(&self.rule);
        let out = cmd.output().map_err(HoldError::Spawn)?;
        if !out.status.success() {
            return Err(HoldError::Rule {
                action,
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(())
    }

    /// SYNs held so far.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }

    /// Lets every held SYN go on (they now take the new path) and stops holding.
    /// Returns once the rule is gone and the queue is empty.
    pub fn release(mut self) -> Result<HoldStats, HoldError> {
        self.finish()
    }

    fn finish(&mut self) -> Result<HoldStats, HoldError> {
        // First pass everything through (held packets go out at once), then remove the rule.
        self.state.store(PASSING, Ordering::SeqCst);
        let released_at = Instant::now();
        let mut first_err = None;
        if self.rule_installed {
            if let Err(e) = self.iptables("-D") {
                first_err = Some(e);
            } else {
                self.rule_installed = false;
            }
        }
        if let Some(prev) = self.prev_brnf.take() {
            let _ = in_netns(self.netns.as_deref(), || std::fs::write(BRNF, prev.trim()));
        }
        self.state.store(FINISH, Ordering::SeqCst);
        if let Some(r) = self.reader.take() {
            match r.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => first_err = first_err.or(Some(HoldError::Reader(e))),
                Err(_) => {
                    first_err = first_err.or(Some(HoldError::Reader(std::io::Error::other(
                        "queue reader panicked",
                    ))))
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(HoldStats {
                held: self.held.load(Ordering::SeqCst),
                released_at,
            }),
        }
    }
}

impl Drop for SynHold {
    fn drop(&mut self) {
        if (self.reader.is_some() || self.rule_installed)
            && let Err(e) = self.finish()
        {
            tracing::error!(error = %e, "SYN hold: release on drop failed");
        }
    }
}

/// A held SYN: its connection (addresses and ports) and initial sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SynKey {
    flow: (Ipv4Addr, u16, Ipv4Addr, u16),
    seq: u32,
}

impl SynKey {
    /// Reads an IPv4 TCP packet's start; `None` for anything else (such packets are let go).
    fn parse(p: &[u8]) -> Option<SynKey> {
        if p.len() < 20 || p[0] >> 4 != 4 || p[9] != 6 {
            return None;
        }
        let ihl = usize::from(p[0] & 0x0f) * 4;
        let tcp = p.get(ihl..ihl + 8)?;
        let addr = |i: usize| Ipv4Addr::new(p[i], p[i + 1], p[i + 2], p[i + 3]);
        Some(SynKey {
            flow: (
                addr(12),
                u16::from_be_bytes([tcp[0], tcp[1]]),
                addr(16),
                u16::from_be_bytes([tcp[2], tcp[3]]),
            ),
            seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
        })
    }
}

/// Which held SYNs must not be released: every SYN of a connection but its client's latest.
/// A client that gave up during the pause and opened a new socket on the same source port has
/// two SYNs held with different sequence numbers; released together, the server may complete
/// the stale one and read the new connection's bytes at the wrong offset. Retransmissions
/// (same sequence number) are redundant once the latest is released.
fn superseded(held: &[Option<SynKey>]) -> Vec<bool> {
    let mut latest = std::collections::HashMap::new();
    for (i, k) in held.iter().enumerate() {
        if let Some(k) = k {
            latest.insert(k.flow, i);
        }
    }
    held.iter()
        .enumerate()
        .map(|(i, k)| k.is_some_and(|k| latest[&k.flow] != i))
        .collect()
}

fn reader(
    netns: Option<PathBuf>,
    queue_num: u16,
    mark: Option<u32>,
    state: Arc<AtomicU8>,
    held_count: Arc<AtomicUsize>,
    ready: std::sync::mpsc::Sender<Result<(), HoldError>>,
) -> std::io::Result<()> {
    if let Some(ns) = &netns
        && let Err(e) = enter_netns(ns)
    {
        let _ = ready.send(Err(e.into()));
        return Ok(());
    }
    let open = || -> std::io::Result<nfq::Queue> {
        let mut q = nfq::Queue::open()?;
        q.bind(queue_num)?;
        q.set_fail_open(queue_num, true)?;
        // Enough of each SYN for its addresses, ports and sequence number (IPv4 options
        // included), to tell a client's stale attempts from its latest one.
        q.set_copy_range(queue_num, 128)?;
        q.set_queue_max_len(queue_num, 65536)?;
        q.set_nonblocking(true);
        Ok(q)
    };
    let mut q = match open() {
        Ok(q) => q,
        Err(source) => {
            let _ = ready.send(Err(HoldError::Queue {
                queue: queue_num,
                source,
            }));
            return Ok(());
        }
    };
    let _ = ready.send(Ok(()));
    let mut held: Vec<nfq::Message> = Vec::new();
    let mut finish_seen: Option<Instant> = None;
    loop {
        let st = state.load(Ordering::SeqCst);
        if st >= PASSING && !held.is_empty() {
            let keys: Vec<Option<SynKey>> = held
                .iter()
                .map(|m| SynKey::parse(m.get_payload()))
                .collect();
            let stale = superseded(&keys);
            for (mut m, stale) in held.drain(..).zip(stale) {
                if stale {
                    m.set_verdict(nfq::Verdict::Drop);
                } else {
                    if let Some(mark) = mark {
                        m.set_nfmark(mark);
                    }
                    m.set_verdict(nfq::Verdict::Accept);
                }
                q.verdict(m)?;
            }
        }
        match q.recv() {
            Ok(mut m) => {
                if st == HOLDING {
                    held_count.fetch_add(1, Ordering::SeqCst);
                    held.push(m);
                } else {
                    if let Some(mark) = mark {
                        m.set_nfmark(mark);
                    }
                    m.set_verdict(nfq::Verdict::Accept);
                    q.verdict(m)?;
                }
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        if st == FINISH {
            // The rule is gone; give packets that were already past it a moment to arrive.
            let since = *finish_seen.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_millis(5) {
                break;
            }
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let _ = q.unbind(queue_num);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4 TCP SYN's first bytes: `ihl` words of IP header, then ports and sequence.
    fn syn(ihl: u8, src: [u8; 4], sport: u16, seq: u32) -> Vec<u8> {
        let mut p = vec![0u8; usize::from(ihl) * 4];
        p[0] = 0x40 | ihl;
        p[9] = 6;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&[10, 0, 0, 10]);
        p.extend_from_slice(&sport.to_be_bytes());
        p.extend_from_slice(&80u16.to_be_bytes());
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&[0; 12]);
        p
    }

    #[test]
    fn parses_addresses_ports_and_sequence_with_ip_options() {
        let k = SynKey::parse(&syn(6, [10, 0, 0, 2], 40000, 7)).unwrap();
        assert_eq!(
            k.flow,
            (
                "10.0.0.2".parse().unwrap(),
                40000,
                "10.0.0.10".parse().unwrap(),
                80
            )
        );
        assert_eq!(k.seq, 7);
        assert_eq!(SynKey::parse(&[0x60; 40]), None, "IPv6 is not read");
        let mut udp = syn(5, [10, 0, 0, 2], 1, 1);
        udp[9] = 17;
        assert_eq!(SynKey::parse(&udp), None);
        assert_eq!(
            SynKey::parse(&syn(5, [10, 0, 0, 2], 1, 1)[..22]),
            None,
            "cut short"
        );
    }

    #[test]
    fn only_each_connections_latest_syn_is_released() {
        let k = |src: u8, port: u16, seq: u32| SynKey::parse(&syn(5, [10, 0, 0, src], port, seq));
        let held = [
            k(2, 40000, 100), // gave up on: superseded by the new socket's SYN below
            k(3, 40000, 500), // another client, same port: its own connection
            k(2, 40000, 100), // a retransmission of the first
            None,             // unreadable: let go
            k(2, 40000, 900), // the client's new socket on the same port
            k(2, 40001, 100),
        ];
        assert_eq!(superseded(&held), [true, false, true, false, false, false]);
    }
}
