//! `patchover patches …`: the patch table (seed fig. 6).
//!
//! `import` is the only way into the table: the bundle's signature is verified against the
//! config's trusted keys first, the verified file is copied into the state directory under its
//! SHA-256, and only then is the row registered.

use std::fs;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use patchover_bundle::{BundlesConfig, verify_bundle};
use patchover_store::{NewPatch, PatchRow, Store};
use serde_json::json;

use super::{BadInput, Ctx};

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
            let (_, store) = open(ctx)?;
            let rows = store.patches()?;
            if ctx.json {
                let v: Vec<_> = rows.iter().map(row_json).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(ExitCode::SUCCESS);
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
            let table: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    vec![
                        r.id.clone(),
                        r.category.to_string(),
                        r.severity.clone(),
                        r.published.clone(),
                        if r.apply_next { "yes" } else { "no" }.to_owned(),
                        ms_text(r.applied_ms),
                        r.applied_lc.clone().unwrap_or_else(|| "-".to_owned()),
                        r.last_result
                            .map_or("-".to_owned(), |x| format!("{x:?}").to_lowercase()),
                    ]
                })
                .collect();
            print!("{}", super::table(&header, &table));
            Ok(ExitCode::SUCCESS)
        }
        PatchesCmd::Show { id } => {
            let (_, store) = open(ctx)?;
            let row = store.patch(&id)?.ok_or_else(|| {
                BadInput(format!("no patch {id:?}; see `patchover patches list`"))
            })?;
            if ctx.json {
                println!("{}", serde_json::to_string_pretty(&row_json(&row))?);
            } else {
                for (k, v) in [
                    ("id", row.id.clone()),
                    ("title", row.title.clone()),
                    ("category", row.category.to_string()),
                    ("severity", row.severity.clone()),
                    ("published", row.published.clone()),
                    ("sha256", row.sha256.clone()),
                    ("file", row.file.clone()),
                    (
                        "next run",
                        if row.apply_next { "yes" } else { "no" }.to_owned(),
                    ),
                    ("applied", ms_text(row.applied_ms)),
                    (
                        "applied on",
                        row.applied_lc.clone().unwrap_or_else(|| "-".into()),
                    ),
                    (
                        "last result",
                        row.last_result
                            .map_or("-".to_owned(), |x| format!("{x:?}").to_lowercase()),
                    ),
                ] {
                    println!("{k:>12}  {v}");
                }
                if let Some(out) = &row.last_output {
                    println!("\n{out}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        PatchesCmd::Mark { ids } | PatchesCmd::Unmark { ids } if ids.is_empty() => {
            Err(BadInput("name at least one patch".into()).into())
        }
        PatchesCmd::Mark { ids } => mark(ctx, &ids, true),
        PatchesCmd::Unmark { ids } => mark(ctx, &ids, false),
        PatchesCmd::Import { file, mark } => {
            let (config, mut store) = open(ctx)?;
            let bundles = BundlesConfig::from_extra(&config.extra).context("config [bundles]")?;
            let keys = bundles.load_trusted_keys().context("config [bundles]")?;
            if keys.is_empty() {
                return Err(BadInput(format!(
                    "no trusted keys: add `trusted_keys = [\"/path/key.pub\"]` to [bundles] in {}",
                    config.path.display()
                ))
                .into());
            }
            let verified = verify_bundle(&file, &keys, &bundles.limits)
                .with_context(|| format!("bundle {} is not imported", file.display()))?;
            let m = verified.manifest();
            if store.patch(m.id.as_str())?.is_some() {
                return Err(BadInput(format!(
                    "patch {} is already in the patch table; bundle ids are unique",
                    m.id
                ))
                .into());
            }
            let dir = bundle_store_dir(&config);
            fs::create_dir_all(&dir)?;
            let dest = dir.join(format!("{}.po", verified.sha256()));
            copy_verified(&file, &dest)?;
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
            if ctx.quiet {
            } else if ctx.json {
                println!("{}", row_json(&row));
            } else {
                println!(
                    "imported {} ({}, {}) signed by key {}{}",
                    row.id,
                    row.category,
                    row.severity,
                    verified.key_id(),
                    if mark {
                        ", marked for the next run"
                    } else {
                        ""
                    }
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Copies the bundle and its signature; the copy is what later runs use, so a change to the
/// original after the import changes nothing.
fn copy_verified(src: &std::path::Path, dest: &std::path::Path) -> anyhow::Result<()> {
    let sig_src = patchover_bundle::keys::signature_path(src);
    let sig_dest = patchover_bundle::keys::signature_path(dest);
    fs::copy(src, dest).with_context(|| format!("copying {} into the store", src.display()))?;
    fs::copy(&sig_src, &sig_dest)
        .with_context(|| format!("copying {} into the store", sig_src.display()))?;
    Ok(())
}

fn mark(ctx: &Ctx, ids: &[String], on: bool) -> anyhow::Result<ExitCode> {
    let (_, mut store) = open(ctx)?;
    // All or nothing: check every id before changing any.
    for id in ids {
        if store.patch(id)?.is_none() {
            return Err(BadInput(format!(
                "no patch {id:?}; nothing was changed (see `patchover patches list`)"
            ))
            .into());
        }
    }
    for id in ids {
        store.mark_patch(id, on)?;
    }
    if ctx.json {
        println!("{}", json!({"marked": on, "ids": ids}));
    } else {
        println!(
            "{} {}",
            if on { "marked" } else { "unmarked" },
            ids.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}
