//! The shape of a bundle `patchover bundle from-apt` makes, and the check that a bundle signed
//! by a key trusted only for apt bundles (`scope = "apt"`) has exactly that shape.
//!
//! Why: the patch monitor signs the bundles it makes from the Debian archive by itself, with a
//! key on the host (docs/monitor.md, "Watching apt"). That key must not be able to sign a
//! bundle that runs anything else: no script but the standby's space check ([`SPACE_SCRIPT`],
//! byte for byte) and the `dpkg -i` of packages apt configures together
//! ([`install_script`], byte for byte, naming only `.deb` files of the bundle); no diff, no
//! replaced file, no check but `package_version`, no file in the archive that no step uses.
//! The `.deb` files themselves must be in the archive's signed index, which the bundle
//! carries ([`crate::aptindex`], checked on the host after this shape check).
//!
//! The constants live here, in the bundle crate, so the maker (`patchover_debian::fromapt`)
//! and the verifier share one definition.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;

use patchover_core::shell;

use crate::archive::{BundleArchive, EntryKind};
use crate::manifest::{Check, Step};

/// The bundle's payload file of the standby's space check.
pub const SPACE_FILE: &str = "check-space.sh";

/// The bundle's first step, run on the standby at boot (707) before any package: its own
/// disk (the filesystems of `/`, `/usr`, `/var`) must have `$1` KiB free. A failure fails the
/// bundle with nothing installed; the service stays on the active LC.
pub const SPACE_SCRIPT: &str = r#"#!/bin/sh
# patchover from-apt: the standby's disk must hold the unpacked updates (docs/debian.md).
need="$1"
case "$need" in ''|*[!0-9]*) echo "check-space.sh: need a number of KiB" >&2; exit 2;; esac
for d in / /usr /var; do
    set -- $(df -P -k "$d" | tail -n 1)
    case "$4" in ''|*[!0-9]*) echo "check-space.sh: cannot read the free space of $d" >&2; exit 2;; esac
    if [ "$4" -lt "$need" ]; then
        echo "the standby's disk ($d) has $4 KiB free; the updates need $need KiB unpacked: free space first" >&2
        exit 1
    fi
done
"#;

/// The payload name of the script of step `n` that installs packages configured together.
pub fn install_script_name(n: usize) -> String {
    format!("install-{n}.sh")
}

/// The script that unpacks and configures `debs` (payload file names) in one dpkg run.
pub fn install_script(debs: &[&str]) -> String {
    let args: Vec<String> = debs.iter().map(|n| shell::quote(n)).collect();
    format!(
        "#!/bin/sh\n# Installs packages that depend on each other, in one dpkg run.\nset -e\nexec dpkg --force-confdef --force-confold -i {}\n",
        args.join(" ")
    )
}

/// A bundle that is not of the from-apt shape: what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ShapeError(pub String);

/// Scripts are small; anything larger is not one of ours.
const MAX_SCRIPT_BYTES: u64 = 64 << 10;

/// Checks that the archive (`bytes`, already validated as `archive`) is of the from-apt shape;
/// returns the archive paths of the `.deb` files its steps install.
pub fn check(bytes: &[u8], archive: &BundleArchive) -> Result<BTreeSet<String>, ShapeError> {
    let m = &archive.manifest;
    if let Some(c) = m
        .checks
        .iter()
        .find(|c| !matches!(c, Check::PackageVersion { .. }))
    {
        return Err(ShapeError(format!(
            "it has a {} check (only package_version)",
            c.kind()
        )));
    }
    if !matches!(m.steps.first(), Some(Step::Script { file, .. }) if file.as_str() == SPACE_FILE) {
        return Err(ShapeError(format!(
            "its first step is not the space check {SPACE_FILE}"
        )));
    }
    let mut used = BTreeSet::new();
    let mut scripts = BTreeSet::new();
    let mut debs = BTreeSet::new();
    for (i, step) in m.steps.iter().enumerate() {
        let file = step.payload_file().as_str();
        check_step(i + 1, step, file)?;
        used.insert(format!("payload/{file}"));
        match step {
            Step::Script { .. } => scripts.insert(format!("payload/{file}")),
            _ => debs.insert(format!("payload/{file}")),
        };
    }
    let texts =
        read_files(bytes, &scripts).map_err(|e| ShapeError(format!("reading its scripts: {e}")))?;
    for path in &scripts {
        let text = texts
            .get(path)
            .map(|t| String::from_utf8_lossy(t).into_owned());
        let want = match path.strip_prefix("payload/") {
            Some(SPACE_FILE) => Some(SPACE_SCRIPT.to_owned()),
            _ => text
                .as_deref()
                .and_then(debs_of_install_script)
                .map(|names| {
                    debs.extend(names.iter().map(|d| format!("payload/{d}")));
                    install_script(&names.iter().map(String::as_str).collect::<Vec<_>>())
                }),
        };
        if want.is_none() || text != want {
            return Err(ShapeError(format!(
                "{path} is not the script from-apt writes"
            )));
        }
    }
    used.extend(debs.iter().cloned());
    check_entries(archive, &used)?;
    Ok(debs)
}

/// One step: step 1 the space check with one number; then `dpkg` of a `.deb`, or the
/// install script of its own number with no arguments.
fn check_step(n: usize, step: &Step, file: &str) -> Result<(), ShapeError> {
    let ok = match step {
        Step::Script { args, .. } if n == 1 => {
            args.len() == 1 && !args[0].is_empty() && args[0].bytes().all(|b| b.is_ascii_digit())
        }
        Step::Script { args, .. } => file == install_script_name(n) && args.is_empty(),
        Step::Dpkg { .. } => is_deb_name(file),
        _ => false,
    };
    if ok {
        return Ok(());
    }
    Err(ShapeError(format!(
        "step {n} is `{}`: an apt bundle has the space check first, then dpkg steps of .deb files and install-N.sh scripts only",
        step.describe()
    )))
}

/// The `.deb` names an install script installs, when its last line is exactly the `dpkg -i`
/// line [`install_script`] writes (each name single-quoted, no quote inside).
fn debs_of_install_script(text: &str) -> Option<Vec<String>> {
    let last = text.lines().last()?;
    let args = last.strip_prefix("exec dpkg --force-confdef --force-confold -i ")?;
    let debs: Vec<String> = args
        .split(' ')
        .map(|a| {
            a.strip_prefix('\'')
                .and_then(|a| a.strip_suffix('\''))
                .filter(|d| is_deb_name(d))
                .map(str::to_owned)
        })
        .collect::<Option<_>>()?;
    (debs.len() >= 2).then_some(debs)
}

fn is_deb_name(f: &str) -> bool {
    f.ends_with(".deb")
        && !f.contains('/')
        && f.len() > 4
        && f.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'+' | b'~'))
}

/// Every entry is the manifest, the `payload` directory, a used regular file, or an index
/// file ([`crate::aptindex::is_index_name`]).
fn check_entries(archive: &BundleArchive, used: &BTreeSet<String>) -> Result<(), ShapeError> {
    for e in &archive.entries {
        let ok = match &e.kind {
            EntryKind::Dir => e.path == "payload",
            EntryKind::File { .. } => {
                e.path == "manifest.toml"
                    || used.contains(&e.path)
                    || e.path
                        .strip_prefix("payload/")
                        .is_some_and(crate::aptindex::is_index_name)
            }
            EntryKind::Symlink { .. } => false,
        };
        if !ok {
            return Err(ShapeError(format!(
                "it carries {}, which no step of an apt bundle uses",
                e.path
            )));
        }
    }
    Ok(())
}

/// The contents of `wanted` entries of the (already validated) archive, each at most
/// [`MAX_SCRIPT_BYTES`].
fn read_files(
    bytes: &[u8],
    wanted: &BTreeSet<String>,
) -> std::io::Result<BTreeMap<String, Vec<u8>>> {
    let decoder = zstd::stream::read::Decoder::with_buffer(bytes)?;
    let mut tar = tar::Archive::new(decoder);
    let mut out = BTreeMap::new();
    for entry in tar.entries()? {
        let entry = entry?;
        let path = String::from_utf8_lossy(&entry.path_bytes())
            .trim_start_matches("./")
            .to_owned();
        if wanted.contains(&path) {
            let mut buf = Vec::new();
            entry.take(MAX_SCRIPT_BYTES + 1).read_to_end(&mut buf)?;
            out.insert(path, buf);
        }
    }
    Ok(out)
}
