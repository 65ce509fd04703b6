//! One file per CLI verb group.

pub mod approval;
pub mod bench;
pub mod bench_copy;
pub mod bench_cycle;
pub mod bench_feed;
pub mod bench_soak;
pub mod bench_switch;
pub mod bundle;
pub mod config;
pub mod demo;
pub mod disk;
pub mod docgen;
pub mod doctor;
pub mod feed;
pub mod image;
pub mod internal;
pub mod lc;
pub mod load;
pub mod monitor;
pub mod net;
pub mod patch;
pub mod patches;
pub mod remote;
pub mod runview;
pub mod scrape;
pub mod serve;
pub mod status;

use std::path::PathBuf;

use anyhow::Context;
use patchover_core::{Config, HostFacts};

/// The global flags, handed to every verb.
#[derive(Clone)]
pub struct Ctx {
    pub config_path: PathBuf,
    pub json: bool,
    /// Print nothing on success (a verb called by another verb).
    pub quiet: bool,
    /// Act in this process even when a daemon answers on its socket (see [`remote`]).
    pub direct: bool,
}

impl Ctx {
    /// Loads and validates the config. Verbs that do not need one never call this.
    pub fn config(&self) -> anyhow::Result<Config> {
        Config::load(&self.config_path, &HostFacts::probe()).context("config")
    }
}

pub use patchover_app::AppError::BadInput;
pub use patchover_app::Env;

/// The kind of an error at the edge: the first cause in its chain that has one.
pub fn error_kind(e: &anyhow::Error) -> patchover_app::ErrorKind {
    e.chain()
        .find_map(patchover_app::ErrorKind::of_cause)
        .unwrap_or(patchover_app::ErrorKind::Internal)
}

impl Ctx {
    /// The config, the store and the LC backends.
    pub fn env(&self) -> anyhow::Result<Env> {
        Ok(Env::open(self.config()?)?)
    }
}

/// Renders an aligned text table.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(header.to_vec(), &mut out);
    for r in rows {
        line(r.iter().map(String::as_str).collect(), &mut out);
    }
    out
}
