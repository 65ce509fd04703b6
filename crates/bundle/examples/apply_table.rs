//! The agent's boot-time flow (seed fig. 12) in one small program, as a reference for the
//! in-LC agent and as a check that the verify + apply parts link statically:
//!
//! ```text
//! RUSTFLAGS="-C target-feature=+crt-static" cargo build -p patchover-bundle \
//!     --no-default-features --target x86_64-unknown-linux-gnu --example apply_table
//! apply_table AGENT_DIR ROOT      # e.g. apply_table /var/lib/patchover-agent /
//! ```
//!
//! Reads `AGENT_DIR/table.json` (1201), verifies the marked bundles in `AGENT_DIR/bundles`
//! against `AGENT_DIR/keys/*.pub` (1202), applies them under ROOT (1203-1204), writes each
//! result into the table (1205) and prints the report as JSON (1207). Exit code 0 only if all
//! marked bundles applied.

use std::path::Path;
use std::process::ExitCode;

use patchover_bundle::apply::{ApplyOptions, ApplyReport, apply_bundles};
use patchover_bundle::table::{
    BUNDLES_DIR, KEYS_DIR, TABLE_FILE, read_table, verification_failure_results, verify_marked,
    write_table,
};
use patchover_bundle::{Limits, TrustedKeys};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let [_, agent_dir, root] = &args[..] else {
        eprintln!("usage: apply_table AGENT_DIR ROOT");
        return ExitCode::from(2);
    };
    match run(Path::new(agent_dir), Path::new(root)) {
        Ok(report) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&report).unwrap_or_default()
            );
            if report.all_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(agent_dir: &Path, root: &Path) -> Result<ApplyReport, String> {
    let table_path = agent_dir.join(TABLE_FILE);
    let mut table = read_table(&table_path).map_err(|e| e.to_string())?;
    let keys = TrustedKeys::from_dir(&agent_dir.join(KEYS_DIR)).map_err(|e| e.to_string())?;
    let bundles = match verify_marked(
        &table,
        &agent_dir.join(BUNDLES_DIR),
        &keys,
        &Limits::default(),
    ) {
        Ok(b) => b,
        Err(e) => {
            let results = verification_failure_results(&table, &e);
            for r in &results {
                table.record(r);
            }
            write_table(&table_path, &table).map_err(|e| e.to_string())?;
            return Ok(ApplyReport { bundles: results });
        }
    };
    let opts = ApplyOptions::new(root, agent_dir.join("work"));
    let mut write_err = None;
    let report = apply_bundles(&opts, &bundles, &mut |r| {
        table.record(r);
        if let Err(e) = write_table(&table_path, &table) {
            write_err = Some(e.to_string());
        }
    });
    match write_err {
        Some(e) => Err(e),
        None => Ok(report),
    }
}
