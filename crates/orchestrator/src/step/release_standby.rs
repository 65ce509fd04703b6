//! A run that fails before its switch (or whose switch rolled back) lets the standby go: it
//! is stopped, the patch execution script leaves its system disk (so nothing patches it at
//! its next boot), and it is an unused LC again. Its disks keep what the copy left (an
//! unfinished copy stays marked incomplete). Recovery does the same for a dead run.

use patchover_core::LcSpec;
use patchover_lc::LcState;
use patchover_store::Role;

use crate::context::Orchestrator;
use crate::copy::{self, LiveCopy};
use crate::install;

/// Releases `s`, ending the live copy `follow` first. Best effort; says what it did (and how
/// far an unfinished copy got).
pub(crate) fn release(
    o: &mut Orchestrator<'_>,
    s: &LcSpec,
    follow: Option<LiveCopy>,
) -> serde_json::Value {
    let copied = follow.as_ref().and_then(LiveCopy::progress);
    drop(follow);
    let mut stopped = false;
    if o.backend
        .status(s)
        .is_ok_and(|st| st.state != LcState::Stopped)
    {
        stopped = o.backend.stop(s).is_ok();
    }
    let _ = copy::with_root(&s.system_disk, &o.config.run_dir, |root| {
        install::uninstall(root);
        Ok(())
    });
    let _ = o.store.set_role(s.id.as_str(), Role::Unused);
    let mut detail = serde_json::json!({"standby": s.id, "stopped": stopped});
    if let Some(p) = copied {
        detail["copied"] = serde_json::to_value(p).unwrap_or_default();
    }
    detail
}

#[cfg(test)]
mod tests {
    use super::super::Step;
    use super::super::fake::Bed;
    use patchover_store::Role;

    #[test]
    fn the_standby_stops_loses_its_script_and_is_unused_again() {
        let mut bed = Bed::new();
        bed.step(Step::StandbySearch).unwrap();
        let sys = bed.disk("lc2", "sys");
        std::fs::create_dir_all(sys.join("etc/init.d")).unwrap();
        bed.step(Step::InstallPatches).unwrap();
        bed.step(Step::CopyAppDisk).unwrap();
        bed.step(Step::BootStandby).unwrap();
        assert_eq!(bed.role("lc2"), Role::Standby);
        let d = bed.release();
        assert_eq!(d["stopped"], true);
        assert_eq!(
            d["copied"]["bytes_copied"], 1234,
            "how far the copy got: {d}"
        );
        assert!(!sys.join("etc/init.d/S05patchover").exists());
        assert!(!sys.join("var/lib/patchover-agent").exists());
        assert_eq!(bed.role("lc2"), Role::Unused);
        let calls = bed.backend.calls();
        let dropped = calls.iter().position(|c| c == "drop copy lc1").unwrap();
        let stop = calls.iter().position(|c| c == "stop lc2").unwrap();
        assert!(
            dropped < stop,
            "the copy ends before the standby stops: {calls:?}"
        );
    }
}
