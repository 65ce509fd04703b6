//! `patchover patches …`: the patch table (seed fig. 6).
//!
//! `import` is the only way into the table: the bundle's signature is verified against the
//! config's trusted keys first, the verified file is copied into the state directory under its
//! SHA-256, and only then is the row registered.
//!
//! Every verb goes through the daemon when one runs (see [`remote`]): [`list_json`],
//! [`show_json`], [`mark`] and [`import`] are called here or by the daemon, and one printer
//! per verb prints their JSON.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use patchover_bundle::{BundlesConfig, VerifyError, verify_bundle};
use patchover_store::{NewPatch, PatchRow, Store};
use serde_json::json;

use super::{BadInput, Ctx, NotFound, remote};

#[derive(Subcommand)]
pub enum PatchesCmd {
    /// The patch table.
    List,
    /// One patch, with the output of its last run.
    Show { id: String },
    /// Mark patches to be applied at the next run.
    Mark {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Clear the apply-at-next-run mark.
    Unmark {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Verify a signed bundle (FILE and FILE.minisig) and register it.
    Import {
        file: PathBuf,
        /// Also mark it for the next run.
        #[arg(long)]
        mark: bool,
    },
}

/// The directory where verified bundles are kept.
pub fn bundle_store_dir(config: &patchover_core::Config) -> PathBuf {
    config.state_dir.join("bundles")
}

fn open(ctx: &Ctx) -> anyhow::Result<(patchover_core::Config, Store)> {
    let config = ctx.config()?;
    let store = Store::open(&config.store_path())?;
    Ok((config, store))
}

fn row_json(r: &PatchRow) -> serde_json::Value {
    serde_json::to_value(r).expect("row serializes")
}

fn ms_text(ms: Option<i64>) -> String {
    ms.map_or("-".to_owned(), |ms| {
        let secs = ms / 1000;
        let (d, rem) = (secs / 86_400, secs % 86_400);
        // Days since the epoch to a civil date (Howard Hinnant's algorithm).
        let z = d + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        format!(
            "{year:04}-{month:02}-{day:02} {:02}:{:02}",
            rem / 3600,
            rem % 3600 / 60
        )
    })
}

pub fn run(cmd: PatchesCmd, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    match cmd {
        PatchesCmd::List => {
            let v = remote::route(
                ctx,
                |c| remote::call(c, "GET", "/v1/patches", None),
                || list_json(&open(ctx)?.1),
            )?;
            print_list(ctx, &v)?;
        }
        PatchesCmd::Show { id } => {
            let v = remote::route(
                ctx,
                |c| {
                    let path = format!("/v1/patches/{}", remote::segment(&id));
                    remote::call(c, "GET", &path, None)
                },
                || show_json(&open(ctx)?.1, &id),
            )?;
            print_show(ctx, &v)?;
        }
        PatchesCmd::Mark { ids } => mark_cmd(ctx, ids, true)?,
        PatchesCmd::Unmark { ids } => mark_cmd(ctx, ids, false)?,
        PatchesCmd::Import { file, mark } => {
            // The daemon reads the file itself: it gets the path as this process sees it.
            let file = std::path::absolute(&file)
                .with_context(|| format!("cannot resolve {}", file.display()))?;
            let v = remote::route(
                ctx,
                |c| {
                    let body = json!({"file": file, "mark": mark});
                    remote::call(c, "POST", "/v1/patches", Some(&body))
                },
                || {
                    let (config, mut store) = open(ctx)?;
                    import(&config, &mut store, &file, mark)
                },
            )?;
            if ctx.quiet {
            } else if ctx.json {
                println!("{v}");
            } else {
                println!(
                    "imported {} ({}, {}) signed by key {}{}",
                    text(&v["id"]),
                    text(&v["category"]),
                    text(&v["severity"]),
                    text(&v["key_id"]),
                    if v["apply_next"] == true {
                        ", marked for the next run"
                    } else {
                        ""
                    }
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn mark_cmd(ctx: &Ctx, ids: Vec<String>, on: bool) -> anyhow::Result<()> {
    let v = remote::route(
        ctx,
        |c| {
            let body = json!({"ids": ids, "apply_next": on});
            remote::call(c, "POST", "/v1/patch-marks", Some(&body))
        },
        || mark(&mut open(ctx)?.1, &ids, on),
    )?;
    if ctx.quiet {
    } else if ctx.json {
        println!("{v}");
    } else {
        let ids: Vec<String> = v["ids"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(text)
            .collect();
        println!(
            "{} {}",
            if v["marked"] == true {
                "marked"
            } else {
                "unmarked"
            },
            ids.join(", ")
        );
    }
    Ok(())
}

/// The patch table: `patches list` and `GET /v1/patches`.
pub fn list_json(store: &Store) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::Value::Array(
        store.patches()?.iter().map(row_json).collect(),
    ))
}

/// One patch: `patches show` and `GET /v1/patches/{id}`.
pub fn show_json(store: &Store, id: &str) -> anyhow::Result<serde_json::Value> {
    let row = store
        .patch(id)?
        .ok_or_else(|| NotFound(format!("no patch {id:?}; see `patchover patches list`")))?;
    Ok(row_json(&row))
}

/// Marks (or unmarks) patches for the next run, all or none: `patches mark|unmark` and
/// `POST /v1/patch-marks`. `{"marked": on, "ids": [...]}`.
pub fn mark(store: &mut Store, ids: &[String], on: bool) -> anyhow::Result<serde_json::Value> {
    if ids.is_empty() {
        return Err(BadInput("name at least one patch".into()).into());
    }
    // All or nothing: check every id before changing any (patches are never removed, so one
    // checked stays there).
    for id in ids {
        if store.patch(id)?.is_none() {
            return Err(NotFound(format!(
                "no patch {id:?}; nothing was changed (see `patchover patches list`)"
            ))
            .into());
        }
    }
    for id in ids {
        store.mark_patch(id, on)?;
    }
    Ok(json!({"marked": on, "ids": ids}))
}

/// Verifies a signed bundle against the config's trusted keys, copies it into the state
/// directory and registers it: `patches import` and `POST /v1/patches`. The patch's row, with
/// the id of the key that signed it (`key_id`).
pub fn import(
    config: &patchover_core::Config,
    store: &mut Store,
    file: &Path,
    mark: bool,
) -> anyhow::Result<serde_json::Value> {
    if !file.is_absolute() {
        return Err(BadInput(format!(
            "{} is not an absolute path; give the bundle's whole path",
            file.display()
        ))
        .into());
    }
    let bundles = BundlesConfig::from_section(&config.bundles);
    let keys = bundles.load_trusted_keys().context("config [bundles]")?;
    if keys.is_empty() {
        return Err(BadInput(format!(
            "no trusted keys: add `trusted_keys = [\"/path/key.pub\"]` to [bundles] in {}",
            config.path.display()
        ))
        .into());
    }
    let verified = verify_bundle(file, &keys, &bundles.limits).map_err(|e| {
        let bad = is_bad_bundle(&e);
        let e =
            anyhow::Error::from(e).context(format!("bundle {} is not imported", file.display()));
        if bad {
            BadInput(format!("{e:#}")).into()
        } else {
            e
        }
    })?;
    let m = verified.manifest();
    if store.patch(m.id.as_str())?.is_some() {
        return Err(BadInput(format!(
            "patch {} is already in the patch table; bundle ids are unique",
            m.id
        ))
        .into());
    }
    let dir = bundle_store_dir(config);
    fs::create_dir_all(&dir)?;
    let dest = dir.join(format!("{}.po", verified.sha256()));
    copy_verified(file, &dest)?;
    store.register_patch(&NewPatch {
        id: m.id.as_str(),
        title: &m.title,
        category: m.category,
        severity: m.severity.as_str(),
        published: &m.published.rfc3339,
        sha256: &verified.sha256().to_string(),
        file: &dest.to_string_lossy(),
    })?;
    if mark {
        store.mark_patch(m.id.as_str(), true)?;
    }
    let row = store.patch(m.id.as_str())?.expect("just registered");
    let mut v = row_json(&row);
    v["key_id"] = json!(verified.key_id().to_string());
    Ok(v)
}

/// Whether a bundle was refused for what it is (a signature that does not verify or is
/// malformed, a bad archive, too large, or no such file): bad input, exit code 2 and 422
/// through the API. Only a failure to read an existing file is the host's.
fn is_bad_bundle(e: &VerifyError) -> bool {
    match e {
        VerifyError::Signature { .. }
        | VerifyError::Archive { .. }
        | VerifyError::TooLarge { .. } => true,
        VerifyError::Read { source, .. } => source.kind() == std::io::ErrorKind::NotFound,
    }
}

/// A JSON value as table text: strings as they are, null as `-`.
fn text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "-".to_owned(),
        serde_json::Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

fn yes_no(v: &serde_json::Value) -> String {
    if *v == true { "yes" } else { "no" }.to_owned()
}

fn print_list(ctx: &Ctx, v: &serde_json::Value) -> anyhow::Result<()> {
    if ctx.json {
        println!("{}", serde_json::to_string_pretty(v)?);
        return Ok(());
    }
    let header = [
        "ID",
        "CATEGORY",
        "SEVERITY",
        "PUBLISHED",
        "NEXT RUN",
        "APPLIED",
        "ON",
        "LAST RESULT",
    ];
    let rows: Vec<Vec<String>> = v
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|r| {
            vec![
                text(&r["id"]),
                text(&r["category"]),
                text(&r["severity"]),
                text(&r["published"]),
                yes_no(&r["apply_next"]),
                ms_text(r["applied_ms"].as_i64()),
                text(&r["applied_lc"]),
                text(&r["last_result"]),
            ]
        })
        .collect();
    print!("{}", super::table(&header, &rows));
    Ok(())
}

fn print_show(ctx: &Ctx, v: &serde_json::Value) -> anyhow::Result<()> {
    if ctx.json {
        println!("{}", serde_json::to_string_pretty(v)?);
        return Ok(());
    }
    for (k, f) in [
        ("id", text(&v["id"])),
        ("title", text(&v["title"])),
        ("category", text(&v["category"])),
        ("severity", text(&v["severity"])),
        ("published", text(&v["published"])),
        ("sha256", text(&v["sha256"])),
        ("file", text(&v["file"])),
        ("next run", yes_no(&v["apply_next"])),
        ("applied", ms_text(v["applied_ms"].as_i64())),
        ("applied on", text(&v["applied_lc"])),
        ("last result", text(&v["last_result"])),
    ] {
        println!("{k:>12}  {f}");
    }
    if let Some(out) = v["last_output"].as_str() {
        println!("\n{out}");
    }
    Ok(())
}

/// Copies the bundle and its signature; the copy is what later runs use, so a change to the
/// original after the import changes nothing.
fn copy_verified(src: &Path, dest: &Path) -> anyhow::Result<()> {
    let sig_src = patchover_bundle::keys::signature_path(src);
    let sig_dest = patchover_bundle::keys::signature_path(dest);
    fs::copy(src, dest).with_context(|| format!("copying {} into the store", src.display()))?;
    fs::copy(&sig_src, &sig_dest)
        .with_context(|| format!("copying {} into the store", sig_src.display()))?;
    Ok(())
}
