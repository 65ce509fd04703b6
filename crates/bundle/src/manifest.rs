//! The bundle manifest (`manifest.toml`): what a patch is, what it targets, the ordered steps
//! that apply it with the OS's own patch programs, and the post-checks that prove it took effect.
//!
//! The manifest is outside input even when signed (a trusted signer can still make mistakes), so
//! parsing is strict: unknown keys, unknown step or check kinds and unknown categories are
//! errors, every path is checked before anything uses it, and the text has a size limit.
//! Parsing happens in two stages, as everywhere in patchover: serde reads the raw TOML into
//! `Raw*` structs, then [`Manifest::parse`] validates them into the public types, so a
//! [`Manifest`] value is always a valid one.

use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use patchover_core::{Category, LcId};
use serde::{Deserialize, Serialize};

use crate::hash::Sha256;

/// The manifest format this crate reads and writes (`format = 1`).
pub const MANIFEST_FORMAT: u32 = 1;
/// The largest manifest accepted, in bytes.
pub const MAX_MANIFEST_BYTES: usize = 64 * 1024;
/// The most apply steps one bundle may have.
pub const MAX_STEPS: usize = 64;
/// The most post-checks one bundle may have.
pub const MAX_CHECKS: usize = 64;
/// The default time limit of one step or check.
pub const DEFAULT_TIMEOUT_SECS: u64 = 600;
/// The longest a single step or check may be allowed to run.
pub const MAX_TIMEOUT_SECS: u64 = 24 * 3600;

/// A manifest that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error(
        "manifest is {size} bytes, over the limit of {max} bytes: keep long texts in the payload"
    )]
    TooLarge { size: usize, max: usize },
    #[error("manifest is not UTF-8 text")]
    NotUtf8(#[source] std::str::Utf8Error),
    #[error("manifest.toml is not valid")]
    Toml(#[source] toml::de::Error),
    #[error("manifest.toml: {field}: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ManifestError {
    ManifestError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// A bundle's name: 1–64 of `A-Z a-z 0-9 . _ -`, starting with a letter or digit. It names
/// the bundle in the patch table and in reports, and is used as a directory name when applied.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BundleId(String);

impl BundleId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for BundleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for BundleId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if s.is_empty() || s.len() > 64 {
            return Err(format!("bundle id {s:?} must be 1 to 64 characters long"));
        }
        if !s.starts_with(|c: char| c.is_ascii_alphanumeric()) || !s.chars().all(ok_char) {
            return Err(format!(
                "bundle id {s:?} may only use A-Z a-z 0-9 . _ - and must start with a letter or digit"
            ));
        }
        Ok(BundleId(s.to_owned()))
    }
}

impl TryFrom<String> for BundleId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<BundleId> for String {
    fn from(id: BundleId) -> String {
        id.0
    }
}

/// How urgent a patch is, as its publisher rates it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    None,
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    pub fn as_str(&self) -> &'static str {
        match self {
            Severity::None => "none",
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Severity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "none" => Severity::None,
            "low" => Severity::Low,
            "medium" => Severity::Medium,
            "high" => Severity::High,
            "critical" => Severity::Critical,
            other => {
                return Err(format!(
                    "unknown severity {other:?}: use none, low, medium, high or critical"
                ));
            }
        })
    }
}

/// When the patch was published: an RFC 3339 date-time with an offset, kept as written and as
/// seconds since the Unix epoch (for sorting and for "published since" queries).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Published {
    pub rfc3339: String,
    pub unix: i64,
}

impl FromStr for Published {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hint = "write an RFC 3339 date-time with an offset, e.g. 2026-11-20T10:00:00Z";
        let at: jiff::Timestamp = s
            .parse()
            .map_err(|e| format!("{s:?} is not a date-time with an offset ({e}): {hint}"))?;
        Ok(Published {
            rfc3339: s.to_owned(),
            unix: at.as_second(),
        })
    }
}

/// A file inside the bundle's `payload/` directory, relative to it: plain components only,
/// no `..`, no `.`, not absolute.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PayloadPath(String);

impl PayloadPath {
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The path inside the archive (`payload/<path>`).
    pub fn archive_path(&self) -> String {
        format!("payload/{}", self.0)
    }
}

impl fmt::Display for PayloadPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for PayloadPath {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() || s.len() > 1024 || s.contains('\0') {
            return Err(format!(
                "payload path {s:?} must be 1 to 1024 bytes without NUL"
            ));
        }
        if s.starts_with('/') {
            return Err(format!(
                "payload path {s:?} is absolute: name the file relative to payload/"
            ));
        }
        for part in s.split('/') {
            if part.is_empty() || part == "." || part == ".." {
                return Err(format!(
                    "payload path {s:?} has an empty, `.` or `..` component: name the file relative to payload/"
                ));
            }
        }
        Ok(PayloadPath(s.to_owned()))
    }
}

impl TryFrom<String> for PayloadPath {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<PayloadPath> for String {
    fn from(p: PayloadPath) -> String {
        p.0
    }
}

/// An absolute path inside the LC being patched (`/usr/bin/tool`): no `..`, no `.`, no empty
/// components. The apply engine resolves it under its root, never outside it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct LcPath(String);

impl LcPath {
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The path's components after the leading `/` (empty for `/` itself).
    pub fn relative(&self) -> &Path {
        Path::new(self.0.trim_start_matches('/'))
    }
    pub fn is_root(&self) -> bool {
        self.0 == "/"
    }
}

impl fmt::Display for LcPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for LcPath {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if !s.starts_with('/') {
            return Err(format!(
                "path {s:?} must be absolute (as seen inside the LC)"
            ));
        }
        if s.len() > 4096 || s.contains('\0') {
            return Err(format!("path {s:?} is too long or has a NUL byte"));
        }
        if s != "/" {
            for part in s[1..].split('/') {
                if part.is_empty() || part == "." || part == ".." {
                    return Err(format!(
                        "path {s:?} has an empty, `.` or `..` component: write it normalized"
                    ));
                }
            }
        }
        Ok(LcPath(s.to_owned()))
    }
}

impl TryFrom<String> for LcPath {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<LcPath> for String {
    fn from(p: LcPath) -> String {
        p.0
    }
}

/// What a replaced file must be before the replace step touches it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OldFile {
    /// The file exists and has this SHA-256.
    Sha256(Sha256),
    /// The file must not exist yet (the step creates it).
    Absent,
}

/// One apply step. Steps run in order with the OS's own programs; the first that fails stops
/// the bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Step {
    /// `/bin/sh payload/<file> <args>…`, working directory the extracted `payload/`.
    Script {
        file: PayloadPath,
        args: Vec<String>,
        timeout_secs: u64,
    },
    /// `patch -p<strip> -N -i payload/<file>` in `<dir>`, after a `--dry-run` that must pass,
    /// so a diff that does not apply changes nothing.
    Patch {
        file: PayloadPath,
        dir: LcPath,
        strip: u32,
        timeout_secs: u64,
    },
    /// `dpkg -i payload/<file>` (with `--root` when the engine's root is not `/`).
    Dpkg {
        file: PayloadPath,
        timeout_secs: u64,
    },
    /// Replace `path` with `payload/<file>` atomically (temp file + rename), after checking
    /// the current file against `old`. Keeps the old file's mode and owner unless `mode` is
    /// given.
    Replace {
        path: LcPath,
        file: PayloadPath,
        old: OldFile,
        mode: Option<u32>,
    },
}

impl Step {
    pub fn kind(&self) -> &'static str {
        match self {
            Step::Script { .. } => "script",
            Step::Patch { .. } => "patch",
            Step::Dpkg { .. } => "dpkg",
            Step::Replace { .. } => "replace",
        }
    }

    /// The payload file the step uses.
    pub fn payload_file(&self) -> &PayloadPath {
        match self {
            Step::Script { file, .. }
            | Step::Patch { file, .. }
            | Step::Dpkg { file, .. }
            | Step::Replace { file, .. } => file,
        }
    }

    /// A one-line description for reports: `patch app.diff in /srv/app`.
    pub fn describe(&self) -> String {
        match self {
            Step::Script { file, .. } => format!("script {file}"),
            Step::Patch { file, dir, .. } => format!("patch {file} in {dir}"),
            Step::Dpkg { file, .. } => format!("dpkg -i {file}"),
            Step::Replace { path, file, .. } => format!("replace {path} with {file}"),
        }
    }
}

/// A post-check: run after the patched LC has rebooted; the switch happens only if all pass.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Check {
    /// The file at `path` has this SHA-256.
    FileHash { path: LcPath, sha256: Sha256 },
    /// `command` (argv, no shell) exits with `exit_code` and its combined output contains
    /// `contains`.
    CommandOutput {
        command: Vec<String>,
        contains: String,
        exit_code: i32,
        timeout_secs: u64,
    },
    /// The Debian package `package` is installed at exactly `version`.
    PackageVersion { package: String, version: String },
}

impl Check {
    pub fn kind(&self) -> &'static str {
        match self {
            Check::FileHash { .. } => "file_hash",
            Check::CommandOutput { .. } => "command_output",
            Check::PackageVersion { .. } => "package_version",
        }
    }
}

/// Which LCs and images a bundle is meant for. Empty lists mean "any".
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Targets {
    pub lcs: Vec<LcId>,
    pub images: Vec<String>,
}

impl Targets {
    pub fn applies_to_lc(&self, lc: &LcId) -> bool {
        self.lcs.is_empty() || self.lcs.contains(lc)
    }
    pub fn applies_to_image(&self, image: &str) -> bool {
        self.images.is_empty() || self.images.iter().any(|i| i == image)
    }
}

/// A validated manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Manifest {
    pub format: u32,
    pub id: BundleId,
    pub title: String,
    pub description: Option<String>,
    pub category: Category,
    pub severity: Severity,
    pub published: Published,
    pub targets: Targets,
    pub steps: Vec<Step>,
    pub checks: Vec<Check>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    format: Option<u32>,
    id: Option<String>,
    title: Option<String>,
    description: Option<String>,
    category: Option<String>,
    severity: Option<String>,
    published: Option<toml::Value>,
    #[serde(default)]
    targets: RawTargets,
    #[serde(default)]
    step: Vec<RawStep>,
    #[serde(default)]
    check: Vec<RawCheck>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTargets {
    #[serde(default)]
    lcs: Vec<String>,
    #[serde(default)]
    images: Vec<String>,
}

// One flat struct per table instead of a tagged enum: serde's internally tagged enums cannot
// deny unknown fields reliably, and this way every error names the step and the field.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    kind: Option<String>,
    file: Option<String>,
    args: Option<Vec<String>>,
    dir: Option<String>,
    strip: Option<u32>,
    path: Option<String>,
    old_sha256: Option<String>,
    mode: Option<String>,
    timeout_secs: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    kind: Option<String>,
    path: Option<String>,
    sha256: Option<String>,
    command: Option<Vec<String>>,
    contains: Option<String>,
    exit_code: Option<i32>,
    timeout_secs: Option<u64>,
    package: Option<String>,
    version: Option<String>,
}

/// Checks that only the fields `allowed` (plus `kind`) are set in a step or check table.
fn only(
    field: &str,
    kind: &str,
    set: &[(&str, bool)],
    allowed: &[&str],
) -> Result<(), ManifestError> {
    for (name, present) in set {
        if *present && !allowed.contains(name) {
            return Err(invalid(
                format!("{field}.{name}"),
                format!(
                    "a {kind} {} has no `{name}`; allowed: {}",
                    noun(field),
                    allowed.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

fn noun(field: &str) -> &str {
    field.split('[').next().unwrap_or(field)
}

fn need<T>(v: Option<T>, field: &str, what: &str) -> Result<T, ManifestError> {
    v.ok_or_else(|| invalid(field, format!("missing: {what}")))
}

fn timeout(v: Option<u64>, field: &str) -> Result<u64, ManifestError> {
    let t = v.unwrap_or(DEFAULT_TIMEOUT_SECS);
    if t == 0 || t > MAX_TIMEOUT_SECS {
        return Err(invalid(
            field,
            format!("timeout_secs must be 1 to {MAX_TIMEOUT_SECS}"),
        ));
    }
    Ok(t)
}

fn parse_field<T: FromStr<Err = String>>(s: &str, field: &str) -> Result<T, ManifestError> {
    s.parse().map_err(|e: String| invalid(field, e))
}

impl Manifest {
    /// Parses and validates manifest bytes. Does not look at the payload: the archive reader
    /// checks that every file a step names is in it.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge {
                size: bytes.len(),
                max: MAX_MANIFEST_BYTES,
            });
        }
        let text = std::str::from_utf8(bytes).map_err(ManifestError::NotUtf8)?;
        let raw: RawManifest = toml::from_str(text).map_err(ManifestError::Toml)?;
        Manifest::from_raw(raw)
    }

    fn from_raw(raw: RawManifest) -> Result<Manifest, ManifestError> {
        let format = need(raw.format, "format", "write `format = 1`")?;
        if format != MANIFEST_FORMAT {
            return Err(invalid(
                "format",
                format!(
                    "format {format} is not supported: this patchover reads format {MANIFEST_FORMAT}"
                ),
            ));
        }
        let id: BundleId = parse_field(&need(raw.id, "id", "name the bundle")?, "id")?;
        let title = need(raw.title, "title", "give the bundle a one-line title")?;
        if title.trim().is_empty() || title.len() > 200 || title.contains('\n') {
            return Err(invalid("title", "must be one line of 1 to 200 bytes"));
        }
        if let Some(d) = &raw.description
            && d.len() > 16 * 1024
        {
            return Err(invalid("description", "must be at most 16 KiB"));
        }
        let category: Category = parse_field(
            &need(raw.category, "category", "security, enhancement or bugfix")?,
            "category",
        )?;
        let severity: Severity = parse_field(
            &need(
                raw.severity,
                "severity",
                "none, low, medium, high or critical",
            )?,
            "severity",
        )?;
        let published = match need(raw.published, "published", "an RFC 3339 date-time")? {
            toml::Value::Datetime(dt) => parse_field(&dt.to_string(), "published")?,
            toml::Value::String(s) => parse_field(&s, "published")?,
            other => {
                return Err(invalid(
                    "published",
                    format!("expected a date-time, found a {}", other.type_str()),
                ));
            }
        };
        let mut lcs = Vec::new();
        for (i, s) in raw.targets.lcs.iter().enumerate() {
            lcs.push(parse_field::<LcId>(s, &format!("targets.lcs[{i}]"))?);
        }
        for (i, s) in raw.targets.images.iter().enumerate() {
            if s.is_empty() || s.len() > 128 || s.chars().any(|c| c.is_control()) {
                return Err(invalid(
                    format!("targets.images[{i}]"),
                    "an image name is 1 to 128 printable characters",
                ));
            }
        }
        if raw.step.is_empty() {
            return Err(invalid(
                "step",
                "the bundle has no [[step]]: add at least one apply step",
            ));
        }
        if raw.step.len() > MAX_STEPS {
            return Err(invalid("step", format!("at most {MAX_STEPS} steps")));
        }
        if raw.check.len() > MAX_CHECKS {
            return Err(invalid("check", format!("at most {MAX_CHECKS} checks")));
        }
        let steps = raw
            .step
            .into_iter()
            .enumerate()
            .map(|(i, s)| step_from_raw(i, s))
            .collect::<Result<Vec<_>, _>>()?;
        let checks = raw
            .check
            .into_iter()
            .enumerate()
            .map(|(i, c)| check_from_raw(i, c))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Manifest {
            format,
            id,
            title,
            description: raw.description,
            category,
            severity,
            published,
            targets: Targets {
                lcs,
                images: raw.targets.images,
            },
            steps,
            checks,
        })
    }
}

fn step_from_raw(i: usize, s: RawStep) -> Result<Step, ManifestError> {
    let f = format!("step[{i}]");
    let kind = need(
        s.kind.as_deref(),
        &format!("{f}.kind"),
        "script, patch, dpkg or replace",
    )?;
    let set = [
        ("file", s.file.is_some()),
        ("args", s.args.is_some()),
        ("dir", s.dir.is_some()),
        ("strip", s.strip.is_some()),
        ("path", s.path.is_some()),
        ("old_sha256", s.old_sha256.is_some()),
        ("mode", s.mode.is_some()),
        ("timeout_secs", s.timeout_secs.is_some()),
    ];
    let file = |s: &Option<String>| -> Result<PayloadPath, ManifestError> {
        parse_field(
            need(s.as_deref(), &format!("{f}.file"), "the payload file")?,
            &format!("{f}.file"),
        )
    };
    Ok(match kind {
        "script" => {
            only(&f, kind, &set, &["file", "args", "timeout_secs"])?;
            Step::Script {
                file: file(&s.file)?,
                args: s.args.unwrap_or_default(),
                timeout_secs: timeout(s.timeout_secs, &format!("{f}.timeout_secs"))?,
            }
        }
        "patch" => {
            only(&f, kind, &set, &["file", "dir", "strip", "timeout_secs"])?;
            let strip = s.strip.unwrap_or(1);
            if strip > 32 {
                return Err(invalid(format!("{f}.strip"), "must be 0 to 32"));
            }
            Step::Patch {
                file: file(&s.file)?,
                dir: parse_field(
                    need(
                        s.dir.as_deref(),
                        &format!("{f}.dir"),
                        "the directory the diff applies in",
                    )?,
                    &format!("{f}.dir"),
                )?,
                strip,
                timeout_secs: timeout(s.timeout_secs, &format!("{f}.timeout_secs"))?,
            }
        }
        "dpkg" => {
            only(&f, kind, &set, &["file", "timeout_secs"])?;
            Step::Dpkg {
                file: file(&s.file)?,
                timeout_secs: timeout(s.timeout_secs, &format!("{f}.timeout_secs"))?,
            }
        }
        "replace" => {
            only(&f, kind, &set, &["file", "path", "old_sha256", "mode"])?;
            let path: LcPath = parse_field(
                need(
                    s.path.as_deref(),
                    &format!("{f}.path"),
                    "the file to replace",
                )?,
                &format!("{f}.path"),
            )?;
            if path.is_root() {
                return Err(invalid(format!("{f}.path"), "cannot replace /"));
            }
            let old = match need(
                s.old_sha256.as_deref(),
                &format!("{f}.old_sha256"),
                "the SHA-256 the file has before the patch, or \"absent\" if the step creates it",
            )? {
                "absent" => OldFile::Absent,
                h => OldFile::Sha256(parse_field(h, &format!("{f}.old_sha256"))?),
            };
            let mode = match &s.mode {
                None => None,
                Some(m) => Some(
                    u32::from_str_radix(m, 8)
                        .ok()
                        .filter(|m| *m <= 0o7777)
                        .ok_or_else(|| {
                            invalid(
                                format!("{f}.mode"),
                                format!("{m:?} is not an octal mode like \"0755\""),
                            )
                        })?,
                ),
            };
            Step::Replace {
                path,
                file: file(&s.file)?,
                old,
                mode,
            }
        }
        other => {
            return Err(invalid(
                format!("{f}.kind"),
                format!("unknown step kind {other:?}: use script, patch, dpkg or replace"),
            ));
        }
    })
}

fn check_from_raw(i: usize, c: RawCheck) -> Result<Check, ManifestError> {
    let f = format!("check[{i}]");
    let kind = need(
        c.kind.as_deref(),
        &format!("{f}.kind"),
        "file_hash, command_output or package_version",
    )?;
    let set = [
        ("path", c.path.is_some()),
        ("sha256", c.sha256.is_some()),
        ("command", c.command.is_some()),
        ("contains", c.contains.is_some()),
        ("exit_code", c.exit_code.is_some()),
        ("timeout_secs", c.timeout_secs.is_some()),
        ("package", c.package.is_some()),
        ("version", c.version.is_some()),
    ];
    Ok(match kind {
        "file_hash" => {
            only(&f, kind, &set, &["path", "sha256"])?;
            Check::FileHash {
                path: parse_field(
                    need(c.path.as_deref(), &format!("{f}.path"), "the file to hash")?,
                    &format!("{f}.path"),
                )?,
                sha256: parse_field(
                    need(
                        c.sha256.as_deref(),
                        &format!("{f}.sha256"),
                        "the expected SHA-256",
                    )?,
                    &format!("{f}.sha256"),
                )?,
            }
        }
        "command_output" => {
            only(
                &f,
                kind,
                &set,
                &["command", "contains", "exit_code", "timeout_secs"],
            )?;
            let command = need(c.command, &format!("{f}.command"), "the argv to run")?;
            if command.is_empty() || command[0].is_empty() {
                return Err(invalid(
                    format!("{f}.command"),
                    "must name a program: [\"/usr/bin/tool\", \"--version\"]",
                ));
            }
            if command.iter().any(|a| a.contains('\0')) {
                return Err(invalid(format!("{f}.command"), "has a NUL byte"));
            }
            Check::CommandOutput {
                command,
                contains: need(
                    c.contains,
                    &format!("{f}.contains"),
                    "the text the output must contain",
                )?,
                exit_code: c.exit_code.unwrap_or(0),
                timeout_secs: timeout(c.timeout_secs, &format!("{f}.timeout_secs"))?,
            }
        }
        "package_version" => {
            only(&f, kind, &set, &["package", "version"])?;
            let package = need(
                c.package,
                &format!("{f}.package"),
                "the Debian package name",
            )?;
            let ok_pkg = !package.is_empty()
                && package.len() <= 128
                && package.chars().all(|ch| {
                    ch.is_ascii_lowercase() || ch.is_ascii_digit() || "+-.:".contains(ch)
                });
            if !ok_pkg {
                return Err(invalid(
                    format!("{f}.package"),
                    format!("{package:?} is not a Debian package name"),
                ));
            }
            let version = need(c.version, &format!("{f}.version"), "the expected version")?;
            if version.is_empty()
                || version.len() > 128
                || version
                    .chars()
                    .any(|ch| ch.is_whitespace() || ch.is_control())
            {
                return Err(invalid(
                    format!("{f}.version"),
                    "must be a version without spaces",
                ));
            }
            Check::PackageVersion { package, version }
        }
        other => {
            return Err(invalid(
                format!("{f}.kind"),
                format!(
                    "unknown check kind {other:?}: use file_hash, command_output or package_version"
                ),
            ));
        }
    })
}

/// Resolves `path` (absolute inside the LC) under `root` the way the LC would see it:
/// symlinks are followed, but absolute link targets restart at `root` and `..` never climbs
/// above it, so a hostile tree cannot make the engine touch a file outside `root`.
/// The last component is resolved too when `follow_last` is set.
pub fn resolve_in_root(root: &Path, path: &Path, follow_last: bool) -> std::io::Result<PathBuf> {
    let mut todo: Vec<std::ffi::OsString> = components_rev(path);
    let mut done: Vec<std::ffi::OsString> = Vec::new();
    let mut hops = 0;
    while let Some(part) = todo.pop() {
        if part == ".." {
            done.pop();
            continue;
        }
        if part == "." || part.is_empty() {
            continue;
        }
        let mut cand = root.to_path_buf();
        cand.extend(&done);
        cand.push(&part);
        let is_last = todo.is_empty();
        match std::fs::symlink_metadata(&cand) {
            Ok(md) if md.file_type().is_symlink() && (follow_last || !is_last) => {
                hops += 1;
                if hops > 40 {
                    return Err(std::io::Error::other(format!(
                        "too many symlinks resolving {}",
                        path.display()
                    )));
                }
                let target = std::fs::read_link(&cand)?;
                if target.is_absolute() {
                    done.clear();
                }
                todo.extend(components_rev(&target));
            }
            _ => done.push(part),
        }
    }
    let mut out = root.to_path_buf();
    out.extend(&done);
    Ok(out)
}

fn components_rev(p: &Path) -> Vec<std::ffi::OsString> {
    let mut v: Vec<std::ffi::OsString> = p
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_owned()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    v.reverse();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const GOOD: &str = r#"
format = 1
id = "demo-2026-001"
title = "Fix the greeting"
category = "security"
severity = "high"
published = 2026-11-20T10:00:00Z

[targets]
lcs = ["lc1"]

[[step]]
kind = "script"
file = "fix.sh"

[[step]]
kind = "patch"
file = "app.diff"
dir = "/srv/app"

[[step]]
kind = "replace"
path = "/usr/bin/tool"
file = "tool"
old_sha256 = "absent"
mode = "0755"

[[check]]
kind = "file_hash"
path = "/usr/bin/tool"
sha256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"

[[check]]
kind = "command_output"
command = ["/bin/echo", "v2"]
contains = "v2"
"#;

    fn with(replace: &str, by: &str) -> Result<Manifest, ManifestError> {
        assert!(GOOD.contains(replace), "{replace}");
        Manifest::parse(GOOD.replacen(replace, by, 1).as_bytes())
    }

    fn err_text(r: Result<Manifest, ManifestError>) -> String {
        let e = r.expect_err("must be rejected");
        let mut s = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(c) = src {
            s.push_str(": ");
            s.push_str(&c.to_string());
            src = c.source();
        }
        s
    }

    #[test]
    fn good_manifest_parses() {
        let m = Manifest::parse(GOOD.as_bytes()).unwrap();
        assert_eq!(m.id.as_str(), "demo-2026-001");
        assert_eq!(m.category, Category::Security);
        assert_eq!(m.severity, Severity::High);
        assert_eq!(m.published.unix, 1_795_168_800);
        assert_eq!(m.steps.len(), 3);
        assert_eq!(m.steps[1].kind(), "patch");
        assert!(matches!(&m.steps[1], Step::Patch { strip: 1, .. }));
        assert!(matches!(
            &m.steps[2],
            Step::Replace {
                old: OldFile::Absent,
                mode: Some(0o755),
                ..
            }
        ));
        assert_eq!(m.checks.len(), 2);
        assert!(m.targets.applies_to_lc(&"lc1".parse().unwrap()));
        assert!(!m.targets.applies_to_lc(&"lc2".parse().unwrap()));
    }

    #[test]
    fn published_as_string_with_offset() {
        let m = with(
            "published = 2026-11-20T10:00:00Z",
            "published = \"2026-11-20T12:00:00+02:00\"",
        )
        .unwrap();
        assert_eq!(m.published.unix, 1_795_168_800);
        assert!(
            err_text(with(
                "published = 2026-11-20T10:00:00Z",
                "published = 2026-11-20"
            ))
            .contains("offset")
        );
        assert!(
            err_text(with(
                "published = 2026-11-20T10:00:00Z",
                "published = \"yesterday\""
            ))
            .contains("RFC 3339")
        );
    }

    #[test]
    fn unknown_category_rejected() {
        let e = err_text(with("category = \"security\"", "category = \"cosmetic\""));
        assert!(
            e.contains("category") && e.contains("security, enhancement or bugfix"),
            "{e}"
        );
    }

    #[test]
    fn unknown_step_kind_rejected() {
        let e = err_text(with("kind = \"script\"", "kind = \"rpm\""));
        assert!(
            e.contains("step[0].kind") && e.contains("unknown step kind"),
            "{e}"
        );
    }

    #[test]
    fn unknown_check_kind_and_fields_rejected() {
        let e = err_text(with("kind = \"file_hash\"", "kind = \"http\""));
        assert!(e.contains("unknown check kind"), "{e}");
        let e = err_text(with("file = \"fix.sh\"", "file = \"fix.sh\"\ndir = \"/x\""));
        assert!(e.contains("step[0].dir"), "{e}");
        let e = err_text(with("format = 1", "format = 1\ncolour = \"red\""));
        assert!(e.contains("colour"), "{e}");
    }

    #[test]
    fn paths_are_checked() {
        for bad in [
            "../etc/passwd",
            "/etc/passwd",
            "a/../../b",
            "a//b",
            "./a",
            "",
        ] {
            let e = err_text(with("file = \"fix.sh\"", &format!("file = {bad:?}")));
            assert!(e.contains("step[0].file"), "{bad}: {e}");
        }
        for bad in ["srv/app", "/srv/../etc", "/srv//app", "/srv/./app"] {
            let e = err_text(with("dir = \"/srv/app\"", &format!("dir = {bad:?}")));
            assert!(e.contains("step[1].dir"), "{bad}: {e}");
        }
    }

    #[test]
    fn too_large_and_no_steps_rejected() {
        let big = format!("{GOOD}\n# {}\n", "x".repeat(MAX_MANIFEST_BYTES));
        assert!(matches!(
            Manifest::parse(big.as_bytes()),
            Err(ManifestError::TooLarge { .. })
        ));
        let no_steps: String = GOOD.split("[[step]]").next().unwrap().to_owned();
        assert!(err_text(Manifest::parse(no_steps.as_bytes())).contains("no [[step]]"));
        assert!(matches!(
            Manifest::parse(b"\xff\xfe"),
            Err(ManifestError::NotUtf8(_))
        ));
    }

    #[test]
    fn bad_ids_and_hashes_rejected() {
        for bad in ["", "-x", "a b", "a/b", &"x".repeat(65)] {
            let e = err_text(with("id = \"demo-2026-001\"", &format!("id = {bad:?}")));
            assert!(e.contains("id"), "{bad}: {e}");
        }
        let e = err_text(with("old_sha256 = \"absent\"", "old_sha256 = \"1234\""));
        assert!(e.contains("old_sha256") && e.contains("64 hex"), "{e}");
        let e = err_text(with("mode = \"0755\"", "mode = \"rwx\""));
        assert!(e.contains("mode"), "{e}");
    }

    #[test]
    fn resolve_stays_in_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("usr/bin")).unwrap();
        std::os::unix::fs::symlink("/usr/bin", root.join("bin")).unwrap();
        std::os::unix::fs::symlink("../../../../../../etc", root.join("usr/esc")).unwrap();
        assert_eq!(
            resolve_in_root(root, Path::new("bin/tool"), true).unwrap(),
            root.join("usr/bin/tool")
        );
        assert_eq!(
            resolve_in_root(root, Path::new("usr/esc/passwd"), true).unwrap(),
            root.join("etc/passwd")
        );
        assert_eq!(
            resolve_in_root(root, Path::new("bin"), false).unwrap(),
            root.join("bin")
        );
    }
}
