//! Later gratuitous ARP announcements of the service address from a process of their own, so
//! that the patch run that moved the address can end (`patchover internal garp-refresh`).
//!
//! The run hands the refresher a [`Refresh`]; the process boundary in between is this
//! module's business ([`HelperCall::args`] writes the arguments, [`Refresh::parse`] reads
//! them back), so neither side formats or parses addresses itself.

use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use patchover_core::MacAddr;
use patchover_core::helper::{ArgReader, HelperArgsError, HelperCall, flag};

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

    /// The verb after `patchover internal`.
    pub const VERB: &str = "garp-refresh";

    /// Reads what [`HelperCall::args`] wrote (the words after the verb).
    pub fn parse(args: &[OsString]) -> Result<Refresh, HelperArgsError> {
        let mut r = ArgReader::new(Self::VERB, args)?;
        let access = match (r.optional("--netns")?, r.optional("--agent")?) {
            (Some(p), None) => LcAccess::Netns(p.into()),
            (None, Some(socket)) => LcAccess::Agent {
                socket: socket.into(),
            },
            _ => return Err(r.rule("needs exactly one of --netns and --agent")),
        };
        let iface = r.required("--iface")?;
        let iface = r.value("--iface", &iface, "UTF-8")?;
        let mac = r.parsed("--mac", "a MAC address")?;
        let addr = r.parsed("--ip", "an IPv4 address")?;
        let count = match r.optional("--count")? {
            Some(c) => r.value("--count", &c, "a count")?,
            None => 3,
        };
        let after = match r.optional("--after-ms")? {
            Some(ms) => {
                let list: String = r.value("--after-ms", &ms, "UTF-8")?;
                list.split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| {
                        r.value(
                            "--after-ms",
                            std::ffi::OsStr::new(s),
                            "milliseconds, comma-separated",
                        )
                        .map(Duration::from_millis)
                    })
                    .collect::<Result<_, _>>()?
            }
            None => Vec::new(),
        };
        r.finish()?;
        Ok(Refresh {
            access,
            iface,
            mac,
            addr,
            count,
            after,
        })
    }

    /// `exe internal garp-refresh …`, detached: its own process group, no standard streams.
    pub fn detached(&self, exe: &Path) -> std::process::Command {
        use std::os::unix::process::CommandExt;
        let mut cmd = self.command(exe);
        cmd.process_group(0)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        cmd
    }

    /// Sends the announcements (what the refresher process does), 5 ms between frames, each
    /// burst only while the LC still holds the address: a later switch (a rollback right after
    /// the patch) may have moved it away, and announcing it then would point the neighbours
    /// back at an LC that no longer answers for it. Ends at the first burst it skips.
    pub fn run(&self) -> Result<(), InLcError> {
        let start = Instant::now();
        for at in &self.after {
            std::thread::sleep(at.saturating_sub(start.elapsed()));
            let lc = self.access.open()?;
            if !lc
                .addresses(&self.iface)?
                .iter()
                .any(|a| a.addr == self.addr)
            {
                tracing::info!(addr = %self.addr, iface = %self.iface, "the LC no longer holds the service address: no more announcements");
                return Ok(());
            }
            lc.announce(
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

impl HelperCall for Refresh {
    fn verb(&self) -> &'static str {
        Self::VERB
    }

    fn args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        match &self.access {
            LcAccess::Netns(p) => flag(&mut a, "--netns", p),
            LcAccess::Agent { socket } => flag(&mut a, "--agent", socket),
        }
        let after: Vec<String> = self
            .after
            .iter()
            .map(|d| d.as_millis().to_string())
            .collect();
        flag(&mut a, "--iface", &self.iface);
        flag(&mut a, "--mac", self.mac.to_string());
        flag(&mut a, "--ip", self.addr.to_string());
        flag(&mut a, "--count", self.count.to_string());
        flag(&mut a, "--after-ms", after.join(","));
        a
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

    #[test]
    fn a_refresh_reads_back_what_it_wrote() {
        for access in [
            LcAccess::Netns("/proc/42/ns/net".into()),
            LcAccess::Agent {
                socket: "/run/po/lc/lc2/agent.sock".into(),
            },
        ] {
            let r = refresh(access);
            assert_eq!(Refresh::parse(&r.args()).unwrap(), r);
            assert_eq!(Refresh::parse(&r.args()).unwrap().args(), r.args());
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
        let words = |s: &str| s.split(' ').map(OsString::from).collect::<Vec<_>>();
        let tail = "--iface eth0 --mac 02:00:00:00:00:07 --ip 10.0.0.10";
        for (args, want) in [
            (
                tail.to_owned(),
                "internal garp-refresh: needs exactly one of --netns and --agent",
            ),
            (
                format!("--netns /n --agent /a {tail}"),
                "internal garp-refresh: needs exactly one of --netns and --agent",
            ),
            (
                "--netns /n --iface eth0 --mac 02:00 --ip 10.0.0.10".to_owned(),
                "internal garp-refresh: --mac \"02:00\" is not a MAC address",
            ),
            (
                format!("--netns /n {tail} --after-ms 5,x"),
                "internal garp-refresh: --after-ms \"x\" is not milliseconds, comma-separated",
            ),
            (
                format!("--netns /n {tail} --ttl 4"),
                "internal garp-refresh: unexpected argument \"--ttl 4\"",
            ),
        ] {
            let e = Refresh::parse(&words(&args)).unwrap_err();
            assert_eq!(e.to_string(), want, "{args}");
        }
        // What clap filled in before: three frames, no later rounds.
        let r = Refresh::parse(&words(&format!("--netns /n {tail}"))).unwrap();
        assert_eq!((r.count, r.after.len()), (3, 0));
    }
}
