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
//!
//! Released SYNs reach a standby that has never talked to their clients. Its SYN-ACKs then wait
//! for ARP, all of them behind the one ARP request it sends, in a queue of `unres_qlen_bytes`
//! (212,992 bytes by default: about 175 SYN-ACKs per neighbour) that drops its *oldest* packets
//! when full. The client's ARP reply reaches the standby only after the whole released burst,
//! so under load the standby dropped the SYN-ACKs of the connections that had waited longest
//! (issue 15: 323 `unresolved_discards` in a VM standby after one switch; those clients waited
//! for their next SYN retransmission and then at the back of the standby's backlog, and a
//! request past the demo's 5 s deadline was the result). So before the release the hold
//! *primes* the standby ([`Prime`]): for every distinct on-link client among the held SYNs it
//! writes, on the standby's bridge port, the ARP request that client would send for the service
//! address — the standby keeps the client's MAC from it and answers at once. The frames go in
//! ahead of the SYNs on the same queue, so the standby knows every client before it answers
//! one. Held SYNs are released oldest connection first.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use patchover_core::{Ipv4Cidr, MacAddr};

use crate::garp::{self, GarpError};
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
    #[error("SYN hold: cannot open the standby's port {port:?} to prime its neighbours")]
    Prime {
        port: String,
        #[source]
        source: GarpError,
    },
}

/// Where the held connections go after the release, so its neighbour table can be primed
/// with their clients (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prime {
    /// The standby's port on the bridge, in the hold's namespace (frames written there reach
    /// only the standby).
    pub port: String,
    /// The standby's MAC.
    pub mac: MacAddr,
    /// The service address and its prefix: what the frames ask for, and which clients are
    /// on-link (only those are primed: the standby reaches the others through a gateway).
    pub service: Ipv4Cidr,
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
    /// When the release began (removing the rule comes after).
    pub released_at: Instant,
    /// When the last held SYN was let go, the standby primed before (the end of the pause):
    /// `released_at` when none was held.
    pub let_go_at: Instant,
    /// Clients announced to the standby before the release ([`Prime`]).
    pub primed: usize,
}

/// An active hold of new TCP connections to `service:port`. Dropping it releases everything.
pub struct SynHold {
    netns: Option<PathBuf>,
    rule: Vec<String>,
    state: Arc<AtomicU8>,
    held: Arc<AtomicUsize>,
    primed: Arc<AtomicUsize>,
    let_go: Arc<Mutex<Option<Instant>>>,
    reader: Option<JoinHandle<std::io::Result<()>>>,
    prev_brnf: Option<String>,
    rule_installed: bool,
}

impl SynHold {
    /// Starts holding SYNs to `service:port` that enter the bridges (and routing) of `netns`.
    /// Released packets get firewall mark `mark`, so rules installed before the pause can act
    /// on exactly them (readdress rewrites their stale destination MAC). With `prime`, the
    /// standby learns every held on-link client's MAC just before the release.
    pub fn start(
        netns: Option<&Path>,
        service: Ipv4Addr,
        port: u16,
        queue: u16,
        mark: Option<u32>,
        prime: Option<Prime>,
    ) -> Result<SynHold, HoldError> {
        let state = Arc::new(AtomicU8::new(HOLDING));
        let held = Arc::new(AtomicUsize::new(0));
        let primed = Arc::new(AtomicUsize::new(0));
        let let_go = Arc::new(Mutex::new(None));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let reader = {
            let netns = netns.map(Path::to_path_buf);
            let state = state.clone();
            let counts = Counts {
                held: held.clone(),
                primed: primed.clone(),
                let_go: let_go.clone(),
            };
            std::thread::Builder::new()
                .name("po-synhold".into())
                .spawn(move || reader(netns, queue, mark, prime, state, counts, ready_tx))
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
            primed,
            let_go,
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

    /// Waits, up to `limit`, until the reader let the held SYNs go (or ended).
    fn wait_let_go(&self, limit: Duration) {
        let start = Instant::now();
        while start.elapsed() < limit
            && self.let_go.lock().is_ok_and(|t| t.is_none())
            && self.reader.as_ref().is_some_and(|r| !r.is_finished())
        {
            std::thread::sleep(Duration::from_micros(50));
        }
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
        // The held SYNs go first; removing the rule starts a process, which on a busy host
        // kept the reader from the CPU while clients waited (issue 26).
        self.wait_let_go(Duration::from_millis(50));
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
                let_go_at: self
                    .let_go
                    .lock()
                    .ok()
                    .and_then(|t| *t)
                    .map_or(released_at, |t| t.max(released_at)),
                primed: self.primed.load(Ordering::SeqCst),
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

/// The held SYNs to let go, in the order to let them go: each connection's latest SYN (see
/// [`superseded`]), the connection that has waited longest first (by its first SYN, not by
/// its latest retransmission), so a standby that answers them in turn serves the oldest
/// waiters first.
fn release_order(held: &[Option<SynKey>]) -> Vec<usize> {
    let stale = superseded(held);
    let mut first = std::collections::HashMap::new();
    for (i, k) in held.iter().enumerate() {
        if let Some(k) = k {
            first.entry(*k).or_insert(i);
        }
    }
    let mut order: Vec<usize> = (0..held.len()).filter(|&i| !stale[i]).collect();
    order.sort_by_key(|&i| held[i].map_or(i, |k| first[&k]));
    order
}

/// The distinct clients of the held SYNs that are on the service's own network, in the order
/// they first asked: (address, MAC as the frame carried it).
fn on_link_clients(
    held: &[(Option<SynKey>, Option<MacAddr>)],
    service: Ipv4Cidr,
) -> Vec<(Ipv4Addr, MacAddr)> {
    let mask = u32::MAX
        .checked_shl(32 - u32::from(service.prefix))
        .unwrap_or(0);
    let net = |a: Ipv4Addr| u32::from(a) & mask;
    let mut seen = std::collections::HashSet::new();
    held.iter()
        .filter_map(|(k, mac)| Some((k.as_ref()?.flow.0, (*mac)?)))
        .filter(|(ip, _)| net(*ip) == net(service.addr) && *ip != service.addr)
        .filter(|c| seen.insert(*c))
        .collect()
}

/// The source MAC of a queued frame, when it came in on an Ethernet device.
fn source_mac(m: &nfq::Message) -> Option<MacAddr> {
    let a: [u8; 6] = m.get_hw_addr()?.try_into().ok()?;
    Some(MacAddr(a))
}

/// Whether an error read from the queue is the kernel's answer to a verdict on a packet it no
/// longer holds (`ENOENT`: it dropped its queued packets through a device that went down, as a
/// VM's tap or an LC's port does in the switch's window). That packet is gone — its client
/// sends the SYN again — and the hold goes on; before, the whole switch failed and was rolled
/// back ("SYN hold: the queue reader thread failed: No such file or directory", once in a
/// fresh-clone CI's QEMU cycle). A verdict's error comes back as a netlink error message on
/// the next read, not from the verdict's own send.
fn verdict_for_a_packet_gone(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOENT)
}

/// Counters the reader thread fills in.
struct Counts {
    held: Arc<AtomicUsize>,
    primed: Arc<AtomicUsize>,
    /// When the held SYNs were let go.
    let_go: Arc<Mutex<Option<Instant>>>,
}

impl Counts {
    /// The held SYNs are let go now (the first time only).
    fn let_go_now(&self) {
        if let Ok(mut t) = self.let_go.lock() {
            t.get_or_insert_with(Instant::now);
        }
    }
}

/// The standby's port, opened before the pause.
struct Primer {
    sender: garp::Sender,
    prime: Prime,
}

impl Primer {
    /// Writes one ARP request per client; returns how many went out.
    fn prime(&self, clients: &[(Ipv4Addr, MacAddr)]) -> usize {
        let p = &self.prime;
        let mut sent = 0;
        for &(ip, mac) in clients {
            let f = garp::request_for(mac, ip, p.mac, p.service.addr);
            match self.sender.send_frame(&f) {
                Ok(()) => sent += 1,
                Err(e) => {
                    tracing::warn!(client = %ip, error = %e, "SYN hold: cannot prime the standby's neighbour entry");
                }
            }
        }
        sent
    }
}

/// Joins `netns`, opens the primer's packet socket and binds the queue; reports the outcome on
/// `ready` (`None`: it failed and was reported).
fn open_here(
    netns: Option<PathBuf>,
    queue_num: u16,
    prime: Option<Prime>,
    ready: &std::sync::mpsc::Sender<Result<(), HoldError>>,
) -> Option<(Option<Primer>, nfq::Queue)> {
    if let Some(ns) = &netns
        && let Err(e) = enter_netns(ns)
    {
        let _ = ready.send(Err(e.into()));
        return None;
    }
    let primer = match prime {
        Some(prime) => match garp::Sender::open_here(netns.clone(), &prime.port) {
            Ok(sender) => Some(Primer { sender, prime }),
            Err(source) => {
                let _ = ready.send(Err(HoldError::Prime {
                    port: prime.port,
                    source,
                }));
                return None;
            }
        },
        None => None,
    };
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
    match open() {
        Ok(q) => {
            let _ = ready.send(Ok(()));
            Some((primer, q))
        }
        Err(source) => {
            let _ = ready.send(Err(HoldError::Queue {
                queue: queue_num,
                source,
            }));
            None
        }
    }
}

/// The SYNs held so far and what each showed: its connection and its sender's MAC.
#[derive(Default)]
struct HeldSyns {
    held: Vec<Option<nfq::Message>>,
    seen: Vec<(Option<SynKey>, Option<MacAddr>)>,
}

impl HeldSyns {
    /// Primes the standby, then accepts each connection's latest SYN, oldest connection
    /// first, and drops the superseded ones.
    fn release(
        &mut self,
        q: &mut nfq::Queue,
        primer: &mut Option<Primer>,
        mark: Option<u32>,
        counts: &Counts,
    ) -> std::io::Result<()> {
        // The standby learns the clients first: these frames queue ahead of the SYNs.
        if let Some(p) = &*primer {
            let clients = on_link_clients(&self.seen, p.prime.service);
            counts.primed.fetch_add(p.prime(&clients), Ordering::SeqCst);
        }
        let keys: Vec<Option<SynKey>> = self.seen.iter().map(|(k, _)| *k).collect();
        for i in release_order(&keys) {
            if let Some(mut m) = self.held[i].take() {
                if let Some(mark) = mark {
                    m.set_nfmark(mark);
                }
                m.set_verdict(nfq::Verdict::Accept);
                q.verdict(m)?;
            }
        }
        counts.let_go_now();
        // What is left is superseded.
        for mut m in self.held.drain(..).flatten() {
            m.set_verdict(nfq::Verdict::Drop);
            q.verdict(m)?;
        }
        self.seen.clear();
        // Closing a packet socket waits for an RCU grace period; nothing waits on it here.
        if let Some(p) = primer.take() {
            let _ = std::thread::Builder::new()
                .name("po-synhold-close".into())
                .spawn(move || drop(p));
        }
        Ok(())
    }
}

fn reader(
    netns: Option<PathBuf>,
    queue_num: u16,
    mark: Option<u32>,
    prime: Option<Prime>,
    state: Arc<AtomicU8>,
    counts: Counts,
    ready: std::sync::mpsc::Sender<Result<(), HoldError>>,
) -> std::io::Result<()> {
    let Some((mut primer, mut q)) = open_here(netns, queue_num, prime, &ready) else {
        return Ok(());
    };
    let mut syns = HeldSyns::default();
    let mut finish_seen: Option<Instant> = None;
    loop {
        let st = state.load(Ordering::SeqCst);
        if st >= PASSING {
            if !syns.held.is_empty() {
                syns.release(&mut q, &mut primer, mark, &counts)?;
            }
            counts.let_go_now();
        }
        match q.recv() {
            Ok(mut m) => {
                if st == HOLDING {
                    counts.held.fetch_add(1, Ordering::SeqCst);
                    syns.seen
                        .push((SynKey::parse(m.get_payload()), source_mac(&m)));
                    syns.held.push(Some(m));
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
            Err(e) if verdict_for_a_packet_gone(&e) => {
                tracing::debug!("a held SYN was let go by the kernel before its verdict");
                continue;
            }
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

    #[test]
    fn only_a_verdict_on_a_packet_gone_is_passed_over() {
        assert!(verdict_for_a_packet_gone(
            &std::io::Error::from_raw_os_error(libc::ENOENT)
        ));
        for errno in [libc::ENOBUFS, libc::EPERM, libc::ENODEV, libc::EINVAL] {
            assert!(!verdict_for_a_packet_gone(
                &std::io::Error::from_raw_os_error(errno)
            ));
        }
    }

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

    #[test]
    fn the_longest_waiting_connection_is_released_first() {
        let k = |src: u8, port: u16, seq: u32| SynKey::parse(&syn(5, [10, 0, 0, src], port, seq));
        let held = [
            k(2, 40000, 100), // 0: first SYN of the oldest connection
            k(3, 40001, 200), // 1
            k(2, 40000, 100), // 2: the oldest connection's retransmission (released)
            None,             // 3: unreadable: let go in its place
            k(4, 40002, 300), // 4
            k(3, 40001, 200), // 5: retransmission of 1 (released)
            k(3, 40003, 1),   // 6
        ];
        // The latest copy of each, ordered by the connection's first SYN.
        assert_eq!(release_order(&held), [2, 5, 3, 4, 6]);
        // A new socket on a used port waits from its own first SYN, not the old one's.
        let reopened = [k(2, 40000, 100), k(3, 40001, 5), k(2, 40000, 900)];
        assert_eq!(release_order(&reopened), [1, 2]);
    }

    #[test]
    fn only_distinct_on_link_clients_are_primed() {
        let k = |src: [u8; 4], port: u16| SynKey::parse(&syn(5, src, port, 1));
        let (m1, m2) = (MacAddr([2, 0, 0, 0, 0, 1]), MacAddr([2, 0, 0, 0, 0, 2]));
        let service: Ipv4Cidr = "10.0.0.10/24".parse().unwrap();
        let held = [
            (k([10, 0, 0, 200], 1), Some(m1)),
            (k([10, 0, 0, 200], 2), Some(m1)), // same client: once
            (k([10, 0, 1, 7], 3), Some(m2)),   // off-link (behind a gateway)
            (k([10, 0, 0, 201], 4), None),     // no Ethernet source
            (None, Some(m2)),                  // unreadable
            (k([10, 0, 0, 10], 5), Some(m2)),  // the service address itself
            (k([10, 0, 0, 3], 6), Some(m2)),
        ];
        assert_eq!(
            on_link_clients(&held, service),
            [
                ("10.0.0.200".parse().unwrap(), m1),
                ("10.0.0.3".parse().unwrap(), m2)
            ]
        );
        let host_route: Ipv4Cidr = "10.0.0.10/32".parse().unwrap();
        assert!(on_link_clients(&held, host_route).is_empty());
        let everything: Ipv4Cidr = "10.0.0.10/0".parse().unwrap();
        assert_eq!(on_link_clients(&held, everything).len(), 3);
    }
}
