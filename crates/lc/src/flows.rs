//! What an LC that stopped leaves in the host's connection tracking.
//!
//! The flows it served through the service NAT (`seamless`: the host DNATs the service address
//! to the LC's own address) keep their conntrack entries after it stopped: the connections it
//! cut at its stop linger on the client's side (CLOSE_WAIT, then LAST_ACK while the client's
//! FIN goes unanswered) and so do their entries (60 s, 30 s; ESTABLISHED: days). conntrack
//! *ignores* a SYN that reuses the client port of such an entry (it is not in TIME_WAIT or
//! CLOSE, so it may be the real connection) and sends it the old way, to the stopped LC: the
//! new connection is black-holed until the entry expires. Clients that open many connections
//! reuse ports within seconds (wrk with `Connection: close`: every ~40 s), so a ten-cycle nginx
//! run under wrk had 43 requests time out after an old LC stopped with 176 connections left.
//! Deleted, a reused port's SYN is NATed anew (to the LC that serves now), and a lingering
//! connection's next segment is answered with a reset there instead of silence.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

/// Deletes the TCP and UDP conntrack entries of flows answered by `addr` (`--reply-src`: the
/// LC's own address, the DNAT target of the service address). Only for an address no running
/// LC has: every flow answered by it is dead. Best effort: a failure is logged, and costs
/// only what the entries would have cost anyway. At nice 19: `conntrack` dumps the whole
/// table into user space (see `patchover_net::live`, which does the same for UDP flows at a
/// switch's drain deadline).
pub fn forget_answered_by(addr: Ipv4Addr) {
    for proto in ["tcp", "udp"] {
        let out = Command::new("nice")
            .args(["-n", "19", "conntrack", "-D", "-p", proto, "--reply-src"])
            .arg(addr.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output();
        match out {
            // conntrack exits 1 when nothing matched; nice exits 127 when it is missing.
            Ok(o) if matches!(o.status.code(), Some(0 | 1)) => {}
            Ok(o) => tracing::warn!(
                %addr,
                proto,
                error = %String::from_utf8_lossy(&o.stderr).trim(),
                "cannot forget the flows of a stopped LC (install conntrack): a client port they used is black-holed until their entries expire"
            ),
            Err(e) => tracing::warn!(%addr, proto, error = %e, "cannot run conntrack"),
        }
    }
}
