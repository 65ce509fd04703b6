//! Steps 705/706: put the patch files, the patch table copy and the patch execution script
//! onto the standby's system disk, the script as one of the OS's boot scripts (seed fig. 11).
//!
//! Everything goes under `/var/lib/patchover-agent` on the standby's disk, including a copy of
//! the static agent, so the script does not depend on what the image ships. The script itself
//! is an rcS-style `S05patchover` (before the services) on busybox/SysV images, or a oneshot
//! unit on systemd images.

use std::path::{Path, PathBuf};

use patchover_bundle::VerifiedBundle;
use patchover_bundle::table::stage;
use patchover_lcroot::LcRoot;

/// The agent directory inside the LC, relative to its root.
pub const AGENT_DIR_REL: &str = "var/lib/patchover-agent";

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("installing the patch execution script")]
    Root(#[source] patchover_lcroot::RootError),
    #[error("installing the patch execution script: the table copy")]
    Table(#[source] patchover_bundle::TableError),
    #[error(
        "the standby's system disk {0} has neither /etc/init.d nor /etc/systemd/system; patchover cannot install a boot script there"
    )]
    NoBootScripts(PathBuf),
    #[error(
        "the standby's system disk {0} boots its sysvinit scripts in parallel from insserv's makefiles, which would skip the patch execution script; create /etc/init.d/.legacy-bootordering in the image (as `patchover image build-debian` does)"
    )]
    ParallelBoot(PathBuf),
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
    root: &LcRoot,
    lc: &str,
    run_id: &str,
    bundles: &[VerifiedBundle],
    keys: &[PathBuf],
    scoped_keys: &[patchover_bundle::ScopedKey],
    agent: &Path,
) -> Result<Installed, InstallError> {
    let dir = Path::new(AGENT_DIR_REL);
    // A previous run's files (its report above all) must not be mistaken for this run's.
    root.remove_all(dir).map_err(InstallError::Root)?;
    root.mkdir_all(dir, 0o755).map_err(InstallError::Root)?;
    stage(root, dir, lc, run_id, bundles, keys, scoped_keys).map_err(InstallError::Table)?;
    root.copy_in(agent, &dir.join("patchover-agent"), 0o755)
        .map_err(InstallError::Root)?;

    // Both are looked up as the LC would (links inside the LC resolve inside its root).
    // A Debian image has /etc/init.d under either init: systemd is recognised by its init.
    let systemd = root.is_dir(Path::new("etc/systemd/system")) && init_is_systemd(root);
    let script = if !systemd && root.is_dir(Path::new("etc/init.d")) {
        let p = Path::new(INIT_SCRIPT);
        // Debian's sysvinit runs the links in /etc/rcS.d, not /etc/init.d/S??*: the script
        // goes last into the boot runlevel, after the filesystems, before any service.
        let sysv_rc = root.is_dir(Path::new("etc/rcS.d"));
        if sysv_rc
            && root
                .stat(Path::new("etc/init.d/.depend.boot"))
                .ok()
                .flatten()
                .is_some()
            && root
                .stat(Path::new(LEGACY_ORDERING))
                .ok()
                .flatten()
                .is_none()
        {
            return Err(InstallError::ParallelBoot(root.host_path().to_owned()));
        }
        root.write_file(p, SCRIPT.as_bytes(), 0o755)
            .map_err(InstallError::Root)?;
        if sysv_rc {
            root.symlink(Path::new(RCS_LINK), Path::new("../init.d/S05patchover"))
                .map_err(InstallError::Root)?;
        }
        p
    } else if root.is_dir(Path::new("etc/systemd/system")) {
        let p = Path::new(UNIT_FILE);
        root.write_file(p, UNIT.as_bytes(), 0o644)
            .map_err(InstallError::Root)?;
        root.symlink(
            Path::new(UNIT_WANTS),
            Path::new("../patchover-apply.service"),
        )
        .map_err(InstallError::Root)?;
        p
    } else {
        return Err(InstallError::NoBootScripts(root.host_path().to_owned()));
    };
    Ok(Installed {
        script: Path::new("/").join(script),
        bundles: bundles.len(),
    })
}

const INIT_SCRIPT: &str = "etc/init.d/S05patchover";
const RCS_LINK: &str = "etc/rcS.d/S99patchover";
const LEGACY_ORDERING: &str = "etc/init.d/.legacy-bootordering";

/// Is the LC's `/sbin/init` systemd (the same file as `/lib/systemd/systemd`)?
fn init_is_systemd(root: &LcRoot) -> bool {
    let id = |p: &str| {
        root.stat(Path::new(p))
            .ok()
            .flatten()
            .map(|s| (s.st_dev, s.st_ino))
    };
    let init = id("sbin/init");
    init.is_some() && init == id("lib/systemd/systemd")
}
const UNIT_FILE: &str = "etc/systemd/system/patchover-apply.service";
const UNIT_WANTS: &str = "etc/systemd/system/multi-user.target.wants/patchover-apply.service";

/// Removes the script and the agent directory (a run that is rolled back leaves no script
/// that would patch at the standby's next boot).
pub fn uninstall(root: &LcRoot) {
    for f in [RCS_LINK, INIT_SCRIPT, UNIT_WANTS, UNIT_FILE] {
        if let Err(e) = root.remove_file(Path::new(f)) {
            tracing::warn!(error = %e, "removing the patch execution script");
        }
    }
    if let Err(e) = root.remove_all(Path::new(AGENT_DIR_REL)) {
        tracing::warn!(error = %e, "removing the agent directory");
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::symlink;

    use super::*;

    /// A systemd root whose unit directories are links out of it (absolute and relative): the
    /// unit, its `wants` link, the agent and the table land inside the root; the host's
    /// directories keep what they had.
    #[test]
    fn a_systemd_root_with_links_out_keeps_every_write_inside() {
        let t = tempfile::tempdir().unwrap();
        let (root, host) = (t.path().join("root"), t.path().join("host"));
        fs::create_dir_all(host.join("units")).unwrap();
        fs::write(host.join("units/keep"), "host's").unwrap();
        fs::write(host.join("agent-bin"), "agent").unwrap();
        fs::create_dir_all(root.join("etc/systemd/system")).unwrap();
        fs::create_dir_all(root.join("var/lib")).unwrap();
        // The wants directory: absolute link to the host's; the unit file: relative link out.
        symlink(
            host.join("units"),
            root.join("etc/systemd/system/multi-user.target.wants"),
        )
        .unwrap();
        symlink(
            "../../../../../../../../../../host/units/keep",
            root.join("etc/systemd/system/patchover-apply.service"),
        )
        .unwrap();
        symlink(host.join("units"), root.join("var/lib/patchover-agent")).unwrap();
        let lc = LcRoot::open(&root).unwrap();
        // The absolute link points at nothing inside the root: refused, the host untouched.
        let e = install(&lc, "lc2", "1", &[], &[], &[], &host.join("agent-bin")).unwrap_err();
        assert!(format!("{e:?}").contains("NotADirectory"), "{e:?}");
        assert_eq!(fs::read_dir(host.join("units")).unwrap().count(), 1);
        // Made to exist inside (as the LC would see it): the writes go there.
        fs::create_dir_all(root.join(host.join("units").strip_prefix("/").unwrap())).unwrap();
        let i = install(&lc, "lc2", "1", &[], &[], &[], &host.join("agent-bin")).unwrap();
        assert_eq!(i.script, Path::new("/").join(UNIT_FILE));
        assert_eq!(fs::read_dir(host.join("units")).unwrap().count(), 1);
        assert_eq!(
            fs::read_to_string(host.join("units/keep")).unwrap(),
            "host's"
        );
        let unit = root.join(UNIT_FILE);
        assert!(fs::symlink_metadata(&unit).unwrap().is_file());
        assert_eq!(fs::read_to_string(unit).unwrap(), UNIT);
        uninstall(&lc);
        assert_eq!(fs::read_dir(host.join("units")).unwrap().count(), 1);
        assert!(fs::symlink_metadata(root.join(UNIT_FILE)).is_err());
    }

    /// Debian: sysvinit runs the `rcS.d` link (not `/etc/init.d/S05patchover` by itself);
    /// systemd (with an `/etc/init.d` of its own) gets the unit; insserv's parallel boot,
    /// which would skip the link, is refused.
    #[test]
    fn debian_images_get_the_script_their_init_runs() {
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("agent-bin"), "agent").unwrap();
        let agent = t.path().join("agent-bin");
        let sysv = t.path().join("sysv");
        for d in [
            "etc/init.d",
            "etc/rcS.d",
            "etc/systemd/system",
            "sbin",
            "var/lib",
        ] {
            fs::create_dir_all(sysv.join(d)).unwrap();
        }
        fs::write(sysv.join("sbin/init"), "sysvinit").unwrap();
        fs::write(sysv.join("etc/init.d/.depend.boot"), "TARGETS = x").unwrap();
        let lc = LcRoot::open(&sysv).unwrap();
        let e = install(&lc, "lc2", "1", &[], &[], &[], &agent).unwrap_err();
        assert!(matches!(e, InstallError::ParallelBoot(_)), "{e:?}");
        fs::write(sysv.join(LEGACY_ORDERING), "").unwrap();
        let i = install(&lc, "lc2", "1", &[], &[], &[], &agent).unwrap();
        assert_eq!(i.script, Path::new("/").join(INIT_SCRIPT));
        assert_eq!(
            fs::read_link(sysv.join(RCS_LINK)).unwrap(),
            Path::new("../init.d/S05patchover")
        );
        assert!(!sysv.join(UNIT_FILE).exists());
        uninstall(&lc);
        assert!(fs::symlink_metadata(sysv.join(RCS_LINK)).is_err());

        let sd = t.path().join("systemd");
        for d in [
            "etc/init.d",
            "etc/systemd/system/multi-user.target.wants",
            "usr/lib/systemd",
            "usr/sbin",
            "var/lib",
        ] {
            fs::create_dir_all(sd.join(d)).unwrap();
        }
        symlink("usr/lib", sd.join("lib")).unwrap();
        symlink("usr/sbin", sd.join("sbin")).unwrap();
        fs::write(sd.join("usr/lib/systemd/systemd"), "systemd").unwrap();
        symlink("/lib/systemd/systemd", sd.join("usr/sbin/init")).unwrap();
        let lc = LcRoot::open(&sd).unwrap();
        let i = install(&lc, "lc2", "1", &[], &[], &[], &agent).unwrap();
        assert_eq!(i.script, Path::new("/").join(UNIT_FILE));
        assert!(!sd.join(INIT_SCRIPT).exists());
    }
}
