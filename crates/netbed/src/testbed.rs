//! A throw-away switch topology made only of network namespaces, for tests and `bench switch`.
//!
//! Everything lives in namespaces this module creates (with unique names), so nothing on the
//! real host changes and tests can run in parallel: a "host" namespace with the bridge (and the
//! NAT of `seamless`), two LC namespaces `a` and `b` with a veth each, and a client namespace —
//! on the bridge for `path`/`readdress`, behind the host as a router for `seamless`, where a
//! routed hop is needed. Dropping the [`Testbed`] deletes every namespace, and with them every
//! link and rule it made, also when the test failed.
//!
//! Set-up uses `ip` commands (no output is parsed): this is scaffolding, not the switcher.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use patchover_core::{Ipv4Cidr, MacAddr};

use patchover_net::garp::GarpConfig;
use patchover_net::health::HealthCheck;
use patchover_net::lc::LcAccess;
use patchover_net::netns::{NetnsError, in_netns};
use patchover_net::switch::{Endpoint, Mode, SwitchPlan};

/// Building the test topology failed.
#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    #[error("testbed: `{cmd}` failed: {stderr}")]
    Cmd { cmd: String, stderr: String },
    #[error("testbed: cannot run `{cmd}` (install iproute2)")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("testbed: sysctl {key}")]
    Sysctl {
        key: String,
        #[source]
        source: std::io::Error,
    },
    #[error("testbed")]
    Netns(#[from] NetnsError),
    #[error("testbed: service NAT")]
    Nft(#[from] patchover_net::nft::NftError),
}

/// The service port of the testbed.
pub const PORT: u16 = 8080;

/// A topology for one switch mode. Dropping it removes everything.
pub struct Testbed {
    pub id: String,
    pub mode: Mode,
    pub host_netns: PathBuf,
    pub bridge: String,
    pub service: Ipv4Cidr,
    pub a: Endpoint,
    pub b: Endpoint,
    /// Where clients run.
    pub client_netns: PathBuf,
    pub lock_path: PathBuf,
    namespaces: Vec<String>,
}

fn unique_id() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mix = (std::process::id() << 12) ^ nanos ^ (N.fetch_add(1, Ordering::SeqCst) << 24);
    format!("{:08x}", mix)
}

fn ip(args: &[&str]) -> Result<(), TestbedError> {
    let cmd = format!("ip {}", args.join(" "));
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| TestbedError::Spawn {
            cmd: cmd.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(TestbedError::Cmd {
            cmd,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

fn sysctl(netns: &Path, key: &str, value: &str) -> Result<(), TestbedError> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    in_netns(Some(netns), || std::fs::write(&path, value))?.map_err(|source| TestbedError::Sysctl {
        key: key.to_string(),
        source,
    })
}

impl Testbed {
    /// Builds the topology for `mode`.
    pub fn new(mode: Mode) -> Result<Testbed, TestbedError> {
        let id = unique_id();
        let ns = |role: &str| format!("po{role}-{id}");
        let mut tb = Testbed {
            id: id.clone(),
            mode,
            host_netns: PathBuf::from(format!("/run/netns/{}", ns("h"))),
            bridge: "pobr".into(),
            service: match mode {
                Mode::Seamless => "10.97.0.10/32".parse().expect("literal"),
                _ => "10.99.0.10/24".parse().expect("literal"),
            },
            a: Endpoint {
                name: "a".into(),
                access: LcAccess::Netns(PathBuf::from(format!("/run/netns/{}", ns("a")))),
                host_port: "poan0".into(),
                iface: "eth0".into(),
                mac: MacAddr([0x02, 0x50, 0, 0, 0, 0x0a]),
                address: "10.99.0.11/24".parse().expect("literal"),
                identity: "lc-a".into(),
            },
            b: Endpoint {
                name: "b".into(),
                access: LcAccess::Netns(PathBuf::from(format!("/run/netns/{}", ns("b")))),
                host_port: "pobn0".into(),
                iface: "eth0".into(),
                mac: MacAddr([0x02, 0x50, 0, 0, 0, 0x0b]),
                address: "10.99.0.12/24".parse().expect("literal"),
                identity: "lc-b".into(),
            },
            client_netns: PathBuf::from(format!("/run/netns/{}", ns("c"))),
            lock_path: std::env::temp_dir().join(format!("patchover-switch-{id}.lock")),
            namespaces: Vec::new(),
        };
        if mode == Mode::Path {
            // One NIC identity: both LCs carry the service address and the same MAC.
            tb.a.address = tb.service;
            tb.b.address = tb.service;
            tb.b.mac = tb.a.mac;
        }
        for role in ["h", "a", "b", "c"] {
            if role == "a" || role == "b" {
                // The LCs' namespaces are made as patchover makes an LC's: with a TCP table
                // of their own (patchover_netlink::tcptable), so the drain's look is the same.
                let made = PathBuf::from(format!("/run/netns/{}", ns(role)));
                patchover_netlink::tcptable::create_with_own_tcp_table(
                    patchover_netlink::tcptable::LC_TCP_TABLE_BUCKETS,
                    &made,
                    || ip(&["netns", "add", &ns(role)]),
                )
                .map_err(|e| TestbedError::Sysctl {
                    key: "net.ipv4.tcp_child_ehash_entries".into(),
                    source: std::io::Error::other(patchover_core::error_chain(&e)),
                })?
                .0?;
            } else {
                ip(&["netns", "add", &ns(role)])?;
            }
            tb.namespaces.push(ns(role));
            ip(&["-n", &ns(role), "link", "set", "lo", "up"])?;
        }
        let h = ns("h");
        ip(&["-n", &h, "link", "add", "pobr", "type", "bridge"])?;
        ip(&["-n", &h, "link", "set", "pobr", "up"])?;
        ip(&["-n", &h, "addr", "add", "10.99.0.1/24", "dev", "pobr"])?;
        sysctl(&tb.host_netns, "net.ipv4.ip_forward", "1")?;
        for (ep, attach, extra) in [
            (&tb.a, true, mode == Mode::Readdress),
            (&tb.b, mode != Mode::Path, false),
        ] {
            let lc = format!("po{}-{id}", ep.name);
            ip(&[
                "-n",
                &h,
                "link",
                "add",
                &ep.host_port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &lc,
            ])?;
            ip(&[
                "-n",
                &lc,
                "link",
                "set",
                "eth0",
                "address",
                &ep.mac.to_string(),
            ])?;
            ip(&[
                "-n",
                &lc,
                "addr",
                "add",
                &ep.address.to_string(),
                "dev",
                "eth0",
            ])?;
            if extra {
                ip(&[
                    "-n",
                    &lc,
                    "addr",
                    "add",
                    &tb.service.to_string(),
                    "dev",
                    "eth0",
                ])?;
            }
            ip(&["-n", &lc, "link", "set", "eth0", "up"])?;
            ip(&["-n", &lc, "route", "add", "default", "via", "10.99.0.1"])?;
            ip(&["-n", &h, "link", "set", &ep.host_port, "up"])?;
            if attach {
                ip(&["-n", &h, "link", "set", &ep.host_port, "master", "pobr"])?;
            }
        }
        let c = ns("c");
        if mode == Mode::Seamless {
            ip(&[
                "-n", &h, "link", "add", "porc0", "type", "veth", "peer", "name", "eth0", "netns",
                &c,
            ])?;
            ip(&["-n", &h, "addr", "add", "10.98.0.1/24", "dev", "porc0"])?;
            ip(&["-n", &h, "link", "set", "porc0", "up"])?;
            ip(&["-n", &c, "addr", "add", "10.98.0.2/24", "dev", "eth0"])?;
            ip(&["-n", &c, "link", "set", "eth0", "up"])?;
            ip(&["-n", &c, "route", "add", "default", "via", "10.98.0.1"])?;
            // The host owns the service address; the NAT sends it on to the active LC.
            ip(&[
                "-n",
                &h,
                "addr",
                "add",
                &tb.service.to_string(),
                "dev",
                "lo",
            ])?;
            patchover_net::seamless_setup(
                Some(&tb.host_netns),
                tb.service.addr,
                tb.a.address.addr,
            )?;
        } else {
            ip(&[
                "-n", &h, "link", "add", "pocn0", "type", "veth", "peer", "name", "eth0", "netns",
                &c,
            ])?;
            ip(&["-n", &h, "link", "set", "pocn0", "master", "pobr"])?;
            ip(&["-n", &h, "link", "set", "pocn0", "up"])?;
            ip(&["-n", &c, "addr", "add", "10.99.0.200/24", "dev", "eth0"])?;
            ip(&["-n", &c, "link", "set", "eth0", "up"])?;
        }
        // Many short connections from one client: reuse TIME_WAIT ports, use the whole range.
        sysctl(
            &tb.client_netns,
            "net.ipv4.ip_local_port_range",
            "1024 65000",
        )?;
        sysctl(&tb.client_netns, "net.ipv4.tcp_tw_reuse", "1")?;
        Ok(tb)
    }

    /// The plan that moves the service from `a` to `b` (`a_to_b`) or back.
    pub fn plan(&self, a_to_b: bool) -> SwitchPlan {
        let (from, to) = if a_to_b {
            (self.a.clone(), self.b.clone())
        } else {
            (self.b.clone(), self.a.clone())
        };
        SwitchPlan {
            host_netns: Some(self.host_netns.clone()),
            bridge: self.bridge.clone(),
            service: self.service,
            from,
            to,
            mode: self.mode,
            health: HealthCheck {
                patience: Duration::from_millis(500),
                ..HealthCheck::new(PORT, "/version", "")
            },
            check_from: None,
            garp: GarpConfig {
                count: 3,
                interval: Duration::from_millis(2),
                refresh_after: vec![Duration::from_millis(500)],
            },
            drain_deadline: Duration::from_secs(2),
            queue: 7,
            lock_path: self.lock_path.clone(),
            handoff: false,
            // Tests switch back and forth: the target may have been drained by an earlier
            // switch (resuming a reference server that is not drained changes nothing).
            resume_to: true,
        }
    }

    /// The URL clients use.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}:{PORT}{path}", self.service.addr)
    }

    /// The service address.
    pub fn service_addr(&self) -> Ipv4Addr {
        self.service.addr
    }
}

/// A namespace on the bridge that claims an address; removed on drop.
pub struct Stranger(String);

impl Stranger {
    /// Claims `addr` (`ADDR/PREFIX`) from a new namespace on `tb`'s bridge, MAC
    /// 02:66:66:66:66:66.
    pub fn claim(tb: &Testbed, addr: &str) -> Stranger {
        let name = format!("pox-{}", tb.id);
        let h = format!("poh-{}", tb.id);
        let run = |args: &[&str]| {
            let st = std::process::Command::new("ip")
                .args(args)
                .status()
                .unwrap();
            assert!(st.success(), "ip {args:?}");
        };
        run(&["netns", "add", &name]);
        let s = Stranger(name.clone());
        run(&[
            "-n", &h, "link", "add", "poxn0", "type", "veth", "peer", "name", "eth0", "netns",
            &name,
        ]);
        run(&[
            "-n",
            &name,
            "link",
            "set",
            "eth0",
            "address",
            "02:66:66:66:66:66",
        ]);
        run(&["-n", &name, "addr", "add", addr, "dev", "eth0", "nodad"]);
        run(&["-n", &name, "link", "set", "eth0", "up"]);
        run(&["-n", &h, "link", "set", "poxn0", "master", "pobr", "up"]);
        // The claim is made once both ends carry traffic: the switcher's probe must meet an
        // owner that can answer, not a link still coming up.
        let up = |ns: &str, dev: &str| {
            let out = std::process::Command::new("ip")
                .args(["-n", ns, "-j", "link", "show", dev])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).contains("\"operstate\":\"UP\"")
        };
        let t0 = std::time::Instant::now();
        while !(up(&name, "eth0") && up(&h, "poxn0")) {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "the stranger's link never came up"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        s
    }
}

impl Drop for Stranger {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

impl Stranger {
    /// The stranger's network namespace.
    pub fn netns(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.0))
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            if let Err(e) = ip(&["netns", "del", ns]) {
                tracing::warn!(error = %e, "testbed cleanup");
            }
        }
        let _ = std::fs::remove_file(&self.lock_path);
    }
}
