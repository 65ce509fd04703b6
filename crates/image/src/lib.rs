//! Image builders for the demo LCs: `patchover image build-demo DIR` makes a bootable
//! busybox rootfs with the agent and the demo service, whose boot scripts (seed fig. 11) start
//! both; with `--qemu` ([`qemu`]) the same tree becomes an ext4 disk image beside a kernel and
//! an initramfs.
//!
//! The guest binaries (`patchover-agent`, `patchover-demo`) must be static, since the rootfs
//! has no C library ([`is_static_elf`] reads the ELF program headers). They are found
//! ([`GuestDirs`]) in `$PATCHOVER_GUEST_DIR` when it is set, then where the package installs
//! them (`/usr/lib/patchover`), then in a development checkout's build tree next to the
//! running binary; `scripts/build-guest` builds them, `scripts/deb` packages them.

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Returns a [`ImageError::Failed`] built like `format!`.
macro_rules! fail {
    ($($t:tt)*) => {
        return Err(ImageError::Failed(format!($($t)*)))
    };
}

pub mod qemu;

/// An image cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// What was asked cannot be done as asked (the target exists, a part is missing or
    /// unusable); nothing at the target was changed.
    #[error("{0}")]
    Refused(String),
    /// A tool or an input failed; the message says which and what to do.
    #[error("{0}")]
    Failed(String),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl ImageError {
    /// Whether the caller can fix it (exit code 2), rather than the host.
    pub fn is_bad_input(&self) -> bool {
        matches!(self, ImageError::Refused(_))
    }
}

/// `.ctx(|| what)` on an I/O result: the error says what was being done.
pub(crate) trait IoContext<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T, ImageError>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T, ImageError> {
        self.map_err(|source| ImageError::Io {
            what: what(),
            source,
        })
    }
}

/// True for an ELF file without a program interpreter (statically linked).
pub fn is_static_elf(path: &Path) -> bool {
    let Ok(data) = fs::read(path) else {
        return false;
    };
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(data[o..o + 4].try_into().expect("4 bytes"));
    let phoff = u64::from_le_bytes(data[32..40].try_into().expect("8 bytes")) as usize;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    (0..phnum).all(|i| {
        let o = phoff + i * phentsize;
        // PT_INTERP = 3
        o + 4 <= data.len() && u32_at(o) != 3
    })
}

/// Where the package (`scripts/deb`) installs the static guest binaries.
pub const PACKAGE_GUEST_DIR: &str = "/usr/lib/patchover";

/// The environment variable that names the guest binaries' directory explicitly.
pub const GUEST_DIR_ENV: &str = "PATCHOVER_GUEST_DIR";

/// The places guest binaries are looked for, in order: the explicit setting
/// (`$PATCHOVER_GUEST_DIR`), the package's directory ([`PACKAGE_GUEST_DIR`]), then the build
/// tree of a development checkout next to the running binary (`target/…/release`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestDirs {
    pub explicit: Option<PathBuf>,
    pub package: PathBuf,
    pub build_tree: Vec<PathBuf>,
}

impl GuestDirs {
    /// This process's places: the environment, `/usr/lib/patchover`, and the directories
    /// near the running executable.
    pub fn of_this_process() -> GuestDirs {
        let exe = std::env::current_exe().ok();
        GuestDirs {
            explicit: std::env::var_os(GUEST_DIR_ENV).map(PathBuf::from),
            package: PathBuf::from(PACKAGE_GUEST_DIR),
            build_tree: exe.as_deref().map(build_tree_near).unwrap_or_default(),
        }
    }

    fn in_order(&self) -> impl Iterator<Item = &PathBuf> {
        self.explicit
            .iter()
            .chain(std::iter::once(&self.package))
            .chain(&self.build_tree)
    }

    /// Finds the static guest binary `name` in the first place that has it.
    pub fn find(&self, name: &str) -> Result<PathBuf, ImageError> {
        let mut dynamic = None;
        for p in self.in_order().map(|d| d.join(name)) {
            if p.is_file() {
                if is_static_elf(&p) {
                    return Ok(p);
                }
                dynamic.get_or_insert(p);
            }
        }
        Err(ImageError::Refused(match dynamic {
            Some(p) => format!(
                "{} is linked dynamically and would not run inside an LC; build the static guest binaries with `scripts/build-guest`",
                p.display()
            ),
            None => self.not_found(name),
        }))
    }

    fn not_found(&self, name: &str) -> String {
        let explicit = match &self.explicit {
            Some(d) => format!("${GUEST_DIR_ENV} ({})", d.display()),
            None => format!("${GUEST_DIR_ENV} (not set)"),
        };
        let tree: Vec<String> = self
            .build_tree
            .iter()
            .map(|d| d.display().to_string())
            .collect();
        format!(
            "cannot find the static guest binary {name}: not in {explicit}, not in the package's {}, \
             not in the build tree near this binary ({}); install the patchover package, set \
             ${GUEST_DIR_ENV}, or build them with `scripts/build-guest`",
            self.package.display(),
            if tree.is_empty() {
                "none".to_owned()
            } else {
                tree.join(", ")
            },
        )
    }
}

/// A development checkout's places for a binary at `exe`: its own directory, and the static
/// target's release directory one and two levels up (`target/debug/patchover`,
/// `target/debug/deps/test-…`).
fn build_tree_near(exe: &Path) -> Vec<PathBuf> {
    let Some(exe_dir) = exe.parent() else {
        return Vec::new();
    };
    let mut dirs = vec![exe_dir.to_owned()];
    for up in [exe_dir.parent(), exe_dir.parent().and_then(Path::parent)]
        .into_iter()
        .flatten()
    {
        dirs.push(up.join("x86_64-unknown-linux-gnu/release"));
        dirs.push(up.join("target/x86_64-unknown-linux-gnu/release"));
    }
    dirs
}

/// Finds a static guest binary by name ([`GuestDirs::of_this_process`]).
pub fn guest_binary(name: &str) -> Result<PathBuf, ImageError> {
    GuestDirs::of_this_process().find(name)
}

/// A static busybox, installing Debian's busybox-static when there is none.
pub fn busybox() -> Result<PathBuf, ImageError> {
    let candidates = ["/bin/busybox", "/usr/bin/busybox"];
    let find = || {
        candidates
            .iter()
            .map(PathBuf::from)
            .find(|p| is_static_elf(p))
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    eprintln!("no static busybox found; installing Debian's busybox-static");
    let status = Command::new("apt-get")
        .args(["install", "-y", "-qq", "busybox-static"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status();
    match (status, find()) {
        (_, Some(p)) => Ok(p),
        (Ok(s), None) => fail!(
            "apt-get install busybox-static ended with {s} and left no static busybox; install it by hand"
        ),
        (Err(e), None) => {
            fail!("cannot run apt-get to install busybox-static ({e}); install it by hand")
        }
    }
}

pub fn write(path: &Path, text: &str, mode: u32) -> Result<(), ImageError> {
    fs::write(path, text).ctx(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .ctx(|| format!("chmod {}", path.display()))
}

const INITTAB: &str = "\
# patchover demo image: busybox init runs the boot scripts (seed fig. 11) and, at
# shutdown, the stop scripts.
::sysinit:/etc/init.d/rcS
::shutdown:/etc/init.d/rcK
";

const RCS: &str = r#"#!/bin/sh
# Runs every /etc/init.d/S??* script in order with "start" (seed fig. 11).
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mkdir -p /var/log /var/run /tmp
for s in /etc/init.d/S??*; do
    [ -x "$s" ] || continue
    echo "rcS: $s start"
    "$s" start
done
echo "rcS: boot scripts done"
"#;

const RCK: &str = r#"#!/bin/sh
# Runs every /etc/init.d/S??* script in reverse order with "stop".
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
for s in $(ls -r /etc/init.d/S??*); do
    [ -x "$s" ] || continue
    "$s" stop
done
"#;

fn daemon_script(name: &str, cmd: &str) -> String {
    format!(
        r#"#!/bin/sh
# Starts and stops {name}.
PIDFILE=/var/run/{name}.pid
case "$1" in
  start)
    {cmd} >>/var/log/{name}.log 2>&1 &
    echo $! > $PIDFILE
    ;;
  stop)
    if [ -f $PIDFILE ]; then
        pid=$(cat $PIDFILE)
        kill $pid 2>/dev/null
        # Wait until it is gone, so that a start right after finds its port free.
        n=0
        # A zombie (init does not reap while it runs the shutdown scripts) counts as gone,
        # but only once it is the last of its threads: a thread-group leader shows State: Z as
        # soon as it exits, while its other threads still hold the shared descriptors (the
        # listening socket) until they too have exited.
        while [ -r /proc/$pid/status ] \
            && ! {{ grep -q '^State:.*Z' /proc/$pid/status && grep -q '^Threads:[[:space:]]*1$' /proc/$pid/status; }} \
            && [ $n -lt 500 ]; do
            usleep 10000; n=$((n+1))
        done
        rm -f $PIDFILE
    fi
    ;;
  restart)
    "$0" stop
    "$0" start
    ;;
  *) echo "usage: $0 start|stop|restart"; exit 2 ;;
esac
"#
    )
}

pub fn build_demo(dir: &Path, version: &str, port: u16, force: bool) -> Result<(), ImageError> {
    let parts = DemoParts::find(version)?;
    let root = prepare_output(dir, force)?;
    populate_demo_tree(root.path(), &parts, port)?;
    root.finish(dir)
}

/// What the demo rootfs is made of, checked before anything at the output is touched.
pub struct DemoParts {
    version: String,
    agent: PathBuf,
    demo: PathBuf,
    busybox: PathBuf,
}

impl DemoParts {
    pub fn find(version: &str) -> Result<DemoParts, ImageError> {
        if version.is_empty() || version.contains(['\n', '"', '\\']) {
            return Err(ImageError::Refused(format!(
                "invalid version {version:?}: one line without quotes"
            )));
        }
        Ok(DemoParts {
            version: version.to_owned(),
            agent: guest_binary("patchover-agent")?,
            demo: guest_binary("patchover-demo")?,
            busybox: busybox()?,
        })
    }

    pub fn busybox(&self) -> &Path {
        &self.busybox
    }
}

/// Checks DIR (empty, or replaceable with `force`) and returns a temporary directory beside it,
/// so that a half-built image is never at DIR; [`TmpDir::finish`] renames it into place.
pub fn prepare_output(dir: &Path, force: bool) -> Result<TmpDir, ImageError> {
    if dir.exists() {
        let empty = fs::read_dir(dir)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if !empty && !force {
            return Err(ImageError::Refused(format!(
                "{} exists and is not empty; pass --force to replace it",
                dir.display()
            )));
        }
        if !empty {
            fs::remove_dir_all(dir).ctx(|| format!("removing {}", dir.display()))?;
        }
    }
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent).ctx(|| format!("creating {}", parent.display()))?;
    tempfile_dir(parent)
}

/// Writes the demo rootfs into the empty directory `root`: busybox with its applets, the
/// static agent and demo service, and the boot scripts. Shared by the ns image (the tree is
/// the system disk) and the QEMU image (the tree becomes an ext4 file).
pub fn populate_demo_tree(root: &Path, parts: &DemoParts, port: u16) -> Result<(), ImageError> {
    let DemoParts {
        version,
        agent,
        demo,
        busybox,
    } = parts;
    for d in [
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "etc/init.d",
        "etc/demo",
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "var/log",
        "var/run",
        "var/lib/patchover-agent",
        "data",
        "root",
    ] {
        fs::create_dir_all(root.join(d)).ctx(|| format!("creating /{d} in the image"))?;
    }
    fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777))
        .ctx(|| "chmod /tmp in the image".to_owned())?;
    fs::copy(busybox, root.join("bin/busybox")).ctx(|| "copying busybox".to_owned())?;
    let list = Command::new(busybox)
        .arg("--list-full")
        .output()
        .ctx(|| "listing busybox applets".to_owned())?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim().trim_start_matches('/');
        if applet.is_empty() || applet == "bin/busybox" {
            continue;
        }
        let link = root.join(applet);
        if let Some(p) = link.parent() {
            fs::create_dir_all(p).ctx(|| format!("creating {}", p.display()))?;
        }
        if !link.exists() {
            symlink("/bin/busybox", &link).ctx(|| format!("linking {}", link.display()))?;
        }
    }
    fs::copy(agent, root.join(patchover_lc::AGENT_PATH_IN_LC))
        .ctx(|| "copying the agent".to_owned())?;
    fs::copy(demo, root.join("usr/bin/patchover-demo"))
        .ctx(|| "copying the demo service".to_owned())?;
    write(&root.join("etc/inittab"), INITTAB, 0o644)?;
    write(&root.join("etc/init.d/rcS"), RCS, 0o755)?;
    write(&root.join("etc/init.d/rcK"), RCK, 0o755)?;
    write(
        &root.join("etc/init.d/S10agent"),
        &daemon_script("patchover-agent", "/usr/sbin/patchover-agent serve"),
        0o755,
    )?;
    write(
        &root.join("etc/init.d/S50demo"),
        &daemon_script(
            "patchover-demo",
            &format!(
                "/usr/bin/patchover-demo --listen 0.0.0.0:{port} --data /data --version-file /etc/demo/version"
            ),
        ),
        0o755,
    )?;
    write(
        &root.join("etc/demo/version"),
        &format!("{version}\n"),
        0o644,
    )?;
    write(
        &root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\n",
        0o644,
    )?;
    write(&root.join("etc/group"), "root:x:0:\n", 0o644)?;
    Ok(())
}

/// A temporary directory beside the target, removed unless kept.
pub struct TmpDir(Option<PathBuf>);

impl TmpDir {
    pub fn path(&self) -> &Path {
        self.0.as_deref().expect("not kept yet")
    }

    /// Moves the finished directory to `dir`.
    pub fn finish(mut self, dir: &Path) -> Result<(), ImageError> {
        let tmp = self.0.take().expect("finished once");
        fs::rename(&tmp, dir).ctx(|| format!("moving the image to {}", dir.display()))
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = fs::remove_dir_all(p);
        }
    }
}

fn tempfile_dir(parent: &Path) -> Result<TmpDir, ImageError> {
    let p = parent.join(format!(".patchover-image-{}", std::process::id()));
    let _ = fs::remove_dir_all(&p);
    fs::create_dir(&p).ctx(|| format!("creating {}", p.display()))?;
    Ok(TmpDir(Some(p)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 file: no program headers (static), or one `PT_INTERP` (dynamic).
    fn elf(path: &Path, dynamic: bool) {
        let mut d = vec![0u8; 64];
        d[..5].copy_from_slice(b"\x7fELF\x02");
        d[32..40].copy_from_slice(&64u64.to_le_bytes());
        d[54..56].copy_from_slice(&56u16.to_le_bytes());
        if dynamic {
            d[56..58].copy_from_slice(&1u16.to_le_bytes());
            let mut ph = vec![0u8; 56];
            ph[..4].copy_from_slice(&3u32.to_le_bytes());
            d.extend(ph);
        }
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, d).unwrap();
    }

    /// Three places under one temporary directory, each holding `agent` when asked.
    fn places(root: &Path, explicit: bool) -> GuestDirs {
        GuestDirs {
            explicit: explicit.then(|| root.join("explicit")),
            package: root.join("usr/lib/patchover"),
            build_tree: vec![
                root.join("target/debug"),
                root.join("target/static/release"),
            ],
        }
    }

    #[test]
    fn guest_binaries_come_from_the_explicit_setting_then_the_package_then_the_build_tree() {
        let t = tempfile::tempdir().unwrap();
        let dirs = places(t.path(), true);
        elf(&dirs.build_tree[1].join("agent"), false);
        assert_eq!(
            dirs.find("agent").unwrap(),
            dirs.build_tree[1].join("agent")
        );
        elf(&dirs.package.join("agent"), false);
        assert_eq!(dirs.find("agent").unwrap(), dirs.package.join("agent"));
        let explicit = dirs.explicit.clone().unwrap();
        elf(&explicit.join("agent"), false);
        assert_eq!(dirs.find("agent").unwrap(), explicit.join("agent"));
        // Not set: the package's directory comes first.
        assert_eq!(
            places(t.path(), false).find("agent").unwrap(),
            dirs.package.join("agent")
        );
    }

    #[test]
    fn a_missing_guest_binary_is_refused_naming_all_three_places() {
        let t = tempfile::tempdir().unwrap();
        for explicit in [true, false] {
            let dirs = places(t.path(), explicit);
            let e = dirs.find("patchover-agent").unwrap_err();
            assert!(e.is_bad_input());
            let msg = e.to_string();
            let setting = if explicit {
                format!(
                    "$PATCHOVER_GUEST_DIR ({})",
                    t.path().join("explicit").display()
                )
            } else {
                "$PATCHOVER_GUEST_DIR (not set)".to_owned()
            };
            for part in [
                "cannot find the static guest binary patchover-agent",
                &setting,
                &format!("the package's {}", dirs.package.display()),
                &dirs.build_tree[1].display().to_string(),
                "scripts/build-guest",
            ] {
                assert!(msg.contains(part), "{part:?} not in: {msg}");
            }
        }
    }

    #[test]
    fn a_dynamic_guest_binary_is_refused_and_a_static_one_later_is_taken() {
        let t = tempfile::tempdir().unwrap();
        let dirs = places(t.path(), true);
        elf(&dirs.package.join("agent"), true);
        let e = dirs.find("agent").unwrap_err().to_string();
        assert!(e.contains("linked dynamically"), "{e}");
        assert!(e.contains(&dirs.package.display().to_string()), "{e}");
        elf(&dirs.build_tree[0].join("agent"), false);
        assert_eq!(
            dirs.find("agent").unwrap(),
            dirs.build_tree[0].join("agent")
        );
    }

    #[test]
    fn the_build_tree_is_found_from_a_binary_or_a_test_in_target() {
        let dirs = build_tree_near(Path::new("/src/target/debug/deps/lc-1234"));
        assert!(dirs.contains(&PathBuf::from(
            "/src/target/x86_64-unknown-linux-gnu/release"
        )));
        let dirs = build_tree_near(Path::new("/src/target/debug/patchover"));
        assert!(dirs.contains(&PathBuf::from(
            "/src/target/x86_64-unknown-linux-gnu/release"
        )));
        assert_eq!(dirs[0], PathBuf::from("/src/target/debug"));
    }
}
