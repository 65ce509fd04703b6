//! KVM or TCG: decided by a probe boot with a deadline, not by `/dev/kvm` existing.
//!
//! On some hosts `/dev/kvm` opens and `KVM_CREATE_VM` works, yet a guest never leaves the
//! firmware (nested virtualization that stalls). So the probe boots the LC's own kernel and
//! initramfs with `patchover.probe=1`; the initramfs prints [`PROBE_OK`] on the console and
//! powers off. Only a probe that prints it within the deadline selects KVM. The answer is kept
//! per host boot (`/proc/sys/kernel/random/boot_id`) in the run directory.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// What the initramfs prints when booted with `patchover.probe=1`.
pub const PROBE_OK: &str = "PATCHOVER-PROBE-OK";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// The `-accel` argument.
    pub fn arg(self) -> &'static str {
        match self {
            // A bounded translation cache: TCG's default grows to a quarter of host memory.
            Accel::Tcg => "tcg,tb-size=64",
            Accel::Kvm => "kvm",
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

impl std::str::FromStr for Accel {
    type Err = String;
    fn from_str(s: &str) -> Result<Accel, String> {
        match s {
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            _ => Err(format!("unknown accelerator {s:?}: use kvm or tcg")),
        }
    }
}

/// The probe's finding, as kept in the run directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Probe {
    pub boot_id: String,
    pub accel: Accel,
    /// Why KVM was not chosen, when it was not.
    pub kvm_refused: Option<String>,
    pub probe_ms: u64,
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The accelerator for this host: `PATCHOVER_QEMU_ACCEL` (kvm|tcg) when set, else the cached
/// probe of this host boot, else a new probe (kept in `cache`).
pub fn choose(
    qemu: &Path,
    kernel: &Path,
    initrd: Option<&Path>,
    cache: &Path,
    deadline: Duration,
) -> Result<Probe, String> {
    if let Ok(v) = std::env::var("PATCHOVER_QEMU_ACCEL") {
        let accel = v
            .parse()
            .map_err(|e| format!("PATCHOVER_QEMU_ACCEL: {e}"))?;
        return Ok(Probe {
            boot_id: boot_id(),
            accel,
            kvm_refused: (accel == Accel::Tcg).then(|| "PATCHOVER_QEMU_ACCEL=tcg".to_owned()),
            probe_ms: 0,
        });
    }
    let id = boot_id();
    if let Ok(text) = std::fs::read_to_string(cache)
        && let Ok(p) = serde_json::from_str::<Probe>(&text)
        && p.boot_id == id
    {
        return Ok(p);
    }
    if let Some(dir) = cache.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let start = Instant::now();
    let kvm_refused = probe_kvm(qemu, kernel, initrd, cache, deadline).err();
    let p = Probe {
        boot_id: id,
        accel: if kvm_refused.is_none() {
            Accel::Kvm
        } else {
            Accel::Tcg
        },
        kvm_refused,
        probe_ms: start.elapsed().as_millis() as u64,
    };
    let _ = std::fs::write(cache, serde_json::to_string(&p).unwrap_or_default());
    tracing::info!(accel = %p.accel, why = ?p.kvm_refused, ms = p.probe_ms, "qemu accelerator probed");
    Ok(p)
}

/// Boots the kernel under KVM and waits for [`PROBE_OK`]; `Err` says why KVM is not usable.
fn probe_kvm(
    qemu: &Path,
    kernel: &Path,
    initrd: Option<&Path>,
    cache: &Path,
    deadline: Duration,
) -> Result<(), String> {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return Err("/dev/kvm cannot be opened".to_owned());
    }
    let log: PathBuf = cache.with_extension("probe-console.log");
    let _ = std::fs::remove_file(&log);
    let mut cmd = Command::new(qemu);
    cmd.args(["-accel", "kvm", "-m", "128", "-smp", "1", "-nodefaults"])
        .args(["-no-user-config", "-display", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", "console=ttyS0 panic=-1 quiet patchover.probe=1"]);
    if let Some(i) = initrd {
        cmd.arg("-initrd").arg(i);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", qemu.display()))?;
    let start = Instant::now();
    let ok = loop {
        let printed = std::fs::read_to_string(&log).is_ok_and(|t| t.contains(PROBE_OK));
        if printed {
            break true;
        }
        match child.try_wait() {
            Ok(Some(_)) => break std::fs::read_to_string(&log).is_ok_and(|t| t.contains(PROBE_OK)),
            Ok(None) if start.elapsed() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => break false,
        }
    };
    let _ = child.kill();
    let out = child.wait_with_output().ok();
    let _ = std::fs::remove_file(&log);
    if ok {
        return Ok(());
    }
    let stderr = out
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_owned())
        .unwrap_or_default();
    Err(if stderr.is_empty() {
        format!("a KVM guest did not boot within {deadline:?} (nested KVM that stalls?)")
    } else {
        format!("QEMU with KVM failed: {stderr}")
    })
}
