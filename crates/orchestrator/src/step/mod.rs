//! The patch cycle's steps (seed fig. 7), one variant and one file each.
//!
//! A run is a list of steps ([`patch_steps`] to patch, [`rollback_steps`] to hand the service
//! back to an old LC), each journaled before it acts and after it is done (see
//! `crate::journal`). The journal stores the variant by its [`Step::as_str`] name, the same
//! names runs have always been journaled with, so a journal written by an older patchover is
//! read, shown and recovered alike ([`crate::recover`] matches on this enum).
//!
//! | variant | seed | file |
//! | --- | --- | --- |
//! | [`Step::StandbySearch`] | 701 | `standby_search.rs` |
//! | [`Step::MalwareCheck`] | 702 | `malware_check.rs` |
//! | [`Step::CopySystemDisk`] | 703 | `copy_system_disk.rs` |
//! | [`Step::CopyAppDisk`] | 704 | `copy_app_disk.rs` |
//! | [`Step::InstallPatches`] | 705/706 | `install_patches.rs` |
//! | [`Step::BootStandby`] | 707 | `boot_standby.rs` |
//! | [`Step::PatchReport`] | 1201–1207 | `patch_report.rs` |
//! | [`Step::RebootStandby`] | 708 | `reboot_standby.rs` |
//! | [`Step::PostChecks`] | 709 | `post_checks.rs` |
//! | [`Step::StandbyHealth`] | 709 | `standby_health.rs` |
//! | [`Step::CatchUpAppDisk`] | 704 | `catch_up_app_disk.rs` |
//! | [`Step::CutAppDisk`] | 704 (dry run) | `cut_app_disk.rs` |
//! | [`Step::Switch`] | fig. 13–17, 21–26 | `switch.rs` |
//! | [`Step::Watch`] | 8, issue 23 | `watch.rs` |
//! | [`Step::HandBack`] | 8, issue 23 | `watch.rs` |
//! | [`Step::StopOld`] | 8 | `stop_old.rs` |
//! | [`Step::ReleaseStandby`] | 709 (failure) | `release_standby.rs` |
//! | [`Step::Recover`] | — | `crate::recover` |

mod boot_standby;
mod catch_up_app_disk;
mod copy_app_disk;
mod copy_system_disk;
mod cut_app_disk;
mod install_patches;
mod malware_check;
mod patch_report;
mod post_checks;
mod reboot_standby;
pub(crate) mod release_standby;
pub(crate) mod standby_health;
mod standby_search;
mod stop_old;
mod switch;
pub(crate) mod watch;

#[cfg(test)]
pub(crate) mod fake;

use std::fmt;
use std::str::FromStr;

use crate::context::{Orchestrator, Run};
use crate::{OrchestratorError, ServiceSettings};

pub(crate) use switch::announce_later;

/// One step of a patch run, as the journal, the events and the report name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    /// 701: find an unused LC that covers the active one (or take the named rollback target).
    StandbySearch,
    /// 702: the YARA rules over the system disk.
    MalwareCheck,
    /// 703: the system disk, copied while the service runs and replayed until caught up.
    CopySystemDisk,
    /// 704: the application disk, copied and followed until the cut.
    CopyAppDisk,
    /// 705/706: the bundles, the table copy and the patch execution script on the standby.
    InstallPatches,
    /// 707: the standby boots (without its application disk, still a live copy).
    BootStandby,
    /// 1201–1207: the standby's script applies the patches and reports.
    PatchReport,
    /// 708: the standby reboots so the patches take effect.
    RebootStandby,
    /// 709: the bundles' post-checks on the standby.
    PostChecks,
    /// 709: the service's health on the standby's own address.
    StandbyHealth,
    /// 704: a block-level copy catches up while the service runs, before the cut.
    CatchUpAppDisk,
    /// 704, dry run: the application disk's cut without a switch.
    CutAppDisk,
    /// Claims 4/5: the network switch, with the cut and the restart in its window.
    Switch,
    /// Issue 23: the service is watched on the new LC (`[service] watch_secs`), the old LC
    /// kept booted with its application disk following; a failed check hands the service back.
    Watch,
    /// A failed watch's hand-back: the switch back to the old LC, still running, with the
    /// reverse follow cut in its window (journaled by [`Step::Watch`] and by recovery).
    HandBack,
    /// The old LC stops, kept intact as the rollback target.
    StopOld,
    /// A run that failed before (or rolled back) its switch lets the standby go.
    ReleaseStandby,
    /// A restarted patchover finished or rolled back the run.
    Recover,
}

/// Where a step is: journaled before it acts and after it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepState {
    Started,
    Done,
    Failed,
}

impl Step {
    pub const ALL: [Step; 18] = [
        Step::StandbySearch,
        Step::MalwareCheck,
        Step::CopySystemDisk,
        Step::CopyAppDisk,
        Step::InstallPatches,
        Step::BootStandby,
        Step::PatchReport,
        Step::RebootStandby,
        Step::PostChecks,
        Step::StandbyHealth,
        Step::CatchUpAppDisk,
        Step::CutAppDisk,
        Step::Switch,
        Step::StopOld,
        Step::ReleaseStandby,
        Step::Recover,
        Step::Watch,
        Step::HandBack,
    ];

    /// The name in the journal, the events and the report (unchanged since the journal began).
    pub fn as_str(self) -> &'static str {
        match self {
            Step::StandbySearch => "standby_search",
            Step::MalwareCheck => "malware_check",
            Step::CopySystemDisk => "copy_system_disk",
            Step::CopyAppDisk => "copy_app_disk",
            Step::InstallPatches => "install_patches",
            Step::BootStandby => "boot_standby",
            Step::PatchReport => "patch_report",
            Step::RebootStandby => "reboot_standby",
            Step::PostChecks => "post_checks",
            Step::StandbyHealth => "standby_health",
            Step::CatchUpAppDisk => "catch_up_app_disk",
            Step::CutAppDisk => "cut_app_disk",
            Step::Switch => "switch",
            Step::StopOld => "stop_old",
            Step::ReleaseStandby => "release_standby",
            Step::Recover => "recover",
            Step::Watch => "watch",
            Step::HandBack => "hand_back",
        }
    }

    /// Whether the step has anything to do in this run; one that has not is not journaled.
    pub(crate) fn applies(self, run: &Run, svc: &ServiceSettings) -> bool {
        match self {
            Step::Watch => !svc.watch.is_zero(),
            Step::CopyAppDisk => {
                run.active.app_disk.is_some()
                    && run.standby.as_ref().is_some_and(|s| s.app_disk.is_some())
            }
            Step::CatchUpAppDisk => run.follow.as_ref().is_some_and(|f| f.catches_up()),
            _ => true,
        }
    }

    /// Does the step's work; returns the detail journaled with `done`.
    pub(crate) fn run(
        self,
        o: &mut Orchestrator<'_>,
        run: &mut Run,
    ) -> Result<serde_json::Value, OrchestratorError> {
        match self {
            Step::StandbySearch => standby_search::run(o, run),
            Step::MalwareCheck => malware_check::run(o, run),
            Step::CopySystemDisk => copy_system_disk::run(o, run),
            Step::CopyAppDisk => copy_app_disk::run(o, run),
            Step::InstallPatches => install_patches::run(o, run),
            Step::BootStandby => boot_standby::run(o, run),
            Step::PatchReport => patch_report::run(o, run),
            Step::RebootStandby => reboot_standby::run(o, run),
            Step::PostChecks => post_checks::run(o, run),
            Step::StandbyHealth => standby_health::run(o, run),
            Step::CatchUpAppDisk => catch_up_app_disk::run(o, run),
            Step::CutAppDisk => cut_app_disk::run(o, run),
            Step::Switch => switch::run(o, run),
            Step::StopOld => stop_old::run(o, run),
            Step::Watch => watch::run(o, run),
            // Not in a list: a failed run, a failed watch and recovery journal these themselves.
            Step::ReleaseStandby | Step::Recover | Step::HandBack => {
                Err(OrchestratorError::OutOfOrder {
                    step: self.as_str(),
                    needs: "a failed or an unfinished run",
                })
            }
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name no step has (a journal from a newer patchover, or damaged).
#[derive(Debug, thiserror::Error)]
#[error("no step is called {0:?}")]
pub struct UnknownStep(pub String);

impl FromStr for Step {
    type Err = UnknownStep;
    fn from_str(s: &str) -> Result<Step, UnknownStep> {
        Step::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownStep(s.to_owned()))
    }
}

impl StepState {
    pub fn as_str(self) -> &'static str {
        match self {
            StepState::Started => "started",
            StepState::Done => "done",
            StepState::Failed => "failed",
        }
    }
}

impl FromStr for StepState {
    type Err = UnknownStep;
    fn from_str(s: &str) -> Result<StepState, UnknownStep> {
        [StepState::Started, StepState::Done, StepState::Failed]
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownStep(s.to_owned()))
    }
}

impl fmt::Display for StepState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The steps that patch the active LC's copy and put it in service (seed fig. 7). A system
/// disk the host cannot read while its LC runs (a VM's image) is checked on its copy, after
/// 703, instead of before it.
pub(crate) fn patch_steps(scan_copy: bool) -> Vec<Step> {
    let mut steps = vec![
        Step::StandbySearch,
        Step::MalwareCheck,
        Step::CopySystemDisk,
        Step::CopyAppDisk,
        Step::InstallPatches,
        Step::BootStandby,
        Step::PatchReport,
        Step::RebootStandby,
        Step::PostChecks,
        Step::StandbyHealth,
        Step::CatchUpAppDisk,
        Step::Switch,
        Step::Watch,
        Step::StopOld,
    ];
    if scan_copy {
        steps.swap(1, 2);
    }
    steps
}

/// The steps that hand the service back to the old LC an earlier run kept: only the
/// application disk is copied, nothing is installed or patched.
pub(crate) fn rollback_steps() -> Vec<Step> {
    vec![
        Step::StandbySearch,
        Step::CopyAppDisk,
        Step::BootStandby,
        Step::StandbyHealth,
        Step::CatchUpAppDisk,
        Step::Switch,
        Step::StopOld,
    ]
}

/// A dry run stops before the switch: the application disk is cut instead, and the patched
/// standby is left ready.
pub(crate) fn dry_run(steps: Vec<Step>) -> Vec<Step> {
    let mut steps: Vec<Step> = steps
        .into_iter()
        .take_while(|s| *s != Step::Switch)
        .collect();
    steps.push(Step::CutAppDisk);
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_step_reads_back_from_its_journal_name() {
        for s in Step::ALL {
            assert_eq!(s.as_str().parse::<Step>().unwrap(), s);
        }
        assert!("copy_everything".parse::<Step>().is_err());
        for st in [StepState::Started, StepState::Done, StepState::Failed] {
            assert_eq!(st.as_str().parse::<StepState>().unwrap(), st);
        }
    }

    #[test]
    fn the_journal_names_are_the_ones_runs_were_always_journaled_with() {
        let names: Vec<&str> = Step::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            names,
            [
                "standby_search",
                "malware_check",
                "copy_system_disk",
                "copy_app_disk",
                "install_patches",
                "boot_standby",
                "patch_report",
                "reboot_standby",
                "post_checks",
                "standby_health",
                "catch_up_app_disk",
                "cut_app_disk",
                "switch",
                "stop_old",
                "release_standby",
                "recover",
                "watch",
                "hand_back"
            ]
        );
    }

    #[test]
    fn a_patch_checks_a_vm_copy_after_703_and_a_rollback_installs_nothing() {
        let p = patch_steps(false);
        assert_eq!(p[1..3], [Step::MalwareCheck, Step::CopySystemDisk]);
        let p = patch_steps(true);
        assert_eq!(p[1..3], [Step::CopySystemDisk, Step::MalwareCheck]);
        let r = rollback_steps();
        for s in [
            Step::MalwareCheck,
            Step::CopySystemDisk,
            Step::InstallPatches,
            Step::PatchReport,
            Step::RebootStandby,
            Step::PostChecks,
        ] {
            assert!(!r.contains(&s), "{s}");
        }
        assert_eq!(r.last(), Some(&Step::StopOld));
        let d = dry_run(patch_steps(false));
        assert_eq!(&d[d.len() - 2..], [Step::CatchUpAppDisk, Step::CutAppDisk]);
        assert!(!d.contains(&Step::Switch) && !d.contains(&Step::StopOld));
        assert!(!d.contains(&Step::Watch) && !r.contains(&Step::Watch));
        let p = patch_steps(false);
        assert_eq!(
            &p[p.len() - 3..],
            [Step::Switch, Step::Watch, Step::StopOld]
        );
    }
}
