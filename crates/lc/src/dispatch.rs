//! One [`LcBackend`] over several: each call goes to the backend the LC's spec names, so the
//! orchestrator, the daemon and the CLI handle `ns` and `qemu` LCs alike.

use std::path::Path;
use std::time::Duration;

use patchover_core::{BackendKind, LcSpec, NicSpec};

use crate::migrate::{Copied, DiskCopyError, LiveCopy, Migratable, Pausable};
use crate::{ExecOutput, LcBackend, LcError, LcStatus, Stdio};

pub struct ByKind {
    pub ns: Box<dyn LcBackend + Send + Sync>,
    /// `None` when this build has no qemu backend.
    pub qemu: Option<Box<dyn LcBackend + Send + Sync>>,
}

impl ByKind {
    fn of(&self, spec: &LcSpec) -> Result<&dyn LcBackend, LcError> {
        match spec.backend {
            BackendKind::Ns => Ok(self.ns.as_ref()),
            BackendKind::Qemu => self
                .qemu
                .as_deref()
                .map(|b| b as &dyn LcBackend)
                .ok_or_else(|| LcError::Unsupported {
                    lc: spec.id.clone(),
                    message: "the qemu backend is not available here".to_owned(),
                }),
        }
    }
}

impl Pausable for ByKind {
    fn set_frozen(&self, spec: &LcSpec, frozen: bool) -> Result<(), LcError> {
        self.of(spec)?.set_frozen(spec, frozen)
    }
}

impl Migratable for ByKind {
    fn copy_system_disk(
        &self,
        active: &LcSpec,
        dst: &Path,
        progress: &dyn crate::Progress,
    ) -> Result<Copied, DiskCopyError> {
        self.of(active)
            .map_err(DiskCopyError::system)?
            .copy_system_disk(active, dst, progress)
    }
    fn live_copy(
        &self,
        active: &LcSpec,
        src: &patchover_core::DiskSpec,
        dst: &patchover_core::DiskSpec,
        progress: std::sync::Arc<dyn crate::Progress>,
    ) -> Result<Box<dyn LiveCopy>, DiskCopyError> {
        self.of(active)
            .map_err(DiskCopyError::application)?
            .live_copy(active, src, dst, progress)
    }
    fn end_leftover_copies(&self, active: &LcSpec) -> Vec<String> {
        self.of(active)
            .map(|b| b.end_leftover_copies(active))
            .unwrap_or_default()
    }
    fn watch_writes(
        &self,
        active: &LcSpec,
        disk: &patchover_core::DiskSpec,
    ) -> Result<Box<dyn crate::WriteWatch>, DiskCopyError> {
        self.of(active)
            .map_err(DiskCopyError::application)?
            .watch_writes(active, disk)
    }
}

impl LcBackend for ByKind {
    fn boot(&self, spec: &LcSpec) -> Result<LcStatus, LcError> {
        self.of(spec)?.boot(spec)
    }
    fn reboot(&self, spec: &LcSpec) -> Result<LcStatus, LcError> {
        self.of(spec)?.reboot(spec)
    }
    fn stop(&self, spec: &LcSpec) -> Result<(), LcError> {
        self.of(spec)?.stop(spec)
    }
    fn status(&self, spec: &LcSpec) -> Result<LcStatus, LcError> {
        self.of(spec)?.status(spec)
    }
    fn exec(&self, spec: &LcSpec, argv: &[String], stdio: Stdio) -> Result<ExecOutput, LcError> {
        self.of(spec)?.exec(spec, argv, stdio)
    }
    fn attach_disk(&self, spec: &LcSpec, source: &Path, at: &Path) -> Result<(), LcError> {
        self.of(spec)?.attach_disk(spec, source, at)
    }
    fn attach_nic(&self, spec: &LcSpec, nic: &NicSpec) -> Result<String, LcError> {
        self.of(spec)?.attach_nic(spec, nic)
    }
    fn wait_agent(
        &self,
        spec: &LcSpec,
        timeout: Duration,
    ) -> Result<patchover_agent::Response, LcError> {
        self.of(spec)?.wait_agent(spec, timeout)
    }
    fn agent(&self, spec: &LcSpec) -> Result<patchover_agent::AgentClient, LcError> {
        self.of(spec)?.agent(spec)
    }
    fn access(&self, spec: &LcSpec) -> Result<crate::Access, LcError> {
        self.of(spec)?.access(spec)
    }
    fn system_disk_readable_live(&self, spec: &LcSpec) -> bool {
        self.of(spec)
            .is_ok_and(|b| b.system_disk_readable_live(spec))
    }
    fn has_agent(&self, spec: &LcSpec) -> bool {
        self.of(spec).is_ok_and(|b| b.has_agent(spec))
    }
    fn console_log(&self, spec: &LcSpec) -> std::path::PathBuf {
        match self.of(spec) {
            Ok(b) => b.console_log(spec),
            Err(_) => self.ns.console_log(spec),
        }
    }
}
