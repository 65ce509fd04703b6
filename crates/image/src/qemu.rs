//! `patchover image build-demo --qemu DIR`: the demo LC as a QEMU machine (issue 9).
//!
//! DIR gets four files (see the QEMU conventions):
//! - `vmlinuz`: Debian's cloud kernel (`linux-image-cloud-amd64`). ext4, ACPI and the serial
//!   console are built in; the virtio drivers are modules.
//! - `initrd.img`: an uncompressed cpio "newc" archive with a static busybox, those modules and
//!   an `/init` script that loads them, mounts the system disk and switches to it. Written here
//!   rather than with `cpio`/`mkinitramfs`, which are not on every host and pull in much more.
//! - `system.img`: ext4 made by `mkfs.ext4 -d` from the same tree as the ns demo rootfs, plus
//!   `/etc/init.d/S01qemu`, which applies what the host put on the kernel command line.
//! - `app.img`: ext4 with the demo's data directory.
//!
//! The kernel package is fetched with `apt-get download` once and kept in [`KERNEL_CACHE`].

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

use crate::{DemoParts, ImageError, IoContext, populate_demo_tree, prepare_output, write};

/// The Debian package that depends on the current cloud kernel.
pub const KERNEL_META_PACKAGE: &str = "linux-image-cloud-amd64";
/// Where downloaded kernel packages are kept and reused.
pub const KERNEL_CACHE: &str = "/var/cache/patchover/kernel";
/// The modules the initramfs loads (their dependencies are added), in this order.
pub const INITRD_MODULES: [&str; 4] = ["virtio_pci", "virtio_blk", "virtio_net", "virtio_console"];
/// Headroom on top of the rootfs tree in system.img, and the smallest system.img.
const SYSTEM_HEADROOM_MIB: u64 = 64;
const SYSTEM_MIN_MIB: u64 = 128;
const APP_MIB: u64 = 64;

/// What `build_demo_qemu` made (also the `--json` output).
#[derive(Debug, Serialize)]
pub struct QemuImage {
    pub vmlinuz: PathBuf,
    pub initrd: PathBuf,
    pub system_disk: PathBuf,
    pub app_disk: PathBuf,
    /// The kernel's release, e.g. `6.1.0-56-cloud-amd64`.
    pub kernel_release: String,
    /// The modules in the initramfs, in load order.
    pub modules: Vec<String>,
    pub version: String,
    pub port: u16,
}

pub fn build_demo_qemu(
    dir: &Path,
    version: &str,
    port: u16,
    force: bool,
    kernel_deb: Option<&Path>,
) -> Result<QemuImage, ImageError> {
    let parts = DemoParts::find(version)?;
    let deb = find_kernel_deb(kernel_deb)?;
    let out = prepare_output(dir, force)?;
    let work = out.path().join(".work");
    let tree = work.join("rootfs");
    fs::create_dir_all(&tree).ctx(|| format!("creating {}", tree.display()))?;

    populate_demo_tree(&tree, &parts, port)?;
    write(&tree.join("etc/init.d/S01qemu"), S01QEMU, 0o755)?;
    let (kernel, modules) =
        images_from_tree(out.path(), &tree, &tree.join("data"), parts.busybox(), &deb)?;
    fs::remove_dir_all(&work).ctx(|| format!("removing {}", work.display()))?;
    out.finish(dir)?;
    Ok(QemuImage {
        vmlinuz: dir.join("vmlinuz"),
        initrd: dir.join("initrd.img"),
        system_disk: dir.join("system.img"),
        app_disk: dir.join("app.img"),
        kernel_release: kernel,
        modules,
        version: version.to_owned(),
        port,
    })
}

/// Writes a QEMU LC's files into `out`: `vmlinuz` and `initrd.img` from the kernel package
/// `deb` (see [`find_kernel_deb`]), `system.img` from the root tree `tree`, `app.img` from
/// `app_tree`. Returns the kernel's release and the initramfs's modules. Shared by the demo's
/// image and `image build-debian --qemu` (patchover-debian).
pub fn images_from_tree(
    out: &Path,
    tree: &Path,
    app_tree: &Path,
    busybox: &Path,
    deb: &Path,
) -> Result<(String, Vec<String>), ImageError> {
    let work = out.join(".kernel");
    let kernel = Kernel::extract(deb, &work)?;
    fs::copy(&kernel.vmlinuz, out.join("vmlinuz")).ctx(|| "copying the kernel".to_owned())?;
    let modules = kernel.resolve(&INITRD_MODULES)?;
    fs::write(out.join("initrd.img"), initramfs(busybox, &modules)?)
        .ctx(|| "writing initrd.img".to_owned())?;
    let sys_mib = (tree_bytes(tree)? >> 20) + SYSTEM_HEADROOM_MIB;
    mkfs_ext4(
        tree,
        "system",
        &out.join("system.img"),
        sys_mib.max(SYSTEM_MIN_MIB),
    )?;
    mkfs_ext4(app_tree, "app", &out.join("app.img"), APP_MIB)?;
    fs::remove_dir_all(&work).ctx(|| format!("removing {}", work.display()))?;
    Ok((
        kernel.release,
        modules.into_iter().map(|(name, _)| name).collect(),
    ))
}

fn by_hand(what: &str) -> String {
    format!(
        "{what}; download {KERNEL_META_PACKAGE}'s kernel package yourself (`apt-get download linux-image-<version>-cloud-amd64` on a Debian host with network) and pass --kernel-deb FILE"
    )
}

/// The kernel .deb: the given one, a cached one, or one downloaded with apt into the cache.
pub fn find_kernel_deb(explicit: Option<&Path>) -> Result<PathBuf, ImageError> {
    if let Some(p) = explicit {
        if !p.is_file() {
            return Err(ImageError::Refused(format!(
                "--kernel-deb {}: no such file",
                p.display()
            )));
        }
        return Ok(p.to_owned());
    }
    let cache = Path::new(KERNEL_CACHE);
    let pkg = match Command::new("apt-cache")
        .args(["depends", KERNEL_META_PACKAGE])
        .output()
    {
        Ok(out) => versioned_kernel_package(&String::from_utf8_lossy(&out.stdout)),
        Err(_) => None,
    };
    let Some(pkg) = pkg else {
        // Without apt, a kernel downloaded before still does.
        if let Some(deb) = cached_deb(cache, "linux-image-", "-cloud-amd64")? {
            return Ok(deb);
        }
        return Err(ImageError::Failed(by_hand(&format!(
            "apt-cache cannot say which kernel {KERNEL_META_PACKAGE} depends on (no apt, or run `apt-get update`)"
        ))));
    };
    if let Some(deb) = cached_deb(cache, &pkg, "")? {
        return Ok(deb);
    }
    fs::create_dir_all(cache).ctx(|| format!("creating {}", cache.display()))?;
    // Download into a private directory, then rename: a cut download is never reused.
    let partial = cache.join(format!(".download-{}", std::process::id()));
    let _ = fs::remove_dir_all(&partial);
    fs::create_dir(&partial).ctx(|| format!("creating {}", partial.display()))?;
    eprintln!("downloading {pkg} into {}", cache.display());
    let dl = Command::new("apt-get")
        .args(["-q", "-o", "APT::Sandbox::User=root", "download", &pkg])
        .current_dir(&partial)
        .output();
    let result = match dl {
        Err(e) => Err(ImageError::Failed(by_hand(&format!(
            "cannot run apt-get ({e})"
        )))),
        Ok(o) if !o.status.success() => Err(ImageError::Failed(by_hand(&format!(
            "apt-get download {pkg} failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        )))),
        Ok(_) => match cached_deb(&partial, &pkg, "")? {
            Some(deb) => {
                let dest = cache.join(deb.file_name().expect("a file"));
                fs::rename(&deb, &dest).ctx(|| format!("moving {}", deb.display()))?;
                Ok(dest)
            }
            None => Err(ImageError::Failed(by_hand(&format!(
                "apt-get download {pkg} left no .deb"
            )))),
        },
    };
    let _ = fs::remove_dir_all(&partial);
    result
}

/// `linux-image-6.1.0-56-cloud-amd64` from `apt-cache depends` output.
fn versioned_kernel_package(apt_cache_depends: &str) -> Option<String> {
    apt_cache_depends.lines().find_map(|l| {
        let dep = l.trim().strip_prefix("Depends:")?.trim();
        (dep.starts_with("linux-image-") && dep != KERNEL_META_PACKAGE).then(|| dep.to_owned())
    })
}

/// The newest `.deb` in `dir` of a package named `<prefix>…<suffix>` (`suffix` empty: the
/// package `prefix` exactly).
fn cached_deb(dir: &Path, prefix: &str, suffix: &str) -> Result<Option<PathBuf>, ImageError> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(None);
    };
    let matches = |file: &str| {
        let Some((pkg, _)) = file.split_once('_') else {
            return false;
        };
        file.ends_with(".deb")
            && if suffix.is_empty() {
                pkg == prefix
            } else {
                pkg.starts_with(prefix) && pkg.ends_with(suffix)
            }
    };
    let mut debs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(matches))
        .collect();
    debs.sort();
    Ok(debs.pop())
}

/// An unpacked kernel package.
struct Kernel {
    vmlinuz: PathBuf,
    release: String,
    /// `lib/modules/<release>` in the unpacked package.
    modules_dir: PathBuf,
}

impl Kernel {
    fn extract(deb: &Path, dest: &Path) -> Result<Kernel, ImageError> {
        fs::create_dir_all(dest).ctx(|| format!("creating {}", dest.display()))?;
        let out = Command::new("dpkg-deb")
            .arg("-x")
            .arg(deb)
            .arg(dest)
            .output()
            .ctx(|| "cannot run dpkg-deb to unpack the kernel package; install dpkg".to_owned())?;
        if !out.status.success() {
            fail!(
                "dpkg-deb -x {} failed ({}): {}; is it a kernel .deb?",
                deb.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let boot = dest.join("boot");
        let vmlinuz = fs::read_dir(&boot)
            .ok()
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("vmlinuz-"))
            });
        let Some(vmlinuz) = vmlinuz else {
            return Err(ImageError::Refused(format!(
                "{} holds no boot/vmlinuz-*; pass a linux-image-*-cloud-amd64 package",
                deb.display()
            )));
        };
        let release = vmlinuz
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("vmlinuz-"))
            .expect("checked above")
            .to_owned();
        let modules_dir = ["lib/modules", "usr/lib/modules"]
            .iter()
            .map(|d| dest.join(d).join(&release))
            .find(|d| d.is_dir());
        let Some(modules_dir) = modules_dir else {
            return Err(ImageError::Refused(format!(
                "{} holds no lib/modules/{release}",
                deb.display()
            )));
        };
        Ok(Kernel {
            vmlinuz,
            release,
            modules_dir,
        })
    }

    /// The modules `wanted` with their dependencies, dependencies first, as (name, file).
    /// Built-in ones are left out. Dependencies come from modules.dep when the package has
    /// one, else from each module's `.modinfo` (Debian's packages leave modules.dep to depmod).
    fn resolve(&self, wanted: &[&str]) -> Result<Vec<(String, PathBuf)>, ImageError> {
        let mut files = std::collections::BTreeMap::new();
        walk(&self.modules_dir, &mut |p| {
            if let Some(n) = p.file_name().and_then(|n| n.to_str())
                && let Some((stem, ext)) = n.split_once(".ko")
            {
                files.insert(module_name(stem), (p.to_owned(), ext.to_owned()));
            }
        })?;
        let builtin: Vec<String> = fs::read_to_string(self.modules_dir.join("modules.builtin"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| Path::new(l).file_name()?.to_str()?.split_once(".ko"))
            .map(|(stem, _)| module_name(stem))
            .collect();
        let dep_file = fs::read_to_string(self.modules_dir.join("modules.dep")).ok();
        let deps_of = |name: &str, file: &Path| -> Result<Vec<String>, ImageError> {
            if let Some(dep) = &dep_file {
                return Ok(modules_dep_entry(dep, name));
            }
            let data = fs::read(file).ctx(|| format!("reading {}", file.display()))?;
            modinfo_depends(&data).ok_or_else(|| {
                ImageError::Failed(format!(
                    "{} has no readable .modinfo section",
                    file.display()
                ))
            })
        };
        let mut order: Vec<(String, PathBuf)> = Vec::new();
        let mut visiting = Vec::new();
        fn visit(
            name: &str,
            files: &std::collections::BTreeMap<String, (PathBuf, String)>,
            builtin: &[String],
            deps_of: &DepsOf<'_>,
            visiting: &mut Vec<String>,
            order: &mut Vec<(String, PathBuf)>,
        ) -> Result<(), ImageError> {
            if order.iter().any(|(n, _)| n == name) || builtin.iter().any(|b| b == name) {
                return Ok(());
            }
            if visiting.iter().any(|v| v == name) {
                fail!("kernel modules depend on each other in a cycle: {visiting:?}");
            }
            let Some((file, ext)) = files.get(name) else {
                fail!(
                    "the kernel package has no module {name} and does not build it in; use a linux-image-*-cloud-amd64 package"
                );
            };
            if !ext.is_empty() {
                fail!(
                    "module {name} is compressed ({}); only uncompressed .ko files are supported",
                    file.display()
                );
            }
            visiting.push(name.to_owned());
            for dep in deps_of(name, file)? {
                visit(&dep, files, builtin, deps_of, visiting, order)?;
            }
            visiting.pop();
            order.push((name.to_owned(), file.clone()));
            Ok(())
        }
        for w in wanted {
            visit(
                &module_name(w),
                &files,
                &builtin,
                &deps_of,
                &mut visiting,
                &mut order,
            )?;
        }
        Ok(order)
    }
}

fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) -> Result<(), ImageError> {
    for e in fs::read_dir(dir).ctx(|| format!("reading {}", dir.display()))? {
        let p = e.ctx(|| format!("reading {}", dir.display()))?.path();
        if p.is_dir() {
            walk(&p, f)?;
        } else {
            f(&p);
        }
    }
    Ok(())
}

/// Module names use `_` where file names may use `-`.
fn module_name(stem: &str) -> String {
    stem.replace('-', "_")
}

/// The dependencies of `name` in a modules.dep file (`kernel/x/a.ko: kernel/y/b.ko ...`).
fn modules_dep_entry(dep: &str, name: &str) -> Vec<String> {
    let to_name = |path: &str| {
        let file = path.rsplit('/').next().unwrap_or(path);
        module_name(file.split_once(".ko").map_or(file, |(s, _)| s))
    };
    dep.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(m, _)| to_name(m.trim()) == name)
        .map(|(_, deps)| deps.split_whitespace().map(to_name).collect())
        .unwrap_or_default()
}

/// The `depends=` list of a kernel module (an ELF64 little-endian relocatable), read from its
/// `.modinfo` section. `None` if the file is not such an ELF or has no `.modinfo`.
fn modinfo_depends(elf: &[u8]) -> Option<Vec<String>> {
    let modinfo = elf_section(elf, ".modinfo")?;
    let deps = modinfo
        .split(|&b| b == 0)
        .find_map(|kv| kv.strip_prefix(b"depends="))
        .unwrap_or_default();
    Some(
        String::from_utf8_lossy(deps)
            .split(',')
            .filter(|d| !d.is_empty())
            .map(module_name)
            .collect(),
    )
}

fn elf_section<'a>(elf: &'a [u8], wanted: &str) -> Option<&'a [u8]> {
    if elf.get(..4)? != b"\x7fELF" || *elf.get(4)? != 2 || *elf.get(5)? != 1 {
        return None;
    }
    let u16_at = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?) as usize);
    let u32_at = |o: usize| Some(u32::from_le_bytes(elf.get(o..o + 4)?.try_into().ok()?) as usize);
    let u64_at = |o: usize| Some(u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?) as usize);
    let (shoff, shentsize, shnum, shstrndx) =
        (u64_at(0x28)?, u16_at(0x3a)?, u16_at(0x3c)?, u16_at(0x3e)?);
    let header = |i: usize| shoff.checked_add(i.checked_mul(shentsize)?);
    let section = |i: usize| {
        let h = header(i)?;
        let (off, size) = (u64_at(h + 24)?, u64_at(h + 32)?);
        elf.get(off..off.checked_add(size)?)
    };
    let names = section(shstrndx)?;
    (0..shnum).find_map(|i| {
        let name_off = u32_at(header(i)?)?;
        let name = names.get(name_off..)?.split(|&b| b == 0).next()?;
        if name == wanted.as_bytes() {
            section(i)
        } else {
            None
        }
    })
}

/// The modules a kernel module depends on, read from its file.
type DepsOf<'a> = dyn Fn(&str, &Path) -> Result<Vec<String>, ImageError> + 'a;

/// The initramfs: busybox, the modules and /init (see [`init_script`]).
fn initramfs(busybox: &Path, modules: &[(String, PathBuf)]) -> Result<Vec<u8>, ImageError> {
    let bb = fs::read(busybox).ctx(|| format!("reading {}", busybox.display()))?;
    let mut mods = Vec::new();
    for (name, file) in modules {
        let data = fs::read(file).ctx(|| format!("reading {}", file.display()))?;
        mods.push((name.as_str(), data));
    }
    let archive = || -> io::Result<Vec<u8>> {
        let mut w = cpio::Writer::new(Vec::new());
        for d in ["bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"] {
            w.dir(d, 0o755)?;
        }
        // The kernel opens /dev/console for /init before anything is mounted.
        w.char_dev("dev/console", 0o600, 5, 1)?;
        w.file("bin/busybox", 0o755, &bb)?;
        w.symlink("bin/sh", "busybox")?;
        for (name, data) in &mods {
            w.file(&format!("lib/modules/{name}.ko"), 0o644, data)?;
        }
        let names: Vec<&str> = mods.iter().map(|(n, _)| *n).collect();
        w.file("init", 0o755, init_script(&names).as_bytes())?;
        w.finish()
    };
    archive().ctx(|| "writing the initramfs".to_owned())
}

/// /init of the initramfs (QEMU conventions): load the modules, answer a probe boot, or mount
/// the system disk and switch to its /sbin/init.
fn init_script(modules: &[&str]) -> String {
    format!(
        r#"#!/bin/sh
# patchover initramfs: loads the virtio drivers, then switches to the system disk.
bb=/bin/busybox
fail() {{
    echo "PATCHOVER-INITRD-FAILED: $*" > /dev/console
    $bb usleep 200000
    $bb poweroff -f
    exit 1
}}
$bb mount -t proc proc /proc || fail "cannot mount /proc"
$bb mount -t sysfs sysfs /sys || fail "cannot mount /sys"
$bb mount -t devtmpfs devtmpfs /dev || fail "cannot mount /dev"
for m in {modules}; do
    $bb insmod /lib/modules/$m.ko || fail "cannot load module $m"
done
root=/dev/vda
for arg in $($bb cat /proc/cmdline); do
    case "$arg" in
        root=*) root=${{arg#root=}} ;;
        patchover.probe=1)
            echo PATCHOVER-PROBE-OK > /dev/console
            $bb usleep 200000
            $bb poweroff -f
            exit 0 ;;
    esac
done
n=0
while [ ! -b "$root" ]; do
    [ $n -ge 100 ] && fail "no $root after 10 s"
    $bb usleep 100000
    n=$((n + 1))
done
$bb mount -t ext4 -o rw "$root" /newroot || fail "cannot mount $root"
[ -e /newroot/sbin/init ] || [ -L /newroot/sbin/init ] || fail "$root has no /sbin/init"
for m in dev proc sys; do
    $bb mount -o move /$m /newroot/$m || fail "cannot move /$m"
done
exec $bb switch_root /newroot /sbin/init
fail "switch_root failed"
"#,
        modules = modules.join(" ")
    )
}

/// Runs first at boot on a QEMU LC and applies the kernel command line the host built.
const S01QEMU: &str = r#"#!/bin/sh
# QEMU LCs: applies what the host put on the kernel command line (patchover.hostname,
# patchover.nic=IFNAME,MAC,ADDR/PREFIX[,GATEWAY], patchover.app=DEV,DIR) before the agent and the
# service start. Does nothing in other LCs.
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
                    echo "S01qemu: no interface has MAC $mac (for $name)" >&2
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
                while [ ! -b "$dev" ] && [ $n -lt 100 ]; do usleep 50000; n=$((n + 1)); done
                mount -t ext4 "$dev" "$dir" || echo "S01qemu: cannot mount $dev on $dir" >&2
                ;;
        esac
    done
    # The agent serves on the virtio port; its name shows up shortly after the driver loads.
    n=0
    while ! grep -qx org.patchover.agent /sys/class/virtio-ports/*/name 2>/dev/null \
        && [ $n -lt 100 ]; do
        usleep 50000; n=$((n + 1))
    done
    ;;
  stop)
    for arg in $cmdline; do
        case "$arg" in
            patchover.app=*) umount "${arg#*,}" 2>/dev/null ;;
        esac
    done
    sync
    mount -o remount,ro / 2>/dev/null
    ;;
esac
exit 0
"#;

/// Bytes under `dir` (files and links), plus a block per entry for the metadata.
fn tree_bytes(dir: &Path) -> Result<u64, ImageError> {
    let mut total = 0;
    for e in fs::read_dir(dir).ctx(|| format!("reading {}", dir.display()))? {
        let e = e.ctx(|| format!("reading {}", dir.display()))?;
        let meta = e
            .path()
            .symlink_metadata()
            .ctx(|| format!("reading {}", e.path().display()))?;
        total += 4096;
        if meta.is_dir() {
            total += tree_bytes(&e.path())?;
        } else {
            total += meta.len();
        }
    }
    Ok(total)
}

fn mkfs_ext4(tree: &Path, label: &str, img: &Path, mib: u64) -> Result<(), ImageError> {
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(tree)
        .args(["-L", label])
        .arg(img)
        .arg(format!("{mib}M"))
        .output()
        .ctx(|| "cannot run mkfs.ext4; install e2fsprogs (1.43 or later, for -d)".to_owned())?;
    if !out.status.success() {
        fail!(
            "mkfs.ext4 -d {} {} failed ({}): {}",
            tree.display(),
            img.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    fs::set_permissions(img, fs::Permissions::from_mode(0o644))
        .ctx(|| format!("chmod {}", img.display()))
}

/// A writer of cpio "newc" archives (the format the kernel unpacks as an initramfs):
/// per entry a 110-byte ASCII header, the NUL-terminated name padded to 4 bytes, then the
/// data padded to 4 bytes; the archive ends with an entry named `TRAILER!!!`.
pub(crate) mod cpio {
    use super::{Write, io};

    const MAGIC: &str = "070701";
    pub const HEADER_LEN: usize = 110;
    const S_IFDIR: u32 = 0o040000;
    const S_IFREG: u32 = 0o100000;
    const S_IFLNK: u32 = 0o120000;
    const S_IFCHR: u32 = 0o020000;

    pub struct Writer<W: Write> {
        out: W,
        ino: u32,
        written: usize,
    }

    impl<W: Write> Writer<W> {
        pub fn new(out: W) -> Writer<W> {
            Writer {
                out,
                ino: 0,
                written: 0,
            }
        }

        pub fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
            self.entry(name, S_IFDIR | perm, 2, (0, 0), &[])
        }

        pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
            self.entry(name, S_IFREG | perm, 1, (0, 0), data)
        }

        pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
            self.entry(name, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
        }

        pub fn char_dev(
            &mut self,
            name: &str,
            perm: u32,
            major: u32,
            minor: u32,
        ) -> io::Result<()> {
            self.entry(name, S_IFCHR | perm, 1, (major, minor), &[])
        }

        /// Writes the trailer and returns the output.
        pub fn finish(mut self) -> io::Result<W> {
            self.ino = u32::MAX; // the trailer's fields are all zero
            self.header("TRAILER!!!", 0, 1, (0, 0), 0)?;
            self.out.flush()?;
            Ok(self.out)
        }

        fn entry(
            &mut self,
            name: &str,
            mode: u32,
            nlink: u32,
            rdev: (u32, u32),
            data: &[u8],
        ) -> io::Result<()> {
            if name.is_empty() || name.starts_with('/') || name.contains('\0') {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("cpio entry name {name:?} must be relative and not empty"),
                ));
            }
            let size = u32::try_from(data.len()).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidInput, format!("{name} exceeds 4 GiB"))
            })?;
            self.ino += 1;
            self.header(name, mode, nlink, rdev, size)?;
            self.put(data)?;
            self.pad()
        }

        fn header(
            &mut self,
            name: &str,
            mode: u32,
            nlink: u32,
            rdev: (u32, u32),
            size: u32,
        ) -> io::Result<()> {
            let ino = if self.ino == u32::MAX { 0 } else { self.ino };
            let namesize = name.len() as u32 + 1;
            let fields = [
                ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, namesize, 0,
            ];
            let mut h = String::with_capacity(HEADER_LEN);
            h.push_str(MAGIC);
            for f in fields {
                h.push_str(&format!("{f:08x}"));
            }
            debug_assert_eq!(h.len(), HEADER_LEN);
            self.put(h.as_bytes())?;
            self.put(name.as_bytes())?;
            self.put(&[0])?;
            self.pad()
        }

        fn put(&mut self, b: &[u8]) -> io::Result<()> {
            self.out.write_all(b)?;
            self.written += b.len();
            Ok(())
        }

        fn pad(&mut self) -> io::Result<()> {
            let n = (4 - self.written % 4) % 4;
            self.put(&[0; 3][..n])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An entry read back: (name, mode, rdev major, rdev minor, data).
    type Entry = (String, u32, u32, u32, Vec<u8>);

    /// A reader written from the format description, independent of the writer.
    fn read_newc(mut b: &[u8]) -> Vec<Entry> {
        let total = b.len();
        let mut entries = Vec::new();
        loop {
            assert_eq!((total - b.len()) % 4, 0, "every header starts 4-aligned");
            assert_eq!(&b[..6], b"070701");
            let field = |i: usize| {
                u32::from_str_radix(std::str::from_utf8(&b[6 + i * 8..14 + i * 8]).unwrap(), 16)
                    .unwrap()
            };
            let (mode, size, major, minor, namesize) = (
                field(1),
                field(6) as usize,
                field(9),
                field(10),
                field(11) as usize,
            );
            let name = std::str::from_utf8(&b[110..110 + namesize - 1])
                .unwrap()
                .to_owned();
            assert_eq!(b[110 + namesize - 1], 0);
            let data_at = (110 + namesize).div_ceil(4) * 4;
            let data = b[data_at..data_at + size].to_vec();
            b = &b[(data_at + size).div_ceil(4) * 4..];
            if name == "TRAILER!!!" {
                assert!(b.is_empty(), "nothing after the trailer");
                return entries;
            }
            entries.push((name, mode, major, minor, data));
        }
    }

    #[test]
    fn cpio_newc_round_trips_every_entry_kind_with_alignment() {
        let mut w = cpio::Writer::new(Vec::new());
        w.dir("bin", 0o755).unwrap();
        w.char_dev("dev/console", 0o600, 5, 1).unwrap();
        w.file("bin/a", 0o755, b"12345").unwrap();
        w.file("bin/bb", 0o644, b"").unwrap();
        w.symlink("bin/sh", "busybox").unwrap();
        let out = w.finish().unwrap();
        assert_eq!(out.len() % 4, 0);
        let e = read_newc(&out);
        let names: Vec<&str> = e.iter().map(|x| x.0.as_str()).collect();
        assert_eq!(names, ["bin", "dev/console", "bin/a", "bin/bb", "bin/sh"]);
        assert_eq!(e[0].1, 0o040755);
        assert_eq!((e[1].1, e[1].2, e[1].3), (0o020600, 5, 1));
        assert_eq!((e[2].1, e[2].4.as_slice()), (0o100755, &b"12345"[..]));
        assert_eq!((e[4].1, e[4].4.as_slice()), (0o120777, &b"busybox"[..]));
        assert!(
            cpio::Writer::new(Vec::new())
                .file("/abs", 0o644, b"")
                .is_err()
        );
    }

    #[test]
    fn busybox_cpio_lists_what_the_writer_wrote() {
        let Ok(bb) = crate::busybox() else {
            panic!("this test needs a static busybox (apt-get install busybox-static)");
        };
        let mut w = cpio::Writer::new(Vec::new());
        w.dir("d", 0o755).unwrap();
        w.file("d/x", 0o644, b"hello").unwrap();
        w.symlink("d/l", "x").unwrap();
        let archive = w.finish().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(bb)
            .args(["cpio", "-i", "-d"])
            .current_dir(dir.path())
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&archive).unwrap();
        assert!(child.wait().unwrap().success());
        assert_eq!(fs::read(dir.path().join("d/x")).unwrap(), b"hello");
        assert_eq!(
            fs::read_link(dir.path().join("d/l")).unwrap(),
            Path::new("x")
        );
    }

    #[test]
    fn versioned_kernel_package_is_read_from_apt_cache() {
        let out = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n";
        assert_eq!(
            versioned_kernel_package(out).as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64")
        );
        assert_eq!(versioned_kernel_package("linux-image-cloud-amd64\n"), None);
    }

    #[test]
    fn cached_debs_are_found_by_package_name() {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "linux-image-6.1.0-5-cloud-amd64_6.1.1-1_amd64.deb",
            "linux-image-6.1.0-9-cloud-amd64_6.1.9-1_amd64.deb",
            "linux-image-6.1.0-9-amd64_6.1.9-1_amd64.deb",
            "linux-image-6.1.0-9-cloud-amd64_6.1.9-1_amd64.deb.partial",
        ] {
            fs::write(dir.path().join(f), b"").unwrap();
        }
        let name =
            |p: Option<PathBuf>| p.map(|p| p.file_name().unwrap().to_str().unwrap().to_owned());
        assert_eq!(
            name(cached_deb(dir.path(), "linux-image-6.1.0-5-cloud-amd64", "").unwrap()).as_deref(),
            Some("linux-image-6.1.0-5-cloud-amd64_6.1.1-1_amd64.deb")
        );
        assert_eq!(
            name(cached_deb(dir.path(), "linux-image-", "-cloud-amd64").unwrap()).as_deref(),
            Some("linux-image-6.1.0-9-cloud-amd64_6.1.9-1_amd64.deb")
        );
        assert!(
            cached_deb(dir.path(), "linux-image-6.1.0-5", "")
                .unwrap()
                .is_none()
        );
        assert!(
            cached_deb(&dir.path().join("none"), "x", "")
                .unwrap()
                .is_none()
        );
    }

    /// A minimal ELF64 LE file with the sections given (plus the null and name sections).
    fn elf_with(sections: &[(&str, &[u8])]) -> Vec<u8> {
        let mut names = vec![0u8];
        let mut name_offs = Vec::new();
        for (n, _) in sections.iter().chain([(".shstrtab", &[][..])].iter()) {
            name_offs.push(names.len() as u32);
            names.extend_from_slice(n.as_bytes());
            names.push(0);
        }
        let mut data = vec![0u8; 64];
        let mut places = Vec::new();
        for (_, body) in sections
            .iter()
            .map(|(n, b)| (*n, *b))
            .chain([(".shstrtab", &names[..])])
        {
            places.push((data.len() as u64, body.len() as u64));
            data.extend_from_slice(body);
        }
        let shoff = data.len() as u64;
        data.extend_from_slice(&[0u8; 64]); // the null section
        for (i, (off, size)) in places.iter().enumerate() {
            let mut h = [0u8; 64];
            h[0..4].copy_from_slice(&name_offs[i].to_le_bytes());
            h[24..32].copy_from_slice(&off.to_le_bytes());
            h[32..40].copy_from_slice(&size.to_le_bytes());
            data.extend_from_slice(&h);
        }
        data[0..6].copy_from_slice(b"\x7fELF\x02\x01");
        data[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
        data[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        data[0x3c..0x3e].copy_from_slice(&(places.len() as u16 + 1).to_le_bytes());
        data[0x3e..0x40].copy_from_slice(&(places.len() as u16).to_le_bytes());
        data
    }

    #[test]
    fn modinfo_depends_reads_the_modinfo_section() {
        let elf = elf_with(&[
            (".text", b"\x90\x90"),
            (
                ".modinfo",
                b"license=GPL\0depends=virtio_ring,virtio-pci-x\0name=y\0",
            ),
        ]);
        assert_eq!(
            modinfo_depends(&elf).unwrap(),
            ["virtio_ring", "virtio_pci_x"]
        );
        let none = elf_with(&[(".modinfo", b"license=GPL\0depends=\0")]);
        assert_eq!(modinfo_depends(&none).unwrap(), Vec::<String>::new());
        assert!(modinfo_depends(&elf_with(&[(".text", b"x")])).is_none());
        assert!(modinfo_depends(&elf[..100]).is_none(), "cut short");
        assert!(modinfo_depends(b"not an elf").is_none());
    }

    #[test]
    fn modules_dep_entries_map_paths_to_names() {
        let dep = "kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_ring.ko kernel/x/virtio-legacy.ko.xz\nkernel/y/virtio_ring.ko:\n";
        assert_eq!(
            modules_dep_entry(dep, "virtio_pci"),
            ["virtio_ring", "virtio_legacy"]
        );
        assert!(modules_dep_entry(dep, "virtio_ring").is_empty());
    }

    #[test]
    fn resolve_orders_dependencies_first_and_skips_builtins() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("lib/modules/9.9-test");
        fs::create_dir_all(m.join("kernel")).unwrap();
        let module = |name: &str, deps: &str| {
            let info = format!("depends={deps}\0");
            fs::write(
                m.join(format!("kernel/{name}.ko")),
                elf_with(&[(".modinfo", info.as_bytes())]),
            )
            .unwrap();
        };
        module("top", "mid,base");
        module("mid", "base,inside");
        module("base", "");
        fs::write(m.join("modules.builtin"), "kernel/fs/inside.ko\n").unwrap();
        let k = Kernel {
            vmlinuz: PathBuf::new(),
            release: "9.9-test".into(),
            modules_dir: m.clone(),
        };
        let names: Vec<String> = k
            .resolve(&["top"])
            .unwrap()
            .into_iter()
            .map(|x| x.0)
            .collect();
        assert_eq!(names, ["base", "mid", "top"]);
        let err = k.resolve(&["missing"]).unwrap_err().to_string();
        assert!(err.contains("no module missing"), "{err}");
        module("loop_a", "loop_b");
        module("loop_b", "loop_a");
        assert!(
            k.resolve(&["loop_a"])
                .unwrap_err()
                .to_string()
                .contains("cycle")
        );
    }
}
