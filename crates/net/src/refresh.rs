//! Later gratuitous ARP announcements of the service address from a process of their own, so
//! that the patch run that moved the address can end (`patchover internal garp-refresh`).
//!
//! The run hands the refresher a [`Refresh`]; the process boundary in between is this
//! module's business ([`Refresh::command`] writes the arguments, [`Refresh::from_args`] reads
//! them back), so neither side formats or parses addresses itself.

use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use patchover_core::MacAddr;

use crate::garp::GarpConfig;
use crate::lc::{InLcError, LcAccess};
use crate::switch::Endpoint;

/// Announcements of `addr` from `iface` of an LC, `count` frames at each of `after` (measured
/// from the refresher's start).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refresh {
    pub access: LcAccess,
    pub iface: String,
    pub mac: MacAddr,
    pub addr: Ipv4Addr,
    pub count: u32,
    pub after: Vec<Duration>,
}

/// The arguments of a refresher could not be read.
#[derive(Debug, thiserror::Error)]
#[error("garp-refresh: {0}")]
pub struct RefreshArgsError(String);

impl Refresh {
    /// The refreshes `garp` asks for, of service address `addr` from the LC at `ep`.
    pub fn new(ep: &Endpoint, addr: Ipv4Addr, garp: &GarpConfig) -> Refresh {
        Refresh {
            access: ep.access.clone(),
            iface: ep.iface.clone(),
            mac: ep.mac,
            addr,
            count: garp.count,
            after: garp.refresh_after.clone(),
        }
    }

    /// The arguments after `patchover internal garp-refresh`.
    pub fn args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = match &self.access {
            LcAccess::Netns(p) => vec!["--netns".into(), p.into()],
            LcAccess::Agent { socket } => vec!["--agent".into(), socket.into()],
        };
        let after: Vec<String> = self
            .after
            .iter()
            .map(|d| d.as_millis().to_string())
            .collect();
        for (k, v) in [
            ("--iface", self.iface.clone()),
            ("--mac", self.mac.to_string()),
            ("--ip", self.addr.to_string()),
            ("--count", self.count.to_string()),
            ("--after-ms", after.join(",")),
        ] {
            a.push(k.into());
            a.push(v.into());
        }
        a
    }

    /// Reads what [`Refresh::args`] wrote (as the command line's parser hands it over).
    #[allow(clippy::too_many_arguments)]
    pub fn from_args(
        netns: Option<PathBuf>,
        agent: Option<PathBuf>,
        iface: String,
        mac: MacAddr,
        addr: Ipv4Addr,
        count: u32,
        after_ms: &[u64],
    ) -> Result<Refresh, RefreshArgsError> {
        let access = match (netns, agent) {
            (Some(p), None) => LcAccess::Netns(p),
            (None, Some(socket)) => LcAccess::Agent { socket },
            _ => {
                return Err(RefreshArgsError(
                    "needs exactly one of --netns and --agent".into(),
                ));
            }
        };
        Ok(Refresh {
            access,
            iface,
            mac,
            addr,
            count,
            after: after_ms
                .iter()
                .map(|&ms| Duration::from_millis(ms))
                .collect(),
        })
    }

    /// `exe internal garp-refresh …`, detached: its own process group, no standard streams.
    pub fn command(&self, exe: &Path) -> std::process::Command {
        use std::os::unix::process::CommandExt;
        let mut cmd = std::process::Command::new(exe);
        cmd.process_group(0)
            .args(["internal", "garp-refresh"])
            .args(self.args())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        cmd
    }

    /// Sends the announcements (what the refresher process does), 5 ms between frames.
    pub fn run(&self) -> Result<(), InLcError> {
        let start = Instant::now();
        for at in &self.after {
            std::thread::sleep(at.saturating_sub(start.elapsed()));
            self.access.open()?.announce(
                &self.iface,
                self.mac,
                self.addr,
                self.count,
                Duration::from_millis(5),
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refresh(access: LcAccess) -> Refresh {
        Refresh {
            access,
            iface: "eth0".into(),
            mac: MacAddr([2, 0, 0, 0, 0, 7]),
            addr: "10.0.0.10".parse().unwrap(),
            count: 3,
            after: vec![Duration::from_secs(1), Duration::from_millis(5500)],
        }
    }

    /// What a command-line parser makes of `args` (flag, value pairs).
    fn parse(args: &[OsString]) -> Result<Refresh, RefreshArgsError> {
        let mut v = std::collections::HashMap::new();
        for kv in args.chunks(2) {
            v.insert(kv[0].to_str().unwrap(), kv[1].to_str().unwrap().to_string());
        }
        let after: Vec<u64> = v["--after-ms"]
            .split(',')
            .map(|s| s.parse().unwrap())
            .collect();
        Refresh::from_args(
            v.get("--netns").map(PathBuf::from),
            v.get("--agent").map(PathBuf::from),
            v["--iface"].clone(),
            v["--mac"].parse().unwrap(),
            v["--ip"].parse().unwrap(),
            v["--count"].parse().unwrap(),
            &after,
        )
    }

    #[test]
    fn a_refresh_reads_back_what_it_wrote() {
        for access in [
            LcAccess::Netns("/proc/42/ns/net".into()),
            LcAccess::Agent {
                socket: "/run/po/lc/lc2/agent.sock".into(),
            },
        ] {
            let r = refresh(access);
            assert_eq!(parse(&r.args()).unwrap(), r);
        }
    }

    #[test]
    fn the_command_is_the_internal_verb() {
        let r = refresh(LcAccess::Netns("/run/netns/x".into()));
        let cmd = r.command(Path::new("/usr/bin/patchover"));
        let args: Vec<_> = cmd.get_args().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(
            args,
            [
                "internal",
                "garp-refresh",
                "--netns",
                "/run/netns/x",
                "--iface",
                "eth0",
                "--mac",
                "02:00:00:00:00:07",
                "--ip",
                "10.0.0.10",
                "--count",
                "3",
                "--after-ms",
                "1000,5500"
            ]
        );
    }

    #[test]
    fn one_way_in_exactly() {
        let e = Refresh::from_args(
            None,
            None,
            "eth0".into(),
            MacAddr([2, 0, 0, 0, 0, 7]),
            "10.0.0.10".parse().unwrap(),
            3,
            &[],
        );
        assert!(e.is_err());
    }
}
