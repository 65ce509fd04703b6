//! Steps 705/706: put the patch files, the patch table copy and the patch execution script
//! onto the standby's system disk, the script as one of the OS's boot scripts (seed fig. 11).
//!
//! Everything goes under `/var/lib/patchover-agent` on the standby's disk, including a copy of
//! the static agent, so the script does not depend on what the image ships. The script itself
//! is an rcS-style `S05patchover` (before the services) on busybox/SysV images, or a oneshot
//! unit on systemd images.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use patchover_bundle::VerifiedBundle;
use patchover_bundle::table::stage;

/// The agent directory inside the LC, relative to its root.
pub const AGENT_DIR_REL: &str = "var/lib/patchover-agent";

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("installing the patch execution script: {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("installing the patch execution script: the table copy")]
    Table(#[source] patchover_bundle::TableError),
    #[error(
        "the standby's system disk {0} has neither /etc/init.d nor /etc/systemd/system; patchover cannot install a boot script there"
    )]
    NoBootScripts(PathBuf),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> InstallError + 'a {
    move |source| InstallError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Where the script went.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Installed {
    pub script: PathBuf,
    pub bundles: usize,
}

const SCRIPT: &str = r#"#!/bin/sh
# Installed by patchover: the patch execution script (seed fig. 11, 12). It applies the
# patches marked in /var/lib/patchover-agent/table.json once per run and reports to patchover.
case "$1" in
  start)
    /var/lib/patchover-agent/patchover-agent apply-patches /var/lib/patchover-agent \
        >>/var/log/patchover-apply.log 2>&1 \
        || echo "patchover: a patch failed; see /var/log/patchover-apply.log"
    ;;
esac
exit 0
"#;

const UNIT: &str = "[Unit]
Description=patchover patch execution script (seed fig. 12)
DefaultDependencies=no
After=local-fs.target
Before=multi-user.target

[Service]
Type=oneshot
ExecStart=/var/lib/patchover-agent/patchover-agent apply-patches /var/lib/patchover-agent
RemainAfterExit=yes

[Install]
WantedBy=multi-user.target
";

pub fn install(
    sysroot: &Path,
    lc: &str,
    run_id: &str,
    bundles: &[VerifiedBundle],
    keys: &[PathBuf],
    agent: &Path,
) -> Result<Installed, InstallError> {
    let dir = sysroot.join(AGENT_DIR_REL);
    // A previous run's files (its report above all) must not be mistaken for this run's.
    if dir.exists() {
        fs::remove_dir_all(&dir).map_err(io("clearing", &dir))?;
    }
    fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
    stage(&dir, lc, run_id, bundles, keys).map_err(InstallError::Table)?;
    let agent_dest = dir.join("patchover-agent");
    fs::copy(agent, &agent_dest).map_err(io("copying", agent))?;
    fs::set_permissions(&agent_dest, fs::Permissions::from_mode(0o755))
        .map_err(io("chmod", &agent_dest))?;

    let initd = sysroot.join("etc/init.d");
    let systemd = sysroot.join("etc/systemd/system");
    let script = if initd.is_dir() {
        let p = initd.join("S05patchover");
        fs::write(&p, SCRIPT).map_err(io("writing", &p))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).map_err(io("chmod", &p))?;
        p
    } else if systemd.is_dir() {
        let p = systemd.join("patchover-apply.service");
        fs::write(&p, UNIT).map_err(io("writing", &p))?;
        let wants = systemd.join("multi-user.target.wants");
        fs::create_dir_all(&wants).map_err(io("creating", &wants))?;
        let link = wants.join("patchover-apply.service");
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink("../patchover-apply.service", &link)
            .map_err(io("linking", &link))?;
        p
    } else {
        return Err(InstallError::NoBootScripts(sysroot.to_owned()));
    };
    Ok(Installed {
        script,
        bundles: bundles.len(),
    })
}

/// Removes the script and the agent directory (a run that is rolled back leaves no script
/// that would patch at the standby's next boot).
pub fn uninstall(sysroot: &Path) {
    let _ = fs::remove_file(sysroot.join("etc/init.d/S05patchover"));
    let _ = fs::remove_file(
        sysroot.join("etc/systemd/system/multi-user.target.wants/patchover-apply.service"),
    );
    let _ = fs::remove_file(sysroot.join("etc/systemd/system/patchover-apply.service"));
    let _ = fs::remove_dir_all(sysroot.join(AGENT_DIR_REL));
}
