//! `patchover image build-demo DIR`: a bootable busybox rootfs with the agent and the demo
//! service, whose boot scripts (seed fig. 11) start both.
//!
//! With `--qemu` the same tree becomes an ext4 disk image beside a kernel and an initramfs
//! (see `image_qemu`).
//!
//! The guest binaries (`patchover-agent`, `patchover-demo`) must be static, since the rootfs
//! has no C library. They are found in `$PATCHOVER_GUEST_DIR`, beside this binary, or in
//! cargo's static-target directory next to it; `scripts/build-guest` builds them.

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, bail};
use clap::Subcommand;
use serde_json::json;

use super::{BadInput, Ctx};

#[derive(Subcommand)]
pub enum ImageCmd {
    /// Build the demo rootfs (system disk) in DIR, and optionally an empty application disk.
    BuildDemo {
        dir: PathBuf,
        /// Also create this empty directory as the application disk.
        #[arg(long, conflicts_with = "qemu")]
        app_dir: Option<PathBuf>,
        /// Build a QEMU image instead: DIR gets vmlinuz, initrd.img, system.img and app.img.
        #[arg(long)]
        qemu: bool,
        /// The Debian kernel package (linux-image-*-cloud-amd64 .deb) for --qemu, instead of
        /// downloading it with apt.
        #[arg(long, requires = "qemu")]
        kernel_deb: Option<PathBuf>,
        /// The demo service's version string (in /etc/demo/version).
        #[arg(long, default_value = "1.0.0")]
        version: String,
        /// The port the demo service listens on.
        #[arg(long, default_value_t = 80)]
        port: u16,
        /// Replace DIR if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Build a Debian rootfs (mmdebstrap, sysvinit, the agent) in DIR: docs/debian.md.
    BuildDebian {
        dir: PathBuf,
        /// Packages to install, comma-separated (their services are enabled).
        #[arg(long, value_delimiter = ',', required = true)]
        packages: Vec<String>,
        /// Also create this empty directory as the application disk.
        #[arg(long)]
        app_dir: Option<PathBuf>,
        #[arg(long, default_value = "bookworm")]
        suite: String,
        /// Include the suite's -updates and -security (default: the suite as released).
        #[arg(long)]
        with_updates: bool,
        /// Replace DIR if it exists.
        #[arg(long)]
        force: bool,
    },
}

pub fn run(cmd: ImageCmd, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    match cmd {
        ImageCmd::BuildDebian {
            dir,
            packages,
            app_dir,
            suite,
            with_updates,
            force,
        } => {
            use patchover_debian::image::{BuildOptions, build_debian};
            let agent = guest_binary("patchover-agent")?;
            let mut opts = BuildOptions::from_host(&suite, packages, with_updates, agent)
                .map_err(|e| BadInput(format!("{:#}", anyhow::Error::from(e))))?;
            opts.force = force;
            let built = build_debian(&dir, &opts).map_err(|e| match e.is_bad_input() {
                true => anyhow::Error::from(BadInput(e.to_string())),
                false => anyhow::Error::from(e),
            })?;
            if let Some(app) = &app_dir {
                fs::create_dir_all(app).with_context(|| format!("creating {}", app.display()))?;
            }
            match ctx.json {
                true => println!("{}", serde_json::to_string(&built)?),
                false => println!(
                    "Debian {suite} image ({}) in {} ({}, {:.1} s + copy {:.1} s)",
                    built.packages.join(", "),
                    dir.display(),
                    if built.cached {
                        "from the cache"
                    } else {
                        "built"
                    },
                    built.build_secs,
                    built.copy_secs
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        ImageCmd::BuildDemo {
            dir,
            qemu: true,
            kernel_deb,
            version,
            port,
            force,
            ..
        } => {
            let img = super::image_qemu::build_demo_qemu(
                &dir,
                &version,
                port,
                force,
                kernel_deb.as_deref(),
            )?;
            if ctx.json {
                println!("{}", serde_json::to_string(&img)?);
            } else {
                println!(
                    "QEMU demo image {} (service v{version} on port {port}, kernel {}) built in {}",
                    env!("CARGO_PKG_VERSION"),
                    img.kernel_release,
                    dir.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        ImageCmd::BuildDemo {
            dir,
            app_dir,
            version,
            port,
            force,
            ..
        } => {
            build_demo(&dir, &version, port, force)?;
            if let Some(app) = &app_dir {
                fs::create_dir_all(app)
                    .with_context(|| format!("creating the application disk {}", app.display()))?;
            }
            if ctx.json {
                println!(
                    "{}",
                    json!({"system_disk": dir, "app_disk": app_dir, "version": version, "port": port})
                );
            } else {
                println!(
                    "demo image {} (service v{version} on port {port}) built in {}",
                    env!("CARGO_PKG_VERSION"),
                    dir.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// True for an ELF file without a program interpreter (statically linked).
pub(super) fn is_static_elf(path: &Path) -> bool {
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

/// Finds a static guest binary by name.
pub fn guest_binary(name: &str) -> anyhow::Result<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("PATCHOVER_GUEST_DIR") {
        dirs.push(PathBuf::from(d));
    }
    if let Some(exe_dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_owned))
    {
        dirs.push(exe_dir.clone());
        for up in [exe_dir.parent(), exe_dir.parent().and_then(Path::parent)]
            .into_iter()
            .flatten()
        {
            dirs.push(up.join("x86_64-unknown-linux-gnu/release"));
            dirs.push(up.join("target/x86_64-unknown-linux-gnu/release"));
        }
    }
    let mut dynamic = None;
    for d in &dirs {
        let p = d.join(name);
        if p.is_file() {
            if is_static_elf(&p) {
                return Ok(p);
            }
            dynamic.get_or_insert(p);
        }
    }
    match dynamic {
        Some(p) => bail!(BadInput(format!(
            "{} is linked dynamically and would not run inside an LC; build the static guest binaries with `scripts/build-guest`",
            p.display()
        ))),
        None => bail!(BadInput(format!(
            "cannot find the static guest binary {name} (looked in $PATCHOVER_GUEST_DIR and near this binary); build it with `scripts/build-guest`"
        ))),
    }
}

/// A static busybox, installing Debian's busybox-static when there is none.
pub(super) fn busybox() -> anyhow::Result<PathBuf> {
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
        (Ok(s), None) => bail!(
            "apt-get install busybox-static ended with {s} and left no static busybox; install it by hand"
        ),
        (Err(e), None) => {
            bail!("cannot run apt-get to install busybox-static ({e}); install it by hand")
        }
    }
}

pub(super) fn write(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
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
        # A zombie (init does not reap while it runs the shutdown scripts) counts as gone.
        while [ -r /proc/$pid/status ] && ! grep -q '^State:.*Z' /proc/$pid/status && [ $n -lt 500 ]; do
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

pub fn build_demo(dir: &Path, version: &str, port: u16, force: bool) -> anyhow::Result<()> {
    let parts = DemoParts::find(version)?;
    let root = prepare_output(dir, force)?;
    populate_demo_tree(root.path(), &parts, port)?;
    root.finish(dir)
}

/// What the demo rootfs is made of, checked before anything at the output is touched.
pub(super) struct DemoParts {
    version: String,
    agent: PathBuf,
    demo: PathBuf,
    busybox: PathBuf,
}

impl DemoParts {
    pub(super) fn find(version: &str) -> anyhow::Result<DemoParts> {
        if version.is_empty() || version.contains(['\n', '"', '\\']) {
            bail!(BadInput(format!(
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

    pub(super) fn busybox(&self) -> &Path {
        &self.busybox
    }
}

/// Checks DIR (empty, or replaceable with `force`) and returns a temporary directory beside it,
/// so that a half-built image is never at DIR; [`TmpDir::finish`] renames it into place.
pub(super) fn prepare_output(dir: &Path, force: bool) -> anyhow::Result<TmpDir> {
    if dir.exists() {
        let empty = fs::read_dir(dir)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if !empty && !force {
            bail!(BadInput(format!(
                "{} exists and is not empty; pass --force to replace it",
                dir.display()
            )));
        }
        if !empty {
            fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
        }
    }
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    tempfile_dir(parent)
}

/// Writes the demo rootfs into the empty directory `root`: busybox with its applets, the
/// static agent and demo service, and the boot scripts. Shared by the ns image (the tree is
/// the system disk) and the QEMU image (the tree becomes an ext4 file).
pub(super) fn populate_demo_tree(root: &Path, parts: &DemoParts, port: u16) -> anyhow::Result<()> {
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
        fs::create_dir_all(root.join(d))?;
    }
    fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    fs::copy(busybox, root.join("bin/busybox")).context("copying busybox")?;
    let list = Command::new(busybox)
        .arg("--list-full")
        .output()
        .context("listing busybox applets")?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim().trim_start_matches('/');
        if applet.is_empty() || applet == "bin/busybox" {
            continue;
        }
        let link = root.join(applet);
        if let Some(p) = link.parent() {
            fs::create_dir_all(p)?;
        }
        if !link.exists() {
            symlink("/bin/busybox", &link)?;
        }
    }
    fs::copy(agent, root.join(patchover_lc::AGENT_PATH_IN_LC)).context("copying the agent")?;
    fs::copy(demo, root.join("usr/bin/patchover-demo")).context("copying the demo service")?;
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
pub(super) struct TmpDir(Option<PathBuf>);

impl TmpDir {
    pub(super) fn path(&self) -> &Path {
        self.0.as_deref().expect("not kept yet")
    }

    /// Moves the finished directory to `dir`.
    pub(super) fn finish(mut self, dir: &Path) -> anyhow::Result<()> {
        let tmp = self.0.take().expect("finished once");
        fs::rename(&tmp, dir).with_context(|| format!("moving the image to {}", dir.display()))
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = fs::remove_dir_all(p);
        }
    }
}

fn tempfile_dir(parent: &Path) -> anyhow::Result<TmpDir> {
    let p = parent.join(format!(".patchover-image-{}", std::process::id()));
    let _ = fs::remove_dir_all(&p);
    fs::create_dir(&p).with_context(|| format!("creating {}", p.display()))?;
    Ok(TmpDir(Some(p)))
}
