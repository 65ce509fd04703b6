//! `patchover patches …`: the patch table (seed fig. 6).
//!
//! Every verb goes through the daemon when one runs (see [`remote`]): the operations of
//! [`patchover_app::patches`] are called here or by the daemon, and one printer per verb
//! renders their typed results.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use patchover_app::patches::{self, Imported, Marked};
use patchover_store::{PatchRow, Store};
use serde_json::json;

use super::{Ctx, remote};

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

fn open(ctx: &Ctx) -> anyhow::Result<(patchover_core::Config, Store)> {
    let config = ctx.config()?;
    let store = Store::open(&config.store_path())?;
    Ok((config, store))
}

fn ms_text(ms: Option<i64>) -> String {
    ms.and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
        .map_or("-".to_owned(), |t| t.strftime("%Y-%m-%d %H:%M").to_string())
}

pub fn run(cmd: PatchesCmd, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    match cmd {
        PatchesCmd::List => {
            let v: Vec<PatchRow> = remote::route_typed(
                ctx,
                |c| remote::call(c, "GET", "/v1/patches", None),
                || Ok(patches::list(&open(ctx)?.1)?),
            )?;
            print_list(ctx, &v)?;
        }
        PatchesCmd::Show { id } => {
            let v: PatchRow = remote::route_typed(
                ctx,
                |c| {
                    let path = format!("/v1/patches/{}", remote::segment(&id));
                    remote::call(c, "GET", &path, None)
                },
                || Ok(patches::show(&open(ctx)?.1, &id)?),
            )?;
            print_show(ctx, &v)?;
        }
        PatchesCmd::Mark { ids } => mark_cmd(ctx, ids, true)?,
        PatchesCmd::Unmark { ids } => mark_cmd(ctx, ids, false)?,
        PatchesCmd::Import { file, mark } => {
            // The daemon reads the file itself: it gets the path as this process sees it.
            let file = std::path::absolute(&file)
                .with_context(|| format!("cannot resolve {}", file.display()))?;
            let v: Imported = remote::route_typed(
                ctx,
                |c| {
                    let body = json!({"file": file, "mark": mark});
                    remote::call(c, "POST", "/v1/patches", Some(&body))
                },
                || {
                    let (config, mut store) = open(ctx)?;
                    Ok(patches::import(&config, &mut store, &file, mark)?)
                },
            )?;
            if ctx.quiet {
            } else if ctx.json {
                println!("{}", serde_json::to_value(&v)?);
            } else {
                println!(
                    "imported {} ({}, {}) signed by key {}{}",
                    v.row.id,
                    text(&v.row.category),
                    v.row.severity,
                    v.key_id,
                    if v.row.apply_next {
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
    let v: Marked = remote::route_typed(
        ctx,
        |c| {
            let body = json!({"ids": ids, "apply_next": on});
            remote::call(c, "POST", "/v1/patch-marks", Some(&body))
        },
        || Ok(patches::mark(&mut open(ctx)?.1, &ids, on)?),
    )?;
    if ctx.quiet {
    } else if ctx.json {
        println!("{}", serde_json::to_value(&v)?);
    } else {
        println!(
            "{} {}",
            if v.marked { "marked" } else { "unmarked" },
            v.ids.join(", ")
        );
    }
    Ok(())
}

/// A typed value as table text, as its JSON shows it: strings as they are, null as `-`.
fn text<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v).unwrap_or_default() {
        serde_json::Value::Null => "-".to_owned(),
        serde_json::Value::String(s) => s,
        v => v.to_string(),
    }
}

fn yes_no(v: bool) -> String {
    if v { "yes" } else { "no" }.to_owned()
}

fn print_list(ctx: &Ctx, v: &[PatchRow]) -> anyhow::Result<()> {
    if ctx.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::to_value(v)?)?
        );
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
        .iter()
        .map(|r| {
            vec![
                r.id.clone(),
                text(&r.category),
                r.severity.clone(),
                r.published.clone(),
                yes_no(r.apply_next),
                ms_text(r.applied_ms),
                text(&r.applied_lc),
                text(&r.last_result),
            ]
        })
        .collect();
    print!("{}", super::table(&header, &rows));
    Ok(())
}

fn print_show(ctx: &Ctx, v: &PatchRow) -> anyhow::Result<()> {
    if ctx.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::to_value(v)?)?
        );
        return Ok(());
    }
    for (k, f) in [
        ("id", v.id.clone()),
        ("title", v.title.clone()),
        ("category", text(&v.category)),
        ("severity", v.severity.clone()),
        ("published", v.published.clone()),
        ("sha256", v.sha256.clone()),
        ("file", v.file.clone()),
        ("next run", yes_no(v.apply_next)),
        ("applied", ms_text(v.applied_ms)),
        ("applied on", text(&v.applied_lc)),
        ("last result", text(&v.last_result)),
    ] {
        println!("{k:>12}  {f}");
    }
    if let Some(out) = &v.last_output {
        println!("\n{out}");
    }
    Ok(())
}
