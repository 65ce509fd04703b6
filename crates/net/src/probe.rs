//! Probes of what the switch needs from the host, made for real in a throw-away network
//! namespace (so the host's own tables are never touched): the xtables NFQUEUE target the
//! SYN hold installs ([`crate::hold`]), nftables (`nft`), connection tracking (`conntrack`),
//! and bridge netfilter (`br_netfilter`). `patchover doctor` reports them.

use std::io;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

/// Runs `program args` in a new network namespace of its own; `Err` says what failed (not
/// found, or the program's exit and stderr).
pub fn in_fresh_netns(program: &str, args: &[&str]) -> io::Result<()> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    // SAFETY: unshare is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
        });
    }
    let out = cmd.output()?;
    if out.status.success() {
        return Ok(());
    }
    Err(io::Error::other(format!(
        "`{program} {}` failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}

/// The SYN hold's rule, installed in a fresh namespace by `iptables-nft` (the xtables NFQUEUE
/// target through nftables' compat layer).
pub fn nfqueue() -> io::Result<()> {
    in_fresh_netns(
        "iptables-nft",
        &[
            "-w",
            "-t",
            "mangle",
            "-A",
            "PREROUTING",
            "-p",
            "tcp",
            "--syn",
            "-j",
            "NFQUEUE",
            "--queue-num",
            "0",
            "--queue-bypass",
        ],
    )
}

/// An nftables table and NAT chain made by `nft` in a fresh namespace.
pub fn nftables() -> io::Result<()> {
    in_fresh_netns(
        "nft",
        &[
            "add table ip po_doctor; add chain ip po_doctor pre { type nat hook prerouting priority -100; }",
        ],
    )
}

/// `conntrack -L` in a fresh namespace: the program and the kernel's `nf_conntrack` netlink.
pub fn conntrack() -> io::Result<()> {
    in_fresh_netns("conntrack", &["-L"])
}

/// Bridge netfilter: its sysctl exists once `br_netfilter` is loaded (`sysctl_dir` is
/// `/proc/sys/net/bridge` on a host).
pub fn br_netfilter(sysctl_dir: &Path) -> io::Result<()> {
    std::fs::read_to_string(sysctl_dir.join("bridge-nf-call-iptables")).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_program_that_is_not_there_or_fails_is_an_error() {
        let e = in_fresh_netns("/nonexistent/nft", &[]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        assert!(br_netfilter(Path::new("/nonexistent")).is_err());
        let e = in_fresh_netns("false", &[]).unwrap_err();
        assert!(e.to_string().contains("`false ` failed"), "{e}");
    }
}
