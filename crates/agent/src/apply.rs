//! The patch execution script's body (seed fig. 12), run at boot by the script patchover
//! installs among the LC's boot scripts (fig. 11):
//!
//! 1201 read the table copy → 1202 pick the marked patches → 1203/1204 verify and apply each,
//! in order, with the OS's own programs → 1205 record each result in the table copy →
//! 1206 when all are done, write the report → 1207 the patch manager asks for it over the
//! agent channel (`report`).
//!
//! The script runs at every boot, also after the reboot that follows the patching (step 708):
//! a report already written for the same run means "done", and nothing is applied twice.

use std::path::{Path, PathBuf};

use patchover_bundle::table::{
    BUNDLES_DIR, KEYS_DIR, TABLE_FILE, verification_failure_results, verify_marked,
};
use patchover_bundle::{
    ApplyOptions, ApplyReport, Limits, TrustedKeys, apply_bundles, read_table, write_table,
};
use serde::{Deserialize, Serialize};

/// The report file, next to the table copy.
pub const REPORT_FILE: &str = "report.json";

/// What the agent reports (1207): the run it belongs to and every marked bundle's result.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PatchReport {
    pub run_id: String,
    pub lc: String,
    pub all_ok: bool,
    #[serde(flatten)]
    pub report: ApplyReport,
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyScriptError {
    #[error("the table copy")]
    Table(#[source] patchover_bundle::TableError),
    #[error("cannot read the trusted keys in {path}")]
    Keys {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the trusted keys")]
    Key(#[source] patchover_bundle::KeyError),
    #[error("cannot write the report {path}")]
    Report {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Runs the script over the agent directory `dir` (the LC's `/var/lib/patchover-agent`),
/// patching the tree at `root` (`/` inside the LC). Returns the report, new or found.
pub fn apply_patches(dir: &Path, root: &Path) -> Result<PatchReport, ApplyScriptError> {
    let table_path = dir.join(TABLE_FILE);
    let mut table = read_table(&table_path).map_err(ApplyScriptError::Table)?;
    let report_path = dir.join(REPORT_FILE);
    if let Ok(bytes) = std::fs::read(&report_path)
        && let Ok(done) = serde_json::from_slice::<PatchReport>(&bytes)
        && done.run_id == table.run_id
    {
        return Ok(done);
    }
    let keys = load_keys(&dir.join(KEYS_DIR))?;
    let limits = Limits::default();
    let report = match verify_marked(&table, &dir.join(BUNDLES_DIR), &keys, &limits) {
        Err(e) => {
            let results = verification_failure_results(&table, &e);
            for r in &results {
                table.record(r);
            }
            ApplyReport { bundles: results }
        }
        Ok(bundles) => {
            let opts = ApplyOptions::new(root, dir.join("work"));
            let mut recorded = Vec::new();
            let report = apply_bundles(&opts, &bundles, &mut |r| {
                // 1205: each result is in the table copy as soon as it is known.
                table.record(r);
                if let Err(e) = write_table(&table_path, &table) {
                    eprintln!("patchover-agent: cannot record {}: {e}", r.id);
                }
                recorded.push(r.id.clone());
            });
            let _ = std::fs::remove_dir_all(dir.join("work"));
            report
        }
    };
    write_table(&table_path, &table).map_err(ApplyScriptError::Table)?;
    let out = PatchReport {
        run_id: table.run_id.clone(),
        lc: table.lc.clone(),
        all_ok: report.all_ok(),
        report,
    };
    let bytes = serde_json::to_vec_pretty(&out).expect("report serializes");
    let tmp = report_path.with_extension("json.tmp");
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &report_path)
    };
    write().map_err(|source| ApplyScriptError::Report {
        path: report_path.clone(),
        source,
    })?;
    Ok(out)
}

fn load_keys(dir: &Path) -> Result<TrustedKeys, ApplyScriptError> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| ApplyScriptError::Keys {
            path: dir.to_owned(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "pub"))
        .collect();
    paths.sort();
    TrustedKeys::from_files(&paths).map_err(ApplyScriptError::Key)
}

/// The post-checks of every bundle in the table copy whose result is `ok` (step 709, after
/// the reboot of step 708).
pub fn post_checks(
    dir: &Path,
    root: &Path,
) -> Result<patchover_bundle::PostCheckReport, ApplyScriptError> {
    let table = read_table(&dir.join(TABLE_FILE)).map_err(ApplyScriptError::Table)?;
    let keys = load_keys(&dir.join(KEYS_DIR))?;
    let bundles = verify_marked(&table, &dir.join(BUNDLES_DIR), &keys, &Limits::default())
        .map_err(ApplyScriptError::Table)?;
    Ok(patchover_bundle::run_post_checks(
        root,
        bundles.iter().map(|b| b.manifest()),
    ))
}
