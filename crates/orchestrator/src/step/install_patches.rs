//! Seed steps 705/706: the verified bundles, the patch table's copy and the patch execution
//! script onto the standby's system disk; the script is installed as one of the standby's own
//! boot scripts (fig. 11).

use crate::context::{Orchestrator, Run};
use crate::{OrchestratorError, copy, install};

pub(super) fn run(
    o: &mut Orchestrator<'_>,
    run: &mut Run,
) -> Result<serde_json::Value, OrchestratorError> {
    let standby = run.standby()?;
    let i = copy::with_root(&standby.system_disk, &o.config.run_dir, |root| {
        Ok(install::install(
            root,
            standby.id.as_str(),
            &run.id().to_string(),
            &run.bundles,
            &o.settings.trusted_keys,
            &o.settings.scoped_keys,
            &o.settings.agent_binary,
        )?)
    })?;
    Ok(serde_json::to_value(i).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::super::Step;
    use super::super::fake::Bed;

    #[test]
    fn the_script_goes_among_the_standbys_boot_scripts_with_the_agent() {
        let mut bed = Bed::new();
        bed.step(Step::StandbySearch).unwrap();
        let sys = bed.disk("lc2", "sys");
        std::fs::create_dir_all(sys.join("etc/init.d")).unwrap();
        let d = bed.step(Step::InstallPatches).unwrap();
        assert_eq!(d["script"], "/etc/init.d/S05patchover");
        assert!(sys.join("etc/init.d/S05patchover").exists());
        assert!(sys.join("var/lib/patchover-agent/patchover-agent").exists());
    }

    #[test]
    fn a_system_without_boot_scripts_fails_the_step() {
        let mut bed = Bed::new();
        bed.step(Step::StandbySearch).unwrap();
        let e = bed.step(Step::InstallPatches).unwrap_err();
        assert!(crate::chain(&e).contains("boot"), "{}", crate::chain(&e));
    }
}
