//! Quiescing a writer: what the disk copier needs from whoever runs the writer.
//!
//! The disk copier (seed fig. 8–10) ships the last writes of a live disk while the writer is
//! held still. For an `ns` LC that is the cgroup freezer, for a QEMU LC a paused vCPU, for a
//! benchmark a plain process group. The copier only sees this trait.

use std::io;

/// Something that can hold every writer of a disk still and let it go again.
pub trait Quiesce {
    /// Stops every writer. Returns only when no write can start any more.
    fn freeze(&mut self) -> io::Result<()>;
    /// Lets the writers go on.
    fn thaw(&mut self) -> io::Result<()>;
}

/// For disks nobody writes to (an LC that is stopped): freezing is a no-op.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoWriters;

impl Quiesce for NoWriters {
    fn freeze(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn thaw(&mut self) -> io::Result<()> {
        Ok(())
    }
}
