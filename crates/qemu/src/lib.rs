//! The QEMU parts of patchover: how the host talks to a VM LC and copies its disks.
//!
//! A VM LC is a `qemu-system-x86_64` process whose system and application disks are block nodes
//! (`sys`, `app`; see the QEMU conventions in the README). Everything the host does to a running
//! VM goes through QMP, QEMU's JSON control socket:
//!
//! - [`qmp`]: a small blocking QMP client. One reader thread keeps asynchronous events in a
//!   queue while commands wait for their replies, every wait has a deadline, and QEMU exiting is
//!   told apart from QEMU hanging. Typed helpers cover what the backend needs (run state,
//!   stop/cont, power-down, hot-plug of disks and NICs, block jobs).
//! - [`mirror`]: the seed's disk copy with a write history, done by the hypervisor: a
//!   `blockdev-mirror` job copies a disk while the guest writes to it, and a *cut* ends it with a
//!   point-in-time copy that another VM can boot. It is the VM counterpart of `patchover-disk`
//!   (which traps writes with fanotify for namespace LCs).
//! - [`blockserver`]: `qemu-storage-daemon` serving image disks on the host as FUSE export
//!   files (loop-mounted); [`backup`] copies such a disk live with a dirty bitmap and
//!   point-in-time backups (QEMU 7.2 refuses a mirror of a writable FUSE export);
//!   [`nsdisks`] is the `ns` backend's image server built on them (one block server per LC).

pub mod accel;
pub mod backend;
pub mod backup;
pub mod blockserver;
pub mod livecopy;
pub mod mirror;
pub mod nsdisks;
pub mod qmp;

pub use backup::{BackupError, BackupSpec, BitmapCopy, CutTimes, RoundReport, ServedCopy};
pub use mirror::{CutReport, ImageFormat, Mirror, MirrorError, MirrorSpec, Progress};
pub use qmp::{BlockJob, CopyMode, Event, Qmp, QmpError, RunState};
