//! `patchover doctor`: every kernel feature and program patchover relies on, probed for real
//! (a namespace unshared in a child, a cgroup frozen, an fanotify group marked, `openat2`
//! called, the SYN hold's rule and an nftables table made in a throw-away network namespace,
//! a KVM guest booted by the qemu backend's own probe), each with what to do when it is
//! missing. The probes belong to the crates whose work needs them (`lc::probe`,
//! `disk::probe_fanotify`, `lcroot::probe_openat2`, `net::probe`, `qemu::accel`); this module
//! only says which ones the loaded config needs.

use std::path::{Path, PathBuf};

use patchover_core::{BackendKind, Config, DiskKind};
use serde::{Deserialize, Serialize};

use patchover_lc::probe::{self as lcp, CloneFlags};
use patchover_net::probe as netp;

/// What a check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckState {
    Ok,
    /// Missing, and the config (or patchover itself) needs it.
    Missing,
    /// Missing, but nothing the config sets up needs it.
    NotNeeded,
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResult {
    pub name: String,
    pub state: CheckState,
    /// Whether the config (or, without one, patchover's base) needs it.
    pub needed: bool,
    /// What was found: the feature's details, or why it failed.
    pub detail: String,
    /// What to do when it is missing (the package or the modprobe line).
    pub fix: Option<String>,
}

/// Every check, and which config decided what is needed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Doctor {
    /// `None`: no config was loaded; only the base features are needed.
    pub config: Option<PathBuf>,
    pub checks: Vec<CheckResult>,
}

impl Doctor {
    /// Something needed is missing (`patchover doctor` exits 1).
    pub fn failed(&self) -> bool {
        self.checks.iter().any(|c| c.state == CheckState::Missing)
    }
}

/// A probe: what it found, or why it failed.
pub type ProbeFn = Box<dyn FnOnce() -> Result<String, String>>;

/// One check to make.
pub struct Check {
    pub name: &'static str,
    pub needed: bool,
    pub fix: &'static str,
    pub probe: ProbeFn,
}

/// Makes every check.
pub fn run(config: Option<&Config>, checks: Vec<Check>) -> Doctor {
    Doctor {
        config: config.map(|c| c.path.clone()),
        checks: checks.into_iter().map(judge).collect(),
    }
}

fn judge(c: Check) -> CheckResult {
    let (state, detail) = match (c.probe)() {
        Ok(found) => (CheckState::Ok, found),
        Err(why) if c.needed => (CheckState::Missing, why),
        Err(why) => (CheckState::NotNeeded, why),
    };
    CheckResult {
        name: c.name.to_owned(),
        fix: (state != CheckState::Ok).then(|| c.fix.to_owned()),
        state,
        needed: c.needed,
        detail,
    }
}

/// What the config sets up, as far as the checks care.
#[derive(Debug, Clone, Default)]
pub struct Needs {
    /// A `qemu` LC: its kernel and initrd (the accelerator probe boots them).
    pub qemu: Option<(PathBuf, Option<PathBuf>)>,
    /// An `ns` LC with an image disk (served by qemu-storage-daemon, mounted by a loop device).
    pub ns_images: bool,
    /// Where the write trap will be armed: the filesystem of the LCs' disks.
    pub disk_dir: PathBuf,
    /// The qemu backend's accelerator cache and program.
    pub run_dir: PathBuf,
    pub qemu_program: PathBuf,
}

impl Needs {
    pub fn of(config: Option<&Config>) -> Needs {
        let Some(c) = config else {
            return Needs {
                disk_dir: std::env::temp_dir(),
                run_dir: PathBuf::from(patchover_core::config::DEFAULT_RUN_DIR),
                qemu_program: qemu_program(),
                ..Needs::default()
            };
        };
        let qemu = c
            .lcs
            .iter()
            .filter(|l| l.backend == BackendKind::Qemu)
            .find_map(|l| l.qemu.as_ref())
            .map(|q| (q.kernel.clone(), q.initrd.clone()));
        let ns_images = c
            .lcs
            .iter()
            .any(|l| l.backend == BackendKind::Ns && l.disks().any(|d| d.kind == DiskKind::Image));
        let disk = c
            .lcs
            .first()
            .map_or(c.state_dir.clone(), |l| l.system_disk.path.clone());
        Needs {
            qemu,
            ns_images,
            disk_dir: existing_ancestor(&disk),
            run_dir: c.run_dir.clone(),
            qemu_program: patchover_qemu::backend::QemuConfig::from_config(c).qemu,
        }
    }
}

fn qemu_program() -> PathBuf {
    PathBuf::from(std::env::var_os("PATCHOVER_QEMU").unwrap_or_else(|| "qemu-system-x86_64".into()))
}

fn existing_ancestor(p: &Path) -> PathBuf {
    p.ancestors()
        .find(|a| a.is_dir())
        .map_or_else(std::env::temp_dir, Path::to_path_buf)
}

fn io(r: std::io::Result<()>, ok: &str) -> Result<String, String> {
    r.map(|()| ok.to_owned()).map_err(|e| e.to_string())
}

/// Every check of this host, needed as `needs` says.
pub fn checks(needs: &Needs) -> Vec<Check> {
    let mut v = namespace_checks();
    v.extend(kernel_checks(needs));
    v.extend(net_checks());
    v.extend(qemu_checks(needs));
    v.extend(program_checks(needs));
    v
}

fn namespace_checks() -> Vec<Check> {
    let ns = |name, flag: CloneFlags, needed, fix| Check {
        name,
        needed,
        fix,
        probe: Box::new(move || io(lcp::namespace(flag), "unshared in a child")),
    };
    vec![
        ns(
            "mount namespace",
            CloneFlags::CLONE_NEWNS,
            true,
            "a kernel with CONFIG_NAMESPACES; in a container, run patchover privileged (CAP_SYS_ADMIN)",
        ),
        ns(
            "network namespace",
            CloneFlags::CLONE_NEWNET,
            true,
            "a kernel with CONFIG_NET_NS; in a container, run patchover privileged",
        ),
        ns(
            "pid namespace",
            CloneFlags::CLONE_NEWPID,
            true,
            "a kernel with CONFIG_PID_NS; in a container, run patchover privileged",
        ),
        ns(
            "uts namespace",
            CloneFlags::CLONE_NEWUTS,
            true,
            "a kernel with CONFIG_UTS_NS",
        ),
        ns(
            "ipc namespace",
            CloneFlags::CLONE_NEWIPC,
            true,
            "a kernel with CONFIG_IPC_NS",
        ),
        ns(
            "user namespace",
            CloneFlags::CLONE_NEWUSER,
            false,
            "a kernel with CONFIG_USER_NS and user.max_user_namespaces > 0 (sysctl -w user.max_user_namespaces=10000); only mmdebstrap's unshare mode uses it",
        ),
    ]
}

fn kernel_checks(needs: &Needs) -> Vec<Check> {
    let dir = needs.disk_dir.clone();
    let dir2 = needs.disk_dir.clone();
    vec![
        Check {
            name: "cgroup freezer",
            needed: true,
            fix: "mount cgroup v2 (mount -t cgroup2 none /sys/fs/cgroup) or the v1 freezer hierarchy; in a container, give it a writable cgroup tree",
            probe: Box::new(|| {
                let mi =
                    std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
                lcp::freezer(&mi).map_err(|e| e.to_string())
            }),
        },
        Check {
            name: "fanotify (FAN_MARK_FILESYSTEM)",
            needed: true,
            fix: "a kernel >= 5.1 with CONFIG_FANOTIFY, and the LCs' disks on a filesystem with file handles (ext4, xfs, btrfs)",
            probe: Box::new(move || {
                io(
                    patchover_disk::probe_fanotify(&dir),
                    &format!("marked the filesystem of {}", dir.display()),
                )
            }),
        },
        Check {
            name: "openat2 (RESOLVE_IN_ROOT)",
            needed: true,
            fix: "a kernel >= 5.6",
            probe: Box::new(move || {
                io(
                    patchover_lcroot::probe_openat2(&dir2),
                    "`/..` stays in the root",
                )
            }),
        },
        Check {
            name: "loop devices",
            needed: needs.ns_images,
            fix: "modprobe loop",
            probe: Box::new(|| {
                lcp::loop_device(Path::new("/dev/loop-control"))
                    .map(|n| format!("/dev/loop{n} is free"))
                    .map_err(|e| format!("/dev/loop-control: {e}"))
            }),
        },
    ]
}

fn net_checks() -> Vec<Check> {
    vec![
        Check {
            name: "xtables NFQUEUE (SYN hold)",
            needed: true,
            fix: "apt install iptables; modprobe nfnetlink_queue xt_NFQUEUE",
            probe: Box::new(|| {
                io(
                    netp::nfqueue(),
                    "iptables-nft installed an NFQUEUE rule in a fresh namespace",
                )
            }),
        },
        Check {
            name: "br_netfilter",
            needed: true,
            fix: "modprobe br_netfilter",
            probe: Box::new(|| {
                io(
                    netp::br_netfilter(Path::new("/proc/sys/net/bridge")),
                    "bridge-nf-call-iptables is there",
                )
                .map_err(|e| format!("/proc/sys/net/bridge/bridge-nf-call-iptables: {e}"))
            }),
        },
        Check {
            name: "nftables (nft)",
            needed: true,
            fix: "apt install nftables; modprobe nf_tables",
            probe: Box::new(|| {
                io(
                    netp::nftables(),
                    "nft made a NAT chain in a fresh namespace",
                )
            }),
        },
        Check {
            name: "conntrack",
            needed: true,
            fix: "apt install conntrack; modprobe nf_conntrack",
            probe: Box::new(|| {
                io(
                    netp::conntrack(),
                    "conntrack -L answered in a fresh namespace",
                )
            }),
        },
    ]
}

fn qemu_checks(needs: &Needs) -> Vec<Check> {
    let (qemu, cache) = (
        needs.qemu_program.clone(),
        needs.run_dir.join("qemu-accel.json"),
    );
    let boot = needs.qemu.clone();
    vec![Check {
        name: "KVM or TCG",
        needed: needs.qemu.is_some(),
        fix: "modprobe kvm_intel (or kvm_amd) and let root open /dev/kvm; without KVM, VMs run under TCG (slower), which needs qemu-system-x86_64 (apt install qemu-system-x86)",
        probe: Box::new(move || accel(&qemu, boot, &cache)),
    }]
}

/// KVM as the qemu backend decides it (its own probe: a guest booted under KVM within a
/// deadline, kept per host boot) when the config has a VM to boot, else whether `/dev/kvm`
/// opens; without KVM, TCG, which needs the QEMU program.
fn accel(
    qemu: &Path,
    boot: Option<(PathBuf, Option<PathBuf>)>,
    cache: &Path,
) -> Result<String, String> {
    let refused = match boot {
        Some((kernel, initrd)) => {
            let deadline = std::time::Duration::from_secs(8);
            let p =
                patchover_qemu::accel::choose(qemu, &kernel, initrd.as_deref(), cache, deadline)?;
            match p.kvm_refused {
                None => return Ok("kvm: a guest booted under KVM".to_owned()),
                Some(why) => why,
            }
        }
        None => match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
        {
            Ok(_) => {
                return Ok("/dev/kvm opens (a probe boot decides at a VM's first boot)".to_owned());
            }
            Err(e) => format!("/dev/kvm: {e}"),
        },
    };
    match patchover_qemu::backend::which(qemu) {
        Some(q) => Ok(format!("tcg with {} (no KVM: {refused})", q.display())),
        None => Err(format!(
            "no KVM ({refused}) and no {} for TCG",
            qemu.display()
        )),
    }
}

fn program_checks(needs: &Needs) -> Vec<Check> {
    let program = |name: &'static str, path: PathBuf, needed, fix| Check {
        name,
        needed,
        fix,
        probe: Box::new(move || {
            patchover_qemu::backend::which(&path)
                .map(|p| p.display().to_string())
                .ok_or_else(|| format!("{} is not on PATH", path.display()))
        }),
    };
    let qemu_lc = needs.qemu.is_some();
    vec![
        program(
            "qemu-system-x86_64",
            needs.qemu_program.clone(),
            qemu_lc,
            "apt install qemu-system-x86 (or set PATCHOVER_QEMU)",
        ),
        program(
            "qemu-storage-daemon",
            PathBuf::from(patchover_qemu::blockserver::DEFAULT_PROGRAM),
            needs.ns_images,
            "apt install qemu-system-common",
        ),
        program(
            "busybox",
            PathBuf::from("busybox"),
            false,
            "apt install busybox-static (for `image build-demo`)",
        ),
        program(
            "mmdebstrap",
            PathBuf::from("mmdebstrap"),
            false,
            "apt install mmdebstrap (for `image build-debian`)",
        ),
        guest("patchover-agent", true),
        guest("patchover-demo", false),
    ]
}

/// A static guest binary where the lookup finds it ($PATCHOVER_GUEST_DIR, the package's
/// /usr/lib/patchover, a checkout's build tree): the agent is installed into every standby.
fn guest(name: &'static str, needed: bool) -> Check {
    Check {
        name,
        needed,
        fix: "install the patchover package (/usr/lib/patchover), set PATCHOVER_GUEST_DIR, or run scripts/build-guest in a source checkout",
        probe: Box::new(move || {
            patchover_image::GuestDirs::of_this_process()
                .find(name)
                .map(|p| p.display().to_string())
                .map_err(|e| e.to_string())
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(needed: bool, r: Result<&'static str, &'static str>) -> Check {
        Check {
            name: "x",
            needed,
            fix: "apt install x",
            probe: Box::new(move || r.map(str::to_owned).map_err(str::to_owned)),
        }
    }

    #[test]
    fn only_a_missing_needed_feature_fails_and_each_missing_one_says_its_fix() {
        let d = run(
            None,
            vec![check(true, Ok("fine")), check(false, Err("gone"))],
        );
        assert!(!d.failed(), "{d:?}");
        assert_eq!(d.checks[0].state, CheckState::Ok);
        assert_eq!(d.checks[0].fix, None);
        assert_eq!(d.checks[1].state, CheckState::NotNeeded);
        assert_eq!(d.checks[1].fix.as_deref(), Some("apt install x"));
        let d = run(None, vec![check(true, Err("gone"))]);
        assert!(d.failed());
        assert_eq!(d.checks[0].state, CheckState::Missing);
        assert_eq!(d.checks[0].detail, "gone");
    }

    #[test]
    fn a_program_not_on_path_is_missing() {
        let needs = Needs {
            qemu: Some((PathBuf::from("/k"), None)),
            qemu_program: PathBuf::from("/nonexistent/qemu-system-x86_64"),
            ..Needs::of(None)
        };
        let d = run(None, program_checks(&needs));
        let q = &d.checks[0];
        assert_eq!(
            (q.name.as_str(), q.state),
            ("qemu-system-x86_64", CheckState::Missing),
            "{d:?}"
        );
        assert!(q.fix.as_deref().unwrap().contains("qemu-system-x86"));
    }
}
