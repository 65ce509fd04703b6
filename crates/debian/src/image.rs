//! `patchover image build-debian`: a real Debian root filesystem for an `ns` LC, made by
//! mmdebstrap from the archive the host's apt is configured for.
//!
//! - By default the suite *as released* (no `-updates`, no `-security`): the image then has
//!   real pending updates, which is what `bundle from-apt` turns into a patch.
//! - Init is sysvinit (`docs/debian.md` says why): its boot scripts run one after the other
//!   in the order insserv numbered them (`/etc/init.d/.legacy-bootordering`), so a link in
//!   `/etc/rcS.d` (the patch execution script) runs; getty lines leave `/etc/inittab` (an LC
//!   has no terminals); the scripts that mount, check or clock the hardware are unlinked (the
//!   `ns` backend mounts the LC's filesystems itself).
//! - The packages' own services are enabled by their maintainer scripts; the agent gets an
//!   init script of its own (`/etc/init.d/patchover-agent`).
//! - Built trees are cached, keyed by suite, package list and the archive's state (a digest
//!   of its signed Release files); an LC never boots from the cache, only from its own copy
//!   (`cp --reflink=auto`), into which the current agent binary is put.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use sha2::{Digest, Sha256};

use crate::apt::{AptEnv, AptError, hex};
use crate::run::{ToolError, run};
use crate::sources::Source;

/// Bumped whenever the customization below changes, so older cached trees are not reused.
const LAYOUT: &str = "patchover-debian-image-2";

/// The agent's path inside the LC (the `ns` backend's agent directory is bound at boot).
pub const AGENT_IN_LC: &str = "usr/sbin/patchover-agent";

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("invalid package name {0:?}")]
    BadPackage(String),
    #[error("invalid suite name {0:?}")]
    BadSuite(String),
    #[error("{} exists and is not empty; pass --force to replace it", .0.display())]
    Exists(PathBuf),
    #[error("reading the archive's state")]
    Archive(#[source] AptError),
    #[error("mmdebstrap")]
    Mmdebstrap(#[source] ToolError),
    #[error("customizing the image: {what}")]
    Customize {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("enabling the agent's init script")]
    EnableAgent(#[source] ToolError),
    #[error("copying the cached image to {}", dir.display())]
    Copy {
        dir: PathBuf,
        #[source]
        source: ToolError,
    },
    #[error("making the QEMU LC's files")]
    Vm(#[source] patchover_image::ImageError),
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub suite: String,
    /// The packages asked for (sysvinit-core is always added).
    pub packages: Vec<String>,
    /// The archive: the host's sources for the suite (see [`crate::sources::for_suite`]).
    pub sources: Vec<Source>,
    /// Where built trees are kept.
    pub cache_dir: PathBuf,
    /// The static agent binary to put into the LC's copy.
    pub agent: PathBuf,
    /// Replace a non-empty DIR.
    pub force: bool,
    /// The tree is for a QEMU LC: `iproute2` is added, and the boot script that applies the
    /// kernel command line the host builds ([`add_qemu_boot`]).
    pub qemu: bool,
}

impl BuildOptions {
    /// The options for `suite` from the host's apt sources (`/etc/apt`): the suite as
    /// released, or with `with_updates` also its `-updates` and `-security` suites.
    pub fn from_host(
        suite: &str,
        packages: Vec<String>,
        with_updates: bool,
        agent: PathBuf,
    ) -> Result<BuildOptions, crate::sources::SourcesError> {
        let etc = Path::new("/etc/apt");
        let all = crate::sources::host_sources(etc)?;
        Ok(BuildOptions {
            suite: suite.to_owned(),
            packages,
            sources: crate::sources::for_suite(&all, suite, with_updates, etc)?,
            cache_dir: std::env::var_os("PATCHOVER_DEBIAN_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE_DIR)),
            agent,
            force: false,
            qemu: false,
        })
    }
}

impl ImageError {
    /// Caused by what was asked (exit code 2), not by the host.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            ImageError::BadPackage(_) | ImageError::BadSuite(_) | ImageError::Exists(_)
        ) || matches!(self, ImageError::Vm(e) if e.is_bad_input())
    }
}

/// What was built.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Built {
    pub dir: PathBuf,
    pub suite: String,
    pub packages: Vec<String>,
    pub cache_key: String,
    /// The tree came from the cache (no mmdebstrap run).
    pub cached: bool,
    pub build_secs: f64,
    pub copy_secs: f64,
}

pub const DEFAULT_CACHE_DIR: &str = "/var/cache/patchover/debian";

/// Builds (or takes from the cache) the tree and copies it to `dir`.
pub fn build_debian(dir: &Path, opts: &BuildOptions) -> Result<Built, ImageError> {
    if opts.suite.is_empty()
        || !opts
            .suite
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(ImageError::BadSuite(opts.suite.clone()));
    }
    let mut packages = opts.packages.clone();
    for p in &packages {
        if !valid_package(p) {
            return Err(ImageError::BadPackage(p.clone()));
        }
    }
    packages.push("sysvinit-core".into());
    if opts.qemu {
        // What the host runs inside a VM through its agent (`patchover_net::lc::agent`):
        // busybox's `ip`, `wget` and `arping`, whose options and output it reads.
        // Static, so each of the many short execs is cheap in a TCG guest.
        packages.push("busybox-static".into());
    }
    packages.sort();
    packages.dedup();
    let nonempty = fs::read_dir(dir)
        .map(|mut d| d.next().is_some())
        .unwrap_or(false);
    if nonempty && !opts.force {
        return Err(ImageError::Exists(dir.to_owned()));
    }

    let started = Instant::now();
    let arch = host_arch();
    let apt = AptEnv::new(&opts.sources, &arch, "").map_err(ImageError::Archive)?;
    apt.update().map_err(ImageError::Archive)?;
    let state = apt.archive_state().map_err(ImageError::Archive)?;
    let key = cache_key(&opts.suite, &packages, &opts.sources, &state);
    let cached_tree = opts.cache_dir.join(&key);
    let cached = cached_tree.join(".patchover-complete").is_file();
    if !cached {
        build_tree(&cached_tree, &opts.suite, &packages, &opts.sources, &arch)?;
    }
    let build_secs = started.elapsed().as_secs_f64();

    let started = Instant::now();
    copy_out(&cached_tree, dir, &opts.agent)?;
    if opts.qemu {
        add_qemu_boot(dir)?;
    }
    Ok(Built {
        dir: dir.to_owned(),
        suite: opts.suite.clone(),
        packages,
        cache_key: key,
        cached,
        build_secs,
        copy_secs: started.elapsed().as_secs_f64(),
    })
}

fn valid_package(p: &str) -> bool {
    p.len() >= 2
        && p.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && p.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c))
}

/// The host's dpkg architecture.
pub fn host_arch() -> String {
    Command::new("dpkg")
        .arg("--print-architecture")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "amd64".into())
}

fn cache_key(suite: &str, packages: &[String], sources: &[Source], state: &str) -> String {
    let mut h = Sha256::new();
    h.update(format!("{LAYOUT}\n{suite}\n{}\n", packages.join(",")));
    for s in sources {
        h.update(format!("{s}\n"));
    }
    h.update(state);
    format!("{suite}-{}", &hex(&h.finalize())[..16])
}

fn build_tree(
    tree: &Path,
    suite: &str,
    packages: &[String],
    sources: &[Source],
    arch: &str,
) -> Result<(), ImageError> {
    let parent = tree.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(parent).map_err(|source| ImageError::Io {
        what: "creating the image cache",
        path: parent.to_owned(),
        source,
    })?;
    // Built beside, renamed into place when complete: a crash leaves no tree that looks done.
    let tmp = parent.join(format!(
        ".building-{}-{}",
        tree.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let _ = fs::remove_dir_all(&tmp);
    let mut c = Command::new("mmdebstrap");
    c.args([
        "--mode=root",
        "--format=directory",
        "--variant=minbase",
        "--quiet",
    ])
    .arg(format!("--architectures={arch}"))
    .arg(format!("--include={}", packages.join(",")))
    .arg("--components=main")
    .arg(suite)
    .arg(&tmp);
    // Naming the sources keeps mmdebstrap from adding -updates and -security by itself.
    for s in sources {
        c.arg(s.to_string());
    }
    let r = run(c, "mmdebstrap")
        .map_err(ImageError::Mmdebstrap)
        .and_then(|_| customize(&tmp))
        .and_then(|_| {
            let _ = fs::remove_dir_all(tree);
            fs::rename(&tmp, tree).map_err(|source| ImageError::Io {
                what: "moving the built image into the cache at",
                path: tree.to_owned(),
                source,
            })
        })
        .and_then(|_| {
            fs::write(tree.join(".patchover-complete"), LAYOUT).map_err(|source| ImageError::Io {
                what: "marking the cached image complete",
                path: tree.to_owned(),
                source,
            })
        });
    if r.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    r
}

/// The agent's init script: started in every multi-user runlevel, before the services.
const AGENT_INIT: &str = r#"#!/bin/sh
### BEGIN INIT INFO
# Provides:          patchover-agent
# Required-Start:
# Required-Stop:
# Default-Start:     2 3 4 5
# Default-Stop:      0 1 6
# Short-Description: patchover's in-LC agent
### END INIT INFO
# Installed by patchover image build-debian.
PIDFILE=/run/patchover-agent.pid
case "$1" in
  start)
    start-stop-daemon --start --background --make-pidfile --pidfile $PIDFILE \
        --exec /usr/sbin/patchover-agent -- serve
    ;;
  stop)
    start-stop-daemon --stop --quiet --oknodo --retry 5 --pidfile $PIDFILE --remove-pidfile
    ;;
  restart) "$0" stop; "$0" start ;;
  status) start-stop-daemon --status --pidfile $PIDFILE ;;
  *) echo "usage: $0 start|stop|restart|status"; exit 2 ;;
esac
"#;

/// rc links of scripts that manage hardware or mount filesystems: in an `ns` LC the backend
/// mounts `/proc`, `/sys`, `/dev` and the disks, and there is no clock or console to set.
/// `hostname.sh` would replace the LC's hostname (set by the backend) with the build host's.
const UNLINK: &[&str] = &[
    "hostname.sh",
    "hwclock.sh",
    "mountkernfs.sh",
    "mount-configfs",
    "mountdevsubfs.sh",
    "checkroot.sh",
    "checkfs.sh",
    "checkroot-bootclean.sh",
    "mountall.sh",
    "mountall-bootclean.sh",
    "mountnfs.sh",
    "mountnfs-bootclean.sh",
    "brightness",
    "umountfs",
    "umountnfs.sh",
    "umountroot",
];

fn customize(root: &Path) -> Result<(), ImageError> {
    let io = |what: &str| {
        let what = what.to_owned();
        move |source| ImageError::Customize { what, source }
    };
    let inittab = root.join("etc/inittab");
    let text = fs::read_to_string(&inittab).map_err(io("reading /etc/inittab"))?;
    // SIGINT (ctrl-alt-del) halts the LC: runlevel 0's stop scripts, then init ends.
    let text: String = text
        .lines()
        .filter(|l| !l.contains("getty"))
        .map(|l| match l.starts_with("ca:") {
            true => "ca:12345:ctrlaltdel:/sbin/shutdown -t1 -h now\n".to_owned(),
            false => format!("{l}\n"),
        })
        .collect();
    fs::write(&inittab, text).map_err(io("writing /etc/inittab"))?;

    let script = root.join("etc/init.d/patchover-agent");
    fs::write(&script, AGENT_INIT).map_err(io("writing the agent's init script"))?;
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755))
        .map_err(io("chmod the agent's init script"))?;
    let mut c = Command::new("chroot");
    c.arg(root)
        .args(["update-rc.d", "patchover-agent", "defaults"]);
    run(c, "coreutils").map_err(ImageError::EnableAgent)?;

    for rc in ["S", "0", "1", "2", "3", "4", "5", "6"] {
        let d = root.join(format!("etc/rc{rc}.d"));
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.len() > 3 && UNLINK.contains(&&name[3..]) {
                fs::remove_file(e.path()).map_err(io("unlinking a boot script"))?;
            }
        }
    }
    fs::write(root.join("etc/init.d/.legacy-bootordering"), "")
        .map_err(io("choosing sequential boot ordering"))?;
    Ok(())
}

/// `image build-debian --qemu`: the Debian tree (with [`BuildOptions::qemu`] set) as a QEMU
/// LC's files in `dir` (`vmlinuz`, `initrd.img`, `system.img`, `app.img`), with the demo
/// image's kernel and initramfs (`patchover_image::qemu::images_from_tree`).
pub fn build_debian_qemu(dir: &Path, opts: &BuildOptions) -> Result<Built, ImageError> {
    let opts = BuildOptions {
        qemu: true,
        ..opts.clone()
    };
    let deb = patchover_image::qemu::find_kernel_deb(None).map_err(ImageError::Vm)?;
    let busybox = patchover_image::busybox().map_err(ImageError::Vm)?;
    let out = patchover_image::prepare_output(dir, opts.force).map_err(ImageError::Vm)?;
    let (tree, app) = (
        out.path().join(".work/rootfs"),
        out.path().join(".work/app"),
    );
    fs::create_dir_all(&app).map_err(|source| ImageError::Io {
        what: "creating",
        path: app.clone(),
        source,
    })?;
    let mut built = build_debian(
        &tree,
        &BuildOptions {
            force: true,
            ..opts
        },
    )?;
    patchover_image::qemu::images_from_tree(out.path(), &tree, &app, &busybox, &deb)
        .map_err(ImageError::Vm)?;
    let work = out.path().join(".work");
    fs::remove_dir_all(&work).map_err(|source| ImageError::Io {
        what: "removing",
        path: work,
        source,
    })?;
    out.finish(dir).map_err(ImageError::Vm)?;
    built.dir = dir.to_owned();
    Ok(built)
}

/// The first boot script of a QEMU LC (`/etc/rcS.d/S00patchover-qemu`): applies what the host
/// put on the kernel command line (hostname, NICs by MAC, the application disk) and waits for
/// the agent's virtio port. The same conventions as the demo's QEMU image (docs/lc-qemu.md).
const QEMU_BOOT: &str = r#"#!/bin/sh
### BEGIN INIT INFO
# Provides:          patchover-qemu
# Required-Start:
# Required-Stop:
# Default-Start:     S
# Default-Stop:
# Short-Description: patchover: the host's kernel command line for a QEMU LC
### END INIT INFO
PATH=/sbin:/bin:/usr/sbin:/usr/bin
cmdline=$(cat /proc/cmdline)
case " $cmdline " in
    *" patchover.hostname="*|*" patchover.nic="*) ;;
    *) exit 0 ;;
esac
case "$1" in
  start)
    ip link set dev lo up
    for arg in $cmdline; do
        case "$arg" in
            patchover.hostname=*) hostname "${arg#patchover.hostname=}" ;;
            patchover.nic=*)
                spec=${arg#patchover.nic=}
                name=${spec%%,*}; rest=${spec#*,}
                mac=$(echo "${rest%%,*}" | tr A-F a-f); addr=${rest#*,}
                gw=
                case "$addr" in *,*) gw=${addr#*,}; addr=${addr%%,*} ;; esac
                found=
                for dev in /sys/class/net/*; do
                    [ "$(cat "$dev/address" 2>/dev/null)" = "$mac" ] && found=${dev##*/}
                done
                if [ -z "$found" ]; then
                    echo "patchover-qemu: no interface has MAC $mac (for $name)" >&2
                    continue
                fi
                [ "$found" = "$name" ] || ip link set dev "$found" name "$name"
                [ "$addr" = "-" ] || ip addr add "$addr" dev "$name"
                ip link set dev "$name" up
                [ -z "$gw" ] || ip route add default via "$gw" dev "$name"
                ;;
            patchover.app=*)
                spec=${arg#patchover.app=}; dev=${spec%%,*}; dir=${spec#*,}
                mkdir -p "$dir"
                n=0
                while [ ! -b "$dev" ] && [ $n -lt 100 ]; do sleep 0.05; n=$((n + 1)); done
                mount -t ext4 "$dev" "$dir" || echo "patchover-qemu: cannot mount $dev on $dir" >&2
                ;;
        esac
    done
    n=0
    while ! grep -qx org.patchover.agent /sys/class/virtio-ports/*/name 2>/dev/null \
        && [ $n -lt 100 ]; do
        sleep 0.05; n=$((n + 1))
    done
    ;;
  stop)
    for arg in $cmdline; do
        case "$arg" in
            patchover.app=*) umount "${arg#*,}" 2>/dev/null ;;
        esac
    done
    sync
    ;;
esac
exit 0
"#;

/// Makes the tree at `root` boot as a QEMU LC: [`QEMU_BOOT`] first in the boot runlevel,
/// and its stop part in the halt runlevel (unmount the application disk, sync); busybox's
/// `ip`, `wget` and `arping` in `/usr/bin` (on the agent's PATH) for the host's in-guest
/// checks and address moves. (The agent keeps its place after the services: the host checks
/// the service's health soon after the agent answers.)
pub fn add_qemu_boot(root: &Path) -> Result<(), ImageError> {
    let io = |what: &'static str| {
        move |source| ImageError::Io {
            what,
            path: root.to_owned(),
            source,
        }
    };
    let script = root.join("etc/init.d/patchover-qemu");
    fs::write(&script, QEMU_BOOT).map_err(io("writing the QEMU boot script in"))?;
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755))
        .map_err(io("chmod the QEMU boot script in"))?;
    for applet in ["ip", "wget", "arping"] {
        let l = root.join("usr/bin").join(applet);
        let _ = fs::remove_file(&l);
        std::os::unix::fs::symlink("/bin/busybox", &l)
            .map_err(io("linking a busybox applet in"))?;
    }
    for (link, rc) in [
        ("S00patchover-qemu", "rcS.d"),
        ("K01patchover-qemu", "rc0.d"),
    ] {
        let l = root.join("etc").join(rc).join(link);
        let _ = fs::remove_file(&l);
        std::os::unix::fs::symlink("../init.d/patchover-qemu", &l)
            .map_err(io("linking the QEMU boot script in"))?;
    }
    Ok(())
}

/// Copies the cached tree to `dir` (through a temporary directory beside it) and puts the
/// agent in.
fn copy_out(tree: &Path, dir: &Path, agent: &Path) -> Result<(), ImageError> {
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(|source| ImageError::Io {
        what: "creating",
        path: parent.to_owned(),
        source,
    })?;
    let tmp = parent.join(format!(".patchover-debian-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    let mut c = Command::new("cp");
    c.args(["-a", "--reflink=auto"]).arg(tree).arg(&tmp);
    let r = run(c, "coreutils")
        .map_err(|source| ImageError::Copy {
            dir: dir.to_owned(),
            source,
        })
        .and_then(|_| {
            let _ = fs::remove_file(tmp.join(".patchover-complete"));
            let to = tmp.join(AGENT_IN_LC);
            fs::copy(agent, &to)
                .and_then(|_| fs::set_permissions(&to, fs::Permissions::from_mode(0o755)))
                .map_err(|source| ImageError::Io {
                    what: "copying the agent from",
                    path: agent.to_owned(),
                    source,
                })
        })
        .and_then(|_| {
            if dir.exists() {
                fs::remove_dir_all(dir).map_err(|source| ImageError::Io {
                    what: "removing",
                    path: dir.to_owned(),
                    source,
                })?;
            }
            fs::rename(&tmp, dir).map_err(|source| ImageError::Io {
                what: "moving the image to",
                path: dir.to_owned(),
                source,
            })
        });
    if r.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_names_are_checked_before_anything_runs() {
        for bad in ["", "a", "Nginx", "-x", "a b", "a;rm", "../x"] {
            assert!(!valid_package(bad), "{bad}");
        }
        for good in ["nginx", "nginx-light", "libstdc++6", "postgresql-15", "g++"] {
            assert!(valid_package(good), "{good}");
        }
    }

    #[test]
    fn the_cache_key_changes_with_what_the_image_is_made_of() {
        let s = vec![Source::parse_line("deb http://x/ bookworm main").unwrap()];
        let p = vec!["nginx".to_owned()];
        let k = cache_key("bookworm", &p, &s, "state1");
        assert_eq!(k, cache_key("bookworm", &p, &s, "state1"));
        assert_ne!(k, cache_key("bookworm", &p, &s, "state2"));
        assert_ne!(k, cache_key("bookworm", &["redis".into()], &s, "state1"));
        assert!(k.starts_with("bookworm-"));
    }
}
