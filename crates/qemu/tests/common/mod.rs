//! A real QEMU for the tests: no guest and no CPU running (`-S`), a disk on a virtio-blk device
//! and QMP. The tests write "as the guest" with HMP `qemu-io -d` on the device's block backend:
//! those writes take the guest's path through the mirror filter (`qemu-io` on a bare node name
//! would not, and its temporary backend drains the node, which wakes a rate-limited job).

#![allow(dead_code)] // each test binary uses a part

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use patchover_qemu::Qmp;

/// A QEMU process killed (and reaped) on drop.
pub struct QemuGuard {
    pub child: Child,
    pub qmp_path: PathBuf,
    pub dir: tempfile::TempDir,
}

impl QemuGuard {
    /// Starts `qemu-system-x86_64 -machine q35 -S` (TCG) with a raw source image `src.img` of
    /// `size` bytes filled by `fill` (file node `src-file`, format node `src`) on a virtio-blk
    /// device `src-dev`. The VM stays in `prelaunch`.
    pub fn start(size: usize, fill: &[u8]) -> QemuGuard {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.img");
        let mut f = fs::File::create(&src).unwrap();
        assert_eq!(fill.len(), size);
        f.write_all(fill).unwrap();
        f.sync_all().unwrap();
        let qmp_path = dir.path().join("qmp.sock");
        let child = Command::new("qemu-system-x86_64")
            .args(["-machine", "q35", "-accel", "tcg", "-S", "-m", "64"])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
            .arg("-blockdev")
            .arg(format!(
                "driver=file,filename={},node-name=src-file",
                src.display()
            ))
            .args(["-blockdev", "driver=raw,file=src-file,node-name=src"])
            .args(["-device", "virtio-blk-pci,drive=src,id=src-dev"])
            .stdin(Stdio::null())
            .stdout(Stdio::null()) // qemu-io (HMP) prints its reports here
            .stderr(Stdio::inherit())
            .spawn()
            .expect("qemu-system-x86_64 must be installed (apt-get install qemu-system-x86)");
        QemuGuard {
            child,
            qmp_path,
            dir,
        }
    }

    pub fn src(&self) -> PathBuf {
        self.dir.path().join("src.img")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn connect(&self) -> Qmp {
        Qmp::connect(&self.qmp_path, Duration::from_secs(10)).expect("QMP connect")
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for QemuGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Deterministic pseudo-random bytes (xorshift64*).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

/// Writes `len` bytes of `pattern` at `offset` through the virtio-blk device `dev` (HMP
/// `qemu-io -d`), as the guest would, and applies the same write to `model`.
pub fn guest_write(
    qmp: &mut Qmp,
    dev: &str,
    pattern: u8,
    offset: usize,
    len: usize,
    model: &mut [u8],
) {
    let out = qmp
        .human_monitor_command(&format!(
            "qemu-io -d /machine/peripheral/{dev}/virtio-backend \"write -P 0x{pattern:02x} {offset} {len}\""
        ))
        .expect("qemu-io write");
    assert!(out.trim().is_empty(), "qemu-io said: {out}");
    model[offset..offset + len].fill(pattern);
}

/// The first differing offset of two buffers, for readable failures.
pub fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

pub fn assert_same(what: &str, got: &Path, want: &[u8]) {
    let data = fs::read(got).unwrap();
    assert_eq!(
        first_diff(&data, want),
        None,
        "{what} ({}) differs from the expected content",
        got.display()
    );
}
