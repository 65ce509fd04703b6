//! Which LC uses which disk, for every backend: a disk is used by one running LC at a time.
//!
//! A booted LC writes an owner file per disk under `<run_dir>/disks/` naming itself and the
//! process that holds the disk (ns: the LC's init; qemu: the QEMU process) with its start
//! time; an owner whose process is gone (or is another process with a reused PID) no longer
//! counts, so a crash never locks a disk for good.

use std::path::{Path, PathBuf};

use patchover_core::{DiskKind, DiskRole, LcId, LcSpec};

use crate::LcError;
use crate::host::Host;

pub struct DiskOwners<'a> {
    pub host: &'a dyn Host,
    pub run_dir: &'a Path,
}

impl DiskOwners<'_> {
    fn owner_path(&self, disk: &Path) -> PathBuf {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in disk.as_os_str().as_encoded_bytes() {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        self.run_dir.join("disks").join(format!("{h:016x}"))
    }

    /// The LC that holds `disk` now, if its process is alive.
    fn holder(&self, disk: &Path) -> Option<String> {
        let text = self.host.read_file(&self.owner_path(disk)).ok()?;
        let mut lines = text.lines();
        let id = lines.next()?.to_owned();
        let _path = lines.next();
        let pid: i32 = lines.next()?.parse().ok()?;
        let start: u64 = lines.next()?.parse().ok()?;
        (self.host.process_start_time(pid) == Some(start)).then_some(id)
    }

    /// Every disk of `spec` exists, is complete, and is not held by another running LC; the
    /// system disk of a directory LC has its init.
    pub fn check(&self, spec: &LcSpec) -> Result<(), LcError> {
        for d in spec.disks() {
            let what = match d.role {
                DiskRole::System => "system disk",
                DiskRole::Application => "application disk",
            };
            if !self.host.exists(&d.path) {
                return Err(LcError::DiskMissing {
                    lc: spec.id.clone(),
                    what,
                    path: d.path.clone(),
                });
            }
            let marker = patchover_core::incomplete_marker(&d.path, d.kind == DiskKind::Image);
            if self.host.exists(&marker) {
                return Err(LcError::DiskIncomplete {
                    lc: spec.id.clone(),
                    path: d.path.clone(),
                });
            }
            if let Some(other) = self.holder(&d.path)
                && other != spec.id.as_str()
            {
                return Err(LcError::DiskInUse {
                    lc: spec.id.clone(),
                    path: d.path.clone(),
                    other,
                });
            }
        }
        Ok(())
    }

    /// Records that `id`, held alive by process `pid` (started at `start_time`), uses `disks`.
    pub fn claim(
        &self,
        id: &LcId,
        pid: i32,
        start_time: u64,
        disks: &[PathBuf],
    ) -> std::io::Result<()> {
        self.host.create_dir_all(&self.run_dir.join("disks"))?;
        for d in disks {
            self.host.write_file(
                &self.owner_path(d),
                &format!("{id}\n{}\n{pid}\n{start_time}\n", d.display()),
            )?;
        }
        Ok(())
    }

    /// Forgets the claims `id` made on `disks` (another LC's claims stay).
    pub fn release(&self, id: &LcId, disks: impl IntoIterator<Item = PathBuf>) {
        for d in disks {
            let owner = self.owner_path(&d);
            if self
                .host
                .read_file(&owner)
                .is_ok_and(|o| o.lines().next() == Some(id.as_str()))
            {
                let _ = self.host.remove_all(&owner);
            }
        }
    }
}
